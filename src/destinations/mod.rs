//! Destinations (SPEC §9): audience membership synced to webhooks, files and Flight clients,
//! with backfill, per-destination rate limits, retries and at-least-once delivery in order per
//! profile.
//!
//! - `config`: the settings under `"destinations"` in a definition file;
//! - `payload`: Segment-spec messages and the requests that carry them (stable keys);
//! - `deliver`: one webhook's rate limiter, retries and verdicts, on an injectable clock;
//! - `sync`: cursors, steps (backfill, changes), sinks, dead letters and status;
//! - `receiver`: a local webhook receiver (demo, trials, benchmarks).

pub mod config;
pub mod deliver;
pub mod payload;
pub mod receiver;
pub mod sync;

pub use config::Destination;
pub use sync::{DestinationStatus, SyncOptions, SyncReport, status, sync};
