//! Every object key of the store is formatted here and nowhere else.
//!
//! ```text
//! spaces/{space}/{table}/_log/{version:020}.json          commit log entries
//! spaces/{space}/{table}/date={YYYY-MM-DD}/part-{id}.parquet   date-partitioned tables (events)
//! spaces/{space}/{table}/part-{id}.parquet                  other tables
//! ```

use std::fmt;

use object_store::path::Path;
use regex::Regex;
use std::sync::LazyLock;

use crate::error::{Error, Result};

static NAME_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[a-z][a-z0-9_-]{0,63}$").unwrap_or_else(|e| panic!("static regex: {e}"))
});

/// A validated space name (tenant).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Space(String);

impl Space {
    /// Validate a space name: `^[a-z][a-z0-9_-]{0,63}$`.
    pub fn new(name: &str) -> Result<Self> {
        if NAME_RE.is_match(name) {
            Ok(Space(name.to_string()))
        } else {
            Err(Error::Usage(format!(
                "invalid space name '{name}': expected lowercase letters, digits, '_' or '-', starting with a letter"
            )))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Space {
    fn default() -> Self {
        Space("default".into())
    }
}

impl fmt::Display for Space {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The tables a space holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableName {
    /// Ingested events, partitioned by UTC event date.
    Events,
    /// Generic table (tests and later tables), by name.
    Named(&'static str),
}

impl TableName {
    /// The table's directory name.
    pub fn as_str(&self) -> &'static str {
        match self {
            TableName::Events => "events",
            TableName::Named(n) => n,
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An object key in the store (relative to the store root).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key(Path);

impl Key {
    /// The object-store path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Parse a key that was previously produced by this module (from a log entry).
    pub fn from_committed(s: &str) -> Self {
        Key(Path::from(s))
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        self.0.as_ref()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_ref())
    }
}

/// The directory of a whole space.
pub fn space_dir(space: &Space) -> Key {
    Key(Path::from(format!("spaces/{space}")))
}

/// The directory of a table.
pub fn table_dir(space: &Space, table: TableName) -> Key {
    Key(Path::from(format!("spaces/{space}/{table}")))
}

/// The directory of a table's commit log.
pub fn log_dir(space: &Space, table: TableName) -> Key {
    Key(Path::from(format!("spaces/{space}/{table}/_log")))
}

/// The key of log entry `version`.
pub fn log_entry(space: &Space, table: TableName, version: u64) -> Key {
    Key(Path::from(format!(
        "spaces/{space}/{table}/_log/{version:020}.json"
    )))
}

/// The key of the checkpoint holding every log entry up to `version`.
pub fn log_checkpoint(space: &Space, table: TableName, version: u64) -> Key {
    Key(Path::from(format!(
        "spaces/{space}/{table}/_log/{version:020}.checkpoint.json"
    )))
}

/// Parse the version out of a log checkpoint key (None for anything else).
pub fn parse_log_checkpoint(key: &Path) -> Option<u64> {
    log_version(key, ".checkpoint.json")
}

/// Parse the version out of a log entry key (None for anything else).
pub fn parse_log_entry(key: &Path) -> Option<u64> {
    log_version(key, ".json")
}

/// The version of a `_log` object named `{version:020}{suffix}`.
fn log_version(key: &Path, suffix: &str) -> Option<u64> {
    let stem = key.filename()?.strip_suffix(suffix)?;
    if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) {
        stem.parse().ok()
    } else {
        None
    }
}

/// A new, unique data file key, in a date partition when `date` is given (`YYYY-MM-DD`).
pub fn data_file(space: &Space, table: TableName, date: Option<&str>, ext: &str) -> Key {
    let id = uuid::Uuid::new_v4().simple();
    match date {
        Some(d) => Key(Path::from(format!(
            "spaces/{space}/{table}/date={d}/part-{id}.{ext}"
        ))),
        None => Key(Path::from(format!(
            "spaces/{space}/{table}/part-{id}.{ext}"
        ))),
    }
}

/// The cursor of destination `name` of `audience`.
pub fn destination_cursor(space: &Space, audience: &str, name: &str) -> Key {
    Key(Path::from(format!(
        "spaces/{space}/_destinations/{audience}/{name}.json"
    )))
}

/// Data kept for destination `name` of `audience`: `state` (what it holds) or `pending` (the
/// messages of the step in progress), gzipped JSON lines.
pub fn destination_data(space: &Space, audience: &str, name: &str, which: &str) -> Key {
    Key(Path::from(format!(
        "spaces/{space}/_destinations/{audience}/{name}.{which}.jsonl.gz"
    )))
}

/// The file a file destination writes for the step `from`..`to`: under the space's
/// `destinations/` prefix, or at the root of the destination's own store (`space` None).
pub fn destination_file(
    space: Option<&Space>,
    audience: &str,
    name: &str,
    from: u64,
    to: u64,
    ext: &str,
) -> Key {
    let file = format!("{audience}/{name}/{to:020}-from-{from:020}.{ext}");
    Key(Path::from(match space {
        Some(s) => format!("spaces/{s}/destinations/{file}"),
        None => file,
    }))
}

/// True when `key` is inside a table's log directory.
pub fn is_log_key(key: &Path) -> bool {
    key.parts().any(|p| p.as_ref() == "_log")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_entries_roundtrip() {
        let s = Space::new("acme").unwrap();
        let k = log_entry(&s, TableName::Events, 42);
        assert_eq!(
            k.as_str(),
            "spaces/acme/events/_log/00000000000000000042.json"
        );
        assert_eq!(parse_log_entry(k.path()), Some(42));
        let c = log_checkpoint(&s, TableName::Events, 64);
        assert_eq!(
            c.as_str(),
            "spaces/acme/events/_log/00000000000000000064.checkpoint.json"
        );
        assert_eq!(parse_log_checkpoint(c.path()), Some(64));
        assert_eq!(parse_log_entry(c.path()), None);
        assert_eq!(parse_log_checkpoint(k.path()), None);
        assert_eq!(
            parse_log_entry(&Path::from("spaces/acme/events/_log/x.json")),
            None
        );
    }

    #[test]
    fn space_names_are_validated() {
        assert!(Space::new("default").is_ok());
        assert!(Space::new("../etc").is_err());
        assert!(Space::new("A").is_err());
        assert!(Space::new("").is_err());
    }

    #[test]
    fn data_files_are_unique_and_partitioned() {
        let s = Space::default();
        let a = data_file(&s, TableName::Events, Some("2026-01-01"), "parquet");
        let b = data_file(&s, TableName::Events, Some("2026-01-01"), "parquet");
        assert_ne!(a, b);
        assert!(
            a.as_str()
                .starts_with("spaces/default/events/date=2026-01-01/part-")
        );
    }
}
