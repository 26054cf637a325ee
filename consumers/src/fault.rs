//! Fault points for crash drills: the process aborts at a chosen point of a record's processing.
//!
//! ```text
//!  record ─▶ [before_effect] ─▶ BEGIN; dedup row; external call ─▶ [after_external_call]
//!         ─▶ DB effect; COMMIT ─▶ [after_db_commit] ─▶ offset stored ─▶ offset committed
//! ```
//!
//! Disabled unless the environment variable `CONSUMER_FAULTS` is set, e.g.
//! `CONSUMER_FAULTS=before_effect=0.01,after_external_call=0.02,after_db_commit=0.01`: each point
//! aborts the process with that probability per record. `std::process::abort` is the closest a
//! process can come to `kill -9` on itself: no destructor runs, no buffered offset is committed,
//! no connection is closed politely.

use std::fmt;

/// Where a drill can crash the consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// Before anything happened for the record.
    BeforeEffect,
    /// After the external call (the gateway charged) but before the database commit.
    AfterExternalCall,
    /// After the database commit but before the offset is stored and committed.
    AfterDbCommit,
}

impl FaultPoint {
    pub const ALL: [FaultPoint; 3] = [
        FaultPoint::BeforeEffect,
        FaultPoint::AfterExternalCall,
        FaultPoint::AfterDbCommit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FaultPoint::BeforeEffect => "before_effect",
            FaultPoint::AfterExternalCall => "after_external_call",
            FaultPoint::AfterDbCommit => "after_db_commit",
        }
    }

    fn index(self) -> usize {
        match self {
            FaultPoint::BeforeEffect => 0,
            FaultPoint::AfterExternalCall => 1,
            FaultPoint::AfterDbCommit => 2,
        }
    }
}

impl fmt::Display for FaultPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The environment variable that enables fault points.
pub const FAULTS_ENV: &str = "CONSUMER_FAULTS";

/// `CONSUMER_FAULTS` does not parse.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{FAULTS_ENV}: {0} (expected e.g. before_effect=0.01,after_external_call=0.02,after_db_commit=0.01)")]
pub struct FaultSpecError(String);

/// The probability of an abort at each fault point; all zero unless enabled explicitly.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    rates: [f64; 3],
}

impl Faults {
    /// No faults.
    pub fn none() -> Faults {
        Faults::default()
    }

    /// From `CONSUMER_FAULTS`; none when it is unset or empty.
    pub fn from_env() -> Result<Faults, FaultSpecError> {
        match std::env::var(FAULTS_ENV) {
            Ok(spec) => Faults::parse(&spec),
            Err(std::env::VarError::NotPresent) => Ok(Faults::none()),
            Err(std::env::VarError::NotUnicode(_)) => Err(FaultSpecError("not valid UTF-8".into())),
        }
    }

    /// `point=probability` pairs separated by commas.
    pub fn parse(spec: &str) -> Result<Faults, FaultSpecError> {
        let mut faults = Faults::none();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, rate) = part
                .split_once('=')
                .ok_or_else(|| FaultSpecError(format!("{part:?} has no '='")))?;
            let point = FaultPoint::ALL
                .into_iter()
                .find(|p| p.as_str() == name.trim())
                .ok_or_else(|| FaultSpecError(format!("unknown fault point {name:?}")))?;
            let rate: f64 = rate
                .trim()
                .parse()
                .map_err(|_| FaultSpecError(format!("{rate:?} is not a number")))?;
            if !(0.0..=1.0).contains(&rate) {
                return Err(FaultSpecError(format!("{rate} is not a probability")));
            }
            faults.rates[point.index()] = rate;
        }
        Ok(faults)
    }

    pub fn rate(&self, point: FaultPoint) -> f64 {
        self.rates[point.index()]
    }

    pub fn enabled(&self) -> bool {
        self.rates.iter().any(|r| *r > 0.0)
    }

    /// Aborts the process with the point's probability.
    pub fn hit(&self, point: FaultPoint) {
        let rate = self.rate(point);
        if rate > 0.0 && rand::random::<f64>() < rate {
            // stderr directly: the log pipeline may buffer, and the line must precede the abort.
            eprintln!("{FAULTS_ENV}: fault point {point} fired, aborting the process");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_spec() {
        let f = Faults::parse("before_effect=0.5, after_db_commit=1").unwrap();
        assert_eq!(f.rate(FaultPoint::BeforeEffect), 0.5);
        assert_eq!(f.rate(FaultPoint::AfterExternalCall), 0.0);
        assert_eq!(f.rate(FaultPoint::AfterDbCommit), 1.0);
        assert!(f.enabled());
        assert!(!Faults::parse("").unwrap().enabled());
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(Faults::parse("before_effect").is_err());
        assert!(Faults::parse("sideways=0.1").is_err());
        assert!(Faults::parse("before_effect=x").is_err());
        assert!(Faults::parse("before_effect=1.5").is_err());
    }

    #[test]
    fn disabled_points_never_fire() {
        // A zero rate returns without touching the random generator or aborting.
        let f = Faults::none();
        for p in FaultPoint::ALL {
            f.hit(p);
        }
    }
}
