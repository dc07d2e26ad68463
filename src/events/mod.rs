//! Events in: the Segment message model and validation ([`message`]), the Arrow schema with
//! shredded property columns ([`schema`]), the Parquet writer ([`writer`]) and the streaming,
//! deduplicating ingest pipeline ([`ingest`]), compaction of small files ([`compact`]).

pub mod compact;
pub mod ingest;
pub mod message;
pub mod read;
pub mod schema;
pub mod writer;

pub use ingest::{IngestOptions, IngestReport, Input, ingest};
pub use message::{Event, MessageType, Rejection};
