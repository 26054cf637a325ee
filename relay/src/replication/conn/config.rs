//! Where and how to connect: [`ReplicationConfig`], built in code or from a libpq-style URL.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::error::ReplicationError;

/// Whether and how to use TLS, with libpq's meaning of each mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// Ask for TLS; continue in plain text if the server declines. As in libpq, a connection
    /// that fails once encrypted (handshake, or the server refusing the login over TLS) is tried
    /// once more without TLS, and the certificate is not verified (encryption against passive
    /// eavesdroppers only).
    #[default]
    Prefer,
    /// TLS or fail, but without verifying the certificate: libpq's `require` (encrypt, don't
    /// authenticate the server). Use `VerifyFull` against an active attacker.
    Require,
    /// TLS, the certificate chain verified against the root certificates
    /// ([`ReplicationConfig::ssl_root_cert`], else the Mozilla roots of `webpki-roots`) and the
    /// host name checked against the certificate.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = ReplicationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-full" => Ok(SslMode::VerifyFull),
            "allow" | "verify-ca" => Err(ReplicationError::Config(format!(
                "sslmode={s} is not supported; use disable, prefer, require or verify-full"
            ))),
            _ => Err(ReplicationError::Config(format!("unknown sslmode {s:?}"))),
        }
    }
}

/// Connection settings of a Postgres connection: the replication connection
/// ([`super::ReplicationClient::connect`]) and the SQL connections ([`super::connect_sql`]) take
/// the same settings, parsed by [`ReplicationConfig::from_url`], with the same TLS.
///
/// `Debug` prints the password as `<redacted>`, so the whole config may be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// Host name or IP address; also the name checked against the certificate in `VerifyFull`.
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Used for cleartext, MD5 and SCRAM authentication; never logged.
    pub password: Option<String>,
    pub dbname: String,
    /// Shown in `pg_stat_activity` and `pg_stat_replication`.
    pub application_name: String,
    /// Bounds the whole connection set-up: TCP, TLS, authentication, until ReadyForQuery.
    pub connect_timeout: Duration,
    pub sslmode: SslMode,
    /// PEM file of the root certificates for `VerifyFull`; `None` means the Mozilla roots.
    pub ssl_root_cert: Option<PathBuf>,
    /// When set, connect to the Unix socket `<dir>/.s.PGSQL.<port>` instead of TCP to `host`.
    /// TLS is never used over a Unix socket (as in libpq): the socket is local already.
    pub unix_socket_dir: Option<PathBuf>,
}

impl fmt::Debug for ReplicationConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("sslmode", &self.sslmode)
            .field("ssl_root_cert", &self.ssl_root_cert)
            .field("unix_socket_dir", &self.unix_socket_dir)
            .finish()
    }
}

impl ReplicationConfig {
    /// Settings with libpq's defaults: port 5432, `sslmode=prefer`, the database named after
    /// the user, no password, a 10 s connect timeout.
    pub fn new(host: impl Into<String>, user: impl Into<String>) -> ReplicationConfig {
        let user = user.into();
        ReplicationConfig {
            host: host.into(),
            port: 5432,
            dbname: user.clone(),
            user,
            password: None,
            application_name: "outbox-relay".to_owned(),
            connect_timeout: Duration::from_secs(10),
            sslmode: SslMode::default(),
            ssl_root_cert: None,
            unix_socket_dir: None,
        }
    }

    /// Parses a libpq-style URL:
    /// `postgres://user:password@host:port/dbname?sslmode=verify-full&sslrootcert=/path/ca.pem`.
    ///
    /// User, password, database and parameter values are percent-decoded, so a password with
    /// `@`, `:` or `/` must be written percent-encoded. A host that decodes to an absolute path
    /// (`postgres://%2Fvar%2Frun%2Fpostgresql/db`), or a `host=/dir` parameter, selects a Unix
    /// socket directory. Parameters: `sslmode`, `sslrootcert`, `application_name`,
    /// `connect_timeout` (seconds), `host`, `port`, `user`, `password`, `dbname`; any other is an
    /// error rather than silently ignored.
    pub fn from_url(url: &str) -> Result<ReplicationConfig, ReplicationError> {
        let bad = |what: &str| ReplicationError::Config(format!("bad connection URL: {what}"));
        let rest = url
            .strip_prefix("postgresql://")
            .or_else(|| url.strip_prefix("postgres://"))
            .ok_or_else(|| bad("expected postgres:// or postgresql://"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = match rest.split_once('/') {
            Some((authority, path)) => (authority, Some(path)),
            None => (rest, None),
        };
        // The password may contain '@' only percent-encoded, so the last '@' ends the userinfo.
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };

        let mut cfg = ReplicationConfig::new("localhost", "");
        let mut dbname = None;
        if let Some(userinfo) = userinfo {
            let (user, password) = match userinfo.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (userinfo, None),
            };
            cfg.user =
                percent_decode(user).ok_or_else(|| bad("invalid percent-encoding in the user"))?;
            if let Some(password) = password {
                cfg.password = Some(
                    percent_decode(password)
                        .ok_or_else(|| bad("invalid percent-encoding in the password"))?,
                );
            }
        }

        let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| bad("unclosed '[' in the host"))?;
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| bad("junk after ']'"))?,
                    ),
                ),
            }
        } else {
            match hostport.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (hostport, None),
            }
        };
        if !host.is_empty() {
            cfg.set_host(
                &percent_decode(host).ok_or_else(|| bad("invalid percent-encoding in the host"))?,
            );
        }
        if let Some(port) = port {
            cfg.port = port
                .parse()
                .map_err(|_| bad("the port is not a number in 1..=65535"))?;
        }
        if let Some(path) = path.filter(|p| !p.is_empty()) {
            dbname = Some(
                percent_decode(path)
                    .ok_or_else(|| bad("invalid percent-encoding in the database"))?,
            );
        }

        for pair in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| bad("a parameter without '='"))?;
            let value = percent_decode(value)
                .ok_or_else(|| bad("invalid percent-encoding in a parameter"))?;
            match key {
                "sslmode" => cfg.sslmode = value.parse()?,
                "sslrootcert" => cfg.ssl_root_cert = Some(PathBuf::from(value)),
                "application_name" => cfg.application_name = value,
                "connect_timeout" => {
                    let secs: u64 = value
                        .parse()
                        .map_err(|_| bad("connect_timeout is not a number of seconds"))?;
                    cfg.connect_timeout = Duration::from_secs(secs);
                }
                "host" => cfg.set_host(&value),
                "port" => {
                    cfg.port = value
                        .parse()
                        .map_err(|_| bad("the port is not a number in 1..=65535"))?
                }
                "user" => cfg.user = value,
                "password" => cfg.password = Some(value),
                "dbname" => dbname = Some(value),
                other => {
                    return Err(ReplicationError::Config(format!(
                        "unsupported connection URL parameter {other:?}"
                    )))
                }
            }
        }
        cfg.dbname = dbname.unwrap_or_else(|| cfg.user.clone());
        cfg.validate()?;
        Ok(cfg)
    }

    /// An absolute path is a Unix socket directory (libpq's convention); anything else a host.
    fn set_host(&mut self, host: &str) {
        if host.starts_with('/') {
            self.unix_socket_dir = Some(PathBuf::from(host));
        } else {
            self.host = host.to_owned();
        }
    }

    /// Rejects settings that cannot work, before any connection attempt.
    pub(crate) fn validate(&self) -> Result<(), ReplicationError> {
        if self.user.is_empty() {
            return Err(ReplicationError::Config("no user given".into()));
        }
        if self.port == 0 {
            return Err(ReplicationError::Config("port 0".into()));
        }
        if self.unix_socket_dir.is_none() && self.host.is_empty() {
            return Err(ReplicationError::Config("no host given".into()));
        }
        // A NUL would end the startup message's string early.
        for (name, value) in [
            ("user", &self.user),
            ("dbname", &self.dbname),
            ("application_name", &self.application_name),
        ] {
            if value.contains('\0') {
                return Err(ReplicationError::Config(format!(
                    "{name} contains a NUL byte"
                )));
            }
        }
        Ok(())
    }
}

/// Decodes `%XX` escapes; `None` on a malformed escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = char::from(bytes.next()?).to_digit(16)?;
            let lo = char::from(bytes.next()?).to_digit(16)?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_url() {
        let cfg = ReplicationConfig::from_url(
            "postgres://relay:p%40ss%3Aw%2Fd@db.example:6543/outbox?sslmode=verify-full\
             &sslrootcert=/etc/ca.pem&application_name=relay%201&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(cfg.user, "relay");
        assert_eq!(cfg.password.as_deref(), Some("p@ss:w/d"));
        assert_eq!(cfg.host, "db.example");
        assert_eq!(cfg.port, 6543);
        assert_eq!(cfg.dbname, "outbox");
        assert_eq!(cfg.sslmode, SslMode::VerifyFull);
        assert_eq!(cfg.ssl_root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(cfg.application_name, "relay 1");
        assert_eq!(cfg.connect_timeout, Duration::from_secs(3));
        assert_eq!(cfg.unix_socket_dir, None);
    }

    #[test]
    fn defaults_ipv6_and_unix_sockets() {
        let cfg = ReplicationConfig::from_url("postgresql://u@[::1]").unwrap();
        assert_eq!(
            (cfg.host.as_str(), cfg.port, cfg.dbname.as_str()),
            ("::1", 5432, "u")
        );
        assert_eq!(cfg.sslmode, SslMode::Prefer);
        assert_eq!(cfg.password, None);

        let cfg = ReplicationConfig::from_url("postgres://u@%2Fvar%2Frun%2Fpg:55432/d").unwrap();
        assert_eq!(cfg.unix_socket_dir, Some(PathBuf::from("/var/run/pg")));
        assert_eq!(cfg.port, 55432);

        let cfg = ReplicationConfig::from_url("postgres:///d?host=/tmp&user=u").unwrap();
        assert_eq!(cfg.unix_socket_dir, Some(PathBuf::from("/tmp")));
        assert_eq!(cfg.user, "u");
    }

    #[test]
    fn bad_urls_are_config_errors() {
        for url in [
            "mysql://u@h/d",
            "postgres://u@h:notaport/d",
            "postgres://u@h/d?sslmode=verify-ca",
            "postgres://u@h/d?sslmode=bogus",
            "postgres://u@h/d?frobnicate=1",
            "postgres://u:%zz@h/d",
            "postgres://h/d",
            "postgres://u@[::1/d",
        ] {
            let err = ReplicationConfig::from_url(url).unwrap_err();
            assert!(matches!(err, ReplicationError::Config(_)), "{url}: {err}");
            assert!(!err.to_string().contains("%zz"), "{err}");
        }
    }

    #[test]
    fn debug_redacts_the_password() {
        let cfg = ReplicationConfig::from_url("postgres://u:hunter2@h/d").unwrap();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
