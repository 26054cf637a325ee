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
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::config::{ReplicationConfig, SslMode};
use super::error::ReplicationError;
use super::Socket;

/// Negotiates TLS on a fresh TCP connection as `cfg.sslmode` says. Returns the socket to speak
/// the protocol on, and whether it is encrypted.
pub(crate) async fn negotiate(
    mut tcp: TcpStream,
    cfg: &ReplicationConfig,
) -> Result<(Box<dyn Socket>, bool), ReplicationError> {
    if cfg.sslmode == SslMode::Disable {
        return Ok((Box::new(tcp), false));
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
        b'S' => {}
        b'N' if cfg.sslmode == SslMode::Prefer => return Ok((Box::new(tcp), false)),
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

    let server_name = ServerName::try_from(cfg.host.clone()).map_err(|e| {
        ReplicationError::Config(format!(
            "host {:?} is not a valid TLS server name: {e}",
            cfg.host
        ))
    })?;
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
    Ok((Box::new(tls), true))
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
