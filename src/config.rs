//! The TOML configuration file: everything per space (tokens, identity rules). Parsed strictly:
//! unknown fields are errors. With no file, the space `default` exists with default rules.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Per-space settings, by space name.
    #[serde(default)]
    pub spaces: BTreeMap<String, SpaceConfig>,
}

/// Settings of one space.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpaceConfig {
    /// Access tokens with their scopes.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// Identity resolution rules.
    #[serde(default)]
    pub identity: IdentityConfig,
}

/// One access token.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The secret.
    pub token: String,
    /// Scopes: `read`, `write`, `admin`, `pii`.
    pub scopes: Vec<Scope>,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens are never printed.
        f.debug_struct("TokenConfig")
            .field("token", &"<redacted>")
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// A token scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read memberships, profiles, SQL.
    Read,
    /// Send events (tracking API write key).
    Write,
    /// Manage audiences and traits.
    Admin,
    /// Raw personal data in exports.
    Pii,
}

/// Identity resolution rules of a space (defaults per SPEC §3).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Per id type limit of values on one profile (`user_id` 1, others 5 by default).
    #[serde(default)]
    pub limits: BTreeMap<String, u32>,
    /// Priority order; unlisted types follow alphabetically.
    #[serde(default)]
    pub priority: Vec<String>,
    /// Blocked values (regular expressions, anchored as written).
    #[serde(default)]
    pub blocked: Option<Vec<String>>,
    /// Extra id types read from `context.externalIds`.
    #[serde(default)]
    pub custom_id_types: Vec<String>,
}

impl Config {
    /// Load a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text).map_err(|reason| Error::Config {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parse config text.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        for (name, space) in &cfg.spaces {
            crate::store::Space::new(name).map_err(|e| e.to_string())?;
            for re in space.identity.blocked.iter().flatten() {
                regex::Regex::new(re)
                    .map_err(|e| format!("spaces.{name}.identity.blocked: {e}"))?;
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spec_example_and_rejects_unknown_fields() {
        let cfg = Config::parse(
            r#"
[spaces.default]
tokens = [ { token = "t1", scopes = ["read"] }, { token = "t2", scopes = ["read", "write", "admin", "pii"] } ]
[spaces.default.identity]
limits = { user_id = 1, email = 5 }
priority = ["user_id", "email"]
blocked = ["^[0-]*$", "-1", "null", "anonymous"]
custom_id_types = ["ga_client_id"]
"#,
        )
        .unwrap();
        let s = &cfg.spaces["default"];
        assert_eq!(s.tokens.len(), 2);
        assert_eq!(s.identity.limits["email"], 5);
        assert!(!format!("{:?}", s.tokens[0]).contains("t1"));
        assert!(Config::parse("[spaces.default]\ntokenz = []").is_err());
        assert!(Config::parse("[spaces.BAD]").is_err());
    }
}
