//! `audiences`: a self-hosted engine that turns Segment-spec events into profiles, traits and
//! audiences over partitioned Parquet in object storage, with Apache DataFusion.
//!
//! The pipeline, one folder per step:
//! - [`events`]: Segment messages in: validation, dedup, shredded Arrow schema, Parquet writer.
//! - [`store`]: the object store, its key layout and the atomic commit log of every table.
//! - [`identity`]: identity resolution into profiles, custom traits and account links.
//! - [`lang`]: the audience query language (AST, parser, printer).
//! - [`tables`]: committed tables as DataFusion tables; the SQL session.
//! - [`generate`]: the deterministic synthetic data generator.
//! - [`compute`], [`plan`]: full compute and refresh of traits and audiences.
//! - [`server`], [`export`]: Flight, Flight SQL, HTTP and CSV exports.
//! - [`destinations`]: membership synced to webhooks, files and Flight clients.
//! - [`cli`] and [`demo`]: the command line.
#![warn(missing_docs)]

pub mod cli;
pub mod compute;
pub mod config;
pub mod definitions;
pub mod demo;
pub mod destinations;
pub mod error;
pub mod events;
pub mod export;
pub mod fault;
pub mod generate;
pub mod identity;
pub mod lang;
pub mod plan;
pub mod progress;
pub mod serve;
pub mod server;
pub mod store;
pub mod tables;

pub use error::{Error, Result};
