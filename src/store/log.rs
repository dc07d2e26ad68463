//! The atomic commit log of one table.
//!
//! Data files are written first under unique names; then a numbered JSON entry naming them is
//! created with put-if-absent (`PutMode::Create`), which is atomic on the local backend, in memory
//! and on S3. Readers replay the entries and see only files they name. A writer that loses the
//! race for a version re-reads the log, lets its caller rebase the draft, and retries a bounded
//! number of times. Every attempt carries a random attempt id, so a put whose reply was lost
//! (written, but the writer saw an error) is recognised on re-read and never committed twice.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use super::Store;
use super::keys::{self, Key, Space, TableName};
use crate::error::{Error, Result};

/// How many times a commit is attempted before giving up.
pub const MAX_COMMIT_ATTEMPTS: usize = 64;

/// Every this many versions, the commit also writes a checkpoint: all entries up to it in one
/// object, so that replaying the log reads that object and the entries after it instead of
/// one object per commit (a table that commits every minute has 1,440 entries a day).
pub const CHECKPOINT_INTERVAL: u64 = 64;

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
    /// Every entry up to `version` (shared by the clones of a snapshot).
    pub entries: Arc<Vec<CommitEntry>>,
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
            entries: Arc::new(entries),
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

    /// The committed versions, with the listing's metadata of their entry objects, and the
    /// versions of the checkpoints; both sorted.
    async fn versions(&self) -> Result<(Vec<(u64, object_store::ObjectMeta)>, Vec<u64>)> {
        let dir = keys::log_dir(&self.space, self.table);
        let metas: Vec<object_store::ObjectMeta> = self
            .store
            .object_store()
            .list(Some(dir.path()))
            .try_collect()
            .await?;
        let mut checkpoints = Vec::new();
        let mut versions = Vec::new();
        for m in metas {
            if let Some(v) = keys::parse_log_entry(&m.location) {
                versions.push((v, m));
            } else if let Some(v) = keys::parse_log_checkpoint(&m.location) {
                checkpoints.push(v);
            }
        }
        versions.sort_unstable_by_key(|v| v.0);
        checkpoints.sort_unstable();
        Ok((versions, checkpoints))
    }

    /// The cache tag of a listed object: it changes whenever the object does.
    fn tag(meta: &object_store::ObjectMeta) -> String {
        format!(
            "{:?}/{}/{}",
            meta.e_tag,
            meta.size,
            meta.last_modified.timestamp_nanos_opt().unwrap_or_default()
        )
    }

    /// One entry, from the store's cache when the object is the one read before (same tag).
    async fn cached_entry(
        &self,
        version: u64,
        meta: &object_store::ObjectMeta,
    ) -> Result<Option<CommitEntry>> {
        let path = meta.location.to_string();
        let tag = Self::tag(meta);
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

    /// All committed entries, in version order. When this store read the log before, and the
    /// latest version's object is unchanged and has no successor (two concurrent HEADs), the
    /// entries read then. Otherwise the log is listed: the entries the latest checkpoint holds
    /// (from the store's cache when every one is there), then one object per later entry.
    pub async fn entries(&self) -> Result<Vec<CommitEntry>> {
        Ok(self.current().await?.entries.as_ref().clone())
    }

    /// The latest snapshot: the one this store replayed before while the log's tail says it is
    /// still current (see [`CommitLog::entries`]), else replayed from the entries.
    async fn current(&self) -> Result<Arc<Snapshot>> {
        let dir = keys::log_dir(&self.space, self.table).path().to_string();
        if let Some(tail) = self.store.log_tail(&dir)
            && self.tail_is_current(&tail).await
        {
            return Ok(tail.snapshot);
        }
        let (versions, checkpoints) = self.versions().await?;
        let mut out = Vec::with_capacity(versions.len());
        let mut covered = 0;
        if let Some(&c) = checkpoints.last() {
            let listed: Vec<&(u64, object_store::ObjectMeta)> =
                versions.iter().take_while(|(v, _)| *v <= c).collect();
            let cached: Option<Vec<CommitEntry>> = listed
                .iter()
                .map(|(_, m)| {
                    self.store
                        .cached_entry(m.location.as_ref(), &Self::tag(m))
                        .map(|e| (*e).clone())
                })
                .collect();
            match cached {
                Some(es) if es.len() as u64 == c => {
                    out = es;
                    covered = c;
                }
                _ => match self.read_checkpoint(c).await {
                    Ok(es) => {
                        // Later reads find them in the cache, under their own objects' tags.
                        for (v, m) in &listed {
                            if let Some(e) = es.get((*v - 1) as usize) {
                                self.store.cache_entry(
                                    m.location.to_string(),
                                    Self::tag(m),
                                    std::sync::Arc::new(e.clone()),
                                );
                            }
                        }
                        out = es;
                        covered = c;
                    }
                    // A checkpoint is only a shortcut: without it, the entries themselves.
                    Err(e) => tracing::warn!(
                        table = %format!("{}/{}", self.space, self.table),
                        checkpoint = c,
                        error = %e,
                        "commit log checkpoint unreadable; reading every entry"
                    ),
                },
            }
        }
        let reads = versions
            .iter()
            .filter(|(v, _)| *v > covered)
            .map(|(v, m)| self.cached_entry(*v, m));
        for e in futures::future::try_join_all(reads)
            .await?
            .into_iter()
            .flatten()
        {
            out.push(e);
        }
        let complete = versions.last().filter(|(v, _)| out.len() as u64 == *v);
        let snapshot = Arc::new(Snapshot::replay(out));
        // versions 1..=v all read: later calls may start from them
        if let Some((v, meta)) = complete {
            let tail = super::LogTail {
                version: *v,
                meta: meta.clone(),
                snapshot: Arc::clone(&snapshot),
            };
            self.store.keep_log_tail(dir, tail);
        }
        Ok(snapshot)
    }

    /// Whether `tail` still holds every entry: its latest version's object is the one read
    /// then and the next version does not exist (a version is only put after the one before
    /// it, so none later exists either). Any doubt, an error included, answers false.
    async fn tail_is_current(&self, tail: &super::LogTail) -> bool {
        let os = self.store.object_store();
        let last = keys::log_entry(&self.space, self.table, tail.version);
        let next = keys::log_entry(&self.space, self.table, tail.version + 1);
        let (last, next) = futures::join!(os.head(last.path()), os.head(next.path()));
        matches!(next, Err(object_store::Error::NotFound { .. }))
            && last.is_ok_and(|m| same_object(&m, &tail.meta))
    }

    /// The entries of checkpoint `version`: exactly versions 1..=version, in order.
    async fn read_checkpoint(&self, version: u64) -> Result<Vec<CommitEntry>> {
        let key = keys::log_checkpoint(&self.space, self.table, version);
        let corrupt = |reason: String| Error::CorruptLog {
            path: key.to_string(),
            reason,
        };
        let bytes = self
            .store
            .object_store()
            .get(key.path())
            .await?
            .bytes()
            .await?;
        let entries: Vec<CommitEntry> =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if entries.len() as u64 != version
            || entries
                .iter()
                .enumerate()
                .any(|(i, e)| e.version != i as u64 + 1)
        {
            return Err(corrupt(format!(
                "expected entries 1..={version}, found {}",
                entries.len()
            )));
        }
        Ok(entries)
    }

    /// Write the checkpoint of `version` (every entry up to it). Best effort: a missing or
    /// broken checkpoint only makes replay read the entries one by one.
    async fn write_checkpoint(&self, version: u64) {
        let result = async {
            let mut entries = self.entries().await?;
            entries.retain(|e| e.version <= version);
            if entries.len() as u64 != version {
                return Err(Error::Usage(format!(
                    "{} entries up to version {version}",
                    entries.len()
                )));
            }
            let key = keys::log_checkpoint(&self.space, self.table, version);
            self.store
                .object_store()
                .put(key.path(), PutPayload::from(serde_json::to_vec(&entries)?))
                .await?;
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(
                table = %format!("{}/{}", self.space, self.table),
                version,
                error = %e,
                "commit log checkpoint not written"
            );
        }
    }

    /// The latest committed snapshot.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        Ok(self.current().await?.as_ref().clone())
    }

    /// The snapshot as of `version` (entries after it are ignored).
    pub async fn snapshot_at(&self, version: u64) -> Result<Snapshot> {
        let current = self.current().await?;
        if current.version <= version {
            return Ok(current.as_ref().clone());
        }
        let entries = current.entries.iter().filter(|e| e.version <= version);
        Ok(Snapshot::replay(entries.cloned().collect()))
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
                if entry.version.is_multiple_of(CHECKPOINT_INTERVAL) {
                    self.write_checkpoint(entry.version).await;
                }
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
    /// older than `grace`: a file a commit removed counts from that commit (a reader of an
    /// earlier snapshot may still be reading it, however old the file is), a file no commit
    /// named (a crashed writer's) from its modification time. Returns the deleted keys.
    pub async fn vacuum(&self, grace: std::time::Duration) -> Result<Vec<String>> {
        let snapshot = self.snapshot().await?;
        let live: std::collections::HashSet<&str> =
            snapshot.files.iter().map(|f| f.path.as_str()).collect();
        let mut removed_at: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
        for e in snapshot.entries.iter() {
            for r in &e.removes {
                removed_at.insert(r.as_str(), e.committed_at);
            }
        }
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
            let young = match removed_at.get(key.as_str()) {
                Some(at) => *at > cutoff.timestamp_micros(),
                None => meta.last_modified > cutoff,
            };
            if live.contains(key.as_str()) || young {
                continue;
            }
            store.delete(&meta.location).await?;
            deleted.push(key);
        }
        Ok(deleted)
    }
}

/// Whether two metadata of one key, from a listing or a HEAD, describe the same object: the
/// same entity tag when both have one (S3's listing and HEAD agree on it, not on the precision
/// of the modification time), else the same modification time; and the same size.
fn same_object(a: &object_store::ObjectMeta, b: &object_store::ObjectMeta) -> bool {
    a.size == b.size
        && match (&a.e_tag, &b.e_tag) {
            (Some(x), Some(y)) => x == y,
            _ => a.last_modified == b.last_modified,
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

    /// The entries a store keeps from its last read follow commits of another process (a
    /// second store on the same directory, with caches of its own) and an entry rewritten in
    /// place, as a listing does.
    #[tokio::test]
    async fn kept_entries_follow_other_writers_and_rewritten_entries() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().to_str().unwrap();
        let (a, b) = (
            Store::open(url, &Default::default()).unwrap(),
            Store::open(url, &Default::default()).unwrap(),
        );
        let table = TableName::Named("t");
        let (la, lb) = (
            CommitLog::new(&a, &Space::default(), table),
            CommitLog::new(&b, &Space::default(), table),
        );
        let draft = |op: &str| {
            let op = op.to_string();
            move |_: &Snapshot| {
                Ok(CommitDraft {
                    operation: op.clone(),
                    adds: vec![add(&op)],
                    ..Default::default()
                })
            }
        };
        let ops =
            |es: Vec<CommitEntry>| -> Vec<String> { es.into_iter().map(|e| e.operation).collect() };
        la.commit(draft("one")).await.unwrap();
        assert_eq!(ops(la.entries().await.unwrap()), ["one"]);
        assert!(
            a.log_tail(keys::log_dir(&Space::default(), table).path().as_ref())
                .is_some()
        );
        assert_eq!(ops(la.entries().await.unwrap()), ["one"], "kept");
        lb.commit(draft("two")).await.unwrap();
        lb.commit(draft("three")).await.unwrap();
        assert_eq!(ops(la.entries().await.unwrap()), ["one", "two", "three"]);
        // the latest entry rewritten in place (only a broken writer does that) is read again
        let key = keys::log_entry(&Space::default(), table, 3);
        let mut e = lb.entries().await.unwrap().pop().unwrap();
        e.operation = "THREE".into(); // same size: the entity tag tells
        a.object_store()
            .put(key.path(), serde_json::to_vec(&e).unwrap().into())
            .await
            .unwrap();
        let got = ops(la.entries().await.unwrap());
        assert_eq!(got, ["one", "two", "THREE"]);
        assert_eq!(ops(lb.entries().await.unwrap()), got);
    }
}
