//! Tokens and scopes. Configured tokens are kept only as SHA-256 digests and compared in
//! constant time; with no tokens configured, the space `default` gets an admin token generated
//! on the first start, printed once, and only its digest is kept in the store. Flight bearer
//! tokens (handed out by the handshake) live in memory for [`SESSION_SECS`].

use std::collections::HashMap;
use std::sync::Mutex;

use object_store::{PutMode, PutOptions, PutPayload};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{Config, Scope};
use crate::error::{Error, Result};
use crate::store::keys::Key;
use crate::store::{Space, Store};

/// Lifetime of a Flight bearer token.
pub const SESSION_SECS: u64 = 24 * 3600;

/// What a token may do, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The one space it can see.
    pub space: Space,
    /// Its scopes.
    pub scopes: Vec<Scope>,
}

impl Grant {
    /// Whether the grant holds `scope` (admin implies read and write).
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
            || (self.scopes.contains(&Scope::Admin) && matches!(scope, Scope::Read | Scope::Write))
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh random token (256 bits, hex).
pub fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    hex(&b)
}

/// The token checker of one server.
pub struct Auth {
    tokens: Vec<([u8; 32], Grant)>,
    sessions: Mutex<HashMap<[u8; 32], (Grant, std::time::Instant)>>,
    /// `--insecure-no-auth`: every call is an admin of the space it names (Flight: of
    /// [`Auth::insecure_space`]).
    pub insecure: bool,
    /// The space of unauthenticated Flight calls in insecure mode (the `--space` of `serve`).
    pub insecure_space: Space,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("tokens", &self.tokens.len())
            .field("insecure", &self.insecure)
            .finish()
    }
}

fn admin_key() -> Key {
    Key::from_committed("spaces/default/_auth/admin_token.json")
}

impl Auth {
    /// Tokens of `cfg`; with none configured, the stored admin token of `default` (created on
    /// the first start: the returned string is the token, to print once).
    pub async fn load(
        store: &Store,
        cfg: &Config,
        insecure: bool,
    ) -> Result<(Auth, Option<String>)> {
        let mut tokens = Vec::new();
        for (name, s) in &cfg.spaces {
            let space = Space::new(name)?;
            for t in &s.tokens {
                tokens.push((
                    digest(&t.token),
                    Grant {
                        space: space.clone(),
                        scopes: t.scopes.clone(),
                    },
                ));
            }
        }
        let mut created = None;
        if tokens.is_empty() && !insecure {
            let key = admin_key();
            let stored = match store.get(&key).await {
                Ok(b) => Some(b),
                Err(Error::ObjectStore(object_store::Error::NotFound { .. })) => None,
                Err(e) => return Err(e),
            };
            let hash = match stored {
                Some(b) => {
                    let v: serde_json::Value = serde_json::from_slice(&b)?;
                    v["sha256"].as_str().unwrap_or_default().to_string()
                }
                None => {
                    let token = random_token();
                    let hash = hex(&digest(&token));
                    let body = serde_json::to_vec(&serde_json::json!({ "sha256": hash }))?;
                    let opts = PutOptions {
                        mode: PutMode::Create,
                        ..Default::default()
                    };
                    match store
                        .object_store()
                        .put_opts(key.path(), PutPayload::from(body), opts)
                        .await
                    {
                        Ok(_) => {
                            created = Some(token);
                            hash
                        }
                        // another server created it first: use theirs
                        Err(object_store::Error::AlreadyExists { .. }) => {
                            let b = store.get(&key).await?;
                            let v: serde_json::Value = serde_json::from_slice(&b)?;
                            v["sha256"].as_str().unwrap_or_default().to_string()
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            let mut d = [0u8; 32];
            if hash.len() != 64 {
                return Err(Error::Usage(
                    "the stored admin token digest is corrupt".into(),
                ));
            }
            for (i, c) in d.iter_mut().enumerate() {
                *c = u8::from_str_radix(&hash[2 * i..2 * i + 2], 16)
                    .map_err(|_| Error::Usage("the stored admin token digest is corrupt".into()))?;
            }
            tokens.push((
                d,
                Grant {
                    space: Space::default(),
                    scopes: vec![Scope::Read, Scope::Write, Scope::Admin, Scope::Pii],
                },
            ));
        }
        Ok((
            Auth {
                tokens,
                sessions: Mutex::new(HashMap::new()),
                insecure,
                insecure_space: Space::default(),
            },
            created,
        ))
    }

    /// An auth that accepts exactly these tokens (tests).
    pub fn with_tokens(tokens: Vec<(String, Grant)>) -> Auth {
        Auth {
            tokens: tokens.into_iter().map(|(t, g)| (digest(&t), g)).collect(),
            sessions: Mutex::new(HashMap::new()),
            insecure: false,
            insecure_space: Space::default(),
        }
    }

    /// The grant of a configured token. Every configured digest is compared, in constant time.
    pub fn check_token(&self, token: &str) -> Option<Grant> {
        let d = digest(token);
        let mut found = None;
        for (h, g) in &self.tokens {
            if bool::from(h.ct_eq(&d)) {
                found = Some(g.clone());
            }
        }
        found
    }

    /// The grant of every call in insecure mode.
    pub fn insecure_grant(&self) -> Grant {
        Grant {
            space: self.insecure_space.clone(),
            scopes: vec![Scope::Read, Scope::Write, Scope::Admin, Scope::Pii],
        }
    }

    /// Hand out a bearer token for `grant`.
    pub fn new_session(&self, grant: Grant) -> String {
        let token = random_token();
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        s.retain(|_, (_, t)| now.duration_since(*t).as_secs() < SESSION_SECS);
        s.insert(digest(&token), (grant, now));
        token
    }

    /// The grant of a bearer token from [`Auth::new_session`] (looked up by its digest).
    pub fn check_bearer(&self, token: &str) -> Option<Grant> {
        let s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        s.get(&digest(token))
            .filter(|(_, t)| t.elapsed().as_secs() < SESSION_SECS)
            .map(|(g, _)| g.clone())
    }
}

/// Decode an HTTP Basic `authorization` value into (user, password).
pub fn basic(header: &str) -> Option<(String, String)> {
    use base64::Engine;
    let b64 = header
        .strip_prefix("Basic ")
        .or_else(|| header.strip_prefix("basic "))?;
    // padding optional: some clients (the Go Flight SQL driver) send unpadded base64
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let raw = engine.decode(b64.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':').unwrap_or((text.as_str(), ""));
    Some((u.to_string(), p.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_scopes_and_sessions() {
        let g = Grant {
            space: Space::new("a").unwrap(),
            scopes: vec![Scope::Read],
        };
        let auth = Auth::with_tokens(vec![("s3cret".into(), g.clone())]);
        assert_eq!(auth.check_token("s3cret"), Some(g.clone()));
        assert_eq!(auth.check_token("s3cre"), None);
        assert!(g.allows(Scope::Read) && !g.allows(Scope::Write));
        let bearer = auth.new_session(g.clone());
        assert_eq!(auth.check_bearer(&bearer), Some(g));
        assert_eq!(auth.check_bearer("nope"), None);
        assert_eq!(
            basic("Basic dXNlcjpwYXNz"),
            Some(("user".into(), "pass".into()))
        );
        assert_eq!(
            basic("Basic dG9rZW46"),
            Some(("token".into(), String::new()))
        );
        assert_eq!(basic("Bearer x"), None);
        // unpadded, as the Go Flight SQL driver sends it
        assert_eq!(
            basic("Basic ZGVmYXVsdDpyZWFkLXRva2VuLTE"),
            Some(("default".into(), "read-token-1".into()))
        );
    }
}
