//! Kafka connection failures that no retry fixes: SASL authentication refused (wrong user or
//! password, a mechanism the broker does not enable) and a broker certificate that does not
//! verify against `ssl.ca.location`.
//!
//! librdkafka reports them only as error events on its client context while it keeps
//! reconnecting, and the calls in progress merely time out; left at that, the relay would
//! reconnect forever with a timeout as the only clue. The contexts record such events in a
//! [`SecurityWatch`], and [`await_connection`] turns one into a configuration error (the relay
//! exits with the broker's reason) before anything else is attempted.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::{Client, ClientContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::SinkError;

/// The first definite security failure librdkafka reported, shared by a client's context and
/// the sink thread.
#[derive(Clone, Debug, Default)]
pub(crate) struct SecurityWatch(Arc<Mutex<Option<String>>>);

impl SecurityWatch {
    /// Records `error` if it is a definite security failure (see the module docs). Returns
    /// whether it was one.
    pub(crate) fn observe(&self, error: &KafkaError, reason: &str) -> bool {
        let Some(what) = definite(error.rdkafka_error_code(), reason) else {
            return false;
        };
        let mut first = self.0.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert_with(|| format!("{what}: {reason}"));
        true
    }

    /// The first failure recorded, if any.
    pub(crate) fn failure(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What a librdkafka error event is, when it is one no reconnect fixes. librdkafka's SSL code
/// (`-181`) also covers transient trouble (a connection reset during the handshake), so only a
/// failed certificate verification counts among those.
fn definite(code: Option<RDKafkaErrorCode>, reason: &str) -> Option<&'static str> {
    match code? {
        RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed => {
            Some("Kafka refused the SASL authentication (check sasl.mechanism, sasl.username and sasl.password)")
        }
        RDKafkaErrorCode::SSL if reason.contains("certificate verify failed") => Some(
            "the Kafka broker's TLS certificate did not verify (check ssl.ca.location and the broker's name in bootstrap_servers)",
        ),
        _ => None,
    }
}

/// Waits until the client has reached a broker (it knows the cluster id) or `timeout` passes.
/// A definite security failure reported meanwhile is a [`SinkError::Config`] at once: an
/// operator must fix the credentials or the CA; reconnecting would only repeat it.
pub(crate) fn await_connection<C: ClientContext>(
    client: &Client<C>,
    watch: &SecurityWatch,
    bootstrap_servers: &str,
    timeout: Duration,
) -> Result<(), SinkError> {
    let deadline = Instant::now() + timeout;
    loop {
        // The cluster id comes with the first metadata response, after TLS and SASL succeeded.
        // Asking for it requests broker metadata only, never a topic's (which could create one).
        if client
            .fetch_cluster_id(Duration::from_millis(500))
            .is_some()
        {
            return Ok(());
        }
        if let Some(failure) = watch.failure() {
            return Err(SinkError::Config(failure));
        }
        if Instant::now() >= deadline {
            return Err(SinkError::Unavailable(format!(
                "no Kafka broker of {bootstrap_servers} answered within {timeout:?}"
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_authentication_and_certificate_failures_are_definite() {
        let watch = SecurityWatch::default();
        assert!(!watch.observe(
            &KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down"
        ));
        assert!(!watch.observe(
            &KafkaError::Global(RDKafkaErrorCode::SSL),
            "SSL transport error: Connection reset by peer"
        ));
        assert_eq!(watch.failure(), None);
        assert!(watch.observe(
            &KafkaError::Global(RDKafkaErrorCode::Authentication),
            "SASL authentication error: Authentication failed during authentication due to \
             invalid credentials with SASL mechanism SCRAM-SHA-512"
        ));
        assert!(watch.observe(
            &KafkaError::Global(RDKafkaErrorCode::SSL),
            "ssl://127.0.0.1:9094/bootstrap: SSL handshake failed: certificate verify failed"
        ));
        // The first one is kept: it is the cause; later ones are consequences.
        let failure = watch.failure().unwrap();
        assert!(failure.contains("SASL authentication"), "{failure}");
        assert!(failure.contains("invalid credentials"), "{failure}");
    }
}
