//! Audience and computed-trait definition files (SPEC §5 JSON), parsed strictly and validated.

use serde::{Deserialize, Serialize};

use super::ast::{Condition, Value};
use super::parser::ParseError;

/// What a definition defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A boolean audience.
    Audience,
    /// A computed trait (a scalar).
    ComputedTrait,
}

/// Evaluation level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Profiles.
    #[default]
    Users,
    /// Accounts.
    Accounts,
}

/// A definition file as written by users.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefinitionFile {
    /// Immutable key, `^[a-z][a-z0-9_]{0,63}$`.
    pub key: String,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// Audience or computed trait.
    pub kind: Kind,
    /// Users or accounts.
    #[serde(default)]
    pub level: Level,
    /// The definition text.
    pub definition: String,
    /// Include anonymous profiles (audiences).
    #[serde(default)]
    pub include_anonymous: bool,
    /// Use all history (true) or only events received after creation (false).
    #[serde(default = "yes")]
    pub historical_backfill: bool,
    /// `realtime` or `every <N><m|h|d>`.
    #[serde(default = "realtime")]
    pub schedule: String,
    /// Destinations (validated by the destinations module).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destinations: Option<Vec<serde_json::Value>>,
}

fn yes() -> bool {
    true
}
fn realtime() -> String {
    "realtime".into()
}

/// The parsed body of a definition.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Body {
    /// An audience condition.
    Audience(Condition),
    /// A computed trait value.
    Trait(Value),
}

/// Why a definition file is invalid.
#[derive(Debug, Clone, PartialEq)]
pub enum DefinitionError {
    /// The JSON itself (unknown field, wrong type, ...).
    Json(String),
    /// A field value is invalid.
    Field {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The definition text does not parse.
    Parse(ParseError),
}

impl std::fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DefinitionError::Json(e) => write!(f, "definition file: {e}"),
            DefinitionError::Field { field, reason } => {
                write!(f, "definition file, field '{field}': {reason}")
            }
            DefinitionError::Parse(e) => write!(f, "definition: {e}"),
        }
    }
}

/// Parse `every 8h` / `every 30m` / `every 1d` into seconds; `realtime` is None.
pub fn schedule_secs(s: &str) -> Result<Option<u64>, String> {
    if s == "realtime" {
        return Ok(None);
    }
    let rest = s
        .strip_prefix("every ")
        .ok_or_else(|| format!("'{s}': expected 'realtime' or 'every <N>m|h|d'"))?;
    let rest = rest.trim();
    let (num, unit) = rest.split_at(rest.len().saturating_sub(1));
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}': expected a whole number before the unit"))?;
    let mult = match unit {
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("'{s}': unit must be m, h or d")),
    };
    if n == 0 {
        return Err(format!("'{s}': the interval must be positive"));
    }
    Ok(Some(n * mult))
}

impl DefinitionFile {
    /// Parse and validate a definition file's JSON text.
    pub fn parse(text: &str) -> Result<(DefinitionFile, Body), DefinitionError> {
        let def: DefinitionFile =
            serde_json::from_str(text).map_err(|e| DefinitionError::Json(e.to_string()))?;
        let body = def.validate()?;
        Ok((def, body))
    }

    /// Validate fields and parse the definition text.
    pub fn validate(&self) -> Result<Body, DefinitionError> {
        let key_ok = {
            let mut chars = self.key.chars();
            chars.next().is_some_and(|c| c.is_ascii_lowercase())
                && self.key.len() <= 64
                && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        if !key_ok {
            return Err(DefinitionError::Field {
                field: "key",
                reason: format!("'{}' must match ^[a-z][a-z0-9_]{{0,63}}$", self.key),
            });
        }
        schedule_secs(&self.schedule).map_err(|reason| DefinitionError::Field {
            field: "schedule",
            reason,
        })?;
        if let Some(d) = &self.destinations {
            if self.kind != Kind::Audience && !d.is_empty() {
                return Err(DefinitionError::Field {
                    field: "destinations",
                    reason: "only audiences have destinations".into(),
                });
            }
            crate::destinations::config::parse_all(d, self.level).map_err(|reason| {
                DefinitionError::Field {
                    field: "destinations",
                    reason,
                }
            })?;
        }
        match self.kind {
            Kind::Audience => super::parser::parse(&self.definition).map(Body::Audience),
            Kind::ComputedTrait => super::parser::parse_value(&self.definition).map(Body::Trait),
        }
        .map_err(DefinitionError::Parse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_example_file_is_valid() {
        let text = r#"{
  "key": "cart_abandoners",
  "name": "Cart abandoners",
  "kind": "audience",
  "level": "users",
  "definition": "event('Checkout Started').where(event('Order Completed').within(parent: 7 days).count() = 0).within(30 days).count() >= 1",
  "include_anonymous": false,
  "historical_backfill": true,
  "schedule": "realtime"
}"#;
        let (def, body) = DefinitionFile::parse(text).unwrap();
        assert_eq!(def.key, "cart_abandoners");
        assert!(matches!(body, Body::Audience(_)));
    }

    #[test]
    fn invalid_files_say_what_and_where() {
        let bad_key = r#"{"key":"Cart","kind":"audience","definition":"trait('a') = 1"}"#;
        assert!(matches!(
            DefinitionFile::parse(bad_key),
            Err(DefinitionError::Field { field: "key", .. })
        ));
        let unknown =
            r#"{"key":"a","kind":"audience","definition":"trait('a') = 1","colour":"red"}"#;
        assert!(matches!(
            DefinitionFile::parse(unknown),
            Err(DefinitionError::Json(_))
        ));
        let sched =
            r#"{"key":"a","kind":"audience","definition":"trait('a') = 1","schedule":"hourly"}"#;
        assert!(matches!(
            DefinitionFile::parse(sched),
            Err(DefinitionError::Field {
                field: "schedule",
                ..
            })
        ));
        let parse = r#"{"key":"a","kind":"computed_trait","definition":"trait('a') = 1"}"#;
        assert!(matches!(
            DefinitionFile::parse(parse),
            Err(DefinitionError::Parse(_))
        ));
        assert_eq!(schedule_secs("every 8h"), Ok(Some(28_800)));
        assert_eq!(schedule_secs("realtime"), Ok(None));
    }
}
