//! The store: one object store per deployment (local directory, memory, or S3), its key layout
//! ([`keys`]) and the per-table atomic commit log ([`log`]).

pub mod keys;
pub mod log;

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use url::Url;

use crate::error::{Error, Result};

pub use keys::{Space, TableName};
pub use log::{CommitEntry, CommitLog, FileAdd, Snapshot};

/// Options for S3-compatible endpoints (on top of the standard AWS environment variables).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// Endpoint URL of an S3-compatible server (`AWS_ENDPOINT_URL` / `--s3-endpoint`).
    pub endpoint: Option<String>,
    /// Allow plain HTTP (`AWS_ALLOW_HTTP`).
    pub allow_http: bool,
    /// Explicit credentials `(access key id, secret)`; otherwise the AWS environment is used.
    pub credentials: Option<(String, String)>,
    /// Explicit region; otherwise `AWS_REGION` / `AWS_DEFAULT_REGION`.
    pub region: Option<String>,
}

/// An opened store: the object store rooted at the store URL's prefix.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    url: String,
    /// Commit log entries already read, by object path, with the listing's tag of the object
    /// they were read from (entries are written once; a different tag reads it again).
    log_entries: Arc<std::sync::Mutex<LogEntryCache>>,
    /// The latest entries of each commit log read, by log directory.
    log_tails: Arc<std::sync::Mutex<std::collections::HashMap<String, LogTail>>>,
}

/// The snapshot of one commit log at its latest version, and the listing's metadata of that
/// version's object: while the object is unchanged and no next version exists, it is still
/// the latest snapshot (versions are committed in order, each put only if absent).
#[derive(Debug, Clone)]
pub(crate) struct LogTail {
    pub version: u64,
    pub meta: object_store::ObjectMeta,
    pub snapshot: Arc<log::Snapshot>,
}

/// Parsed commit log entries of a store, shared by its clones.
pub(crate) type LogEntryCache = std::collections::HashMap<String, (String, Arc<log::CommitEntry>)>;

/// Entries kept at most (beyond it the cache starts over).
const LOG_ENTRY_CACHE_MAX: usize = 200_000;

/// The URL under which the store is registered with DataFusion's object store registry.
pub const DATAFUSION_URL: &str = "audiences://store/";

impl Store {
    /// Open a store from a URL: a local path or `file://` URL, `memory://`, or `s3://bucket/prefix`.
    pub fn open(url: &str, s3: &S3Options) -> Result<Self> {
        let bad = |reason: &str| Error::StoreUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let inner: Arc<dyn ObjectStore> = if url == "memory://" || url.starts_with("memory://") {
            Arc::new(InMemory::new())
        } else if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("missing bucket name (expected s3://bucket/prefix)"));
            }
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
            if let Some(endpoint) = &s3.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            if s3.allow_http {
                builder = builder.with_allow_http(true);
            }
            if let Some((key, secret)) = &s3.credentials {
                builder = builder
                    .with_access_key_id(key)
                    .with_secret_access_key(secret);
            }
            if let Some(region) = &s3.region {
                builder = builder.with_region(region);
            }
            let s3_store = builder.build().map_err(|e| bad(&e.to_string()))?;
            let prefix = prefix.trim_matches('/');
            if prefix.is_empty() {
                Arc::new(s3_store)
            } else {
                Arc::new(PrefixStore::new(s3_store, prefix))
            }
        } else {
            let path = if url.starts_with("file://") {
                Url::parse(url)
                    .ok()
                    .and_then(|u| u.to_file_path().ok())
                    .ok_or_else(|| bad("not a valid file:// URL"))?
            } else if url.contains("://") {
                return Err(bad(
                    "unsupported scheme (use a path, file://, memory:// or s3://)",
                ));
            } else {
                std::path::PathBuf::from(url)
            };
            std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
            Arc::new(LocalFileSystem::new_with_prefix(&path)?)
        };
        Ok(Store {
            inner,
            url: url.to_string(),
            log_entries: Default::default(),
            log_tails: Default::default(),
        })
    }

    /// A fresh in-memory store (tests).
    pub fn memory() -> Self {
        Store {
            inner: Arc::new(InMemory::new()),
            url: "memory://".into(),
            log_entries: Default::default(),
            log_tails: Default::default(),
        }
    }

    /// A commit log entry read before from the object at `path` with listing tag `tag`.
    pub(crate) fn cached_entry(&self, path: &str, tag: &str) -> Option<Arc<log::CommitEntry>> {
        let cache = self.log_entries.lock().ok()?;
        cache
            .get(path)
            .filter(|(t, _)| t == tag)
            .map(|(_, e)| Arc::clone(e))
    }

    /// Remember a commit log entry read from the object at `path` with listing tag `tag`.
    pub(crate) fn cache_entry(&self, path: String, tag: String, entry: Arc<log::CommitEntry>) {
        if let Ok(mut cache) = self.log_entries.lock() {
            if cache.len() >= LOG_ENTRY_CACHE_MAX {
                cache.clear();
            }
            cache.insert(path, (tag, entry));
        }
    }

    /// The entries of the commit log in `dir` as last read.
    pub(crate) fn log_tail(&self, dir: &str) -> Option<LogTail> {
        self.log_tails.lock().ok()?.get(dir).cloned()
    }

    /// Remember the entries of the commit log in `dir` (a later version replaces an earlier).
    pub(crate) fn keep_log_tail(&self, dir: String, tail: LogTail) {
        if let Ok(mut tails) = self.log_tails.lock()
            && tails.get(&dir).is_none_or(|t| t.version <= tail.version)
        {
            tails.insert(dir, tail);
        }
    }

    /// The object store, rooted at the store prefix.
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.inner)
    }

    /// The URL this store was opened from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Read a whole object.
    pub async fn get(&self, key: &keys::Key) -> Result<bytes::Bytes> {
        Ok(self.inner.get(key.path()).await?.bytes().await?)
    }

    /// Write a whole object (overwriting).
    pub async fn put(&self, key: &keys::Key, data: bytes::Bytes) -> Result<()> {
        self.inner.put(key.path(), PutPayload::from(data)).await?;
        Ok(())
    }
}
