//! `pg_snapshot` values (`xmin:xmax:xip,...`, as `pg_current_snapshot()::text` prints them) and
//! the visibility rule Postgres applies to them, so the relay can tell, for a transaction id
//! (`xid8`) seen on the replication stream, whether its rows were visible to a snapshot taken
//! earlier (the first start's backfill read them from the table then).

use std::collections::BTreeSet;

/// A snapshot: transactions below `xmin` had finished, those from `xmax` on had not started,
/// and of those in between the ones in `xip` were still in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    pub xip: BTreeSet<u64>,
}

/// The text is not a `pg_snapshot`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a pg_snapshot (expected xmin:xmax:xip,...): {0}")]
pub struct SnapshotError(String);

impl Snapshot {
    /// Parses `xmin:xmax:xip1,xip2,...` (the list may be empty). Never panics.
    pub fn parse(text: &str) -> Result<Snapshot, SnapshotError> {
        let bad = |why: &str| SnapshotError(why.to_owned());
        let mut parts = text.trim().splitn(3, ':');
        let num = |s: Option<&str>, what: &str| {
            s.and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| bad(what))
        };
        let xmin = num(parts.next(), "xmin")?;
        let xmax = num(parts.next(), "xmax")?;
        let list = parts.next().ok_or_else(|| bad("no xip list"))?;
        let mut xip = BTreeSet::new();
        for x in list.split(',').filter(|x| !x.is_empty()) {
            let x = x.parse::<u64>().map_err(|_| bad("xip"))?;
            if x < xmin || x >= xmax {
                return Err(bad("an xip outside xmin..xmax"));
            }
            xip.insert(x);
        }
        if xmax < xmin {
            return Err(bad("xmax below xmin"));
        }
        Ok(Snapshot { xmin, xmax, xip })
    }

    /// Whether a transaction's effects were visible in this snapshot (it had committed when
    /// the snapshot was taken): `pg_visible_in_snapshot`'s rule, for committed transactions.
    pub fn visible(&self, txid: u64) -> bool {
        txid < self.xmin || (txid < self.xmax && !self.xip.contains(&txid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_applies_the_visibility_rule() {
        let s = Snapshot::parse("100:110:102,105").unwrap();
        assert!(s.visible(99));
        assert!(s.visible(100) && s.visible(101) && s.visible(109));
        assert!(!s.visible(102) && !s.visible(105));
        assert!(!s.visible(110) && !s.visible(1_000));
        let empty = Snapshot::parse("7:7:").unwrap();
        assert!(empty.visible(6) && !empty.visible(7));
    }

    #[test]
    fn garbage_is_an_error() {
        for t in [
            "",
            "1",
            "1:2",
            "a:b:",
            "5:3:",
            "1:9:0",
            "1:9:10",
            "1:9:x",
            "1:9:2,,3,-1",
        ] {
            assert!(Snapshot::parse(t).is_err(), "{t:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(t in ".{0,40}") {
            let _ = Snapshot::parse(&t);
        }

        #[test]
        fn round_trips(xmin in 0u64..1_000_000, span in 0u64..100, picks in proptest::collection::vec(0u64..100, 0..10)) {
            let xmax = xmin + span;
            let xip: BTreeSet<u64> = picks.into_iter().filter(|p| *p < span).map(|p| xmin + p).collect();
            let text = format!("{xmin}:{xmax}:{}", xip.iter().map(u64::to_string).collect::<Vec<_>>().join(","));
            let s = Snapshot::parse(&text).unwrap();
            proptest::prop_assert_eq!(s.xip, xip);
        }
    }
}
