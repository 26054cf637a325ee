//! The client side of SASL/SCRAM (RFC 5802; SCRAM-SHA-256 and SCRAM-SHA-512, as Kafka speaks
//! them), for the wire client's login. Messages from the server are checked, never trusted:
//! a nonce that does not extend ours, a missing or malformed field, or a server signature that
//! does not prove knowledge of the password is an error.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256, Sha512};

/// The hash a SCRAM mechanism is built on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scram {
    Sha256,
    Sha512,
}

impl Scram {
    /// The mechanism for `sasl.mechanism`, if it is a SCRAM one.
    pub fn from_mechanism(m: &str) -> Option<Scram> {
        match m.to_ascii_uppercase().as_str() {
            "SCRAM-SHA-256" => Some(Scram::Sha256),
            "SCRAM-SHA-512" => Some(Scram::Sha512),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scram::Sha256 => "SCRAM-SHA-256",
            Scram::Sha512 => "SCRAM-SHA-512",
        }
    }

    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        // HMAC takes keys of any length: new_from_slice cannot fail.
        match self {
            Scram::Sha256 => {
                let mut m = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
            Scram::Sha512 => {
                let mut m = Hmac::<Sha512>::new_from_slice(key).expect("any key length");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
        }
    }

    fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            Scram::Sha256 => Sha256::digest(data).to_vec(),
            Scram::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    /// Hi(): PBKDF2 with this HMAC, one block.
    fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        let mut first = salt.to_vec();
        first.extend_from_slice(&1u32.to_be_bytes());
        let mut u = self.hmac(password, &first);
        let mut out = u.clone();
        for _ in 1..iterations {
            u = self.hmac(password, &u);
            for (o, b) in out.iter_mut().zip(&u) {
                *o ^= b;
            }
        }
        out
    }
}

/// One login in progress: the client's messages and the proof of the server's.
#[derive(Debug)]
pub struct Exchange {
    scram: Scram,
    password: String,
    client_nonce: String,
    first_bare: String,
    /// Set by `client_final`: the server's expected signature.
    server_signature: Option<Vec<u8>>,
}

impl Exchange {
    /// Starts a login as `username` with `client_nonce` (random, printable, no comma).
    pub fn new(scram: Scram, username: &str, password: &str, client_nonce: &str) -> Exchange {
        let name = username.replace('=', "=3D").replace(',', "=2C");
        Exchange {
            scram,
            password: password.to_owned(),
            client_nonce: client_nonce.to_owned(),
            first_bare: format!("n={name},r={client_nonce}"),
            server_signature: None,
        }
    }

    /// The client-first message.
    pub fn client_first(&self) -> String {
        format!("n,,{}", self.first_bare)
    }

    /// The client-final message, in answer to the server-first message `server_first`.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<String, String> {
        let server_first = std::str::from_utf8(server_first)
            .map_err(|_| "the server's first SCRAM message is not UTF-8".to_owned())?;
        let field = |k: &str| {
            server_first
                .split(',')
                .find_map(|f| f.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
        };
        let nonce = field("r").ok_or("the server's first SCRAM message has no nonce")?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return Err("the server's SCRAM nonce does not extend the client's".to_owned());
        }
        let salt = field("s")
            .and_then(|s| B64.decode(s).ok())
            .ok_or("the server's first SCRAM message has no valid salt")?;
        let iterations: u32 = field("i")
            .and_then(|i| i.parse().ok())
            .filter(|&i| (1..=10_000_000).contains(&i))
            .ok_or("the server's first SCRAM message has no valid iteration count")?;
        let s = self.scram;
        let salted = s.salted_password(self.password.as_bytes(), &salt, iterations);
        let client_key = s.hmac(&salted, b"Client Key");
        let stored_key = s.hash(&client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.first_bare);
        let signature = s.hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = s.hmac(&salted, b"Server Key");
        self.server_signature = Some(s.hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final message: the server proved it knows the password.
    pub fn verify_server_final(&self, server_final: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(server_final)
            .map_err(|_| "the server's final SCRAM message is not UTF-8".to_owned())?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(format!("the server refused the SCRAM login: {e}"));
        }
        let got = text
            .split(',')
            .find_map(|f| f.strip_prefix("v="))
            .and_then(|v| B64.decode(v).ok())
            .ok_or("the server's final SCRAM message has no valid signature")?;
        match &self.server_signature {
            Some(want) if *want == got => Ok(()),
            Some(_) => Err(
                "the server's SCRAM signature is wrong: it does not know the password".to_owned(),
            ),
            None => Err("SCRAM messages out of order".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677, section 3: the SCRAM-SHA-256 example exchange.
    #[test]
    fn rfc7677_example() {
        let mut x = Exchange::new(Scram::Sha256, "user", "pencil", "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(x.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        assert_eq!(
            x.client_final(server_first).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        x.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert!(x
            .verify_server_final(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
            .is_err());
        assert!(x.verify_server_final(b"e=invalid-proof").is_err());
    }

    #[test]
    fn bad_server_messages_are_errors() {
        let mut x = Exchange::new(Scram::Sha512, "a=b,c", "pw", "abc");
        assert_eq!(x.client_first(), "n,,n=a=3Db=2Cc,r=abc");
        for bad in [
            &b"r=xyz,s=AAAA,i=4096"[..], // not our nonce
            b"r=abc,s=AAAA,i=4096",      // not extended
            b"r=abcd,s=!!,i=4096",       // bad salt
            b"r=abcd,s=AAAA,i=0",        // bad count
            b"r=abcd,s=AAAA",            // no count
            b"\xff\xfe",                 // not UTF-8
        ] {
            assert!(x.client_final(bad).is_err(), "{bad:?}");
        }
        assert!(x.client_final(b"r=abcd,s=AAAA,i=2").is_ok());
    }
}
