//! Integration tests, one binary (one link). Real parts: Parquet files through object_store on
//! the local filesystem, in memory and on a loopback S3 server (moto_server), the real binary
//! for crash tests, DuckDB (Python) as the independent reader.

mod audiences;
mod commit_log;
mod common;
mod crash;
mod demo;
mod destinations;
mod duckdb;
mod identity;
mod ingest;
mod refresh;
mod s3;
mod server;
mod slt;
