//! compose.yaml parses, and its Postgres runs with the settings of the project's own stack.

use std::collections::BTreeMap;
use std::path::PathBuf;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `name = value` lines of scripts/postgres.conf, with quotes and comments removed.
fn stack_settings() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(repo_root().join("scripts/postgres.conf")).unwrap();
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once('=').expect("name = value");
            (k.trim().to_owned(), v.trim().trim_matches('\'').to_owned())
        })
        .collect()
}

#[test]
fn compose_postgres_matches_the_stack_settings() {
    let text = std::fs::read_to_string(repo_root().join("compose.yaml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("compose.yaml is valid YAML");
    let services = doc
        .get("services")
        .and_then(|s| s.as_mapping())
        .expect("services");
    for name in ["postgres", "kafka", "migrate", "relay"] {
        assert!(
            services.contains_key(name),
            "compose.yaml has a {name} service"
        );
    }
    let command: Vec<String> = doc["services"]["postgres"]["command"]
        .as_sequence()
        .expect("postgres command is a list")
        .iter()
        .map(|v| v.as_str().expect("string").to_owned())
        .collect();
    let mut compose = BTreeMap::new();
    let mut args = command.iter();
    while let Some(a) = args.next() {
        if a == "-c" {
            let kv = args.next().expect("-c takes name=value");
            let (k, v) = kv.split_once('=').expect("name=value");
            compose.insert(k.to_owned(), v.to_owned());
        }
    }
    let stack = stack_settings();
    assert!(stack.contains_key("wal_level") && stack.contains_key("max_slot_wal_keep_size"));
    assert_eq!(
        compose, stack,
        "compose.yaml's Postgres flags equal scripts/postgres.conf"
    );

    // The relay runs as the least-privilege role the Postgres service creates, not as postgres.
    let relay_url = doc["services"]["relay"]["environment"]["RELAY_POSTGRES__URL"]
        .as_str()
        .expect("the relay's Postgres URL");
    assert!(
        relay_url.starts_with("postgres://relay:"),
        "the relay connects as its own role: {relay_url}"
    );
    let init = doc["services"]["postgres"]["volumes"][0]
        .as_str()
        .expect("the role script is mounted");
    let script = init.split(':').next().unwrap_or_default();
    let script = std::fs::read_to_string(repo_root().join(script)).expect("the role script");
    assert!(
        script.contains("CREATE ROLE relay LOGIN REPLICATION")
            && !script.contains("SUPERUSER")
            && script.contains("GRANT SELECT ON TABLES TO relay"),
        "{script}"
    );

    let kafka_env = &doc["services"]["kafka"]["environment"];
    assert_eq!(
        kafka_env["KAFKA_PROCESS_ROLES"].as_str(),
        Some("broker,controller"),
        "KRaft"
    );
    for key in [
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
    ] {
        assert_eq!(
            kafka_env[key].as_u64(),
            Some(1),
            "{key} is 1 on a single node"
        );
    }
}
