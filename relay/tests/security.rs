//! Production connections against the stack: Kafka over TLS with SASL (SCRAM-SHA-512 for
//! `relay cdc`; PLAIN and OAUTHBEARER for the sink), the broker certificate verified against the
//! stack's CA; Postgres with `sslmode=verify-full` for the replication connection and the SQL
//! connections; `sslmode=prefer` falling back like libpq's; a least-privilege Postgres role; and
//! the failures an operator must be told about plainly (a wrong Kafka password, an unknown CA).

use crate::cdc::{start_writers, Harness};
use crate::support::kafka::{self, Isolation};
use crate::support::pg::{self, TestDb};
use crate::support::process::{PgCluster, RelayEnv, RelayProc};
use crate::support::{env_or, unique_name};
use relay::replication::conn::{connect_sql, ReplicationClient, ReplicationConfig, SslMode};
use relay::sink::kafka::{KafkaBackend, KafkaSettings};
use relay::sink::{KafkaSink, Sink, SinkError};
use std::time::Duration;

/// A path below the stack's directory, for when `scripts/stack env` was not evaluated.
fn stack_file(var: &str, below_stack_dir: &str) -> String {
    std::env::var(var)
        .unwrap_or_else(|_| format!("{}/../.stack/{below_stack_dir}", env!("CARGO_MANIFEST_DIR")))
}

/// The CA that signed the stack broker's certificate (`STACK_KAFKA_CA`).
fn kafka_ca() -> String {
    stack_file("STACK_KAFKA_CA", "kafka/tls/ca.crt")
}

/// The stack broker's SASL_SSL listener (`STACK_KAFKA_SASL_SSL_BOOTSTRAP`).
fn sasl_ssl_bootstrap() -> String {
    env_or("STACK_KAFKA_SASL_SSL_BOOTSTRAP", "127.0.0.1:59094")
}

/// The stack broker's SSL listener, TLS without SASL (`STACK_KAFKA_SSL_BOOTSTRAP`).
fn ssl_bootstrap() -> String {
    env_or("STACK_KAFKA_SSL_BOOTSTRAP", "127.0.0.1:59095")
}

/// The SCRAM user the stack creates (`STACK_KAFKA_SASL_USER` / `_PASSWORD`).
fn scram_user() -> (String, String) {
    (
        env_or("STACK_KAFKA_SASL_USER", "relay"),
        env_or("STACK_KAFKA_SASL_PASSWORD", "relay-kafka-secret"),
    )
}

/// The relay's settings for the SASL_SSL listener: SCRAM-SHA-512 as `user`/`password`, the
/// broker's certificate (and its name, 127.0.0.1) verified against the stack's CA.
fn over_sasl_ssl(env: &mut RelayEnv, user: &str, password: &str) {
    env.set("RELAY_KAFKA__BOOTSTRAP_SERVERS", sasl_ssl_bootstrap())
        .set("RELAY_KAFKA__LIBRDKAFKA__SECURITY.PROTOCOL", "SASL_SSL")
        .set("RELAY_KAFKA__LIBRDKAFKA__SASL.MECHANISM", "SCRAM-SHA-512")
        .set("RELAY_KAFKA__LIBRDKAFKA__SASL.USERNAME", user)
        .set("RELAY_KAFKA__LIBRDKAFKA__SASL.PASSWORD", password)
        .set("RELAY_KAFKA__LIBRDKAFKA__SSL.CA.LOCATION", kafka_ca())
        .set(
            "RELAY_KAFKA__LIBRDKAFKA__SSL.ENDPOINT.IDENTIFICATION.ALGORITHM",
            "https",
        );
}

/// `url` with `sslmode=verify-full` against the stack server's own certificate.
fn verify_full(url: &str) -> String {
    format!(
        "{url}?sslmode=verify-full&sslrootcert={}",
        pg::server_cert().display()
    )
}

/// `relay cdc` with both of its connections secured: Kafka over SASL_SSL with SCRAM-SHA-512 and
/// CA verification, Postgres with `sslmode=verify-full`. Writers commit for a few seconds; a
/// read_committed reader then finds every committed event exactly once, in per-key order. The
/// relay's walsender is seen encrypted in `pg_stat_ssl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cdc_relays_exactly_once_over_sasl_ssl_and_verify_full() {
    let db = TestDb::create().await;
    // The harness (writers, tally) talks to the stack directly; only the relay is secured.
    let h = Harness::new(db.url(), kafka::bootstrap());
    let mut env = h.env();
    let (user, password) = scram_user();
    over_sasl_ssl(&mut env, &user, &password);
    let app = unique_name("tls_relay");
    env.set(
        "RELAY_POSTGRES__URL",
        format!("{}&application_name={app}", verify_full(&db.url())),
    );
    h.create_slot().await;
    let mut relay = RelayProc::spawn(&["cdc"], &env);
    let (state, writers) = start_writers(&db.url(), 2);
    tokio::time::sleep(Duration::from_secs(5)).await;

    let admin = db.client().await;
    let encrypted: Vec<bool> = admin
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = $1",
            &[&app],
        )
        .await
        .expect("pg_stat_ssl")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        !encrypted.is_empty() && encrypted.iter().all(|e| *e),
        "the relay's Postgres connections are encrypted: {encrypted:?}\n{}",
        relay.log_text()
    );

    h.finish(
        &mut relay,
        &state,
        writers,
        Duration::from_secs(120),
        "SASL_SSL (SCRAM-SHA-512) + verify-full",
    )
    .await;
    let log = relay.log_text();
    assert!(!log.contains(&password), "the Kafka password is not logged");
}

/// A wrong Kafka password: `relay cdc` exits 1 on its own, soon, saying that Kafka refused the
/// SASL authentication (not a timeout, not a reconnect loop), and without the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_kafka_password_is_a_clear_error_exit() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    let mut env = h.env();
    let (user, _) = scram_user();
    let wrong = "not-the-password-42";
    over_sasl_ssl(&mut env, &user, wrong);
    let mut relay = RelayProc::spawn(&["cdc"], &env);
    let status = relay
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the relay did not exit by itself:\n{}", relay.log_text()));
    let log = relay.log_text();
    assert_eq!(status.code(), Some(1), "exit status {status}:\n{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains("Kafka refused the SASL authentication")
            && last.contains("invalid credentials"),
        "the last line says what is wrong: {last}\n{log}"
    );
    assert!(!log.contains(wrong), "the password is not logged:\n{log}");
    assert!(
        !log.contains("reconnecting"),
        "no reconnect loop before giving up:\n{log}"
    );
}

fn sink_settings(bootstrap: String, options: &[(&str, String)]) -> KafkaSettings {
    KafkaSettings {
        bootstrap_servers: bootstrap,
        transactional_id: unique_name("sec_txn"),
        checkpoint_topic: unique_name("sec_cp"),
        transaction_timeout: Duration::from_secs(30),
        topic_partitions: 1,
        create_topics: true,
        librdkafka: options
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
        delivery: relay::config::Delivery::ExactlyOnce,
        transactional_producers: 1,
        client: relay::config::KafkaClient::Librdkafka,
        wire_transaction_version: 0,
    }
}

/// Commits `n` records to a new topic through a sink with `settings`; returns the topic.
async fn commit_through(settings: KafkaSettings, n: usize) -> Result<String, SinkError> {
    let topic = unique_name("sec");
    let rt = tokio::runtime::Handle::current();
    let backend = match settings.client {
        relay::config::KafkaClient::Librdkafka => {
            KafkaSink::Librdkafka(Box::new(KafkaBackend::new(settings, rt)))
        }
        relay::config::KafkaClient::Wire => KafkaSink::Wire(Box::new(
            relay::sink::wire::WireBackend::new(settings, 0, rt),
        )),
    };
    let (sink, _) = Sink::start(backend, "cdc/sec".into()).await?;
    let records = (0..n)
        .map(|i| relay::outbox::OutRecord {
            topic: topic.clone().into(),
            key: bytes::Bytes::from(format!("k{i}")),
            value: bytes::Bytes::from(format!("v{i}")),
            headers: vec![],
            extra_headers: vec![],
        })
        .collect();
    sink.send(records).await?;
    let checkpoint = relay::checkpoint::Checkpoint {
        relay: "cdc/sec".into(),
        system_id: 1,
        end_lsn: 16,
        commit_lsn: 8,
        ..Default::default()
    };
    let committed = sink.commit(checkpoint).await?.await;
    sink.close().await;
    committed.map_err(|_| SinkError::Stopped)??;
    Ok(topic)
}

/// The other SASL mechanisms production clusters use, over the SASL_SSL listener: PLAIN, and
/// OAUTHBEARER (librdkafka's unsecured JWT, which the test broker accepts; a real cluster takes
/// `sasl.oauthbearer.method=oidc`, built in too). And TLS alone on the SSL listener. Each
/// commits 10 records in a transaction, counted under read_committed, compressed with one of
/// the codecs the build carries (lz4, zstd, gzip).
#[tokio::test(flavor = "multi_thread")]
async fn the_sink_commits_over_plain_oauthbearer_and_ssl() {
    let tls = [
        ("ssl.ca.location", kafka_ca()),
        ("ssl.endpoint.identification.algorithm", "https".to_owned()),
    ];
    type Options = Vec<(&'static str, String)>;
    let cases: Vec<(&str, String, Options)> = vec![
        (
            "SASL_SSL PLAIN",
            sasl_ssl_bootstrap(),
            vec![
                ("security.protocol", "SASL_SSL".into()),
                ("sasl.mechanism", "PLAIN".into()),
                ("sasl.username", "relay_plain".into()),
                ("sasl.password", "plain-secret".into()),
                ("compression.type", "lz4".into()),
            ],
        ),
        (
            "SASL_SSL OAUTHBEARER",
            sasl_ssl_bootstrap(),
            vec![
                ("security.protocol", "SASL_SSL".into()),
                ("sasl.mechanism", "OAUTHBEARER".into()),
                ("enable.sasl.oauthbearer.unsecure.jwt", "true".into()),
                ("sasl.oauthbearer.config", "principal=relay".into()),
                ("compression.type", "zstd".into()),
            ],
        ),
        (
            "SSL",
            ssl_bootstrap(),
            vec![
                ("security.protocol", "SSL".into()),
                ("compression.type", "gzip".into()),
            ],
        ),
    ];
    for (what, bootstrap, mut options) in cases {
        options.extend(tls.iter().cloned());
        let topic = commit_through(sink_settings(bootstrap, &options), 10)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let read = kafka::read_all(&topic, Isolation::ReadCommitted).await;
        assert_eq!(read.len(), 10, "{what}: committed records read back");
    }
}

/// A broker certificate that does not verify (the system's CAs do not know the stack's CA) is a
/// configuration error naming the cause, not a timeout the relay would retry.
#[tokio::test(flavor = "multi_thread")]
async fn an_unverifiable_broker_certificate_is_a_configuration_error() {
    let other_ca = pg::server_cert().display().to_string();
    let settings = sink_settings(
        ssl_bootstrap(),
        &[
            ("security.protocol", "SSL".into()),
            // A CA, but not the one that signed the broker's certificate.
            ("ssl.ca.location", other_ca),
        ],
    );
    let err = commit_through(settings, 1).await.unwrap_err();
    assert!(
        matches!(&err, SinkError::Config(m) if m.contains("did not verify") && m.contains("certificate verify failed")),
        "{err}"
    );
    assert!(!err.is_transient());
}

/// The experimental wire client over the SSL listener: 10 records committed and read back, the
/// broker's certificate verified against the stack's CA and its name; a CA that did not sign it
/// is a configuration error naming the TLS handshake, not a timeout retried forever.
#[tokio::test(flavor = "multi_thread")]
async fn the_wire_client_commits_over_tls_and_refuses_an_unverifiable_certificate() {
    let mut settings = sink_settings(
        ssl_bootstrap(),
        &[
            ("security.protocol", "SSL".into()),
            ("ssl.ca.location", kafka_ca()),
        ],
    );
    settings.client = relay::config::KafkaClient::Wire;
    let topic = commit_through(settings, 10).await.expect("wire over TLS");
    let read = kafka::read_all(&topic, Isolation::ReadCommitted).await;
    assert_eq!(read.len(), 10, "committed records read back");

    let mut settings = sink_settings(
        ssl_bootstrap(),
        &[
            ("security.protocol", "SSL".into()),
            ("ssl.ca.location", pg::server_cert().display().to_string()),
        ],
    );
    settings.client = relay::config::KafkaClient::Wire;
    let err = commit_through(settings, 1).await.unwrap_err();
    assert!(
        matches!(&err, SinkError::Config(m) if m.contains("TLS handshake") && m.contains("certificate")),
        "{err}"
    );
    assert!(!err.is_transient());
}

/// The wire client over SASL_SSL, logging in with PLAIN (the stack's `relay_plain` user) and
/// with SCRAM-SHA-512 (its SCRAM user): 10 records committed and read back each time; a wrong
/// password is a configuration error with the broker's reason, not retried, and the password
/// appears in no error.
#[tokio::test(flavor = "multi_thread")]
async fn the_wire_client_logs_in_with_sasl_plain_and_scram_over_tls() {
    let (scram_name, scram_password) = scram_user();
    let options = |mechanism: &str, user: &str, password: &str| {
        vec![
            ("security.protocol", "SASL_SSL".to_owned()),
            ("sasl.mechanism", mechanism.to_owned()),
            ("sasl.username", user.to_owned()),
            ("sasl.password", password.to_owned()),
            ("ssl.ca.location", kafka_ca()),
        ]
    };
    for (mechanism, user, password) in [
        ("PLAIN", "relay_plain".to_owned(), "plain-secret".to_owned()),
        ("SCRAM-SHA-512", scram_name, scram_password),
    ] {
        let mut settings =
            sink_settings(sasl_ssl_bootstrap(), &options(mechanism, &user, &password));
        settings.client = relay::config::KafkaClient::Wire;
        let topic = commit_through(settings, 10)
            .await
            .unwrap_or_else(|e| panic!("wire over SASL_SSL {mechanism}: {e}"));
        let read = kafka::read_all(&topic, Isolation::ReadCommitted).await;
        assert_eq!(read.len(), 10, "{mechanism}: committed records read back");

        let wrong = "not-the-secret-at-all";
        let mut settings = sink_settings(sasl_ssl_bootstrap(), &options(mechanism, &user, wrong));
        settings.client = relay::config::KafkaClient::Wire;
        let err = commit_through(settings, 1).await.unwrap_err();
        let text = err.to_string();
        let want = format!("SASL {mechanism} login as {user} refused");
        assert!(
            matches!(&err, SinkError::Config(m) if m.contains(&want)),
            "{text}"
        );
        assert!(!err.is_transient());
        assert!(!text.contains(wrong), "the password leaked: {text}");
    }
}

/// `relay migrate` and a SQL connection with `sslmode=verify-full` against the stack server's
/// certificate: encrypted (pg_stat_ssl), and refused when the root is another CA.
#[tokio::test]
async fn verify_full_for_migrate_and_sql_connections() {
    let db = TestDb::create_empty().await;
    let url = verify_full(&db.url());
    let applied = relay::migrate::run(&url)
        .await
        .expect("migrate over verify-full");
    assert_eq!(applied, relay::migrate::MIGRATOR.iter().count());

    let cfg = ReplicationConfig::from_url(&url).unwrap();
    let client = connect_sql(&cfg).await.expect("SQL over verify-full");
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the SQL connection is encrypted");
    let repl = ReplicationClient::connect(&cfg)
        .await
        .expect("replication over verify-full");
    assert!(repl.is_tls());
    repl.close().await;

    // The Kafka stack's CA did not sign the Postgres server's certificate.
    let mut wrong = cfg.clone();
    wrong.ssl_root_cert = Some(kafka_ca().into());
    let err = connect_sql(&wrong).await.unwrap_err();
    assert!(
        err.to_string().contains("TLS") && !err.is_transient(),
        "{err}"
    );
    let err = relay::migrate::run(&format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        db.url(),
        kafka_ca()
    ))
    .await
    .unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
}

/// `sslmode=prefer` as libpq does it, against a server whose pg_hba.conf refuses TLS
/// connections (`hostssl ... reject`) and accepts plain ones: the first attempt is encrypted and
/// refused, the second, unencrypted, succeeds; for the SQL connection and the replication
/// connection alike. `require` fails there.
#[tokio::test(flavor = "multi_thread")]
async fn prefer_falls_back_to_plain_when_the_server_refuses_tls_logins() {
    let pg = tokio::task::spawn_blocking(|| {
        PgCluster::start_with(|data| {
            crate::support::process::make_server_cert(data);
            (
                "ssl = on\n".to_owned(),
                "hostssl all all 127.0.0.1/32 reject\n\
                 hostssl replication all 127.0.0.1/32 reject\n\
                 hostnossl all all 127.0.0.1/32 trust\n\
                 hostnossl replication all 127.0.0.1/32 trust\n\
                 local all all trust\n"
                    .to_owned(),
            )
        })
    })
    .await
    .unwrap();
    let prefer =
        ReplicationConfig::from_url(&format!("{}?sslmode=prefer", pg.url("postgres"))).unwrap();
    let client = connect_sql(&prefer).await.expect("prefer connects");
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!ssl, "the fallback connection is plain");
    let repl = ReplicationClient::connect(&prefer)
        .await
        .expect("prefer connects");
    assert!(!repl.is_tls());
    repl.close().await;
    // Both refusals are in the server's log: the TLS attempts happened.
    let log = std::fs::read_to_string(pg.dir.join("postgres.log")).unwrap_or_default();
    assert!(
        log.matches("rejects connection for host \"127.0.0.1\", user \"postgres\", database \"postgres\", SSL encryption").count() == 2,
        "two refused TLS attempts in the server log:\n{log}"
    );

    let mut require = prefer.clone();
    require.sslmode = SslMode::Require;
    let err = connect_sql(&require).await.unwrap_err();
    assert!(err.to_string().contains("pg_hba.conf"), "{err}");
}

/// The least-privilege role of README and RUNBOOK: LOGIN REPLICATION, SELECT on the outbox, the
/// publication made by the migrations (an admin), no superuser, no ownership. `relay cdc` as
/// that role creates its slot and relays every committed event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cdc_relays_exactly_once_as_a_least_privilege_role() {
    let db = TestDb::create().await;
    let role = unique_name("relay_role");
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN REPLICATION PASSWORD 'role-secret'; \
             GRANT SELECT ON public.outbox TO {role};"
        ))
        .await
        .expect("create the role");
    let (superuser, replication): (bool, bool) = {
        let r = admin
            .query_one(
                "SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = $1",
                &[&role],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(!superuser && replication);

    let h = Harness::new(db.url(), kafka::bootstrap());
    let mut env = h.env();
    env.set(
        "RELAY_POSTGRES__URL",
        format!(
            "postgres://{role}:role-secret@{}:{}/{}",
            pg::host(),
            pg::port(),
            db.name
        ),
    );
    // The relay creates its slot as the role; rows written before that are not in the slot's
    // stream, so the writers start once the role's walsender streams from it.
    let mut relay = RelayProc::spawn(&["cdc"], &env);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let streaming: bool = admin
            .query_one(
                "SELECT count(*) >= 1 FROM pg_replication_slots s \
                 JOIN pg_stat_replication r ON r.pid = s.active_pid \
                 WHERE s.database = current_database() AND r.usename = $1",
                &[&role],
            )
            .await
            .unwrap()
            .get(0);
        if streaming {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline && relay.try_status().is_none(),
            "the relay streams from its slot as {role}:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (state, writers) = start_writers(&db.url(), 2);
    tokio::time::sleep(Duration::from_secs(4)).await;
    h.finish(
        &mut relay,
        &state,
        writers,
        Duration::from_secs(120),
        "least-privilege role",
    )
    .await;
    drop(db);
    let _ = pg::connect("postgres")
        .await
        .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
        .await;
}

/// A SQL connection authenticates as the replication client does, over TLS: SCRAM-SHA-256 with
/// the right password (tokio-postgres on the relay's own TLS socket, without channel binding),
/// and a wrong password is an `Auth` error with the server's SQLSTATE 28P01, not transient.
#[tokio::test]
async fn sql_connections_authenticate_over_the_relays_tls() {
    let (user, password) = pg::SCRAM_USER;
    let url = |password: &str| {
        format!(
            "postgres://{user}:{password}@{}:{}/postgres?sslmode=verify-full&sslrootcert={}",
            pg::host(),
            pg::port(),
            pg::server_cert().display()
        )
    };
    let cfg = ReplicationConfig::from_url(&url(password)).unwrap();
    let client = connect_sql(&cfg).await.expect("SCRAM over TLS");
    let (ssl, me): (bool, String) = {
        let row = client
            .query_one(
                "SELECT ssl, current_user::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(ssl && me == user, "{ssl} {me}");

    let wrong = ReplicationConfig::from_url(&url("not-it")).unwrap();
    let err = connect_sql(&wrong).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("28P01"), "{err}");
    assert!(!err.is_transient(), "{err}");
    assert!(!err.to_string().contains("not-it"), "{err}");
}
