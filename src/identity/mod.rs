//! Identity resolution: events → profiles ([`graph`]) under the space's rules ([`rules`]),
//! persisted as committed Parquet tables of the `identity` log, and updated incrementally from
//! the events committed since the last run.
//!
//! Tables (one atomic commit carries all of them, so they are always mutually consistent):
//! `identities` (id_type, id_value, profile_id, profile_idx, identity_key, first_seen,
//! first_message_id), `profiles` (profile_idx, profile_id, merged_into, known, created_at,
//! first_message_id), `profile_merges` (from_profile_id, into_profile_id, at, message_id),
//! `traits` (entity, profile_id, account_id, key, value, updated_at, message_id) and
//! `account_links` (profile_id, account_id, linked_at).
//!
//! Attribution: an event belongs to the current canonical profile of its primary id (`userId`
//! when present and not blocked, else `anonymousId`), joined through `identity_key`; events are
//! never rewritten when profiles merge.
//!
//! Order: events are processed in (commit, timestamp, messageId) order. Within a run this is
//! timestamp order; across runs, an event that arrives after a later-timestamped event was
//! processed is handled at arrival. The outcome equals a single run over all events unless such
//! a late event takes part in a limit conflict or creates a profile that a single run would have
//! created earlier (then the surviving profile id can differ); `audiences identity --full`
//! recomputes from scratch in pure timestamp order.

pub mod graph;
pub mod lookup;
pub mod persist;
pub mod rules;
mod source;

pub use graph::{Graph, IdentityEvent, ProfileIdx};
pub use persist::{IdentityReport, resolve};
pub use rules::IdentityRules;
pub(crate) use source::prefetch;
