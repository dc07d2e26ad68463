//! The atomic commit log of one table.
//!
//! Data files are written first under unique names; then a numbered JSON entry naming them is
//! created with put-if-absent (`PutMode::Create`), which is atomic on the local backend, in memory
//! and on S3. Readers replay the entries and see only files they name. A writer that loses the
//! race for a version re-reads the log, lets its caller rebase the draft, and retries a bounded
//! number of times. Every attempt carries a random attempt id, so a put whose reply was lost
//! (written, but the writer saw an error) is recognised on re-read and never committed twice.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use super::Store;
use super::keys::{self, Key, Space, TableName};
use crate::error::{Error, Result};

/// How many times a commit is attempted before giving up.
pub const MAX_COMMIT_ATTEMPTS: usize = 64;

/// A typed dynamic column recorded for a data file (property and context columns of events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord, Hash)]
pub struct ColumnSpec {
    /// Column name, e.g. `properties.price:num`.
    pub name: String,
    /// Arrow type: `utf8`, `float64` or `boolean`.
    pub kind: String,
}

/// One data file added by a commit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FileAdd {
    /// Object key relative to the store root.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Number of rows.
    pub rows: u64,
    /// Partition value (`date=YYYY-MM-DD` partitions hold the date), if the table is partitioned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
    /// Smallest and largest event timestamp (UTC microseconds), for pruning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts_range: Option<(i64, i64)>,
    /// Smallest and largest received-at timestamp (UTC microseconds), for the dedup window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_range: Option<(i64, i64)>,
    /// Dynamic columns present in the file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<ColumnSpec>,
    /// Which table of a multi-table log the file belongs to (e.g. `identities`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// A committed log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitEntry {
    /// The version this entry created (1-based, dense).
    pub version: u64,
    /// Random id of the attempt that wrote it.
    pub attempt_id: String,
    /// Commit time, UTC microseconds.
    pub committed_at: i64,
    /// What produced it (`ingest`, `compute`, ...).
    pub operation: String,
    /// Files added.
    #[serde(default)]
    pub adds: Vec<FileAdd>,
    /// Keys of files logically removed.
    #[serde(default)]
    pub removes: Vec<String>,
    /// Free-form details of the operation (counts, watermarks).
    #[serde(default)]
    pub info: serde_json::Value,
}

/// What a writer wants to commit (the log fills in version, attempt id and time).
#[derive(Debug, Clone, Default)]
pub struct CommitDraft {
    /// Operation name.
    pub operation: String,
    /// Files added.
    pub adds: Vec<FileAdd>,
    /// Files removed.
    pub removes: Vec<String>,
    /// Details.
    pub info: serde_json::Value,
}

/// The state of a table as of one version: the live files, in commit order.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The version (0 for an empty table).
    pub version: u64,
    /// Live files.
    pub files: Vec<FileAdd>,
    /// Every entry up to `version`.
    pub entries: Vec<CommitEntry>,
}

impl Snapshot {
    /// Build a snapshot by replaying entries (sorted by version).
    fn replay(entries: Vec<CommitEntry>) -> Self {
        let mut live: BTreeMap<String, (u64, usize, FileAdd)> = BTreeMap::new();
        for entry in &entries {
            for r in &entry.removes {
                live.remove(r);
            }
            for (i, add) in entry.adds.iter().enumerate() {
                live.insert(add.path.clone(), (entry.version, i, add.clone()));
            }
        }
        let mut files: Vec<_> = live.into_values().collect();
        files.sort_by_key(|(v, i, _)| (*v, *i));
        Snapshot {
            version: entries.last().map_or(0, |e| e.version),
            files: files.into_iter().map(|(_, _, f)| f).collect(),
            entries,
        }
    }
}

/// The commit log of one table of one space.
#[derive(Debug, Clone)]
pub struct CommitLog {
    store: Store,
    space: Space,
    table: TableName,
    unsafe_overwrite: bool,
}

/// Outcome of one put-if-absent attempt.
enum PutOutcome {
    Committed,
    Lost,
}

impl CommitLog {
    /// The log of `table` in `space`.
    pub fn new(store: &Store, space: &Space, table: TableName) -> Self {
        CommitLog {
            store: store.clone(),
            space: space.clone(),
            table,
            unsafe_overwrite: false,
        }
    }

    /// A deliberately broken log that commits with a plain overwrite instead of put-if-absent:
    /// only for tests that show their checks catch a lost commit race.
    #[doc(hidden)]
    pub fn with_unsafe_overwrite(mut self, on: bool) -> Self {
        self.unsafe_overwrite = on;
        self
    }

    /// The table this log belongs to.
    pub fn table(&self) -> TableName {
        self.table
    }

    /// The space this log belongs to.
    pub fn space(&self) -> &Space {
        &self.space
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Versions present in the log, sorted.
    /// The committed versions, with the listing's metadata of their entry objects.
    async fn versions(&self) -> Result<Vec<(u64, object_store::ObjectMeta)>> {
        let dir = keys::log_dir(&self.space, self.table);
        let metas: Vec<object_store::ObjectMeta> = self
            .store
            .object_store()
            .list(Some(dir.path()))
            .try_collect()
            .await?;
        let mut versions: Vec<(u64, object_store::ObjectMeta)> = metas
            .into_iter()
            .filter_map(|m| keys::parse_log_entry(&m.location).map(|v| (v, m)))
            .collect();
        versions.sort_unstable_by_key(|v| v.0);
        Ok(versions)
    }

    /// One entry, from the store's cache when the object is the one read before (same tag).
    async fn cached_entry(
        &self,
        version: u64,
        meta: &object_store::ObjectMeta,
    ) -> Result<Option<CommitEntry>> {
        let path = meta.location.to_string();
        let tag = format!(
            "{:?}/{}/{}",
            meta.e_tag,
            meta.size,
            meta.last_modified.timestamp_nanos_opt().unwrap_or_default()
        );
        if let Some(e) = self.store.cached_entry(&path, &tag) {
            return Ok(Some((*e).clone()));
        }
        let e = self.read_entry(version).await?;
        if let Some(e) = &e {
            self.store
                .cache_entry(path, tag, std::sync::Arc::new(e.clone()));
        }
        Ok(e)
    }

    async fn read_entry(&self, version: u64) -> Result<Option<CommitEntry>> {
        let key = keys::log_entry(&self.space, self.table, version);
        match self.store.object_store().get(key.path()).await {
            Ok(r) => {
                let bytes = r.bytes().await?;
                let entry: CommitEntry =
                    serde_json::from_slice(&bytes).map_err(|e| Error::CorruptLog {
                        path: key.to_string(),
                        reason: e.to_string(),
                    })?;
                Ok(Some(entry))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// All committed entries, in version order.
    pub async fn entries(&self) -> Result<Vec<CommitEntry>> {
        let versions = self.versions().await?;
        let reads = versions.iter().map(|(v, m)| self.cached_entry(*v, m));
        let mut out = Vec::with_capacity(versions.len());
        for e in futures::future::try_join_all(reads)
            .await?
            .into_iter()
            .flatten()
        {
            out.push(e);
        }
        Ok(out)
    }

    /// The latest committed snapshot.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        Ok(Snapshot::replay(self.entries().await?))
    }

    /// The snapshot as of `version` (entries after it are ignored).
    pub async fn snapshot_at(&self, version: u64) -> Result<Snapshot> {
        let mut entries = self.entries().await?;
        entries.retain(|e| e.version <= version);
        Ok(Snapshot::replay(entries))
    }

    /// Commit a draft built from the current snapshot.
    ///
    /// `build` is called with the latest snapshot; when another writer commits first, it is
    /// called again with the new snapshot so the caller can rebase (or give up with an error).
    /// Writers whose rebase needs async work loop over [`CommitLog::try_commit`] themselves.
    pub async fn commit(
        &self,
        mut build: impl FnMut(&Snapshot) -> Result<CommitDraft>,
    ) -> Result<CommitEntry> {
        let mut snapshot = self.snapshot().await?;
        for _ in 0..MAX_COMMIT_ATTEMPTS {
            let draft = build(&snapshot)?;
            if let Some(entry) = self.try_commit(snapshot.version, draft).await? {
                return Ok(entry);
            }
            snapshot = self.snapshot().await?;
        }
        Err(self.conflict_error())
    }

    /// The error for a commit that kept losing races.
    pub fn conflict_error(&self) -> Error {
        Error::CommitConflict {
            table: format!("{}/{}", self.space, self.table),
            attempts: MAX_COMMIT_ATTEMPTS,
        }
    }

    /// Try to commit `draft` as version `base_version + 1`. Returns `None` when another writer
    /// took that version first (re-read, rebase and try again).
    pub async fn try_commit(
        &self,
        base_version: u64,
        draft: CommitDraft,
    ) -> Result<Option<CommitEntry>> {
        let entry = CommitEntry {
            version: base_version + 1,
            attempt_id: uuid::Uuid::new_v4().to_string(),
            committed_at: chrono::Utc::now().timestamp_micros(),
            operation: draft.operation,
            adds: draft.adds,
            removes: draft.removes,
            info: draft.info,
        };
        crate::fault::hit("before_commit");
        match self.try_put(&entry).await? {
            PutOutcome::Committed => {
                crate::fault::hit("after_commit");
                Ok(Some(entry))
            }
            PutOutcome::Lost => Ok(None),
        }
    }

    /// Create the entry with put-if-absent. An error whose outcome is unknown is resolved by
    /// reading the entry back and comparing attempt ids.
    async fn try_put(&self, entry: &CommitEntry) -> Result<PutOutcome> {
        let key: Key = keys::log_entry(&self.space, self.table, entry.version);
        let body = serde_json::to_vec_pretty(entry)?;
        let opts = PutOptions {
            mode: if self.unsafe_overwrite {
                PutMode::Overwrite
            } else {
                PutMode::Create
            },
            ..Default::default()
        };
        let mut last_err = None;
        for _ in 0..3 {
            let result = self
                .store
                .object_store()
                .put_opts(key.path(), PutPayload::from(body.clone()), opts.clone())
                .await;
            let result = if crate::fault::active("lose_put_reply") && result.is_ok() {
                Err(object_store::Error::Generic {
                    store: "fault",
                    source: "reply lost (injected)".into(),
                })
            } else {
                result
            };
            match result {
                Ok(_) => return Ok(PutOutcome::Committed),
                Err(object_store::Error::AlreadyExists { .. }) => {
                    return match self.read_entry(entry.version).await? {
                        Some(e) if e.attempt_id == entry.attempt_id => Ok(PutOutcome::Committed),
                        _ => Ok(PutOutcome::Lost),
                    };
                }
                Err(e) => {
                    // Ambiguous: the put may or may not have happened.
                    match self.read_entry(entry.version).await {
                        Ok(Some(e)) if e.attempt_id == entry.attempt_id => {
                            return Ok(PutOutcome::Committed);
                        }
                        Ok(Some(_)) => return Ok(PutOutcome::Lost),
                        Ok(None) | Err(_) => last_err = Some(e),
                    }
                }
            }
        }
        Err(last_err
            .map(Error::from)
            .unwrap_or_else(|| Error::Usage("unreachable commit state".into())))
    }

    /// Delete data files of this table that the latest snapshot does not name and that are
    /// older than `grace`. Returns the deleted keys.
    pub async fn vacuum(&self, grace: std::time::Duration) -> Result<Vec<String>> {
        let snapshot = self.snapshot().await?;
        let live: std::collections::HashSet<&str> =
            snapshot.files.iter().map(|f| f.path.as_str()).collect();
        let dir = keys::table_dir(&self.space, self.table);
        let store = self.store.object_store();
        let metas: Vec<_> = store.list(Some(dir.path())).try_collect().await?;
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::zero());
        let mut deleted = Vec::new();
        for meta in metas {
            if keys::is_log_key(&meta.location) {
                continue;
            }
            let key = meta.location.to_string();
            if live.contains(key.as_str()) || meta.last_modified > cutoff {
                continue;
            }
            store.delete(&meta.location).await?;
            deleted.push(key);
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(path: &str) -> FileAdd {
        FileAdd {
            path: path.into(),
            size: 1,
            rows: 1,
            date: None,
            ts_range: None,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn replay_applies_adds_and_removes() {
        let store = Store::memory();
        let log = CommitLog::new(&store, &Space::default(), TableName::Named("t"));
        log.commit(|_| {
            Ok(CommitDraft {
                operation: "a".into(),
                adds: vec![add("x"), add("y")],
                ..Default::default()
            })
        })
        .await
        .unwrap();
        log.commit(|_| {
            Ok(CommitDraft {
                operation: "b".into(),
                adds: vec![add("z")],
                removes: vec!["x".into()],
                ..Default::default()
            })
        })
        .await
        .unwrap();
        let s = log.snapshot().await.unwrap();
        assert_eq!(s.version, 2);
        let paths: Vec<_> = s.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, vec!["y", "z"]);
        let s1 = log.snapshot_at(1).await.unwrap();
        assert_eq!(s1.files.len(), 2);
    }
}
