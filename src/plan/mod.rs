//! Audience and computed-trait definitions → DataFusion logical plans, built with
//! `DataFrame`/`Expr` (never SQL strings; user-provided names go through `ident()`).
//!
//! Shape of a profile-level audience plan:
//!
//! ```text
//! profiles (known unless include_anonymous)
//!   ⟕ Aggregate[profile_idx](events pruned to the widest window; one FILTERed aggregate per
//!                             event condition, so every condition shares one scan)
//!   ⟕ traits / computed traits used (typed columns)      ⟕ referenced audiences' members
//!   σ two-valued condition (every comparator coalesced to false)
//!   π profile_idx, profile_id
//! ```
//!
//! Values are carried in three typed forms (string, number, boolean), mirroring the shredded
//! storage: a string literal compares with the string form, a number with the numeric form.

mod account;
pub mod compile;
mod nested;
pub mod one_phase;

pub use compile::{Compiled, Inputs, compile_audience, compile_trait};
