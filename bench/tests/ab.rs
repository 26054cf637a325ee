//! A short `relay-bench ab` run at tiny rates: the report files exist and parse, there is a row
//! per contender and rate, and every event written was delivered exactly once. No timing is
//! asserted: the figures are the bench's business, not the test's.

use std::path::PathBuf;
use std::process::Command;

/// The relay binary the bench starts: `RELAY_BIN`, else the workspace's debug build (which
/// `cargo test --workspace` has built for the relay's own tests), built here if missing.
fn relay_bin() -> PathBuf {
    if let Ok(p) = std::env::var("RELAY_BIN") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the bench crate lives in the workspace")
        .to_path_buf();
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let bin = target.join("debug").join("relay");
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "relay", "--bin", "relay"])
            .current_dir(&root)
            .status()
            .expect("run cargo build -p relay");
        assert!(status.success(), "cargo build -p relay failed");
    }
    bin
}

#[test]
fn ab_at_tiny_rates_delivers_every_event_once_and_writes_its_report() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_relay-bench"))
        .args([
            "ab",
            "--contenders",
            "cdc,poll",
            "--rates",
            "20,50",
            "--duration",
            "3s",
            "--writers",
            "2",
            "--drain-timeout",
            "60s",
            // A short warm-up: exercised, and not counted in the phase's figures.
            "--warmup",
            "1s",
        ])
        .arg("--relay-bin")
        .arg(relay_bin())
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("run relay-bench");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "relay-bench ab failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for f in ["report.json", "report.md", "latency.svg", "db_cpu.svg"] {
        assert!(out.path().join(f).exists(), "{f} missing");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    let rows = report["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 4, "one row per contender and rate: {rows:?}");
    for contender in ["cdc", "poll"] {
        for rate in [20, 50] {
            let row = rows
                .iter()
                .find(|r| r["contender"] == contender && r["rate"] == rate)
                .unwrap_or_else(|| panic!("no row for {contender} at {rate}/s"));
            let written = row["written"].as_u64().unwrap();
            assert!(written > 0, "{contender} {rate}: nothing written");
            assert_eq!(row["lost"], 0, "{contender} {rate}/s lost events: {row}");
            assert_eq!(
                row["duplicated"], 0,
                "{contender} {rate}/s duplicates: {row}"
            );
        }
    }
    // Each phase's own counts add up: delivered exactly what was written.
    for p in report["phases"].as_array().unwrap() {
        if p["contender"] != "none" {
            assert_eq!(p["delivered"], p["written"], "{p}");
            assert_eq!(p["foreign"], 0, "{p}");
        }
    }
    let baseline = report["baseline"].as_array().unwrap();
    assert_eq!(baseline.len(), 2, "a none phase per rate");
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(
        md.contains("| cdc | 20 |") && md.contains("| poll | 50 |"),
        "{md}"
    );
}
