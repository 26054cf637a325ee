//! `scripts/stack up` on bad ground: a taken port, no Java, a failed Maven download. Each stops
//! with a message that says which and what to do, and leaves no process behind.

use crate::support::process::free_port;
use crate::support::unique_name;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A directory holding fake `java` and/or `mvn` that fail, put first on PATH.
fn fake_bin(dir: &Path, names: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for name in names {
        let path = dir.join(name);
        std::fs::write(
            &path,
            "#!/bin/sh\necho \"fake $0: simulated failure\" >&2\nexit 1\n",
        )
        .unwrap();
        let ok = Command::new("chmod").arg("+x").arg(&path).status().unwrap();
        assert!(ok.success());
    }
}

fn stack_up(stack_dir: &Path, pg_port: u16, kafka_port: u16, env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(repo().join("scripts/stack"));
    cmd.arg("up")
        .env("STACK_DIR", stack_dir)
        .env("STACK_PG_PORT", pg_port.to_string())
        .env("STACK_KAFKA_PORT", kafka_port.to_string())
        .env("STACK_KAFKA_CONTROLLER_PORT", free_port().to_string())
        .env("STACK_NO_INSTALL", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// Nothing listens on `port` any more.
fn port_is_free(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
}

fn cleanup(stack_dir: &Path) {
    let _ = Command::new(repo().join("scripts/stack"))
        .arg("destroy")
        .env("STACK_DIR", stack_dir)
        .output();
}

#[test]
fn a_taken_port_is_named_with_the_variable_to_change() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(unique_name("stack_port"));
    let out = stack_up(&dir, port, free_port(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("port {port} (Postgres) is already in use")),
        "{err}"
    );
    assert!(
        err.contains("STACK_PG_PORT="),
        "says which variable to change: {err}"
    );
    assert!(
        !dir.join("pg/data/postmaster.pid").exists(),
        "no Postgres was started"
    );
    cleanup(&dir);
}

#[test]
fn missing_java_stops_with_the_fix_and_stops_postgres_again() {
    let dir = std::env::temp_dir().join(unique_name("stack_java"));
    let bin = dir.with_extension("bin");
    fake_bin(&bin, &["java"]);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let pg_port = free_port();
    let out = stack_up(&dir, pg_port, free_port(), &[("PATH", path)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Java 17 (or newer) is missing"), "{err}");
    assert!(
        err.contains("apt-get install openjdk-17-jre-headless"),
        "says what to do: {err}"
    );
    assert!(
        err.contains("postgres stopped"),
        "the Postgres this run started is stopped: {err}"
    );
    assert!(port_is_free(pg_port), "nothing left listening on {pg_port}");
    cleanup(&dir);
    let _ = std::fs::remove_dir_all(&bin);
}

#[test]
fn a_failed_maven_download_stops_with_the_log_and_leaves_nothing_running() {
    let dir = std::env::temp_dir().join(unique_name("stack_mvn"));
    let bin = dir.with_extension("bin");
    fake_bin(&bin, &["mvn"]);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let cache = dir.with_extension("cache");
    let (pg_port, kafka_port) = (free_port(), free_port());
    let out = stack_up(
        &dir,
        pg_port,
        kafka_port,
        &[("PATH", path), ("STACK_CACHE", cache.display().to_string())],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Maven could not download Kafka 4.1.1"),
        "{err}"
    );
    assert!(
        err.contains("Maven Central is reachable"),
        "says what to check: {err}"
    );
    assert!(
        port_is_free(pg_port) && port_is_free(kafka_port),
        "nothing left listening"
    );
    assert!(
        !cache.join("kafka-4.1.1/libs/.complete").exists(),
        "no half-filled cache is kept"
    );
    cleanup(&dir);
    let _ = std::fs::remove_dir_all(&bin);
    let _ = std::fs::remove_dir_all(&cache);
}

/// Kafka's controller, SASL_SSL and SSL ports follow `STACK_KAFKA_PORT` (+1, +2, +3) unless set,
/// so a second stack on another client port collides with nothing: `scripts/stack env` names the
/// listeners there, and a taken controller port (client port + 1) is reported as such, with the
/// variable to change, and nothing is left running.
#[test]
fn kafka_ports_follow_the_client_port() {
    let dir = std::env::temp_dir().join(unique_name("stack_ports"));
    // A client port whose next port is taken by someone else.
    let (kafka_port, _taken) = loop {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let controller = taken.local_addr().unwrap().port();
        if controller > 1024 && port_is_free(controller - 1) {
            break (controller - 1, taken);
        }
    };
    let stack = |command: &str| {
        Command::new(repo().join("scripts/stack"))
            .arg(command)
            .env("STACK_DIR", &dir)
            .env("STACK_PG_PORT", free_port().to_string())
            .env("STACK_KAFKA_PORT", kafka_port.to_string())
            .env_remove("STACK_KAFKA_CONTROLLER_PORT")
            .env_remove("STACK_KAFKA_SASL_SSL_PORT")
            .env_remove("STACK_KAFKA_SSL_PORT")
            .env("STACK_NO_INSTALL", "1")
            .output()
            .unwrap()
    };
    let env = String::from_utf8_lossy(&stack("env").stdout).into_owned();
    for (var, port) in [
        ("STACK_KAFKA_BOOTSTRAP", kafka_port),
        ("STACK_KAFKA_SASL_SSL_BOOTSTRAP", kafka_port + 2),
        ("STACK_KAFKA_SSL_BOOTSTRAP", kafka_port + 3),
    ] {
        assert!(
            env.contains(&format!("export {var}=127.0.0.1:{port}\n")),
            "{var}: {env}"
        );
    }
    let out = stack("up");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "port {} (Kafka controller) is already in use",
            kafka_port + 1
        )) && err.contains("STACK_KAFKA_CONTROLLER_PORT="),
        "{err}"
    );
    assert!(
        !dir.join("pg/data/postmaster.pid").exists(),
        "the Postgres this run started was stopped again"
    );
    cleanup(&dir);
}
