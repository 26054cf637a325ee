//! Slot safety against the real stack: the slot metrics of a running `relay cdc`, every metric
//! the alert rules name exported by it, `/readyz` saying why the relay cannot stream while the
//! metrics keep coming, and `relay status` (read-only: the running relay is not fenced).

use crate::cdc::{insert_event, sample, Harness};
use crate::support::kafka;
use crate::support::pg::TestDb;
use crate::support::process::{RelayEnv, RelayProc};
use relay::replication::Lsn;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The alert rules: (alert name, expr, runbook_url) of every rule in alerts/*.rules.yml.
fn alert_rules() -> Vec<(String, String, String)> {
    let mut rules = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("alerts"))
        .expect("alerts/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.to_string_lossy().ends_with(".rules.yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no alerts/*.rules.yml");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("rule file");
        let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
        for group in doc["groups"].as_sequence().expect("groups") {
            for rule in group["rules"].as_sequence().expect("rules") {
                let text = |k: &str| rule[k].as_str().unwrap_or_default().to_owned();
                rules.push((
                    text("alert"),
                    text("expr"),
                    rule["annotations"]["runbook_url"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                ));
            }
        }
    }
    rules
}

/// The `relay_*` metric names a PromQL expression uses (identifiers outside string literals).
fn relay_metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut chars = expr.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '"' || c == '\'' {
            // Skip a string literal (label values are not metric names).
            while let Some((_, d)) = chars.next() {
                if d == '\\' {
                    chars.next();
                } else if d == c {
                    break;
                }
            }
        } else if c.is_ascii_alphabetic() || c == '_' {
            let mut end = i + c.len_utf8();
            while let Some(&(j, d)) = chars.peek() {
                if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                    end = j + d.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            let ident = &expr[i..end];
            if ident.starts_with("relay_") {
                names.insert(ident.to_owned());
            }
        }
    }
    names
}

#[test]
fn metric_names_are_read_from_expressions() {
    let names = relay_metric_names(
        "sum by (relay) (increase(relay_dlq_records_total{relay=\"relay_x\"}[5m])) \
         / on(instance) relay_up > 0 and up{job='outbox-relay'} == 0",
    );
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(names, ["relay_dlq_records_total", "relay_up"]);
}

/// GitHub's anchor of a Markdown heading: lower case, spaces to dashes, punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Every alert's runbook_url points at a section of RUNBOOK.md that exists, and every alert
/// has one.
#[test]
fn every_alert_has_a_runbook_section() {
    let runbook = std::fs::read_to_string(repo_root().join("RUNBOOK.md")).expect("RUNBOOK.md");
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect();
    let rules = alert_rules();
    assert!(rules.len() >= 15, "only {} alerts", rules.len());
    for (alert, _, url) in &rules {
        let (_, fragment) = url
            .split_once("RUNBOOK.md#")
            .unwrap_or_else(|| panic!("{alert}: runbook_url {url:?} is not RUNBOOK.md#<section>"));
        assert!(
            anchors.contains(fragment),
            "{alert}: RUNBOOK.md has no section #{fragment}"
        );
    }
}

impl Harness {
    /// The relay's environment for these tests: slot metrics every second.
    fn watch_env(&self) -> RelayEnv {
        let mut env = self.env();
        env.set("RELAY_SLOT_WATCH__INTERVAL", "1s");
        env
    }
}

/// Polls the relay's /metrics until `ready` holds for it (the relay must keep running).
async fn wait_metrics(
    relay: &mut RelayProc,
    env: &RelayEnv,
    what: &str,
    ready: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    let addr = Harness::http_listen(env);
    loop {
        if let Some(st) = relay.try_status() {
            panic!("relay exited ({st}) before {what}:\n{}", relay.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "no {what} in 90 s:\n{}\n{}",
            Harness::metrics(env).await,
            relay.log_text()
        );
        // The relay binds http.listen only once it has read its configuration.
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            let m = Harness::metrics(env).await;
            if ready(&m) {
                return m;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The value of `name{slot="<slot>"}` in a metrics text.
fn get_in(metrics: &str, name: &str, slot: &str) -> Option<f64> {
    sample(metrics, &format!("{name}{{slot=\"{slot}\"}}"))
}

/// A live `relay cdc` exports every `relay_*` metric any alert expression names, and its slot
/// metrics describe its slot as Postgres does: it exists, it is the relay's own, reserved, held by
/// the relay's walsender, capped by the stack's max_slot_wal_keep_size (1GB).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_the_alerts_name_is_exported() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    // Another slot of the database, watched with slot_watch.all_slots.
    let other = format!("{}_other", h.slot);
    let c = h.client().await;
    c.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&other],
    )
    .await
    .unwrap();
    let mut env = h.watch_env();
    env.set("RELAY_SLOT_WATCH__ALL_SLOTS", "true");
    let mut relay = RelayProc::spawn(&["cdc"], &env);
    let slot = h.slot.clone();
    let active = format!("relay_slot_active{{slot=\"{slot}\"}}");
    let m = wait_metrics(&mut relay, &env, "an active slot", |m| {
        sample(m, "relay_ready") == Some(1.0)
            && sample(m, "relay_slot_watch_success") == Some(1.0)
            && sample(m, &active) == Some(1.0)
    })
    .await;
    let other_series = |name: &str| format!("{name}{{slot=\"{other}\"}}");
    assert_eq!(sample(&m, &other_series("relay_slot_own")), Some(0.0));
    assert_eq!(sample(&m, &other_series("relay_slot_exists")), Some(1.0));
    assert_eq!(sample(&m, &other_series("relay_slot_active")), Some(0.0));

    let rules = alert_rules();
    let mut used = BTreeSet::new();
    for (_, expr, _) in &rules {
        used.extend(relay_metric_names(expr));
    }
    let exported: BTreeSet<&str> = m
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = used
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    eprintln!(
        "{} alerts name {} relay metrics; the relay exports {} metric names",
        rules.len(),
        used.len(),
        exported.len()
    );
    assert!(used.len() >= 15, "the rules name only {used:?}");
    assert!(
        missing.is_empty(),
        "alert expressions name metrics the relay does not export: {missing:?}"
    );

    let get = |name: &str| get_in(&m, name, &slot);
    let slot_lines: Vec<&str> = m.lines().filter(|l| l.starts_with("relay_slot")).collect();
    assert_eq!(get("relay_slot_exists"), Some(1.0), "{slot_lines:#?}");
    assert_eq!(get("relay_slot_own"), Some(1.0), "{slot_lines:#?}");
    // One wal_status at a time. Healthy is reserved, or extended when other work on the shared
    // cluster (the load tests running beside this one) has WAL past max_wal_size.
    let status = |w: &str| {
        sample(
            &m,
            &format!("relay_slot_wal_status{{slot=\"{slot}\",wal_status=\"{w}\"}}"),
        )
    };
    let values: Vec<Option<f64>> = ["reserved", "extended", "unreserved", "lost"]
        .iter()
        .map(|w| status(w))
        .collect();
    assert_eq!(
        values.iter().flatten().sum::<f64>(),
        1.0,
        "one status: {slot_lines:#?}"
    );
    assert_eq!(
        status("reserved").unwrap_or(0.0) + status("extended").unwrap_or(0.0),
        1.0,
        "{slot_lines:#?}"
    );
    assert_eq!(
        sample(&m, "relay_postgres_max_slot_wal_keep_size_bytes"),
        Some(1024.0 * 1024.0 * 1024.0)
    );
    let pid = get("relay_slot_active_pid").expect("active pid");
    let walsender: i32 = h
        .client()
        .await
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        pid,
        f64::from(walsender),
        "the pid Postgres shows for the slot"
    );
    assert!(get("relay_slot_retained_wal_bytes").is_some_and(|b| b >= 0.0));
    assert!(get("relay_slot_safe_wal_size_bytes").is_some_and(|b| b > 0.0));

    // A watched slot that is dropped loses its series; the relay's own keeps its.
    c.execute("SELECT pg_drop_replication_slot($1)", &[&other])
        .await
        .unwrap();
    let m = wait_metrics(&mut relay, &env, "the dropped slot's series gone", |m| {
        !m.contains(&format!("slot=\"{other}\""))
    })
    .await;
    assert_eq!(get_in(&m, "relay_slot_exists", &slot), Some(1.0));
    let st = relay.terminate(Duration::from_secs(20)).expect("exit");
    assert!(st.success(), "{}", relay.log_text());
}

/// While another process streams the relay's slot, the relay cannot stream: /readyz answers 503
/// and names the slot and the holder's pid, and the slot metrics keep coming from the watcher's
/// own connection (watch success 1, the holder's pid). Once the holder lets go, the relay streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_names_the_process_holding_the_slot_and_metrics_keep_coming() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    h.create_slot().await;
    let (holder, holder_pid) = h.hold_slot().await;
    let env = h.watch_env();
    let mut relay = RelayProc::spawn(&["cdc"], &env);
    let pid_series = format!("relay_slot_active_pid{{slot=\"{}\"}}", h.slot);
    let m = wait_metrics(&mut relay, &env, "the holder's pid", |m| {
        sample(m, &pid_series) == Some(f64::from(holder_pid))
            && sample(m, "relay_slot_watch_success") == Some(1.0)
    })
    .await;
    assert_eq!(sample(&m, "relay_ready"), Some(0.0), "not streaming");
    let deadline = Instant::now() + Duration::from_secs(30);
    let readyz = loop {
        let r = Harness::http_get(&env, "/readyz").await;
        if r.contains("held by process") {
            break r;
        }
        assert!(Instant::now() < deadline, "/readyz says no holder: {r}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(readyz.starts_with("HTTP/1.1 503"), "{readyz}");
    assert!(
        readyz.contains(&format!("slot {} is held by process {holder_pid}", h.slot)),
        "{readyz}"
    );
    assert!(readyz.contains("reconnecting after:"), "{readyz}");

    holder.finish().await.unwrap();
    let id = insert_event(&h.client().await, "w-1").await;
    h.wait_caught_up(&mut relay, Duration::from_secs(90)).await;
    let readyz = Harness::http_get(&env, "/readyz").await;
    assert!(readyz.starts_with("HTTP/1.1 200"), "{readyz}");
    let st = relay.terminate(Duration::from_secs(20)).expect("exit");
    assert!(st.success(), "{}", relay.log_text());
    assert_eq!(h.copies_of(id).await, 1);
}

/// Runs `relay status` with the relay's environment; (exit code, output).
fn status(env: &RelayEnv) -> (i32, String) {
    let mut p = RelayProc::spawn(&["status"], env);
    let st = p
        .wait_exit(Duration::from_secs(90))
        .expect("relay status exits");
    (st.code().unwrap_or(-1), p.log_text())
}

/// `relay status` before the first start (would create the slot), while the relay runs (the
/// slot held by its walsender, the checkpoint it committed last, and the running relay is not
/// fenced: it relays an event afterwards, once), after a graceful stop (would resume at the
/// checkpoint), and after the slot was dropped (would refuse, exit 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_status_reports_slot_checkpoint_and_restart() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    let env = h.watch_env();

    let (code, out) = status(&env);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("slot {}: does not exist", h.slot)),
        "{out}"
    );
    assert!(out.contains("): none"), "no checkpoint yet: {out}");
    assert!(
        out.contains(&format!("restart: would create slot {}", h.slot)),
        "{out}"
    );

    // Rows committed before the relay's first start are not in its slot's stream: start first.
    let c = h.client().await;
    let mut relay = h.spawn();
    h.wait_caught_up(&mut relay, Duration::from_secs(90)).await;
    let first = insert_event(&c, "s-1").await;
    h.wait_caught_up(&mut relay, Duration::from_secs(90)).await;
    // Heartbeats move the checkpoint on every second: the one status reads lies between the
    // last one before it and the last one after it.
    let before = Lsn(h.last_checkpoint_end().await);
    let (code, out) = status(&env);
    let after = Lsn(h.last_checkpoint_end().await);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("state: wal_status ") && out.contains(", active (process"),
        "{out}"
    );
    let shown: Lsn = out
        .split_once("): end_lsn ")
        .and_then(|(_, rest)| rest.split(',').next())
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("no checkpoint end_lsn in {out}"));
    assert!(
        before <= shown && shown <= after,
        "status shows checkpoint {shown}, committed were {before} then {after}: {out}"
    );
    assert!(
        out.contains("restart: the slot is held by process"),
        "{out}"
    );
    assert!(out.contains("max_slot_wal_keep_size 1.0 GiB"), "{out}");

    // The status read did not fence the running relay: it goes on relaying.
    let second = insert_event(&c, "s-2").await;
    h.wait_caught_up(&mut relay, Duration::from_secs(90)).await;
    assert!(relay.try_status().is_none(), "{}", relay.log_text());
    let st = relay.terminate(Duration::from_secs(20)).expect("exit");
    assert!(st.success(), "{}", relay.log_text());
    assert!(!relay.log_text().contains("fenced"), "{}", relay.log_text());
    assert_eq!(h.copies_of(first).await, 1);
    assert_eq!(h.copies_of(second).await, 1);

    let cp = Lsn(h.last_checkpoint_end().await);
    let (code, out) = status(&env);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(", inactive"), "{out}");
    assert!(
        out.contains(&format!(
            "restart: would resume streaming at {cp}, dropping transactions committed before {cp}"
        )),
        "{out}"
    );

    c.execute("SELECT pg_drop_replication_slot($1)", &[&h.slot])
        .await
        .unwrap();
    let (code, out) = status(&env);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("restart: would refuse to start"), "{out}");
    assert!(
        out.contains(&format!(
            "does not exist, but the relay's checkpoint in Kafka is at {cp}"
        )),
        "{out}"
    );
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(ok.success(), "kill -{sig} {pid}");
}

/// A frozen relay (SIGSTOP) exports nothing, so `relay watch-slots` watches its slot alone: while
/// the relay is stopped and events are written, the watcher (ready, reads succeeding) shows the
/// slot's unconfirmed lag growing and its confirmed position standing still; after SIGCONT the
/// relay catches up, the watcher sees the lag gone, and every event arrived once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_slots_sees_a_stalled_relay_fall_behind() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    let env = h.watch_env();
    let mut relay = RelayProc::spawn(&["cdc"], &env);
    h.wait_caught_up(&mut relay, Duration::from_secs(90)).await;
    let c = h.client().await;

    signal(relay.pid(), "STOP");
    let mut wenv = env.clone();
    wenv.set(
        "RELAY_HTTP__LISTEN",
        format!("127.0.0.1:{}", crate::support::process::free_port()),
    );
    let mut watcher = RelayProc::spawn(&["watch-slots"], &wenv);
    let lag = format!("relay_slot_confirmed_lag_bytes{{slot=\"{}\"}}", h.slot);
    let age = format!("relay_slot_confirmed_age_seconds{{slot=\"{}\"}}", h.slot);
    let mut ids = Vec::new();
    ids.push(insert_event(&c, "st-1").await);
    let m = wait_metrics(&mut watcher, &wenv, "lag behind a stopped relay", |m| {
        sample(m, &lag).is_some_and(|l| l > 0.0) && sample(m, &age).is_some_and(|a| a >= 2.0)
    })
    .await;
    let first_lag = sample(&m, &lag).unwrap_or_default();
    assert_eq!(sample(&m, "relay_slot_watch_success"), Some(1.0));
    assert_eq!(sample(&m, "relay_ready"), Some(1.0), "ready while it reads");
    for i in 2..=5 {
        ids.push(insert_event(&c, &format!("st-{i}")).await);
    }
    let m = wait_metrics(&mut watcher, &wenv, "growing lag", |m| {
        sample(m, &lag).is_some_and(|l| l > first_lag)
    })
    .await;
    eprintln!(
        "stopped relay: lag {first_lag} then {} bytes, confirmed position unchanged for {} s",
        sample(&m, &lag).unwrap_or_default(),
        sample(&m, &age).unwrap_or_default()
    );

    signal(relay.pid(), "CONT");
    h.wait_caught_up(&mut relay, Duration::from_secs(120)).await;
    wait_metrics(&mut watcher, &wenv, "the lag gone", |m| {
        sample(m, &age) == Some(0.0)
    })
    .await;
    let st = relay.terminate(Duration::from_secs(20)).expect("exit");
    assert!(st.success(), "{}", relay.log_text());
    let st = watcher.terminate(Duration::from_secs(20)).expect("exit");
    assert!(st.success(), "{}", watcher.log_text());
    for id in ids {
        assert_eq!(h.copies_of(id).await, 1, "event {id}");
    }
}

/// The start-up checks name the setting and the fix: on a cluster of the test's own with
/// `max_slot_wal_keep_size = -1` and `wal_sender_timeout = 0`, the relay warns about each and
/// still streams; with every other slot taken, it warns that no slot can be created; with a publication that does not publish
/// inserts it refuses to start (exit 1) and prints the ALTER PUBLICATION that fixes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn start_up_checks_name_the_setting_and_the_fix() {
    use crate::support::process::PgCluster;
    let pg = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
    let url = pg.url("postgres");
    relay::migrate::run(&url).await.expect("migrate");
    let h = Harness::new(url, kafka::bootstrap());
    let c = h.client().await;
    for sql in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = -1",
        "ALTER SYSTEM SET wal_sender_timeout = 0",
        "SELECT pg_reload_conf()",
    ] {
        c.batch_execute(sql).await.expect(sql);
    }
    let mut relay = RelayProc::spawn(&["cdc"], &h.watch_env());
    h.wait_caught_up(&mut relay, Duration::from_secs(90)).await;
    let st = relay.terminate(Duration::from_secs(20)).expect("exit");
    let log = relay.log_text();
    assert!(st.success(), "{log}");
    for needle in [
        "max_slot_wal_keep_size is unlimited (-1)",
        "Set max_slot_wal_keep_size (e.g. 1GB",
        "wal_sender_timeout = 0 (disabled)",
        "Set wal_sender_timeout (e.g. 60s",
        r#""server_version_num":150"#,
    ] {
        assert!(log.contains(needle), "no {needle:?} in:\n{log}");
    }

    // Every other slot taken (the stack's max_replication_slots is 16): the relay still streams
    // from its own, and warns that no slot can be created.
    let max: String = c
        .query_one("SHOW max_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    let max: usize = max.parse().unwrap();
    for i in 1..max {
        c.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&format!("filler_{i}")],
        )
        .await
        .unwrap();
    }
    let mut relay = RelayProc::spawn(&["cdc"], &h.watch_env());
    h.wait_caught_up(&mut relay, Duration::from_secs(90)).await;
    let st = relay.terminate(Duration::from_secs(20)).expect("exit");
    let log = relay.log_text();
    assert!(st.success(), "{log}");
    assert!(
        log.contains("max_replication_slots: every slot is in use, so no slot can be created"),
        "{log}"
    );

    c.batch_execute("ALTER PUBLICATION outbox_pub SET (publish = 'update, delete')")
        .await
        .unwrap();
    let mut relay = RelayProc::spawn(&["cdc"], &h.watch_env());
    let st = relay
        .wait_exit(Duration::from_secs(60))
        .expect("the relay exits by itself");
    let log = relay.log_text();
    assert_eq!(st.code(), Some(1), "{log}");
    assert!(
        log.contains(
            "does not publish inserts; run: ALTER PUBLICATION outbox_pub SET (publish = 'insert')"
        ),
        "{log}"
    );
}
