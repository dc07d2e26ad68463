//! Segment-spec messages for membership changes, and the requests that carry them.
//!
//! A change of one member (profile or account) becomes one message per value of the id type the
//! destination needs (fan-out); its idempotency key is a hash of (space, audience, destination,
//! mode, member, id value, change, version), so every retry and every re-run after a crash sends
//! the same key. Requests carry one message, a Segment `{"batch": [...]}` of several, or (list
//! mode) one list of adds and removes; their order is deterministic (sorted by member and value),
//! so a resumed sync rebuilds exactly the requests it was sending.

use hashbrown::HashMap;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::config::{Destination, Mode, hex};

/// One member entering (true) or exiting (false) at a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Profile id (users) or account id (accounts).
    pub member: String,
    /// Entered (true) or exited (false).
    pub entered: bool,
    /// Audience version of the change.
    pub version: u64,
    /// As-of time of that version (UTC microseconds).
    pub as_of: i64,
}

/// External ids needed to address members.
#[derive(Debug, Default)]
pub struct Ids {
    /// Profile → values of the destination's id type, sorted.
    pub values: HashMap<String, Vec<String>>,
    /// Profile → its first user id.
    pub user_id: HashMap<String, String>,
    /// Profile → its first anonymous id.
    pub anonymous_id: HashMap<String, String>,
    /// Account → its profiles, sorted.
    pub links: HashMap<String, Vec<String>>,
}

/// What a destination in a state mode (identify, list, group) holds about one member:
/// (mode, member, profile addressed, id value); group entries have empty profile and value.
pub type Entry = (Mode, String, String, String);

/// One message to deliver.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// Stable idempotency key (hex).
    pub key: String,
    /// Member the change is about.
    pub member: String,
    /// Profile addressed (users: the member; account identify: a profile of the account).
    pub profile: Option<String>,
    /// The id value addressed (None for group calls).
    pub id_value: Option<String>,
    /// Entered or exited.
    pub entered: bool,
    /// Version of the change.
    pub version: u64,
    /// `identify`, `track`, `group` or `list`.
    pub mode: Mode,
    /// The Segment-spec JSON (list mode: the entry, merged into a list request).
    pub body: Value,
}

/// One HTTP request (or one file line group): messages and the body that carries them.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// `Idempotency-Key` header.
    pub key: String,
    /// Indices of the messages it carries.
    pub messages: Vec<usize>,
    /// JSON body.
    pub body: bytes::Bytes,
}

/// Who is sending: the space, the audience and the destination.
#[derive(Debug, Clone, Copy)]
pub struct Sender<'a> {
    /// Space name.
    pub space: &'a str,
    /// Audience key.
    pub audience: &'a str,
    /// The destination.
    pub dest: &'a Destination,
}

fn key_of(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    hex(&h.finalize()[..16])
}

fn timestamp(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

impl Sender<'_> {
    fn context(&self, version: u64, ext: Option<(&str, &str)>) -> Value {
        let mut c = json!({
            "library": {"name": "audiences", "version": env!("CARGO_PKG_VERSION")},
            "personas": {
                "computation_key": self.audience,
                "computation_class": "audience",
                "space_id": self.space,
                "version": version,
                "destination": self.dest.name,
            },
        });
        if let Some((t, v)) = ext {
            c["externalIds"] =
                json!([{"id": v, "type": t, "collection": "users", "encoding": "none"}]);
        }
        c
    }

    /// `userId` / `anonymousId` (and `traits.email`) for one profile addressed by `value`.
    fn address(&self, body: &mut Value, profile: &str, value: &str, ids: &Ids) {
        match self.dest.id_type.as_str() {
            "user_id" => body["userId"] = json!(value),
            "anonymous_id" => body["anonymousId"] = json!(value),
            _ => {
                match (ids.user_id.get(profile), ids.anonymous_id.get(profile)) {
                    (Some(u), _) => body["userId"] = json!(u),
                    (None, Some(a)) => body["anonymousId"] = json!(a),
                    // every message needs one of the two: the profile id stands in
                    (None, None) => body["anonymousId"] = json!(profile),
                }
            }
        }
        if self.dest.id_type == "email" {
            body["traits"]["email"] = json!(value);
        }
    }

    fn message(
        &self,
        mode: Mode,
        c: &Change,
        profile: Option<&str>,
        value: Option<&str>,
        ids: &Ids,
    ) -> Message {
        let mode_name = format!("{mode:?}").to_ascii_lowercase();
        let version = c.version.to_string();
        let key = key_of(&[
            self.space,
            self.audience,
            &self.dest.name,
            &mode_name,
            &c.member,
            profile.unwrap_or(""),
            value.unwrap_or(""),
            if c.entered { "entered" } else { "exited" },
            &version,
        ]);
        let aud = self.audience;
        let mut body = match mode {
            Mode::Identify => json!({"type": "identify", "traits": {aud: c.entered}}),
            Mode::Track => json!({
                "type": "track",
                "event": if c.entered { "Audience Entered" } else { "Audience Exited" },
                "properties": {"audience_key": aud, aud: c.entered},
            }),
            Mode::Group => {
                json!({"type": "group", "groupId": c.member, "traits": {aud: c.entered}})
            }
            Mode::List => {
                json!({"value": value, "change": if c.entered { "add" } else { "remove" }})
            }
        };
        if mode != Mode::List {
            body["messageId"] = json!(format!("aud-{key}"));
            body["timestamp"] = json!(timestamp(c.as_of));
            let ext = value.map(|v| (self.dest.id_type.as_str(), v));
            body["context"] = self.context(c.version, ext);
            if let (Some(p), Some(v)) = (profile, value) {
                self.address(&mut body, p, v, ids);
            }
        }
        Message {
            key,
            member: c.member.clone(),
            profile: profile.map(String::from),
            id_value: value.map(String::from),
            entered: c.entered,
            version: c.version,
            mode,
            body,
        }
    }

    /// The entries one member fans out to: a group entry per account, and per (profile, value
    /// of the id type) of the member (accounts: of its linked profiles) for the other modes.
    fn fan_out(&self, member: &str, accounts: bool, ids: &Ids) -> Vec<Entry> {
        let mut out = Vec::new();
        let none = Vec::new();
        for mode in self.dest.mode.list() {
            if mode == Mode::Group {
                out.push((mode, member.to_string(), String::new(), String::new()));
                continue;
            }
            let own = [member.to_string()];
            let profiles: &[String] = if accounts {
                ids.links.get(member).unwrap_or(&none)
            } else {
                &own
            };
            for p in profiles {
                for v in ids.values.get(p).unwrap_or(&none) {
                    out.push((mode, member.to_string(), p.clone(), v.clone()));
                }
            }
        }
        out
    }

    /// The message of one entry for change `c`.
    fn entry_message(&self, e: &Entry, c: &Change, ids: &Ids) -> Message {
        let (mode, _, p, v) = e;
        if *mode == Mode::Group {
            self.message(*mode, c, None, None, ids)
        } else {
            self.message(*mode, c, Some(p.as_str()), Some(v.as_str()), ids)
        }
    }

    /// The messages for `changes` (sorted by member), and how many members had no value of the
    /// id type (nothing to send them).
    pub fn messages(&self, changes: &[Change], accounts: bool, ids: &Ids) -> (Vec<Message>, u64) {
        let mut out = Vec::new();
        let mut no_id = 0u64;
        for c in changes {
            let entries = self.fan_out(&c.member, accounts, ids);
            no_id += u64::from(entries.is_empty());
            out.extend(entries.iter().map(|e| self.entry_message(e, c, ids)));
        }
        (out, no_id)
    }

    /// What the destination should hold for `members` (sorted), and how many members have no
    /// value of the id type.
    pub fn desired(&self, members: &[String], accounts: bool, ids: &Ids) -> (Vec<Entry>, u64) {
        let mut out = Vec::new();
        let mut no_id = 0u64;
        for m in members {
            let entries = self.fan_out(m, accounts, ids);
            no_id += u64::from(entries.is_empty());
            out.extend(entries);
        }
        (out, no_id)
    }

    /// Messages that add `adds` and remove `removes` at `version`, sorted by member.
    pub fn entry_messages(
        &self,
        adds: &[&Entry],
        removes: &[&Entry],
        version: u64,
        as_of: i64,
        ids: &Ids,
    ) -> Vec<Message> {
        let mut all: Vec<(&Entry, bool)> = adds
            .iter()
            .map(|e| (*e, true))
            .chain(removes.iter().map(|e| (*e, false)))
            .collect();
        all.sort_by(|a, b| (&a.0.1, &a.0.2, &a.0.3, a.0.0).cmp(&(&b.0.1, &b.0.2, &b.0.3, b.0.0)));
        all.into_iter()
            .map(|(e, entered)| {
                let c = Change {
                    member: e.1.clone(),
                    entered,
                    version,
                    as_of,
                };
                self.entry_message(e, &c, ids)
            })
            .collect()
    }

    /// Group messages into requests of at most `batch` messages (list mode: list requests).
    pub fn requests(
        &self,
        msgs: &[Message],
        to_version: u64,
        as_of: i64,
    ) -> serde_json::Result<Vec<Outgoing>> {
        let batch = self.dest.batch().max(1);
        let mut out = Vec::new();
        let idx: Vec<usize> = (0..msgs.len()).collect();
        for chunk in idx.chunks(batch) {
            let key = if chunk.len() == 1 {
                msgs[chunk[0]].key.clone()
            } else {
                let keys: Vec<&str> = chunk.iter().map(|&i| msgs[i].key.as_str()).collect();
                key_of(&keys)
            };
            let is_list = msgs[chunk[0]].mode == Mode::List;
            let body = if is_list {
                let pick = |add: bool| -> Vec<&Value> {
                    chunk
                        .iter()
                        .filter(|&&i| msgs[i].entered == add)
                        .map(|&i| &msgs[i].body["value"])
                        .collect()
                };
                json!({
                    "type": "audience_list",
                    "messageId": format!("aud-{key}"),
                    "audience_key": self.audience,
                    "id_type": self.dest.id_type,
                    "version": to_version,
                    "timestamp": timestamp(as_of),
                    "add": pick(true),
                    "remove": pick(false),
                    "context": self.context(to_version, None),
                })
            } else if chunk.len() == 1 {
                msgs[chunk[0]].body.clone()
            } else {
                json!({"batch": chunk.iter().map(|&i| &msgs[i].body).collect::<Vec<_>>()})
            };
            out.push(Outgoing {
                key,
                messages: chunk.to_vec(),
                body: serde_json::to_vec(&body)?.into(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::config::parse_all;
    use crate::lang::definition::Level;

    fn dest(v: Value) -> Destination {
        parse_all(&[v], Level::Users).unwrap().remove(0)
    }

    fn ch(member: &str, entered: bool, version: u64) -> Change {
        Change {
            member: member.into(),
            entered,
            version,
            as_of: 1_700_000_000_000_000,
        }
    }

    #[test]
    fn identify_fans_out_per_email_with_stable_keys() {
        let d =
            dest(json!({"name": "crm", "kind": "webhook", "url": "http://x", "id_type": "email"}));
        let s = Sender {
            space: "default",
            audience: "vip",
            dest: &d,
        };
        let mut ids = Ids::default();
        ids.values
            .insert("p1".into(), vec!["a@x.io".into(), "b@x.io".into()]);
        ids.user_id.insert("p1".into(), "u1".into());
        let (m, no_id) = s.messages(&[ch("p1", true, 5), ch("p2", false, 5)], false, &ids);
        assert_eq!((m.len(), no_id), (2, 1));
        assert_eq!(m[0].body["type"], "identify");
        assert_eq!(m[0].body["traits"], json!({"vip": true, "email": "a@x.io"}));
        assert_eq!(m[0].body["userId"], "u1");
        assert_eq!(m[1].body["traits"]["email"], "b@x.io");
        assert_ne!(m[0].key, m[1].key);
        let (again, _) = s.messages(&[ch("p1", true, 5)], false, &ids);
        assert_eq!(again[0].key, m[0].key);
        assert_eq!(m[0].body["messageId"], format!("aud-{}", m[0].key));
        let r = s.requests(&m, 5, 0).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].key, m[0].key);
    }

    #[test]
    fn track_and_list_payloads() {
        let d = dest(json!({"name": "t", "kind": "webhook", "url": "http://x", "mode": "track"}));
        let s = Sender {
            space: "default",
            audience: "vip",
            dest: &d,
        };
        let mut ids = Ids::default();
        ids.values.insert("p1".into(), vec!["u1".into()]);
        let (m, _) = s.messages(&[ch("p1", false, 7)], false, &ids);
        assert_eq!(m[0].body["event"], "Audience Exited");
        assert_eq!(
            m[0].body["properties"],
            json!({"audience_key": "vip", "vip": false})
        );
        assert_eq!(m[0].body["userId"], "u1");

        let d = dest(
            json!({"name": "l", "kind": "webhook", "url": "http://x", "mode": "list", "batch_size": 2}),
        );
        let s = Sender {
            space: "default",
            audience: "vip",
            dest: &d,
        };
        ids.values.insert("p2".into(), vec!["u2".into()]);
        ids.values.insert("p3".into(), vec!["u3".into()]);
        let (m, _) = s.messages(
            &[ch("p1", true, 7), ch("p2", false, 7), ch("p3", true, 7)],
            false,
            &ids,
        );
        let r = s.requests(&m, 7, 0).unwrap();
        assert_eq!(r.len(), 2);
        let b: Value = serde_json::from_slice(&r[0].body).unwrap();
        assert_eq!(
            (b["add"].clone(), b["remove"].clone()),
            (json!(["u1"]), json!(["u2"]))
        );
        let b: Value = serde_json::from_slice(&r[1].body).unwrap();
        assert_eq!(b["add"], json!(["u3"]));
    }
}
