//! Identity resolution rules of a space: blocked values, per-type limits, priority order
//! (SPEC §3), built from the config with the defaults named here.

use std::collections::BTreeMap;

use regex::RegexSet;

use crate::config::IdentityConfig;
use crate::error::{Error, Result};

/// Blocked values by default (regular expressions matched against the whole value).
pub const DEFAULT_BLOCKED: &[&str] = &["^[0-]*$", "^-1$", "^null$", "^anonymous$", "^$"];
/// Default limit for `user_id`.
pub const DEFAULT_USER_ID_LIMIT: u32 = 1;
/// Default limit for every other id type.
pub const DEFAULT_LIMIT: u32 = 5;

/// The resolved rules.
#[derive(Debug, Clone)]
pub struct IdentityRules {
    limits: BTreeMap<String, u32>,
    priority: Vec<String>,
    blocked: RegexSet,
    /// Custom id types read from `traits.<type>` and `context.traits.<type>`.
    pub custom_id_types: Vec<String>,
}

impl Default for IdentityRules {
    fn default() -> Self {
        Self::from_config(&IdentityConfig::default()).unwrap_or_else(|_| IdentityRules {
            limits: BTreeMap::new(),
            priority: vec!["user_id".into(), "email".into()],
            blocked: RegexSet::empty(),
            custom_id_types: Vec::new(),
        })
    }
}

/// The default rules, built once.
pub fn default_rules() -> &'static IdentityRules {
    static RULES: std::sync::LazyLock<IdentityRules> =
        std::sync::LazyLock::new(IdentityRules::default);
    &RULES
}

fn anchor(re: &str) -> String {
    // Plain values ("null") block exactly that value; patterns keep their own anchors.
    if re.starts_with('^') || re.ends_with('$') {
        re.to_string()
    } else {
        format!("^{}$", regex::escape(re))
    }
}

impl IdentityRules {
    /// Rules from a space's config section.
    pub fn from_config(c: &IdentityConfig) -> Result<Self> {
        let blocked_src: Vec<String> = match &c.blocked {
            Some(list) => list
                .iter()
                .map(|s| anchor(s))
                .chain(["^$".to_string()])
                .collect(),
            None => DEFAULT_BLOCKED.iter().map(|s| s.to_string()).collect(),
        };
        let blocked = RegexSet::new(&blocked_src)
            .map_err(|e| Error::Usage(format!("identity.blocked: {e}")))?;
        let priority = if c.priority.is_empty() {
            vec!["user_id".to_string(), "email".to_string()]
        } else {
            c.priority.clone()
        };
        Ok(IdentityRules {
            limits: c.limits.clone(),
            priority,
            blocked,
            custom_id_types: c.custom_id_types.clone(),
        })
    }

    /// True when `value` never links anything.
    pub fn is_blocked(&self, value: &str) -> bool {
        self.blocked.is_match(value)
    }

    /// The most values of `id_type` one profile may hold.
    pub fn limit(&self, id_type: &str) -> u32 {
        self.limits
            .get(id_type)
            .copied()
            .unwrap_or(if id_type == "user_id" {
                DEFAULT_USER_ID_LIMIT
            } else {
                DEFAULT_LIMIT
            })
    }

    /// Sort key of an id type: configured priority first, then alphabetical.
    pub fn rank<'a>(&self, id_type: &'a str) -> (usize, &'a str) {
        match self.priority.iter().position(|p| p == id_type) {
            Some(i) => (i, ""),
            None => (self.priority.len(), id_type),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_spec() {
        let r = IdentityRules::default();
        for v in ["", "0000", "0-0", "-1", "null", "anonymous"] {
            assert!(r.is_blocked(v), "{v}");
        }
        for v in ["u1", "nullable", "10", "anonymous1"] {
            assert!(!r.is_blocked(v), "{v}");
        }
        assert_eq!(r.limit("user_id"), 1);
        assert_eq!(r.limit("email"), 5);
        assert_eq!(r.limit("ga_client_id"), 5);
        let mut types = vec!["anonymous_id", "ga_client_id", "email", "user_id"];
        types.sort_by_key(|t| r.rank(t));
        assert_eq!(
            types,
            vec!["user_id", "email", "anonymous_id", "ga_client_id"]
        );
    }
}
