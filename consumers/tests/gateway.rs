//! The fake payment gateway on its own: a repeated idempotency key returns the original charge,
//! a request without a key charges again, and both show in the request log and the ledger.

use std::time::Duration;

use consumers::gateway::client::GatewayClient;
use consumers::gateway::{Charge, ChargeRequest, GatewayFaults, RequestLogEntry, Summary};

use crate::support::gateway::Gateway;
use crate::support::pg::TestDb;
use crate::support::procs::Proc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_idempotency_key_returns_the_original_charge() {
    let db = TestDb::create().await;
    let gw = Gateway::start(&db.url(), GatewayFaults::default()).await;
    let c = GatewayClient::new(&gw.url(), Duration::from_secs(5));
    let req = ChargeRequest {
        order_id: "o-1".into(),
        amount_cents: 1234,
    };
    let first = c.charge(&req, Some("order-o-1")).await.unwrap();
    assert!(!first.replayed);
    // The same key, three more times, two of them concurrently.
    let (a, b) = tokio::join!(
        c.charge(&req, Some("order-o-1")),
        c.charge(&req, Some("order-o-1"))
    );
    let again = c.charge(&req, Some("order-o-1")).await.unwrap();
    for r in [a.unwrap(), b.unwrap(), again] {
        assert_eq!(
            r.charge_id, first.charge_id,
            "the original charge comes back"
        );
        assert!(r.replayed);
    }
    // The key reused for another order is refused, not charged.
    let other = ChargeRequest {
        order_id: "o-2".into(),
        amount_cents: 1234,
    };
    let refused = c.charge(&other, Some("order-o-1")).await.unwrap_err();
    assert_eq!(refused.kind, "gateway_rejected");
    // Without a key, every request is a new charge.
    let n1 = c.charge(&other, None).await.unwrap();
    let n2 = c.charge(&other, None).await.unwrap();
    assert_ne!(n1.charge_id, n2.charge_id);

    let ledger: Vec<Charge> = gw.client().get_json("/charges").await.unwrap();
    assert_eq!(ledger.len(), 3, "one charge for o-1, two for o-2");
    let log: Vec<RequestLogEntry> = gw.client().get_json("/requests").await.unwrap();
    let outcomes: Vec<&str> = log.iter().map(|e| e.outcome.as_str()).collect();
    assert_eq!(
        outcomes.len(),
        7,
        "every request is logged, repeats included"
    );
    assert_eq!(outcomes.iter().filter(|o| **o == "replayed").count(), 3);
    assert_eq!(outcomes.iter().filter(|o| **o == "charged").count(), 3);
    assert_eq!(outcomes.iter().filter(|o| **o == "conflict").count(), 1);
    let s: Summary = gw.client().summary().await.unwrap();
    assert_eq!(
        (
            s.requests,
            s.charges,
            s.orders_charged,
            s.orders_charged_more_than_once,
            s.extra_charges
        ),
        (7, 3, 2, 1, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_timeout_charges_but_answers_too_late_and_failures_charge_nothing() {
    let db = TestDb::create().await;
    let gw = Gateway::start(
        &db.url(),
        GatewayFaults {
            timeout_rate: 1.0,
            timeout_delay: Duration::from_millis(500),
            ..GatewayFaults::default()
        },
    )
    .await;
    let c = GatewayClient::new(&gw.url(), Duration::from_millis(100));
    let req = ChargeRequest {
        order_id: "o-1".into(),
        amount_cents: 10,
    };
    let e = c.charge(&req, Some("k")).await.unwrap_err();
    assert_eq!(e.kind, "gateway_timeout");
    assert!(e.is_retryable());
    let s: Summary = gw.client().summary().await.unwrap();
    assert_eq!(
        (s.charges, s.injected_timeouts),
        (1, 1),
        "charged although the caller timed out"
    );

    let failing = Gateway::start(
        &db.url(),
        GatewayFaults {
            fail_rate: 1.0,
            ..GatewayFaults::default()
        },
    )
    .await;
    let c = GatewayClient::new(&failing.url(), Duration::from_secs(5));
    let e = c.charge(&req, Some("k2")).await.unwrap_err();
    assert_eq!(e.kind, "gateway_5xx");
    assert!(e.is_retryable());
    let s: Summary = failing.client().summary().await.unwrap();
    assert_eq!(
        (s.charges, s.injected_failures),
        (1, 1),
        "the 503 charged nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_runs_as_its_own_process_and_keeps_its_ledger_across_restarts() {
    let db = TestDb::create().await;
    let port = crate::support::free_port();
    let listen = format!("127.0.0.1:{port}");
    let args: Vec<String> = ["gateway", "--listen", &listen, "--database-url", &db.url()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let log = std::env::temp_dir().join(crate::support::unique_name("gateway_log"));
    let c = GatewayClient::new(&format!("http://{listen}"), Duration::from_secs(5));
    let req = ChargeRequest {
        order_id: "o-1".into(),
        amount_cents: 700,
    };
    let mut first = None;
    for life in 0..2 {
        let gw = Proc::spawn(&args, &[], &log);
        let charge =
            crate::support::wait_for("the gateway answers", Duration::from_secs(30), || {
                let (c, req) = (c.clone(), req.clone());
                async move { c.charge(&req, Some("order-o-1")).await.ok() }
            })
            .await;
        // The second process answers from the ledger the first one wrote.
        let original = first.get_or_insert_with(|| charge.clone());
        assert_eq!(charge.charge_id, original.charge_id, "life {life}");
        assert_eq!(charge.replayed, life == 1, "life {life}");
        assert!(gw.stop().success(), "the gateway stops cleanly on SIGTERM");
    }
    let s: Summary = {
        let gw = Proc::spawn(&args, &[], &log);
        let s = crate::support::wait_for("summary", Duration::from_secs(30), || {
            let c = c.clone();
            async move { c.summary().await.ok() }
        })
        .await;
        gw.stop();
        s
    };
    assert_eq!((s.requests, s.charges, s.replayed_requests), (2, 1, 1));
}
