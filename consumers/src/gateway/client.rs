//! The payment consumer's client for the gateway: one HTTP/1.1 request per connection over
//! loopback TCP (hyper's low-level client), with a timeout on the whole exchange.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

use super::{Charge, ChargeRequest, Summary};
use crate::error::HandlerError;

/// Responses larger than this are refused (the gateway's are a few hundred bytes; the log and
/// ledger listings are larger and read with [`GatewayClient::get_json`]).
const MAX_CHARGE_RESPONSE: usize = 64 * 1024;

/// Talks to one gateway.
#[derive(Debug, Clone)]
pub struct GatewayClient {
    /// `host:port`.
    authority: String,
    timeout: Duration,
}

impl GatewayClient {
    /// `url` is `http://host:port` (or just `host:port`); `timeout` bounds each request.
    pub fn new(url: &str, timeout: Duration) -> GatewayClient {
        let authority = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        GatewayClient { authority, timeout }
    }

    async fn send(
        &self,
        req: Request<Full<Bytes>>,
        max_body: usize,
    ) -> Result<(hyper::StatusCode, Bytes), HandlerError> {
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(&self.authority)
                .await
                .map_err(|e| HandlerError::retryable("gateway_unavailable", e.to_string()))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| HandlerError::retryable("gateway_unavailable", e.to_string()))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| HandlerError::retryable("gateway_io", e.to_string()))?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), max_body)
                .collect()
                .await
                .map_err(|e| HandlerError::retryable("gateway_io", e.to_string()))?
                .to_bytes();
            Ok::<_, HandlerError>((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                HandlerError::retryable(
                    "gateway_timeout",
                    format!("no answer within {:?}", self.timeout),
                )
            })?
    }

    /// `POST /charges`, with `Idempotency-Key: key` when given.
    ///
    /// Timeouts, connection errors and 5xx are retryable; a 4xx is permanent (retrying the same
    /// request cannot help).
    pub async fn charge(
        &self,
        request: &ChargeRequest,
        key: Option<&str>,
    ) -> Result<Charge, HandlerError> {
        let body = serde_json::to_vec(request)
            .map_err(|e| HandlerError::permanent("gateway_request", e.to_string()))?;
        let mut builder = Request::post("/charges")
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(k) = key {
            builder = builder.header("idempotency-key", k);
        }
        let req = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| HandlerError::permanent("gateway_request", e.to_string()))?;
        let (status, body) = self.send(req, MAX_CHARGE_RESPONSE).await?;
        if status.is_server_error() {
            return Err(HandlerError::retryable(
                "gateway_5xx",
                format!("gateway answered {status}"),
            ));
        }
        if !status.is_success() {
            return Err(HandlerError::permanent(
                "gateway_rejected",
                format!("gateway answered {status}"),
            ));
        }
        serde_json::from_slice(&body).map_err(|e| {
            HandlerError::permanent("gateway_bad_response", format!("not a charge: {e}"))
        })
    }

    /// `GET path`, parsed as JSON (for the ledger, the log and the summary).
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<T, HandlerError> {
        let req = Request::get(path)
            .header(hyper::header::HOST, &self.authority)
            .body(Full::new(Bytes::new()))
            .map_err(|e| HandlerError::permanent("gateway_request", e.to_string()))?;
        let (status, body) = self.send(req, 256 * 1024 * 1024).await?;
        if !status.is_success() {
            return Err(HandlerError::retryable(
                "gateway_5xx",
                format!("gateway answered {status}"),
            ));
        }
        serde_json::from_slice(&body)
            .map_err(|e| HandlerError::permanent("gateway_bad_response", e.to_string()))
    }

    pub async fn summary(&self) -> Result<Summary, HandlerError> {
        self.get_json("/summary").await
    }
}
