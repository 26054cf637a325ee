//! TLS for the replication connection: SSLRequest negotiation and the rustls configuration of
//! each [`SslMode`].
//!
//! One certificate verifier, `ServerAuth`, stands in for libpq's behaviour where rustls's
//! defaults differ:
//!
//! - `require` (and `prefer`) encrypt but, like libpq, do not authenticate the server:
//!   `CertCheck::None` accepts any certificate (still checking that the server holds its key,
//!   which is free).
//! - `verify-full` uses rustls's WebPKI verifier, except when the server presents one of the
//!   configured root certificates itself. Postgres setups commonly use a self-signed server
//!   certificate as `sslrootcert`; such a certificate is usually marked `CA:TRUE`, which WebPKI
//!   refuses as an end-entity certificate (`CaUsedAsEndEntity`) while OpenSSL accepts it. For
//!   that case `CertCheck::PinnedOrWebPki` accepts the exact certificate the operator pinned and
//!   still checks the host name against it. It does not check a pinned certificate's validity
//!   period.
//!
//! `prefer` follows libpq: TLS when the server offers it, plain text when it answers `N`; and
//! when a connection fails once encrypted (the handshake fails, or the server refuses the login
//! over TLS, as a `hostnossl` line in pg_hba.conf makes it), one more attempt on a new,
//! unencrypted connection ([`with_prefer_fallback`]).

use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;

use super::config::{ReplicationConfig, SslMode};
use super::error::ReplicationError;
use super::Socket;

/// Opens the connection `cfg` names: the Unix socket `<dir>/.s.PGSQL.<port>`, or TCP with TLS
/// negotiated as `cfg.sslmode` says. `encrypted` is set as soon as the server agrees to TLS,
/// before the handshake, so a caller can tell a failure over TLS from one before it.
pub(crate) async fn open(
    cfg: &ReplicationConfig,
    encrypted: &mut bool,
) -> Result<Box<dyn Socket>, ReplicationError> {
    *encrypted = false;
    if let Some(dir) = &cfg.unix_socket_dir {
        let path = dir.join(format!(".s.PGSQL.{}", cfg.port));
        return Ok(Box::new(UnixStream::connect(path).await?));
    }
    let tcp = TcpStream::connect((cfg.host.as_str(), cfg.port)).await?;
    // Status updates and small queries: latency matters more than packet count.
    tcp.set_nodelay(true)?;
    // A peer that vanished (host down, network partition, a NAT that dropped the flow) is
    // noticed by the kernel within about a minute and the read fails, instead of a replication
    // stream waiting forever for the next message.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(30))
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(3);
    socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive)?;
    negotiate(tcp, cfg, encrypted).await
}

/// Connects as every Postgres connection of the relay does: validates `cfg`, then runs
/// `attempt` (one connection attempt, which sets its `bool` once TLS is agreed on); under
/// `sslmode=prefer`, when it failed over TLS in a way a plain connection might not, runs it once
/// more with TLS off, as libpq does (logged, so a downgrade never goes unnoticed). All of it
/// within `cfg.connect_timeout` (a timeout is an `Io` error of kind `TimedOut`, transient).
pub(crate) async fn establish<T, F>(
    cfg: &ReplicationConfig,
    mut attempt: F,
) -> Result<T, ReplicationError>
where
    F: for<'a> FnMut(
        &'a ReplicationConfig,
        &'a mut bool,
    ) -> futures_util::future::BoxFuture<'a, Result<T, ReplicationError>>,
{
    cfg.validate()?;
    let with_fallback = async {
        let mut encrypted = false;
        match attempt(cfg, &mut encrypted).await {
            Err(e) if cfg.sslmode == SslMode::Prefer && encrypted && plain_may_help(&e) => {
                tracing::warn!(
                    host = %cfg.host,
                    port = cfg.port,
                    error = %e,
                    "connection over TLS failed; sslmode=prefer retries without TLS"
                );
                let mut plain = cfg.clone();
                plain.sslmode = SslMode::Disable;
                attempt(&plain, &mut encrypted).await
            }
            other => other,
        }
    };
    match tokio::time::timeout(cfg.connect_timeout, with_fallback).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "connecting took longer than connect_timeout ({:?})",
                cfg.connect_timeout
            ),
        )
        .into()),
    }
}

/// Failures after TLS was agreed on that a plain connection may not meet: the handshake, the
/// connection dropping, or the server's refusal. Not the client's own configuration problems
/// (no password configured, an unsupported method), which TLS has nothing to do with.
fn plain_may_help(e: &ReplicationError) -> bool {
    match e {
        ReplicationError::Tls(_)
        | ReplicationError::Io(_)
        | ReplicationError::UnexpectedEof { .. }
        | ReplicationError::Server(_) => true,
        ReplicationError::Auth { server, .. } => server.is_some(),
        ReplicationError::Protocol { .. } | ReplicationError::Config(_) => false,
    }
}

/// Checks, without connecting, what the TLS settings need from the local machine: that
/// `sslrootcert` is readable and holds a usable certificate under `verify-full`, and that the
/// host is a valid TLS server name. Configuration validation calls it, so a typo in the path is
/// reported by `check-config` rather than at the first connection.
pub fn check_tls_settings(cfg: &ReplicationConfig) -> Result<(), ReplicationError> {
    if cfg.sslmode == SslMode::Disable || cfg.unix_socket_dir.is_some() {
        return Ok(());
    }
    client_config(cfg.sslmode, cfg.ssl_root_cert.as_deref())?;
    server_name(cfg).map(drop)
}

fn server_name(cfg: &ReplicationConfig) -> Result<ServerName<'static>, ReplicationError> {
    ServerName::try_from(cfg.host.clone()).map_err(|e| {
        ReplicationError::Config(format!(
            "host {:?} is not a valid TLS server name: {e}",
            cfg.host
        ))
    })
}

/// Negotiates TLS on a fresh TCP connection as `cfg.sslmode` says. Returns the socket to speak
/// the protocol on; `encrypted` tells whether it is encrypted (set before the handshake).
async fn negotiate(
    mut tcp: TcpStream,
    cfg: &ReplicationConfig,
    encrypted: &mut bool,
) -> Result<Box<dyn Socket>, ReplicationError> {
    if cfg.sslmode == SslMode::Disable {
        return Ok(Box::new(tcp));
    }
    // Build the rustls configuration first, so that an unreadable root file fails before any
    // bytes are exchanged.
    let config = client_config(cfg.sslmode, cfg.ssl_root_cert.as_deref())?;

    let mut request = BytesMut::new();
    postgres_protocol::message::frontend::ssl_request(&mut request);
    tcp.write_all(&request).await?;
    // Exactly one byte: anything the server sent after it must come through TLS, never be
    // buffered from the plain connection (CVE-2021-23222).
    let answer = tcp.read_u8().await?;
    match answer {
        b'S' => *encrypted = true,
        b'N' if cfg.sslmode == SslMode::Prefer => return Ok(Box::new(tcp)),
        b'N' => {
            return Err(ReplicationError::Tls(format!(
                "the server does not accept TLS connections, but sslmode={}",
                if cfg.sslmode == SslMode::Require {
                    "require"
                } else {
                    "verify-full"
                }
            )))
        }
        // An error here comes from a server too old to know SSLRequest.
        other => {
            return Err(ReplicationError::protocol(
                format!(
                    "unexpected answer {} to SSLRequest",
                    super::frame::tag_name(other)
                ),
                Some(0),
            ))
        }
    }

    let server_name = server_name(cfg)?;
    let tls = TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(|e| {
            match e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                Some(tls_error) => ReplicationError::Tls(tls_error.to_string()),
                None => ReplicationError::Io(e),
            }
        })?;
    Ok(Box::new(tls))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client configuration of an encrypting `sslmode`.
fn client_config(
    mode: SslMode,
    root_cert: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, ReplicationError> {
    let provider = provider();
    let algorithms = provider.signature_verification_algorithms;
    let check = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => CertCheck::None,
        SslMode::VerifyFull => {
            let (roots, pinned) = match root_cert {
                Some(path) => {
                    let certs = load_pem_certs(path)?;
                    let mut roots = RootCertStore::empty();
                    let (added, _ignored) = roots.add_parsable_certificates(certs.iter().cloned());
                    if added == 0 {
                        return Err(ReplicationError::Tls(format!(
                            "no usable certificate in sslrootcert {}",
                            path.display()
                        )));
                    }
                    (roots, certs)
                }
                None => (
                    RootCertStore {
                        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                    },
                    Vec::new(),
                ),
            };
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| {
                        ReplicationError::Tls(format!("cannot build the certificate verifier: {e}"))
                    })?;
            CertCheck::PinnedOrWebPki { webpki, pinned }
        }
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ReplicationError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerAuth { check, algorithms }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn load_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ReplicationError> {
    let unreadable = |e: &dyn std::fmt::Display| {
        ReplicationError::Tls(format!("cannot read sslrootcert {}: {e}", path.display()))
    };
    CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(&e))
}

/// How the server's certificate is checked; the handshake signatures are verified in any case
/// (that proves the server holds the key of the certificate it presented, and costs nothing).
#[derive(Debug)]
enum CertCheck {
    /// `sslmode=require`: encryption without server authentication, as libpq does it.
    None,
    /// `sslmode=verify-full`: WebPKI, or the exact pinned root certificate presented by the
    /// server (see the module docs).
    PinnedOrWebPki {
        webpki: Arc<WebPkiServerVerifier>,
        pinned: Vec<CertificateDer<'static>>,
    },
}

#[derive(Debug)]
struct ServerAuth {
    check: CertCheck,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerAuth {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.check {
            CertCheck::None => Ok(ServerCertVerified::assertion()),
            CertCheck::PinnedOrWebPki { pinned, .. }
                if pinned.iter().any(|p| p.as_ref() == end_entity.as_ref()) =>
            {
                let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&parsed, server_name)?;
                Ok(ServerCertVerified::assertion())
            }
            CertCheck::PinnedOrWebPki { webpki, .. } => webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::conn::ReplicationClient;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// A server that agrees to TLS and then hangs up (a broken TLS set-up), but serves a plain
    /// connection: AuthenticationOk, ReadyForQuery. Counts the connections it accepted.
    async fn tls_breaking_server() -> (ReplicationConfig, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut cfg = ReplicationConfig::new("127.0.0.1", "u");
        cfg.port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let len = usize::try_from(socket.read_i32().await.unwrap()).unwrap();
                    let mut body = vec![0; len - 4];
                    socket.read_exact(&mut body).await.unwrap();
                    // SSLRequest: its code 80877103 instead of a protocol version.
                    if body[..4] == 80_877_103i32.to_be_bytes() {
                        socket.write_all(b"S").await.unwrap();
                        return; // dropped: the handshake fails
                    }
                    let mut answer = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0];
                    answer.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
                    socket.write_all(&answer).await.unwrap();
                    let mut rest = Vec::new();
                    let _ = socket.read_to_end(&mut rest).await;
                });
            }
        });
        (cfg, accepted)
    }

    #[tokio::test]
    async fn prefer_retries_without_tls_when_the_handshake_fails() {
        let (mut cfg, accepted) = tls_breaking_server().await;
        cfg.sslmode = SslMode::Prefer;
        let client = ReplicationClient::connect(&cfg).await.expect("plain retry");
        assert!(!client.is_tls());
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "one TLS attempt, one plain"
        );

        cfg.sslmode = SslMode::Require;
        let err = ReplicationClient::connect(&cfg).await.unwrap_err();
        assert!(
            matches!(
                err,
                ReplicationError::Io(_) | ReplicationError::UnexpectedEof { .. }
            ),
            "the broken handshake is the error: {err}"
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            3,
            "require never goes plain"
        );
    }

    #[test]
    fn only_failures_over_tls_that_plain_may_avoid_are_retried() {
        assert!(plain_may_help(&ReplicationError::Tls("handshake".into())));
        assert!(plain_may_help(&ReplicationError::UnexpectedEof {
            mid_frame: false
        }));
        assert!(!plain_may_help(&ReplicationError::Config("bad".into())));
        assert!(!plain_may_help(&ReplicationError::Auth {
            what: "no password configured".into(),
            server: None
        }));
    }

    #[test]
    fn tls_settings_are_checked_without_connecting() {
        let mut cfg = ReplicationConfig::new("db.example", "u");
        cfg.sslmode = SslMode::VerifyFull;
        check_tls_settings(&cfg).expect("the Mozilla roots");
        cfg.ssl_root_cert = Some("/nonexistent/root.pem".into());
        let err = check_tls_settings(&cfg).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/root.pem"), "{err}");
        cfg.sslmode = SslMode::Disable;
        check_tls_settings(&cfg).expect("nothing to check without TLS");
    }
}
