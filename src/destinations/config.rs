//! Destination settings (SPEC §9), as written under `"destinations"` in a definition file:
//! parsed strictly, defaults named here, secret headers never printed.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::lang::definition::Level;

/// What a header value is shown as by `audience show` and the management API.
pub const REDACTED: &str = "<redacted>";

/// Where changes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// HTTP POST of Segment-spec JSON to `url`.
    Webhook,
    /// NDJSON or Parquet files under a store prefix (`url`: another store URL; default the
    /// space's own `destinations/` prefix).
    File,
    /// Kept as changes for Flight clients to pull (`["destinations", KEY, NAME]`) and
    /// acknowledge (action `ack`).
    Flight,
}

/// The calls a destination receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// `identify` with trait `{KEY: true|false}`.
    Identify,
    /// `track` of `Audience Entered` / `Audience Exited`.
    Track,
    /// Batched adds and removes.
    List,
    /// `group` per account (account audiences).
    Group,
}

/// One mode or several (`"mode": "identify"` or `"mode": ["group", "identify"]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Modes {
    /// One mode.
    One(Mode),
    /// Several modes (account audiences: group and identify).
    Many(Vec<Mode>),
}

impl Modes {
    /// The modes, sorted, without repeats.
    pub fn list(&self) -> Vec<Mode> {
        let mut v = match self {
            Modes::One(m) => vec![*m],
            Modes::Many(v) => v.clone(),
        };
        v.sort();
        v.dedup();
        v
    }
}

/// File sink formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// One JSON message per line.
    #[default]
    Ndjson,
    /// One row per message.
    Parquet,
}

/// Token-bucket rate limit: `per_second` sustained, `burst` at once. In any one second a
/// destination sees at most `per_second + burst` requests (`burst: 1` for a strict limit).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests per second.
    pub per_second: f64,
    /// Bucket size.
    #[serde(default = "default_burst")]
    pub burst: u32,
}

fn default_burst() -> u32 {
    1
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_second: 100.0,
            burst: 10,
        }
    }
}

/// One destination of an audience.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// Name, unique within the audience (`^[a-z][a-z0-9_-]{0,63}$`); its cursor is kept under it.
    pub name: String,
    /// Sink kind.
    pub kind: SinkKind,
    /// Webhook URL (required for webhooks), or a store URL for files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Calls to make (default `identify`; `list` for... only when asked).
    #[serde(default = "default_modes")]
    pub mode: Modes,
    /// The id type the destination needs (default `user_id`); one call per value.
    #[serde(default = "default_id_type")]
    pub id_type: String,
    /// Rate limit (webhooks).
    #[serde(default)]
    pub rate_limit: RateLimit,
    /// Messages per request: `list` batches (default 1000); for identify/track/group, more than
    /// 1 sends Segment `{"batch": [...]}` requests (default 1: one call per request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// How long failed calls are retried (default `4h`).
    #[serde(default = "default_retry_period")]
    pub retry_period: String,
    /// Per-request timeout (default `10s`).
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Requests in flight at once (default 4).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Extra request headers (secrets: never logged, shown as `<redacted>`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// File sink format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<FileFormat>,
}

fn default_modes() -> Modes {
    Modes::One(Mode::Identify)
}
fn default_id_type() -> String {
    "user_id".into()
}
fn default_retry_period() -> String {
    "4h".into()
}
fn default_timeout() -> String {
    "10s".into()
}
fn default_concurrency() -> usize {
    4
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &self.url)
            .field("mode", &self.mode)
            .field("id_type", &self.id_type)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Largest batch a request may carry.
pub const MAX_BATCH: usize = 10_000;

impl Destination {
    /// Messages per request.
    pub fn batch(&self) -> usize {
        let default = if self.mode.list().contains(&Mode::List) {
            1000
        } else {
            1
        };
        self.batch_size.unwrap_or(default)
    }

    /// The retry period.
    pub fn retry_period(&self) -> Duration {
        crate::serve::parse_duration(&self.retry_period).unwrap_or(Duration::from_secs(4 * 3600))
    }

    /// The request timeout.
    pub fn timeout(&self) -> Duration {
        crate::serve::parse_duration(&self.timeout).unwrap_or(Duration::from_secs(10))
    }

    /// What identifies the destination's receiving side: when it changes, the destination is a
    /// new connection and gets a backfill.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let modes: Vec<String> = self.mode.list().iter().map(|m| format!("{m:?}")).collect();
        let text = format!(
            "{:?}|{}|{}|{}|{:?}",
            self.kind,
            self.url.as_deref().unwrap_or(""),
            modes.join(","),
            self.id_type,
            self.format
        );
        hex(&Sha256::digest(text.as_bytes())[..8])
    }

    /// Check the settings against the audience level.
    pub fn validate(&self, level: Level) -> Result<(), String> {
        let name_ok = {
            let mut c = self.name.chars();
            c.next().is_some_and(|c| c.is_ascii_lowercase())
                && self.name.len() <= 64
                && c.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        };
        if !name_ok {
            return Err(format!(
                "name '{}' must match ^[a-z][a-z0-9_-]{{0,63}}$",
                self.name
            ));
        }
        let n = &self.name;
        let modes = self.mode.list();
        if modes.is_empty() {
            return Err(format!("'{n}': mode: at least one mode"));
        }
        match level {
            Level::Users => {
                if modes.len() > 1 || modes[0] == Mode::Group {
                    return Err(format!(
                        "'{n}': mode: a users audience takes one of identify, track, list"
                    ));
                }
            }
            Level::Accounts => {
                if modes
                    .iter()
                    .any(|m| !matches!(m, Mode::Group | Mode::Identify))
                {
                    return Err(format!(
                        "'{n}': mode: an account audience takes group and/or identify"
                    ));
                }
            }
        }
        if self.id_type.is_empty() || self.id_type.len() > 64 {
            return Err(format!("'{n}': id_type must be a non-empty id type name"));
        }
        match self.kind {
            SinkKind::Webhook => {
                let url = self
                    .url
                    .as_deref()
                    .ok_or_else(|| format!("'{n}': a webhook needs a url"))?;
                let parsed = url::Url::parse(url).map_err(|e| format!("'{n}': url: {e}"))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(format!("'{n}': url: a webhook url is http:// or https://"));
                }
            }
            SinkKind::File => {
                if let Some(u) = &self.url {
                    url::Url::parse(u).map_err(|e| format!("'{n}': url: {e}"))?;
                }
            }
            SinkKind::Flight => {
                if self.url.is_some() {
                    return Err(format!(
                        "'{n}': a flight destination has no url (clients pull it)"
                    ));
                }
            }
        }
        if self.format.is_some() && self.kind != SinkKind::File {
            return Err(format!("'{n}': format is for file destinations"));
        }
        let r = &self.rate_limit;
        if !(r.per_second.is_finite() && r.per_second > 0.0) || r.burst == 0 {
            return Err(format!(
                "'{n}': rate_limit: per_second must be positive and burst at least 1"
            ));
        }
        if self.batch() == 0 || self.batch() > MAX_BATCH {
            return Err(format!("'{n}': batch_size must be 1..={MAX_BATCH}"));
        }
        if self.concurrency == 0 || self.concurrency > 64 {
            return Err(format!("'{n}': concurrency must be 1..=64"));
        }
        crate::serve::parse_duration(&self.retry_period)
            .map_err(|e| format!("'{n}': retry_period: {e}"))?;
        crate::serve::parse_duration(&self.timeout).map_err(|e| format!("'{n}': timeout: {e}"))?;
        for (k, v) in &self.headers {
            let name_ok = reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_ok();
            let value_ok = reqwest::header::HeaderValue::from_str(v).is_ok();
            if !name_ok || !value_ok {
                // the value is a secret: name the header only
                return Err(format!("'{n}': header '{k}' is not a valid HTTP header"));
            }
        }
        Ok(())
    }
}

/// Parse and validate the `destinations` of a definition file.
pub fn parse_all(values: &[serde_json::Value], level: Level) -> Result<Vec<Destination>, String> {
    let mut out: Vec<Destination> = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let d: Destination =
            serde_json::from_value(v.clone()).map_err(|e| format!("destinations[{i}]: {e}"))?;
        d.validate(level)
            .map_err(|e| format!("destinations[{i}]: {e}"))?;
        if out.iter().any(|o| o.name == d.name) {
            return Err(format!(
                "destinations[{i}]: name '{}' is used twice",
                d.name
            ));
        }
        out.push(d);
    }
    Ok(out)
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: serde_json::Value, level: Level) -> Result<Vec<Destination>, String> {
        parse_all(&[v], level)
    }

    #[test]
    fn the_spec_example_parses_with_defaults() {
        let d = parse(
            serde_json::json!({"name": "crm", "kind": "webhook", "url": "https://example.com/h",
                "mode": "identify", "id_type": "email",
                "rate_limit": {"per_second": 10, "burst": 20},
                "headers": {"Authorization": "Bearer s3cret"}}),
            Level::Users,
        )
        .unwrap()
        .remove(0);
        assert_eq!(d.batch(), 1);
        assert_eq!(d.retry_period(), Duration::from_secs(4 * 3600));
        assert_eq!(d.rate_limit.burst, 20);
        assert!(!format!("{d:?}").contains("s3cret"));
    }

    #[test]
    fn invalid_settings_say_what_and_where() {
        let bad = [
            (
                serde_json::json!({"name": "x", "kind": "webhook"}),
                "needs a url",
            ),
            (
                serde_json::json!({"name": "x", "kind": "webhook", "url": "ftp://a"}),
                "http",
            ),
            (
                serde_json::json!({"name": "x", "kind": "flight", "mode": "group"}),
                "users audience",
            ),
            (
                serde_json::json!({"name": "x", "kind": "flight", "colour": 1}),
                "unknown field",
            ),
            (
                serde_json::json!({"name": "X", "kind": "flight"}),
                "must match",
            ),
            (
                serde_json::json!({"name": "x", "kind": "webhook", "url": "http://a",
                    "rate_limit": {"per_second": 0}}),
                "rate_limit",
            ),
            (
                serde_json::json!({"name": "x", "kind": "file", "batch_size": 0}),
                "batch_size",
            ),
        ];
        for (v, want) in bad {
            let e = parse(v.clone(), Level::Users).unwrap_err();
            assert!(
                e.contains(want) && e.contains("destinations[0]"),
                "{v}: {e}"
            );
        }
        let e = parse(
            serde_json::json!({"name": "x", "kind": "flight", "mode": "track"}),
            Level::Accounts,
        )
        .unwrap_err();
        assert!(e.contains("group and/or identify"), "{e}");
        assert!(
            parse(
                serde_json::json!({"name": "x", "kind": "flight", "mode": ["group", "identify"]}),
                Level::Accounts
            )
            .is_ok()
        );
        let two = parse_all(
            &[
                serde_json::json!({"name": "x", "kind": "flight"}),
                serde_json::json!({"name": "x", "kind": "flight"}),
            ],
            Level::Users,
        )
        .unwrap_err();
        assert!(two.contains("used twice"), "{two}");
    }
}
