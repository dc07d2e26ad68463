//! The Segment message model and its validation rules (SPEC §2).
//!
//! Messages are parsed into JSON values first so that every rule can reject with its own reason
//! code and a precise message; valid messages become [`Event`]s.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Longest accepted `messageId`, in characters.
pub const MAX_MESSAGE_ID_CHARS: usize = 100;
/// Largest accepted message, in bytes of JSON.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
/// Largest accepted HTTP batch request, in bytes.
pub const MAX_BATCH_BYTES: usize = 500 * 1024;
/// An identify call with this many traits or more is rejected.
pub const MAX_TRAITS: usize = 300;
/// Deepest accepted nesting of objects and arrays in a message.
pub const MAX_DEPTH: usize = 32;

/// The six Segment message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MessageType {
    /// `track`: a named user action.
    Track,
    /// `page`: a web page view.
    Page,
    /// `screen`: a mobile screen view.
    Screen,
    /// `identify`: who the user is, with traits.
    Identify,
    /// `group`: the user belongs to an account.
    Group,
    /// `alias`: two ids are the same user.
    Alias,
}

impl MessageType {
    /// All types, in a fixed order.
    pub const ALL: [MessageType; 6] = [
        MessageType::Track,
        MessageType::Page,
        MessageType::Screen,
        MessageType::Identify,
        MessageType::Group,
        MessageType::Alias,
    ];

    /// The spec name.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Track => "track",
            MessageType::Page => "page",
            MessageType::Screen => "screen",
            MessageType::Identify => "identify",
            MessageType::Group => "group",
            MessageType::Alias => "alias",
        }
    }

    /// Parse a spec name.
    pub fn parse(s: &str) -> Option<Self> {
        MessageType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// A validated event, ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `messageId` (generated from the content when missing).
    pub message_id: String,
    /// Message type.
    pub kind: MessageType,
    /// Track event name.
    pub event: Option<String>,
    /// Page or screen name.
    pub name: Option<String>,
    /// `userId`.
    pub user_id: Option<String>,
    /// `anonymousId`.
    pub anonymous_id: Option<String>,
    /// `groupId` (group calls).
    pub group_id: Option<String>,
    /// `previousId` (alias calls).
    pub previous_id: Option<String>,
    /// Event time, UTC microseconds.
    pub timestamp: i64,
    /// `originalTimestamp`, UTC microseconds.
    pub original_timestamp: Option<i64>,
    /// `sentAt`, UTC microseconds.
    pub sent_at: Option<i64>,
    /// `receivedAt`, UTC microseconds.
    pub received_at: i64,
    /// `properties` (track, page, screen).
    pub properties: Option<Map<String, Value>>,
    /// `traits` (identify, group).
    pub traits: Option<Map<String, Value>>,
    /// `context`.
    pub context: Option<Map<String, Value>>,
    /// `integrations`.
    pub integrations: Option<Map<String, Value>>,
    /// Any other top-level fields, kept as they came.
    pub extra: Map<String, Value>,
}

/// Why a message was rejected: a stable code and a human explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Stable reason code (see [`REASON_CODES`]).
    pub code: &'static str,
    /// What exactly is wrong.
    pub message: String,
}

/// Every reason code a message can be rejected with.
pub const REASON_CODES: &[&str] = &[
    "invalid_utf8",
    "malformed_json",
    "not_an_object",
    "message_too_large",
    "nesting_too_deep",
    "missing_type",
    "unknown_type",
    "invalid_field",
    "missing_identity",
    "missing_event",
    "missing_group_id",
    "missing_previous_id",
    "message_id_too_long",
    "invalid_timestamp",
    "too_many_traits",
];

impl Rejection {
    /// A rejection with a code and message.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        debug_assert!(REASON_CODES.contains(&code));
        Rejection {
            code,
            message: message.into(),
        }
    }
}

const KNOWN_FIELDS: &[&str] = &[
    "type",
    "messageId",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "receivedAt",
    "userId",
    "anonymousId",
    "groupId",
    "previousId",
    "event",
    "name",
    "properties",
    "traits",
    "context",
    "integrations",
];

/// Parse raw bytes of one message (a line of NDJSON, or one HTTP message) and validate it.
pub fn parse_message(raw: &[u8], received_now: i64) -> Result<Event, Rejection> {
    if raw.len() > MAX_MESSAGE_BYTES {
        return Err(Rejection::new(
            "message_too_large",
            format!(
                "message is {} bytes; the limit is {MAX_MESSAGE_BYTES}",
                raw.len()
            ),
        ));
    }
    let text = std::str::from_utf8(raw).map_err(|e| {
        Rejection::new(
            "invalid_utf8",
            format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        )
    })?;
    let value: Value = serde_json::from_str(text).map_err(json_rejection)?;
    validate(value, raw, received_now)
}

/// The rejection for a JSON syntax error.
pub fn json_rejection(e: serde_json::Error) -> Rejection {
    if e.to_string().contains("recursion limit") {
        Rejection::new(
            "nesting_too_deep",
            format!("nesting deeper than serde's limit: {e}"),
        )
    } else {
        Rejection::new("malformed_json", e.to_string())
    }
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Parse an RFC 3339 timestamp to UTC microseconds.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| t.timestamp_micros())
}

/// Validate a parsed message. `raw` is its original text (used to generate a missing messageId
/// deterministically, so that re-ingesting the same file deduplicates).
pub fn validate(value: Value, raw: &[u8], received_now: i64) -> Result<Event, Rejection> {
    let Value::Object(mut obj) = value else {
        return Err(Rejection::new(
            "not_an_object",
            "a message must be a JSON object",
        ));
    };
    let d = obj.values().map(depth).max().unwrap_or(0) + 1;
    if d > MAX_DEPTH {
        return Err(Rejection::new(
            "nesting_too_deep",
            format!("message nests {d} levels deep; the limit is {MAX_DEPTH}"),
        ));
    }
    let kind = match obj.get("type") {
        None | Some(Value::Null) => {
            return Err(Rejection::new("missing_type", "field 'type' is required"));
        }
        Some(Value::String(s)) => MessageType::parse(s).ok_or_else(|| {
            Rejection::new(
                "unknown_type",
                format!("type '{s}' is not one of track, page, screen, identify, group, alias"),
            )
        })?,
        Some(_) => {
            return Err(Rejection::new(
                "invalid_field",
                "field 'type' must be a string",
            ));
        }
    };
    let user_id = id_field(&obj, "userId")?;
    let anonymous_id = id_field(&obj, "anonymousId")?;
    let group_id = id_field(&obj, "groupId")?;
    let previous_id = id_field(&obj, "previousId")?;
    let event = string_field(&obj, "event")?;
    let name = string_field(&obj, "name")?;
    match kind {
        MessageType::Alias => {
            if user_id.is_none() {
                return Err(Rejection::new("missing_identity", "alias needs 'userId'"));
            }
            if previous_id.is_none() {
                return Err(Rejection::new(
                    "missing_previous_id",
                    "alias needs 'previousId'",
                ));
            }
        }
        _ => {
            if user_id.is_none() && anonymous_id.is_none() {
                return Err(Rejection::new(
                    "missing_identity",
                    format!("{} needs 'userId' or 'anonymousId'", kind.as_str()),
                ));
            }
        }
    }
    if kind == MessageType::Track && event.as_deref().is_none_or(str::is_empty) {
        return Err(Rejection::new(
            "missing_event",
            "track needs a non-empty 'event'",
        ));
    }
    if kind == MessageType::Group && group_id.is_none() {
        return Err(Rejection::new("missing_group_id", "group needs 'groupId'"));
    }
    let message_id = match obj.get("messageId") {
        None | Some(Value::Null) => {
            let digest = Sha256::digest(raw);
            let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
            format!("gen-{hex}")
        }
        Some(Value::String(s)) if s.is_empty() => {
            return Err(Rejection::new("invalid_field", "'messageId' is empty"));
        }
        Some(Value::String(s)) => {
            let n = s.chars().count();
            if n > MAX_MESSAGE_ID_CHARS {
                return Err(Rejection::new(
                    "message_id_too_long",
                    format!("'messageId' has {n} characters; the limit is {MAX_MESSAGE_ID_CHARS}"),
                ));
            }
            s.clone()
        }
        Some(_) => {
            return Err(Rejection::new(
                "invalid_field",
                "'messageId' must be a string",
            ));
        }
    };
    let received_at = ts_field(&obj, "receivedAt")?.unwrap_or(received_now);
    let timestamp = ts_field(&obj, "timestamp")?.unwrap_or(received_at);
    let original_timestamp = ts_field(&obj, "originalTimestamp")?;
    let sent_at = ts_field(&obj, "sentAt")?;
    let properties = object_field(&mut obj, "properties")?;
    let traits = object_field(&mut obj, "traits")?;
    let context = object_field(&mut obj, "context")?;
    let integrations = object_field(&mut obj, "integrations")?;
    if kind == MessageType::Identify
        && let Some(t) = &traits
        && t.len() >= MAX_TRAITS
    {
        return Err(Rejection::new(
            "too_many_traits",
            format!(
                "identify has {} traits; it must have fewer than {MAX_TRAITS}",
                t.len()
            ),
        ));
    }
    let extra: Map<String, Value> = obj
        .into_iter()
        .filter(|(k, _)| !KNOWN_FIELDS.contains(&k.as_str()))
        .collect();
    Ok(Event {
        message_id,
        kind,
        event,
        name,
        user_id,
        anonymous_id,
        group_id,
        previous_id,
        timestamp,
        original_timestamp,
        sent_at,
        received_at,
        properties,
        traits,
        context,
        integrations,
        extra,
    })
}

/// An id field: a non-empty string, or a number (Segment libraries send numeric ids as numbers).
fn id_field(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, Rejection> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(Rejection::new(
            "invalid_field",
            format!("'{key}' must be a string or a number"),
        )),
    }
}

fn string_field(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, Rejection> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Rejection::new(
            "invalid_field",
            format!("'{key}' must be a string"),
        )),
    }
}

fn ts_field(obj: &Map<String, Value>, key: &str) -> Result<Option<i64>, Rejection> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_timestamp(s).map(Some).ok_or_else(|| {
            Rejection::new(
                "invalid_timestamp",
                format!(
                    "'{key}' is not an RFC 3339 timestamp: '{}'",
                    truncate(s, 60)
                ),
            )
        }),
        Some(_) => Err(Rejection::new(
            "invalid_timestamp",
            format!("'{key}' must be an RFC 3339 string"),
        )),
    }
}

fn object_field(
    obj: &mut Map<String, Value>,
    key: &str,
) -> Result<Option<Map<String, Value>>, Rejection> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(Rejection::new(
            "invalid_field",
            format!("'{key}' must be an object"),
        )),
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Format UTC microseconds as RFC 3339 with microsecond precision.
pub fn format_timestamp(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_else(|| micros.to_string())
}

impl Event {
    /// The event's primary identity, which attributes it to a profile: `userId` when present
    /// and not blocked by the default rules, else `anonymousId` (same condition), else whichever
    /// is present. Returns the id type and value.
    pub fn primary_identity(&self) -> (&'static str, &str) {
        let rules = crate::identity::rules::default_rules();
        fn ok<'a>(
            v: &'a Option<String>,
            rules: &crate::identity::IdentityRules,
        ) -> Option<&'a str> {
            v.as_deref().filter(|v| !rules.is_blocked(v))
        }
        match (ok(&self.user_id, rules), ok(&self.anonymous_id, rules)) {
            (Some(u), _) => ("user_id", u),
            (None, Some(a)) => ("anonymous_id", a),
            (None, None) => match (&self.user_id, &self.anonymous_id) {
                (Some(u), _) => ("user_id", u),
                (None, Some(a)) => ("anonymous_id", a),
                (None, None) => ("user_id", ""),
            },
        }
    }

    /// The Segment-spec JSON form of this event (timestamps normalized to UTC).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), self.kind.as_str().into());
        m.insert("messageId".into(), self.message_id.clone().into());
        let mut opt = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                m.insert(k.into(), v.clone().into());
            }
        };
        opt("event", &self.event);
        opt("name", &self.name);
        opt("userId", &self.user_id);
        opt("anonymousId", &self.anonymous_id);
        opt("groupId", &self.group_id);
        opt("previousId", &self.previous_id);
        m.insert("timestamp".into(), format_timestamp(self.timestamp).into());
        m.insert(
            "receivedAt".into(),
            format_timestamp(self.received_at).into(),
        );
        if let Some(t) = self.original_timestamp {
            m.insert("originalTimestamp".into(), format_timestamp(t).into());
        }
        if let Some(t) = self.sent_at {
            m.insert("sentAt".into(), format_timestamp(t).into());
        }
        for (k, v) in [
            ("properties", &self.properties),
            ("traits", &self.traits),
            ("context", &self.context),
            ("integrations", &self.integrations),
        ] {
            if let Some(v) = v {
                m.insert(k.into(), Value::Object(v.clone()));
            }
        }
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z

    fn reject(line: &str) -> &'static str {
        parse_message(line.as_bytes(), NOW).unwrap_err().code
    }

    #[test]
    fn each_rule_has_its_code() {
        assert_eq!(reject("{"), "malformed_json");
        assert_eq!(reject("[1]"), "not_an_object");
        assert_eq!(reject(r#"{"userId":"u"}"#), "missing_type");
        assert_eq!(reject(r#"{"type":"boom","userId":"u"}"#), "unknown_type");
        assert_eq!(
            reject(r#"{"type":"track","event":"x"}"#),
            "missing_identity"
        );
        assert_eq!(reject(r#"{"type":"track","userId":"u"}"#), "missing_event");
        assert_eq!(
            reject(r#"{"type":"group","userId":"u"}"#),
            "missing_group_id"
        );
        assert_eq!(
            reject(r#"{"type":"alias","userId":"u"}"#),
            "missing_previous_id"
        );
        assert_eq!(
            reject(r#"{"type":"alias","previousId":"a"}"#),
            "missing_identity"
        );
        assert_eq!(
            reject(r#"{"type":"page","userId":{"a":1}}"#),
            "invalid_field"
        );
        assert_eq!(
            reject(r#"{"type":"page","userId":"u","timestamp":"yesterday"}"#),
            "invalid_timestamp"
        );
        let long = "x".repeat(101);
        assert_eq!(
            reject(&format!(
                r#"{{"type":"page","userId":"u","messageId":"{long}"}}"#
            )),
            "message_id_too_long"
        );
        let traits: Vec<String> = (0..300).map(|i| format!("\"t{i}\":1")).collect();
        assert_eq!(
            reject(&format!(
                r#"{{"type":"identify","userId":"u","traits":{{{}}}}}"#,
                traits.join(",")
            )),
            "too_many_traits"
        );
        let big = "y".repeat(MAX_MESSAGE_BYTES);
        assert_eq!(
            reject(&format!(r#"{{"type":"page","userId":"u","name":"{big}"}}"#)),
            "message_too_large"
        );
        let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
        assert_eq!(
            reject(&format!(
                r#"{{"type":"track","userId":"u","event":"e","properties":{{"d":{deep}}}}}"#
            )),
            "nesting_too_deep"
        );
        assert_eq!(
            parse_message(b"{\"type\":\"page\",\"userId\":\"\xff\"}", NOW)
                .unwrap_err()
                .code,
            "invalid_utf8"
        );
    }

    #[test]
    fn limits_are_inclusive_where_the_spec_says() {
        let id = "x".repeat(100);
        assert!(
            parse_message(
                format!(r#"{{"type":"page","userId":"u","messageId":"{id}"}}"#).as_bytes(),
                NOW
            )
            .is_ok()
        );
        let traits: Vec<String> = (0..299).map(|i| format!("\"t{i}\":1")).collect();
        assert!(
            parse_message(
                format!(
                    r#"{{"type":"identify","userId":"u","traits":{{{}}}}}"#,
                    traits.join(",")
                )
                .as_bytes(),
                NOW
            )
            .is_ok()
        );
    }

    #[test]
    fn timestamps_default_and_normalize() {
        let e = parse_message(
            br#"{"type":"page","anonymousId":"a","receivedAt":"2026-01-01T01:00:00+01:00"}"#,
            0,
        )
        .unwrap();
        assert_eq!(e.received_at, NOW);
        assert_eq!(e.timestamp, NOW);
        let e = parse_message(br#"{"type":"page","anonymousId":"a"}"#, NOW).unwrap();
        assert_eq!(e.timestamp, NOW);
        assert_eq!(e.received_at, NOW);
        let e = parse_message(
            br#"{"type":"page","anonymousId":"a","timestamp":"2026-01-01T00:00:00.5Z"}"#,
            0,
        )
        .unwrap();
        assert_eq!(e.timestamp, NOW + 500_000);
    }

    #[test]
    fn missing_message_id_is_generated_from_content() {
        let a = parse_message(br#"{"type":"page","anonymousId":"a"}"#, NOW).unwrap();
        let b = parse_message(br#"{"type":"page","anonymousId":"a"}"#, NOW + 1).unwrap();
        let c = parse_message(br#"{"type":"page","anonymousId":"b"}"#, NOW).unwrap();
        assert!(a.message_id.starts_with("gen-"));
        assert_eq!(a.message_id, b.message_id);
        assert_ne!(a.message_id, c.message_id);
    }
}
