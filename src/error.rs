//! The crate's one error type, and its conversion to process exit codes.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `audiences`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A store URL could not be understood.
    #[error("invalid store URL '{url}': {reason}")]
    StoreUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The object store failed.
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// A committed log entry could not be parsed.
    #[error("commit log entry {path} is corrupt: {reason}")]
    CorruptLog {
        /// The key of the entry.
        path: String,
        /// Why it could not be read.
        reason: String,
    },
    /// A commit could not be made after the bounded number of retries.
    #[error("commit to {table} failed after {attempts} attempts: concurrent writers kept winning")]
    CommitConflict {
        /// The table being committed.
        table: String,
        /// How many attempts were made.
        attempts: usize,
    },
    /// Reading or writing a local file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Arrow failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// Parquet failed.
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// Computing one definition failed (the cause says why).
    #[error("computing '{key}': {source}")]
    Compute {
        /// The definition's key.
        key: String,
        /// What failed.
        source: Box<Error>,
    },
    /// DataFusion failed (planning or execution).
    #[error("query: {}", query_message(.0))]
    DataFusion(#[from] datafusion::error::DataFusionError),
    /// JSON serialization failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// The configuration file is invalid.
    #[error("config {path}: {reason}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The user asked for something invalid (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// Another writer committed first; nothing of this run was committed.
    #[error("{0}")]
    Conflict(String),
    /// The definition is being recomputed after an edit.
    #[error("{0}")]
    Locked(String),
    /// Ingest was run with `--strict` and rejected messages.
    #[error("{0} message(s) rejected (see the dead-letter file); --strict makes that a failure")]
    StrictRejections(u64),
}

impl Error {
    /// Wrap an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The process exit code for this error: 2 for usage/definition errors, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) | Error::StoreUrl { .. } | Error::Config { .. } => 2,
            Error::Compute { source, .. } => source.exit_code(),
            _ => 1,
        }
    }
}

/// A query error, with what to do about a memory limit reached.
fn query_message(e: &datafusion::error::DataFusionError) -> String {
    match e.find_root() {
        datafusion::error::DataFusionError::ResourcesExhausted(m) => format!(
            "the memory limit was reached (raise --memory-limit / AUDIENCES_MEMORY_LIMIT, or \
             --query-memory for Flight SQL): {m}"
        ),
        _ => e.to_string(),
    }
}
