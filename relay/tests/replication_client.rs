//! The native replication-protocol client against the real Postgres: authentication methods,
//! TLS modes, Unix sockets, replication commands, streaming, status updates and the errors an
//! operator sees. Every test has its own database and slot names, so they run in parallel.

use std::time::{Duration, Instant};

use relay::replication::conn::{
    sqlstate, ReplicationClient, ReplicationConfig, ReplicationError, ReplicationMessage,
    ReplicationStream, SnapshotAction, SslMode, StartOptions,
};
use relay::replication::Lsn;

use crate::support::pg::{self, TestDb};
use crate::support::unique_name;

/// Replication config for `db` over TCP as `user`, without TLS unless a test says otherwise.
fn config(db: &TestDb, user: &str, password: Option<&str>) -> ReplicationConfig {
    let mut cfg = ReplicationConfig::new(pg::host(), user);
    cfg.port = pg::port();
    cfg.dbname = db.name.clone();
    cfg.password = password.map(str::to_owned);
    cfg.sslmode = SslMode::Disable;
    cfg.application_name = "replication_client_test".into();
    cfg
}

fn superuser_config(db: &TestDb) -> ReplicationConfig {
    config(db, &pg::superuser(), None)
}

async fn connect(cfg: &ReplicationConfig) -> ReplicationClient {
    ReplicationClient::connect(cfg)
        .await
        .unwrap_or_else(|e| panic!("connect with {cfg:?}: {e}"))
}

/// The single text value of a one-row, one-column answer.
async fn scalar(client: &mut ReplicationClient, sql: &str) -> Option<String> {
    let rows = client.simple_query(sql).await.unwrap();
    assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
    rows[0][0].clone()
}

/// Polls `sql` (one text value) on a normal connection until it equals `want`, for up to 10 s.
async fn eventually(admin: &tokio_postgres::Client, sql: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = admin.query_one(sql, &[]).await.unwrap();
        let got: Option<String> = row.get(0);
        if got.as_deref() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: got {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A table and a publication on it, in `db`.
async fn table_and_publication(db: &TestDb) -> (tokio_postgres::Client, String) {
    let admin = db.client().await;
    let publication = unique_name("pub");
    admin
        .batch_execute(&format!(
            "CREATE TABLE items (id bigint generated always as identity primary key, body text);
             CREATE PUBLICATION {publication} FOR TABLE items;"
        ))
        .await
        .unwrap();
    (admin, publication)
}

/// A stream from a fresh slot over a publication of table `items`, in a database of its own.
struct Streaming {
    stream: ReplicationStream,
    slot: String,
    consistent_point: Lsn,
    /// A normal connection to the database.
    admin: tokio_postgres::Client,
    /// Last, so that the database outlives the connections to it.
    db: TestDb,
}

impl Streaming {
    async fn start() -> Streaming {
        Self::start_after(&[]).await
    }

    /// Runs `setup` (SQL such as `SET wal_sender_timeout = ...`) on the replication connection
    /// before streaming starts.
    async fn start_after(setup: &[&str]) -> Streaming {
        let db = TestDb::create_empty().await;
        let (admin, publication) = table_and_publication(&db).await;
        let mut client = connect(&superuser_config(&db)).await;
        for sql in setup {
            client.simple_query(sql).await.unwrap();
        }
        let slot = unique_name("slot");
        let created = client
            .create_logical_slot(&slot, "pgoutput", false, SnapshotAction::NoExport)
            .await
            .unwrap();
        let stream = client
            .start_replication(&slot, Lsn::INVALID, StartOptions::new(vec![publication]))
            .await
            .unwrap();
        Streaming {
            stream,
            slot,
            consistent_point: created.consistent_point,
            admin,
            db,
        }
    }
}

/// The next message within `timeout`; panics on errors, the end of the stream, or the timeout.
async fn next_within(stream: &mut ReplicationStream, timeout: Duration) -> ReplicationMessage {
    tokio::time::timeout(timeout, stream.next())
        .await
        .expect("a replication message in time")
        .expect("no stream error")
        .expect("the stream has not ended")
}

#[tokio::test]
async fn trust_connect_identify_system_and_sql() {
    let db = TestDb::create_empty().await;
    let mut client = connect(&superuser_config(&db)).await;
    assert!(client.server_version().is_some_and(|v| v.starts_with("15")));
    assert!(client.backend_key().is_some());
    assert!(!client.is_tls());

    let ident = client.identify_system().await.unwrap();
    let admin = db.client().await;
    let system_id: i64 = admin
        .query_one("SELECT system_identifier FROM pg_control_system()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ident.system_id, system_id as u64);
    assert!(ident.timeline >= 1);
    assert!(ident.xlogpos.is_valid());
    assert_eq!(ident.dbname.as_deref(), Some(db.name.as_str()));

    assert_eq!(
        scalar(&mut client, "SHOW wal_level").await.as_deref(),
        Some("logical")
    );
    let rows = client
        .simple_query("SELECT 1::text, NULL::text UNION ALL SELECT 'two', 'x'")
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![
            vec![Some("1".to_owned()), None],
            vec![Some("two".to_owned()), Some("x".to_owned())]
        ]
    );
    // An SQL error leaves the connection usable.
    let err = client.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("22012"), "{err}");
    assert_eq!(
        scalar(&mut client, "SELECT 'still here'").await.as_deref(),
        Some("still here")
    );
    client.close().await;
}

#[tokio::test]
async fn password_methods_scram_md5_cleartext() {
    let db = TestDb::create_empty().await;
    for (user, password) in [pg::SCRAM_USER, pg::MD5_USER, pg::CLEARTEXT_USER] {
        let mut client = connect(&config(&db, user, Some(password))).await;
        assert_eq!(
            scalar(&mut client, "SELECT current_user").await.as_deref(),
            Some(user)
        );
        client.identify_system().await.unwrap();
        client.close().await;
    }
}

#[tokio::test]
async fn wrong_or_missing_password_is_a_definite_auth_error() {
    let db = TestDb::create_empty().await;
    for user in [pg::SCRAM_USER.0, pg::MD5_USER.0, pg::CLEARTEXT_USER.0] {
        let err = ReplicationClient::connect(&config(&db, user, Some("not-the-password")))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ReplicationError::Auth { .. }),
            "{user}: {err}"
        );
        assert_eq!(
            err.sqlstate(),
            Some(sqlstate::INVALID_PASSWORD),
            "{user}: {err}"
        );
        assert!(!err.is_transient());
        assert!(!err.to_string().contains("not-the-password"), "{err}");

        let err = ReplicationClient::connect(&config(&db, user, None))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ReplicationError::Auth { server: None, .. }),
            "{user}: {err}"
        );
    }
}

#[tokio::test]
async fn refused_connection_is_transient() {
    let db = TestDb::create_empty().await;
    let mut cfg = superuser_config(&db);
    // A port nothing listens on: bind one, then free it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    cfg.port = listener.local_addr().unwrap().port();
    drop(listener);
    let err = ReplicationClient::connect(&cfg).await.unwrap_err();
    assert!(matches!(err, ReplicationError::Io(_)), "{err}");
    assert!(err.is_transient(), "{err}");
}

/// The encryption of the connection, as the server sees it.
async fn server_sees_ssl(client: &mut ReplicationClient) -> bool {
    let ssl = scalar(
        client,
        "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .await;
    ssl.as_deref() == Some("true")
}

#[tokio::test]
async fn tls_require_prefer_and_verify_full() {
    let db = TestDb::create_empty().await;

    // require: encrypted, certificate not verified. SCRAM over TLS, where the server also offers
    // SCRAM-SHA-256-PLUS, checks that plain SCRAM is accepted.
    let (user, password) = pg::SCRAM_USER;
    let mut cfg = config(&db, user, Some(password));
    cfg.sslmode = SslMode::Require;
    let mut client = connect(&cfg).await;
    assert!(client.is_tls());
    assert!(server_sees_ssl(&mut client).await);
    client.close().await;

    // prefer against a server with TLS: encrypted.
    cfg.sslmode = SslMode::Prefer;
    let mut client = connect(&cfg).await;
    assert!(client.is_tls() && server_sees_ssl(&mut client).await);
    client.close().await;

    // disable: plain.
    cfg.sslmode = SslMode::Disable;
    let mut client = connect(&cfg).await;
    assert!(!client.is_tls() && !server_sees_ssl(&mut client).await);
    client.close().await;

    // verify-full with the server's certificate as the root, by host name and by IP address
    // (the certificate names both).
    for host in ["localhost", "127.0.0.1"] {
        let mut cfg = superuser_config(&db);
        cfg.host = host.into();
        cfg.sslmode = SslMode::VerifyFull;
        cfg.ssl_root_cert = Some(pg::server_cert());
        let mut client = connect(&cfg).await;
        assert!(
            client.is_tls() && server_sees_ssl(&mut client).await,
            "{host}"
        );
        client.close().await;
    }
}

#[tokio::test]
async fn tls_verify_full_rejects_what_it_cannot_verify() {
    let db = TestDb::create_empty().await;
    // The self-signed certificate is not under the Mozilla roots.
    let mut cfg = superuser_config(&db);
    cfg.host = "localhost".into();
    cfg.sslmode = SslMode::VerifyFull;
    let err = ReplicationClient::connect(&cfg).await.unwrap_err();
    assert!(matches!(err, ReplicationError::Tls(_)), "{err}");
    assert!(!err.is_transient());

    // A missing root file is a TLS error before anything is sent.
    cfg.ssl_root_cert = Some("/nonexistent/root.crt".into());
    let err = ReplicationClient::connect(&cfg).await.unwrap_err();
    assert!(matches!(err, ReplicationError::Tls(_)), "{err}");
}

#[tokio::test]
async fn unix_socket_connect() {
    let db = TestDb::create_empty().await;
    let mut cfg = superuser_config(&db);
    cfg.unix_socket_dir = Some(pg::socket_dir());
    // TLS is never attempted over a Unix socket, whatever sslmode says.
    cfg.sslmode = SslMode::Require;
    let mut client = connect(&cfg).await;
    assert!(!client.is_tls());
    let addr = scalar(
        &mut client,
        "SELECT coalesce(inet_client_addr()::text, 'unix')",
    )
    .await;
    assert_eq!(addr.as_deref(), Some("unix"));
    client.identify_system().await.unwrap();
    client.close().await;
}

#[tokio::test]
async fn url_config_connects() {
    let db = TestDb::create_empty().await;
    let (user, password) = pg::SCRAM_USER;
    // The password percent-encoded as a URL needs it ('-' needs no escape, but %2D is valid).
    let url = format!(
        "postgres://{user}:{}@{}:{}/{}?sslmode=require&application_name=url%20test",
        password.replace('-', "%2D"),
        pg::host(),
        pg::port(),
        db.name
    );
    let cfg = ReplicationConfig::from_url(&url).unwrap();
    assert!(!format!("{cfg:?}").contains(password));
    let mut client = connect(&cfg).await;
    let name = scalar(&mut client, "SELECT current_setting('application_name')").await;
    assert_eq!(name.as_deref(), Some("url test"));
    client.close().await;
}

#[tokio::test]
async fn create_slot_with_exported_snapshot_then_drop() {
    let db = TestDb::create_empty().await;
    let (admin, _publication) = table_and_publication(&db).await;
    admin
        .execute("INSERT INTO items (body) VALUES ('before')", &[])
        .await
        .unwrap();

    let mut client = connect(&superuser_config(&db)).await;
    let slot = unique_name("slot");
    let created = client
        .create_logical_slot(&slot, "pgoutput", false, SnapshotAction::Export)
        .await
        .unwrap();
    assert_eq!(created.slot_name, slot);
    assert_eq!(created.output_plugin, "pgoutput");
    assert!(created.consistent_point.is_valid());
    let snapshot = created.snapshot_name.clone().expect("an exported snapshot");

    // A row committed after the slot's consistent point is invisible in the exported snapshot,
    // which another session can import while the replication connection stays open and idle.
    admin
        .execute("INSERT INTO items (body) VALUES ('after')", &[])
        .await
        .unwrap();
    let mut reader = db.client().await;
    let txn = reader
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    txn.batch_execute(&format!("SET TRANSACTION SNAPSHOT '{snapshot}'"))
        .await
        .unwrap();
    let in_snapshot: i64 = txn
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    txn.commit().await.unwrap();
    assert_eq!(
        in_snapshot, 1,
        "the snapshot sees the database as of the consistent point"
    );

    let row = admin
        .query_one(
            "SELECT confirmed_flush_lsn::text, plugin::text FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, String>(0).parse::<Lsn>().unwrap(),
        created.consistent_point
    );
    assert_eq!(row.get::<_, String>(1), "pgoutput");

    // Creating it again: duplicate_object.
    let err = client
        .create_logical_slot(&slot, "pgoutput", false, SnapshotAction::NoExport)
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some(sqlstate::DUPLICATE_OBJECT), "{err}");
    assert!(!err.is_transient());

    client.drop_slot(&slot, false).await.unwrap();
    let remaining: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(remaining, 0);
    let err = client.drop_slot(&slot, false).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some(sqlstate::UNDEFINED_OBJECT), "{err}");

    // Temporary slots vanish with their connection.
    let temp = unique_name("slot");
    client
        .create_logical_slot(&temp, "pgoutput", true, SnapshotAction::NoExport)
        .await
        .unwrap();
    client.close().await;
    eventually(
        &admin,
        &format!("SELECT count(*)::text FROM pg_replication_slots WHERE slot_name = '{temp}'"),
        "0",
    )
    .await;
}

#[tokio::test]
async fn stream_a_transaction_confirm_it_and_finish() {
    let Streaming {
        mut stream,
        slot,
        consistent_point,
        admin,
        db,
    } = Streaming::start().await;

    admin
        .execute("INSERT INTO items (body) VALUES ('hello')", &[])
        .await
        .unwrap();

    // Begin ... Commit of the one transaction; keepalives may come in between.
    let mut tags = Vec::new();
    let mut commit_end = None;
    while commit_end.is_none() {
        match next_within(&mut stream, Duration::from_secs(15)).await {
            ReplicationMessage::XLogData { wal_end, data, .. } => {
                let tag = *data.first().expect("a non-empty pgoutput message");
                tags.push(tag);
                if tag == b'C' {
                    // Commit: flags (1), commit LSN (8), end LSN (8), timestamp (8).
                    let end = u64::from_be_bytes(data[10..18].try_into().unwrap());
                    assert_eq!(
                        Lsn(end),
                        wal_end,
                        "the Commit's XLogData carries its end LSN"
                    );
                    commit_end = Some(wal_end);
                }
            }
            ReplicationMessage::Keepalive { .. } => {}
        }
    }
    let end = commit_end.unwrap();
    assert_eq!(tags.first(), Some(&b'B'), "{tags:?}");
    assert_eq!(tags.last(), Some(&b'C'), "{tags:?}");
    assert!(tags.contains(&b'I'), "{tags:?}");

    // Nothing is confirmed on the caller's behalf.
    let confirmed_sql = format!(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{slot}'"
    );
    let confirmed: String = admin.query_one(&confirmed_sql, &[]).await.unwrap().get(0);
    assert_eq!(confirmed.parse::<Lsn>().unwrap(), consistent_point);

    // Confirm the transaction's end LSN and ask for an immediate reply: the server answers
    // with a keepalive, and the slot's confirmed position advances to exactly that LSN.
    stream
        .send_status_update(end, end, end, true)
        .await
        .unwrap();
    loop {
        if let ReplicationMessage::Keepalive { wal_end, .. } =
            next_within(&mut stream, Duration::from_secs(15)).await
        {
            assert!(wal_end >= end);
            break;
        }
    }
    eventually(&admin, &confirmed_sql, &end.to_string()).await;

    // A second consumer of the same slot: object_in_use, definite.
    let other = connect(&superuser_config(&db)).await;
    let err = other
        .start_replication(
            &slot,
            Lsn::INVALID,
            StartOptions::new(vec!["anything".into()]),
        )
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some(sqlstate::OBJECT_IN_USE), "{err}");
    assert!(!err.is_transient());

    stream.finish().await.unwrap();
    eventually(
        &admin,
        &format!("SELECT active::text FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        "false",
    )
    .await;
}

#[tokio::test]
async fn next_survives_cancellation_in_select() {
    let mut s = Streaming::start().await;
    s.admin
        .batch_execute(
            "INSERT INTO items (body) SELECT repeat('x', 20000) FROM generate_series(1, 50)",
        )
        .await
        .unwrap();

    // Race next() against a timer that fires often, so that many calls are cancelled midway;
    // the messages must still arrive whole and in order: one Begin, 50 Inserts, one Commit.
    let mut tags = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_micros(200));
    let deadline = Instant::now() + Duration::from_secs(30);
    while tags.last() != Some(&b'C') {
        assert!(
            Instant::now() < deadline,
            "the transaction in time: {tags:?}"
        );
        tokio::select! {
            message = s.stream.next() => {
                if let Some(ReplicationMessage::XLogData { data, .. }) = message.unwrap() {
                    if data.first() == Some(&b'I') {
                        assert!(data.len() > 20000, "an Insert arrives whole");
                    }
                    tags.push(data[0]);
                }
            }
            _ = tick.tick() => {}
        }
    }
    let inserts = tags.iter().filter(|&&t| t == b'I').count();
    assert_eq!((tags[0], inserts), (b'B', 50), "{tags:?}");
    s.stream.finish().await.unwrap();
}

#[tokio::test]
async fn terminated_walsender_is_a_transient_stream_error() {
    let mut s = Streaming::start().await;
    let terminated: bool = s
        .admin
        .query_one(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
            &[&s.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(15), s.stream.next())
            .await
            .unwrap()
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended cleanly after its walsender was terminated"),
            Err(e) => break e,
        }
    };
    // The server says why (admin_shutdown) before it closes the socket.
    assert_eq!(err.sqlstate(), Some(sqlstate::ADMIN_SHUTDOWN), "{err}");
    assert!(err.is_transient(), "{err}");
}

/// `wal_sender_timeout` can be set per connection (it is a user setting), so a short one makes
/// the server's reply-requested keepalives, due at half the timeout, come within a second.
#[tokio::test]
async fn keepalives_ask_for_replies_and_unanswered_ones_end_the_stream() {
    let mut s = Streaming::start_after(&["SET wal_sender_timeout = '2s'"]).await;

    // Answered: the stream lives on through several timeouts' worth of keepalives.
    let started = Instant::now();
    let mut answered = 0;
    while answered < 3 {
        if let ReplicationMessage::Keepalive {
            wal_end,
            reply_requested,
            ..
        } = next_within(&mut s.stream, Duration::from_secs(15)).await
        {
            assert!(wal_end.is_valid());
            if reply_requested {
                // Nothing was received, so the slot's own position is all that is safe.
                let safe = s.consistent_point;
                s.stream
                    .send_status_update(safe, safe, safe, false)
                    .await
                    .unwrap();
                answered += 1;
            }
        }
    }
    assert!(started.elapsed() > Duration::from_secs(2));

    // Unanswered: the server gives up after the timeout and closes the connection between
    // messages (it logs the reason, it does not send it): a clean EOF, transient.
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(15), s.stream.next())
            .await
            .expect("the server times out the silent client")
        {
            Ok(Some(ReplicationMessage::Keepalive { .. })) => continue,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err, ReplicationError::UnexpectedEof { mid_frame: false }),
        "{err}"
    );
    assert!(err.is_transient());
}

#[tokio::test]
async fn start_replication_on_a_missing_slot_is_undefined_object() {
    let db = TestDb::create_empty().await;
    let client = connect(&superuser_config(&db)).await;
    let err = client
        .start_replication(
            &unique_name("nosuch"),
            Lsn::INVALID,
            StartOptions::new(vec!["p".into()]),
        )
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some(sqlstate::UNDEFINED_OBJECT), "{err}");
    assert!(!err.is_transient());
}
