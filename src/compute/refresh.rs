//! `audiences refresh`: one micro-batch.
//!
//! Every committed version of an audience or computed trait records its *basis*: the
//! definition version, identity version, events version and as-of it is exact for, and the
//! versions of the definitions it read. A refresh continues each key from its basis. A
//! profile's result can only differ from the committed one when
//!
//! - one of its events was committed after the basis (new or late events: the identity keys of
//!   the event files committed since, read by their `identity_key` column only), if the event
//!   is of a source the definition reads (`event('X')`, `event(type: 'page', ...)`) or an
//!   identify, group or alias call (traits and accounts);
//! - identity moved something: an identity key now maps to another profile (a merge moves
//!   history), or a profile is new, merged, renamed or newly known (identity tables diffed
//!   against the basis's identity version);
//! - time moved a window edge across one of its events of those sources: for every window
//!   relative to the as-of (`within`, `between`, and the `timestamp <= as_of` bound of every
//!   query), the events whose timestamps lie between the edge at the old and at the new as-of
//!   (one time slice per edge, read with date-partition pruning);
//! - a definition it reads changed for that profile in this refresh (entered/exited members,
//!   changed trait values).
//!
//! Those *affected* profiles are re-evaluated with the very plan a full compute uses, over
//! `profiles` and `events_indexed` restricted to them; every other profile keeps its committed
//! result, and the entered/exited changes are the difference. That equals a full compute at
//! the same as-of by construction, for every construct of the language. Where a key cannot be
//! continued (first version, edited definition, account level, value comparisons relative to
//! the as-of while the as-of moved, a dependency recomputed outside the refresh, inputs already
//! vacuumed), it is recomputed in full and the log line says why.
//!
//! All new versions of one refresh are committed in one memberships log entry (put-if-absent
//! on the version the refresh started from): a refresh killed at any point leaves the previous
//! versions intact, and of two refreshers racing for the same batch exactly one commits.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, AsArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use datafusion::common::JoinType;
use datafusion::dataframe::DataFrame;
use datafusion::datasource::MemTable;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::{SessionContext, col, lit};
use serde::Serialize;

use super::bits::{Bits, gallop};
use super::members::{MemberSet, Replace};
use super::{
    Basis, MEMBERSHIPS, VersionRef, audience_files, bases, conform, put_batch, read_file,
    register_trait_values, trait_batch, versions,
};
use crate::definitions::{self, Stored};
use crate::error::{Error, Result};
use crate::identity::IdentityRules;
use crate::lang::definition::{Body, DefinitionFile, Kind, Level};
use crate::plan::{Inputs, compile_audience, compile_trait};
use crate::store::log::{CommitDraft, FileAdd};
use crate::store::{CommitLog, Space, Store, TableName};
use crate::tables::CommittedTable;

/// How to run one refresh.
#[derive(Clone, Default)]
pub struct RefreshOptions {
    /// Evaluation time (UTC microseconds).
    pub as_of: i64,
    /// Only these keys (the serve loop passes the keys that are due); all live keys when None.
    pub keys: Option<BTreeSet<String>>,
    /// The identity graph kept in memory between refreshes of one process (the serve loop).
    pub identity_cache: Option<crate::identity::persist::GraphCache>,
    /// Test hook: wait here right before the commit (to race two refreshers).
    #[doc(hidden)]
    pub before_commit: Option<Arc<tokio::sync::Barrier>>,
    /// Test hook: commit with a plain overwrite instead of put-if-absent (deliberately broken).
    #[doc(hidden)]
    pub unsafe_overwrite_commit: bool,
}

impl RefreshOptions {
    /// Refresh every live key at `as_of`.
    pub fn at(as_of: i64) -> Self {
        RefreshOptions {
            as_of,
            ..Default::default()
        }
    }
}

/// What one refresh read and changed.
#[derive(Debug, Clone, Serialize)]
pub struct RefreshReport {
    /// Evaluation time.
    pub as_of: i64,
    /// Identity version used.
    pub identity_version: u64,
    /// Events version covered.
    pub events_version: u64,
    /// Event files committed since the oldest basis, read for their identity keys.
    pub new_event_files: u64,
    /// Rows in those files.
    pub new_event_rows: u64,
    /// The memberships log version committed (None: nothing changed, nothing committed).
    pub committed: Option<u64>,
    /// Per key.
    pub keys: Vec<KeyRefresh>,
    /// Milliseconds spent.
    pub millis: u64,
}

/// What a refresh did for one key.
#[derive(Debug, Clone, Serialize)]
pub struct KeyRefresh {
    /// Key.
    pub key: String,
    /// `audience` or `computed_trait`.
    pub kind: String,
    /// `incremental` or `full`.
    pub mode: String,
    /// Why it was recomputed in full.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Profiles re-evaluated (incremental mode).
    pub affected: u64,
    /// The new version (None: unchanged).
    pub version: Option<u64>,
    /// Members or profiles with a value.
    pub size: u64,
    /// Entered (audiences).
    pub entered: u64,
    /// Exited (audiences).
    pub exited: u64,
    /// Profiles whose value changed (traits).
    pub changed: u64,
    /// Milliseconds spent.
    pub millis: u64,
}

/// How a definition depends on the as-of time.
#[derive(Debug, Default)]
struct TimeUse {
    /// Offsets from the as-of of every window edge (0: the `timestamp <= as_of` bound).
    offsets: BTreeSet<i64>,
    /// A value is compared with the as-of (`within_last` and friends).
    relative_compare: bool,
    /// Event sources the definition reads: (type, name).
    sources: BTreeSet<(String, Option<String>)>,
}

impl TimeUse {
    /// Rows of the sources the definition reads (None: it reads no events).
    fn source_rows(&self) -> Option<Expr> {
        self.sources
            .iter()
            .map(|(t, n)| {
                let p = col("type").eq(lit(t.clone()));
                match (t.as_str(), n) {
                    ("track", Some(n)) => p.and(col("event").eq(lit(n.clone()))),
                    (_, Some(n)) => p.and(col("name").eq(lit(n.clone()))),
                    (_, None) => p,
                }
            })
            .reduce(Expr::or)
    }

    /// A cache key for [`TimeUse::source_rows`].
    fn sources_id(&self) -> String {
        serde_json::to_string(&self.sources).unwrap_or_default()
    }
}

fn time_use(def: &DefinitionFile) -> Result<TimeUse> {
    let body = def
        .validate()
        .map_err(|e| Error::Usage(format!("{}: {e}", def.key)))?;
    let ast = match &body {
        Body::Audience(c) => serde_json::to_value(c)?,
        Body::Trait(v) => serde_json::to_value(v)?,
    };
    let mut t = TimeUse::default();
    t.offsets.insert(0);
    fn micros(d: Option<&serde_json::Value>) -> Option<i64> {
        serde_json::from_value::<crate::lang::ast::Duration>(d?.clone())
            .ok()
            .map(|d| d.micros())
    }
    fn walk(v: &serde_json::Value, t: &mut TimeUse) {
        match v {
            serde_json::Value::Object(m) => {
                match m.get("kind").and_then(|k| k.as_str()) {
                    Some("within") => t.offsets.extend(micros(m.get("duration"))),
                    Some("between") => {
                        t.offsets.extend(micros(m.get("from")));
                        t.offsets.extend(micros(m.get("to")));
                    }
                    _ => {}
                }
                if let Some(src) = m.get("source").and_then(|x| x.as_object())
                    && let Some(ty) = src.get("type").and_then(|x| x.as_str())
                {
                    let name = src.get("name").and_then(|x| x.as_str()).map(String::from);
                    t.sources.insert((ty.to_string(), name));
                }
                if let Some(op) = m.get("op").and_then(|o| o.as_str())
                    && matches!(
                        op,
                        "within_last" | "within_next" | "before_last" | "after_next"
                    )
                {
                    t.relative_compare = true;
                }
                m.values().for_each(|x| walk(x, t));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, t)),
            _ => {}
        }
    }
    walk(&ast, &mut t);
    Ok(t)
}

/// Collect a one-column `profile_idx` result into a set.
async fn idx_set(df: DataFrame) -> Result<HashSet<i64>> {
    let mut out = HashSet::new();
    for b in df.collect().await? {
        let c = b.column(0).as_primitive::<Int64Type>();
        out.extend(c.iter().flatten());
    }
    Ok(out)
}

/// The lowest events version the bases of live keys cover: compaction leaves later event
/// files alone so a refresh can read them (None: no key has a basis yet).
pub async fn compaction_bound(store: &Store, space: &Space) -> Result<Option<u64>> {
    let snap = CommitLog::new(store, space, MEMBERSHIPS).snapshot().await?;
    if snap.version == 0 {
        return Ok(None);
    }
    let live = definitions::live(store, space).await?;
    Ok(bases(&snap)
        .into_iter()
        .filter(|(k, _)| live.contains_key(k))
        .map(|(_, b)| b.events_version)
        .min())
}

/// A set of affected profiles, or why it could not be found.
type Found = std::result::Result<Arc<HashSet<i64>>, String>;

/// Sets of affected profiles, cached by what they depend on (keys usually share a basis).
struct Affected<'a> {
    store: &'a Store,
    space: &'a Space,
    ctx: &'a SessionContext,
    events: crate::store::log::Snapshot,
    identity_version: u64,
    events_version: u64,
    delta: HashMap<(u64, String), Found>,
    identity: HashMap<u64, Found>,
    slices: HashMap<(i64, i64, String), Arc<HashSet<i64>>>,
    files_read: HashSet<String>,
    rows_read: u64,
    /// identity_key → canonical profile_idx (read once).
    keymap: Option<Arc<KeyMap>>,
    /// The session's `events_indexed` (its key index is the map).
    indexed: Arc<crate::tables::indexed::IndexedEvents>,
}

/// The current `identity_keys` table, both ways.
struct KeyMap {
    /// identity_key → canonical profile_idx (the session's index, shared with its scans).
    index: Arc<crate::tables::indexed::KeyIndex>,
    /// One more than the largest profile_idx (profile indexes are dense).
    profiles: usize,
}

impl KeyMap {
    fn new(index: Arc<crate::tables::indexed::KeyIndex>) -> KeyMap {
        let profiles = index
            .pairs()
            .filter_map(|(_, p)| usize::try_from(p).ok())
            .max()
            .map_or(0, |p| p + 1);
        KeyMap { index, profiles }
    }

    /// The identity keys of `profiles` with their profile, in key order: one pass over the
    /// index with a bitmap of the profiles.
    fn keys_of(&self, profiles: &HashSet<i64>) -> (Vec<i64>, Vec<i64>) {
        let bits = Bits::of(profiles.iter().copied());
        self.index
            .pairs()
            .filter(|(_, p)| bits.contains(*p))
            .unzip()
    }
}

impl Affected<'_> {
    /// The current identity_key → profile_idx map.
    async fn keymap(&mut self) -> Result<Arc<KeyMap>> {
        if let Some(m) = &self.keymap {
            return Ok(Arc::clone(m));
        }
        let t = std::time::Instant::now();
        let index = self.indexed.index(&self.ctx.state()).await?;
        let m = Arc::new(KeyMap::new(index));
        tracing::debug!(
            millis = t.elapsed().as_millis() as u64,
            "identity keys by profile"
        );
        self.keymap = Some(Arc::clone(&m));
        Ok(m)
    }

    /// The profiles of the distinct identity keys a one-column query returns.
    async fn profiles_of_keys(&mut self, keys: DataFrame) -> Result<HashSet<i64>> {
        let keys = idx_set(keys).await?;
        let map = self.keymap().await?;
        Ok(keys.iter().filter_map(|k| map.index.get(*k)).collect())
    }

    /// Profiles with events committed after events version `from` that can change the result
    /// of a definition reading `time.sources`: events of those sources, and identify, group and
    /// alias calls (traits, accounts; what they do to identities is in [`Affected::identity`]).
    async fn delta(
        &mut self,
        from: u64,
        time: &TimeUse,
    ) -> std::result::Result<Arc<HashSet<i64>>, String> {
        let cache = (from, time.sources_id());
        if let Some(r) = self.delta.get(&cache) {
            return r.clone();
        }
        let files: Vec<FileAdd> = self
            .events
            .entries
            .iter()
            .filter(|e| {
                e.version > from && e.version <= self.events_version && e.operation != "compact"
            })
            .flat_map(|e| e.adds.iter().cloned())
            .collect();
        let r = if files.is_empty() {
            Ok(Arc::new(HashSet::new()))
        } else {
            for f in &files {
                if self.files_read.insert(f.path.clone()) {
                    self.rows_read += f.rows;
                }
            }
            let run = async {
                let name = "__delta_events";
                let _ = self.ctx.deregister_table(name);
                self.ctx
                    .register_table(name, Arc::new(CommittedTable::events(&files)))?;
                let calls =
                    col("type").in_list(vec![lit("identify"), lit("group"), lit("alias")], false);
                let rows = match time.source_rows() {
                    Some(p) => calls.or(p),
                    None => calls,
                };
                let keys = self
                    .ctx
                    .table(name)
                    .await?
                    .filter(rows.and(col("identity_key").is_not_null()))?
                    .select(vec![col("identity_key")])?
                    .distinct()?;
                self.profiles_of_keys(keys).await
            };
            run.await
                .map(Arc::new)
                .map_err(|e| format!("event files since version {from} unreadable: {e}"))
        };
        self.delta.insert(cache, r.clone());
        r
    }

    /// The profiles the identity commits after `from` recorded as changed (None when one of
    /// them recorded none, e.g. a full re-resolution, or its file is gone).
    async fn identity_recorded(&self, from: u64) -> Option<HashSet<i64>> {
        let log = CommitLog::new(self.store, self.space, crate::identity::persist::IDENTITY);
        let entries = log.entries().await.ok()?;
        let mut out = HashSet::new();
        for e in entries
            .iter()
            .filter(|e| e.version > from && e.version <= self.identity_version)
        {
            let f = e
                .adds
                .iter()
                .find(|f| f.kind.as_deref() == Some(crate::identity::persist::CHANGED_PROFILES))?;
            for b in read_file(self.store, f).await.ok()? {
                out.extend(
                    b.column(0)
                        .as_primitive_opt::<Int64Type>()?
                        .iter()
                        .flatten(),
                );
            }
        }
        Some(out)
    }

    /// Profiles whose identity changed since identity version `from`: keys mapped elsewhere
    /// (old and new profile), profiles new, merged, renamed or newly known.
    async fn identity(&mut self, from: u64) -> std::result::Result<Arc<HashSet<i64>>, String> {
        if from == self.identity_version {
            return Ok(Arc::new(HashSet::new()));
        }
        if let Some(r) = self.identity.get(&from) {
            return r.clone();
        }
        if let Some(r) = self.identity_recorded(from).await {
            let r = Ok(Arc::new(r));
            self.identity.insert(from, r.clone());
            return r;
        }
        let run = async {
            let log = CommitLog::new(self.store, self.space, crate::identity::persist::IDENTITY);
            let old = log.snapshot_at(from).await?;
            if !old
                .files
                .iter()
                .any(|f| f.kind.as_deref() == Some("identity_keys"))
            {
                return Err(Error::Usage(format!(
                    "identity version {from} has no identity_keys table"
                )));
            }
            for kind in ["identity_keys", "profiles"] {
                let _ = self.ctx.deregister_table(format!("__old_{kind}").as_str());
            }
            crate::tables::register_identity(
                self.ctx,
                &old,
                &["identity_keys", "profiles"],
                |kind| format!("__old_{kind}"),
            )?;
            // Fixed internal tables only: no user text reaches this SQL.
            let df = self
                .ctx
                .sql(
                    "SELECT o.profile_idx AS a, n.profile_idx AS b \
                     FROM __old_identity_keys o FULL JOIN identity_keys n \
                       ON o.identity_key = n.identity_key \
                     WHERE (o.profile_idx IS DISTINCT FROM n.profile_idx) \
                     UNION ALL \
                     SELECT o.canonical_idx AS a, n.canonical_idx AS b \
                     FROM __old_profiles o FULL JOIN profile_index n \
                       ON o.profile_idx = n.profile_idx \
                     WHERE (o.canonical_idx IS DISTINCT FROM n.canonical_idx) \
                        OR (o.known IS DISTINCT FROM n.known) \
                        OR (o.profile_id IS DISTINCT FROM n.profile_id) \
                     UNION ALL \
                     SELECT o.profile_idx AS a, n.canonical_idx AS b \
                     FROM __old_profiles o JOIN profile_index n \
                       ON o.profile_idx = n.profile_idx \
                     WHERE (o.canonical_idx IS DISTINCT FROM n.canonical_idx)",
                )
                .await?;
            let mut out = HashSet::new();
            for b in df.collect().await? {
                for c in b.columns() {
                    out.extend(c.as_primitive::<Int64Type>().iter().flatten());
                }
            }
            Ok::<_, Error>(out)
        };
        let r = run
            .await
            .map(Arc::new)
            .map_err(|e| format!("identity version {from} unreadable: {e}"));
        self.identity.insert(from, r.clone());
        r
    }

    /// Profiles with an event of `time.sources` whose timestamp lies between `t0 - offset`
    /// and `t1 - offset` (only those events move across the window edge at `offset`).
    async fn slice(
        &mut self,
        t0: i64,
        t1: i64,
        offset: i64,
        time: &TimeUse,
    ) -> Result<Arc<HashSet<i64>>> {
        let (a, b) = (t0.min(t1) - offset, t0.max(t1) - offset);
        let cache = (a, b, time.sources_id());
        if let Some(r) = self.slices.get(&cache) {
            return Ok(Arc::clone(r));
        }
        let Some(sources) = time.source_rows() else {
            return Ok(Arc::new(HashSet::new()));
        };
        let ts = |m: i64| {
            lit(datafusion::common::ScalarValue::TimestampMicrosecond(
                Some(m),
                Some("UTC".into()),
            ))
        };
        let df = self
            .ctx
            .table("events_raw")
            .await?
            .filter(
                col("timestamp")
                    .gt_eq(ts(a))
                    .and(col("timestamp").lt_eq(ts(b)))
                    .and(col("identity_key").is_not_null())
                    .and(sources),
            )?
            .select(vec![col("identity_key")])?
            .distinct()?;
        let r = Arc::new(self.profiles_of_keys(df).await?);
        self.slices.insert(cache, Arc::clone(&r));
        Ok(r)
    }
}

/// Register (or replace) a one-batch in-memory table.
fn register_batch(
    ctx: &SessionContext,
    name: &str,
    schema: SchemaRef,
    batch: RecordBatch,
) -> Result<()> {
    let _ = ctx.deregister_table(name);
    ctx.register_table(
        name,
        Arc::new(MemTable::try_new(schema, vec![vec![batch]])?),
    )?;
    Ok(())
}

/// Every account link: (account_id, profile_idx).
async fn account_links(ctx: &SessionContext) -> Result<Vec<(String, i64)>> {
    let mut out = Vec::new();
    let links = ctx
        .table("__account_links_all")
        .await?
        .select(vec![col("account_id"), col("profile_idx")])?;
    for b in links.collect().await? {
        let (a, p) = (
            b.column(0).as_string::<i32>(),
            b.column(1).as_primitive::<Int64Type>(),
        );
        for r in 0..b.num_rows() {
            if a.is_valid(r) && p.is_valid(r) {
                out.push((a.value(r).to_string(), p.value(r)));
            }
        }
    }
    Ok(out)
}

/// Register `account_links` and the account rows of `traits` restricted to `accounts` (None:
/// unrestricted).
async fn restrict_accounts(ctx: &SessionContext, accounts: Option<&HashSet<String>>) -> Result<()> {
    for t in ["account_links", "traits"] {
        let _ = ctx.deregister_table(t);
    }
    let (links, traits) = (
        ctx.table("__account_links_all").await?,
        ctx.table("__traits_all").await?,
    );
    let Some(accounts) = accounts else {
        ctx.register_table("account_links", links.into_view())?;
        ctx.register_table("traits", traits.into_view())?;
        return Ok(());
    };
    let schema = Arc::new(Schema::new(vec![Field::new(
        "__acc",
        DataType::Utf8,
        false,
    )]));
    let mut ids: Vec<&str> = accounts.iter().map(String::as_str).collect();
    ids.sort_unstable();
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![Arc::new(arrow::array::StringArray::from(ids))],
    )?;
    register_batch(ctx, "__affected_accounts", schema, batch)?;
    let of_affected = |df: DataFrame| async move {
        Ok::<_, Error>(df.join(
            ctx.table("__affected_accounts").await?,
            JoinType::LeftSemi,
            &["account_id"],
            &["__acc"],
            None,
        )?)
    };
    ctx.register_table("account_links", of_affected(links).await?.into_view())?;
    let profile_rows = traits.clone().filter(col("entity").eq(lit("profile")))?;
    let account_rows = of_affected(traits.filter(col("entity").eq(lit("account")))?).await?;
    ctx.register_table("traits", profile_rows.union(account_rows)?.into_view())?;
    Ok(())
}

/// Register `profiles` and `events_indexed` restricted to `affected` (None: unrestricted), the
/// events read from table `events` (`events_raw` or the [`SHARED`] events).
async fn restrict(
    ctx: &SessionContext,
    affected: Option<(&HashSet<i64>, &KeyMap)>,
    events: &str,
) -> Result<()> {
    for t in ["profiles", "events_indexed"] {
        let _ = ctx.deregister_table(t);
    }
    let Some((affected, keymap)) = affected else {
        ctx.register_table("profiles", ctx.table("__profiles_all").await?.into_view())?;
        ctx.register_table(
            "events_indexed",
            ctx.table("__events_all").await?.into_view(),
        )?;
        return Ok(());
    };
    let schema = Arc::new(Schema::new(vec![Field::new("__a", DataType::Int64, false)]));
    let mut ids: Vec<i64> = affected.iter().copied().collect();
    ids.sort_unstable();
    let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(Int64Array::from(ids))])?;
    register_batch(ctx, "__affected", schema, batch)?;
    let profiles = ctx
        .table("__affected")
        .await?
        .join(
            ctx.table("__profiles_all").await?,
            JoinType::Inner,
            &["__a"],
            &["profile_idx"],
            None,
        )?
        .drop_columns(&["__a"])?;
    ctx.register_table("profiles", profiles.into_view())?;
    // The identity keys of the affected profiles, from the map (no join over all keys).
    let (ks, ps) = keymap.keys_of(affected);
    let kschema = Arc::new(Schema::new(vec![
        Field::new("__key", DataType::Int64, false),
        Field::new("profile_idx", DataType::Int64, false),
    ]));
    let kbatch = RecordBatch::try_new(
        Arc::clone(&kschema),
        vec![
            Arc::new(Int64Array::from(ks)),
            Arc::new(Int64Array::from(ps)),
        ],
    )?;
    register_batch(ctx, "__affected_keys", kschema, kbatch)?;
    let keys = ctx.table("__affected_keys").await?;
    let events = keys
        .join(
            ctx.table(events).await?,
            JoinType::Inner,
            &["__key"],
            &["identity_key"],
            None,
        )?
        .drop_columns(&["__key"])?;
    ctx.register_table("events_indexed", events.into_view())?;
    Ok(())
}

/// The accounts linked to an affected profile, and every profile linked to them (what an
/// account-level key re-evaluates).
fn account_scope(
    links: &[(String, i64)],
    affected: &HashSet<i64>,
) -> (HashSet<String>, HashSet<i64>) {
    let accounts: HashSet<String> = links
        .iter()
        .filter(|(_, p)| affected.contains(p))
        .map(|(a, _)| a.clone())
        .collect();
    let profiles = links
        .iter()
        .filter(|(a, _)| accounts.contains(a))
        .map(|(_, p)| *p)
        .collect();
    (accounts, profiles)
}

/// The table of events read once for several keys.
const SHARED: &str = "__shared_events";

/// Events of the profiles several incremental keys re-evaluate, read from the event files once.
struct Shared {
    /// The keys whose plans read their events from it.
    keys: HashSet<String>,
    /// The profiles whose events it holds.
    profiles: HashSet<i64>,
}

/// The scans of `events_raw` in a plan: (columns read, filters).
fn event_scans(
    plan: &datafusion::logical_expr::LogicalPlan,
) -> Result<Vec<(BTreeSet<String>, Vec<Expr>)>> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    use datafusion::logical_expr::LogicalPlan;
    let mut out = Vec::new();
    plan.apply_with_subqueries(|n| {
        if let LogicalPlan::TableScan(s) = n
            && s.table_name.table() == "events_raw"
        {
            let mut cols: BTreeSet<String> = s
                .projected_schema
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect();
            for f in &s.filters {
                cols.extend(f.column_refs().into_iter().map(|c| c.name.clone()));
            }
            out.push((cols, s.filters.clone()));
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(out)
}

/// `e` widened to a condition on the event kind and time only: every part that reads another
/// column is taken as true (in an AND/OR tree that only widens what passes), so the shared
/// read evaluates a cheap filter and each plan still applies its own.
fn kind_and_time(e: Expr) -> Expr {
    use datafusion::logical_expr::{BinaryExpr, Operator};
    match e {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: op @ (Operator::And | Operator::Or),
            right,
        }) => {
            let (l, r) = (kind_and_time(*left), kind_and_time(*right));
            match op {
                Operator::And => l.and(r),
                _ => l.or(r),
            }
        }
        e if e
            .column_refs()
            .iter()
            .all(|c| matches!(c.name.as_str(), "type" | "event" | "name" | "timestamp")) =>
        {
            e
        }
        _ => lit(true),
    }
}

/// `__in_keys(identity_key)`: whether an identity key is in a fixed sorted set. Event files are
/// sorted by kind and identity key, so the keys of a batch come in ascending runs: a key equal
/// to the previous row's reuses its answer, a greater one is found by a galloping search
/// forward from the last position. The shared read filters with it instead of joining with the
/// keys (which had the scanned rows repartitioned by key hash and gathered again).
#[derive(Debug)]
struct InKeys {
    /// Sorted, unique.
    keys: Arc<Vec<i64>>,
    signature: Signature,
}

impl InKeys {
    fn new(keys: Vec<i64>) -> InKeys {
        debug_assert!(keys.windows(2).all(|w| w[0] < w[1]));
        InKeys {
            keys: Arc::new(keys),
            signature: Signature::exact(vec![DataType::Int64], Volatility::Immutable),
        }
    }

    /// The first position of a key not below `k`, searching from `pos` (the answer for the
    /// previous key) forward when `k` is greater than every key before `pos`, else from the
    /// start.
    fn seek(&self, pos: usize, k: i64) -> usize {
        let keys = &self.keys[..];
        let from = if pos > 0 && keys[pos - 1] >= k {
            0
        } else {
            pos
        };
        gallop(from, keys.len(), |i| keys[i] < k)
    }

    fn contains_all(&self, column: &Int64Array) -> arrow::buffer::BooleanBuffer {
        let (mut pos, mut last): (usize, Option<(i64, bool)>) = (0, None);
        arrow::buffer::BooleanBuffer::collect_bool(column.len(), |i| {
            if column.is_null(i) {
                return false;
            }
            let k = column.value(i);
            match last {
                Some((l, hit)) if l == k => hit,
                _ => {
                    pos = self.seek(pos, k);
                    let hit = self.keys.get(pos) == Some(&k);
                    last = Some((k, hit));
                    hit
                }
            }
        })
    }
}

// One set per instance: equal when it is the same set.
impl PartialEq for InKeys {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.keys, &other.keys)
    }
}

impl Eq for InKeys {}

impl std::hash::Hash for InKeys {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.keys).hash(state);
    }
}

impl ScalarUDFImpl for InKeys {
    fn name(&self) -> &str {
        "__in_keys"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let keys = args.args[0].to_array(args.number_rows)?;
        let found = self.contains_all(keys.as_primitive::<Int64Type>());
        Ok(ColumnarValue::Array(Arc::new(
            arrow::array::BooleanArray::new(found, None),
        )))
    }
}

/// A column of `n` rows standing in for one no shared plan reads (None: no stand-in for its
/// type; the column is read).
fn stand_in(field: &Field, n: usize) -> Option<arrow::array::ArrayRef> {
    use arrow::array::{StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::TimeUnit;
    if field.is_nullable() {
        return Some(arrow::array::new_null_array(field.data_type(), n));
    }
    Some(match field.data_type() {
        DataType::Utf8 => Arc::new(StringArray::from_iter_values(std::iter::repeat_n("", n))),
        DataType::Int64 => Arc::new(Int64Array::from(vec![0; n])),
        DataType::Timestamp(TimeUnit::Microsecond, tz) => {
            Arc::new(TimestampMicrosecondArray::from(vec![0; n]).with_timezone_opt(tz.clone()))
        }
        _ => return None,
    })
}

/// Read once the events of every incremental key's profiles that the keys' plans read (the
/// union of their scans' filters and columns; columns no plan reads hold stand-ins), and
/// register them as [`SHARED`]. Keys whose plans read unfiltered events keep their own scan.
/// None when fewer than two keys would share, or for too many profiles (see below).
#[allow(clippy::too_many_arguments)]
async fn share_events(
    ctx: &SessionContext,
    aff: &mut Affected<'_>,
    defs: &BTreeMap<String, Stored>,
    found: &HashMap<String, (Option<String>, HashSet<i64>)>,
    links: &[(String, i64)],
    trait_values: &BTreeMap<String, Vec<RecordBatch>>,
    as_of: i64,
    computed: &BTreeSet<String>,
    account_keys: &BTreeSet<String>,
) -> Result<Option<Shared>> {
    let t = std::time::Instant::now();
    let keymap = aff.keymap().await?;
    let mut keys = HashSet::new();
    let mut profiles: HashSet<i64> = HashSet::new();
    let mut columns: BTreeSet<String> = BTreeSet::new();
    let mut rows: Vec<Expr> = Vec::new();
    for (key, (reason, affected)) in found {
        if reason.is_some() || affected.is_empty() {
            continue;
        }
        let stored = &defs[key];
        let (accounts, scope) = match stored.file.level {
            Level::Accounts => {
                let (a, p) = account_scope(links, affected);
                (Some(a), p)
            }
            Level::Users => (None, affected.clone()),
        };
        // The plan as the key will run it, compiled only to see what it reads.
        register_inputs(
            ctx,
            Some((&scope, &keymap)),
            "events_raw",
            accounts.as_ref(),
            trait_values,
        )
        .await?;
        let inputs = Inputs {
            ctx,
            as_of,
            created_at: stored.created_at,
            computed_traits: computed,
            account_keys,
        };
        let frame = match stored.file.kind {
            Kind::Audience => compile_audience(&inputs, &stored.file).await?.frame,
            Kind::ComputedTrait => compile_trait(&inputs, &stored.file).await?.frame,
        };
        let scans = event_scans(&frame.into_optimized_plan()?)?;
        if scans.is_empty() || scans.iter().any(|(_, f)| f.is_empty()) {
            continue;
        }
        for (cols, filters) in scans {
            columns.extend(cols);
            rows.extend(filters.into_iter().map(kind_and_time).reduce(Expr::and));
        }
        profiles.extend(scope);
        keys.insert(key.clone());
    }
    // The shared events are held in memory: for many profiles (beyond 200k and an eighth of
    // all, as at large scale or after an identity change that touched most of them) each key
    // streams its own scan instead.
    let all = keymap.profiles;
    if keys.len() < 2 || (profiles.len() > 200_000 && profiles.len().saturating_mul(8) > all) {
        return Ok(None);
    }
    tracing::debug!(
        millis = t.elapsed().as_millis() as u64,
        "plans compiled to see the events they read"
    );
    columns.insert("identity_key".into());
    // in key order: the index's order
    let (identity_keys, _) = keymap.keys_of(&profiles);
    let in_keys = ScalarUDF::new_from_impl(InKeys::new(identity_keys));
    let raw = ctx.table("events_raw").await?;
    let rows_filter = match rows.into_iter().reduce(Expr::or) {
        Some(any) => crate::tables::kind_in_lists(&any)
            .into_iter()
            .fold(any, |f, kinds| kinds.and(f)),
        None => lit(true),
    };
    let schema: Schema = raw.schema().as_arrow().clone();
    let read: Vec<Expr> = schema
        .fields()
        .iter()
        .filter(|f| columns.contains(f.name()) || stand_in(f, 0).is_none())
        .map(|f| col(datafusion::common::Column::new_unqualified(f.name())))
        .collect();
    // the key test first: the kind and time conditions then see only the rows it keeps
    let events = raw
        .filter(in_keys.call(vec![col("identity_key")]).and(rows_filter))?
        .select(read)?;
    let schema = Arc::new(schema);
    let parts = ctx.state().config().target_partitions().max(1);
    let mut partitions: Vec<Vec<RecordBatch>> = vec![Vec::new(); parts];
    let mut n = 0;
    for (i, b) in super::collect_traced(SHARED, events)
        .await?
        .into_iter()
        .enumerate()
    {
        let cols = schema
            .fields()
            .iter()
            .map(|f| match b.column_by_name(f.name()) {
                Some(c) => Ok(Arc::clone(c)),
                None => stand_in(f, b.num_rows())
                    .ok_or_else(|| Error::Usage(format!("no stand-in for column {}", f.name()))),
            })
            .collect::<Result<Vec<_>>>()?;
        n += b.num_rows();
        partitions[i % parts].push(RecordBatch::try_new(Arc::clone(&schema), cols)?);
    }
    let _ = ctx.deregister_table(SHARED);
    ctx.register_table(SHARED, Arc::new(MemTable::try_new(schema, partitions)?))?;
    tracing::debug!(
        keys = keys.len(),
        profiles = profiles.len(),
        rows = n,
        columns = columns.len(),
        millis = t.elapsed().as_millis() as u64,
        "events read once for the keys that share them"
    );
    Ok(Some(Shared { keys, profiles }))
}

/// Register what a key's plan reads: `profiles` and `events_indexed` restricted to the affected
/// profiles (see [`restrict`]), `account_links` and account traits restricted to `accounts`,
/// and the current values of the computed traits.
async fn register_inputs(
    ctx: &SessionContext,
    affected: Option<(&HashSet<i64>, &KeyMap)>,
    events: &str,
    accounts: Option<&HashSet<String>>,
    trait_values: &BTreeMap<String, Vec<RecordBatch>>,
) -> Result<()> {
    restrict(ctx, affected, events).await?;
    restrict_accounts(ctx, accounts).await?;
    register_trait_values(ctx, trait_values)
}

/// Trait values per profile_idx (JSON text), from trait-values batches.
fn trait_map(batches: &[RecordBatch]) -> HashMap<i64, String> {
    let mut out = HashMap::new();
    for b in batches {
        let idx = b.column(2).as_primitive::<Int64Type>();
        let val = b.column(3).as_string::<i32>();
        for r in 0..b.num_rows() {
            if idx.is_valid(r) {
                out.insert(idx.value(r), val.value(r).to_string());
            }
        }
    }
    out
}

/// Account trait values: account id → JSON text.
fn account_values(batches: &[RecordBatch]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for b in batches {
        let acc = b.column(9).as_string::<i32>();
        let val = b.column(3).as_string::<i32>();
        for r in 0..b.num_rows() {
            if acc.is_valid(r) {
                out.insert(acc.value(r).to_string(), val.value(r).to_string());
            }
        }
    }
    out
}

/// One batch of a computed trait's values with every row stamped `version` and `as_of`.
fn stamp(batches: &[RecordBatch], version: u64, as_of: i64) -> Result<RecordBatch> {
    let schema = super::schema("trait_values");
    let all = arrow::compute::concat_batches(&schema, batches)?;
    let n = all.num_rows();
    let mut cols = all.columns().to_vec();
    cols[7] = Arc::new(Int64Array::from_iter_values(std::iter::repeat_n(
        version as i64,
        n,
    )));
    cols[8] = crate::identity::persist::ts_array(vec![as_of; n]);
    Ok(RecordBatch::try_new(schema, cols)?)
}

/// Why a key must be recomputed in full (None: it can continue from its basis).
#[allow(clippy::too_many_arguments)]
fn full_reason(
    stored: &Stored,
    prev: Option<&VersionRef>,
    basis: Option<&Basis>,
    deps: &BTreeSet<String>,
    latest: &BTreeMap<String, VersionRef>,
    defs: &BTreeMap<String, Stored>,
    time: &TimeUse,
    as_of: i64,
) -> Option<String> {
    let Some(_) = prev else {
        return Some("first version".into());
    };
    let Some(basis) = basis else {
        return Some("its last version records no refresh basis".into());
    };
    if basis.definition_version != stored.version {
        return Some(format!(
            "definition edited (version {} → {})",
            basis.definition_version, stored.version
        ));
    }
    if time.relative_compare && basis.as_of != as_of {
        return Some("it compares values with the as-of time, which moved".into());
    }
    for d in deps {
        if defs.get(d).is_some_and(|s| s.file.level == Level::Accounts) {
            return Some(format!("it reads account-level '{d}'"));
        }
        if latest.get(d).map(|v| v.version) != basis.deps.get(d).copied() {
            return Some(format!("'{d}' was recomputed outside the refresh"));
        }
    }
    None
}

/// One micro-batch: continue every live key from its basis to `opts.as_of`, commit the keys
/// that changed in one entry.
pub async fn refresh(
    store: &Store,
    space: &Space,
    rules: &IdentityRules,
    opts: &RefreshOptions,
) -> Result<RefreshReport> {
    let t0 = std::time::Instant::now();
    let as_of = opts.as_of;
    let identity = crate::identity::persist::resolve_cached(
        store,
        space,
        rules,
        false,
        opts.identity_cache.as_ref(),
    )
    .await?;
    tracing::debug!(
        millis = t0.elapsed().as_millis() as u64,
        "identity up to date"
    );
    let defs = definitions::live(store, space).await?;
    if let Some(keys) = &opts.keys {
        for k in keys {
            if !defs.contains_key(k) {
                return Err(Error::Usage(format!(
                    "no audience or computed trait '{k}' in space '{space}'"
                )));
            }
        }
    }
    let deps = definitions::dependencies(&defs)?;
    let order = definitions::order(&deps)?;
    let mlog = CommitLog::new(store, space, MEMBERSHIPS)
        .with_unsafe_overwrite(opts.unsafe_overwrite_commit);
    let snap = mlog.snapshot().await?;
    let mut latest: BTreeMap<String, VersionRef> = BTreeMap::new();
    for v in versions(&snap) {
        latest.insert(v.key.clone(), v);
    }
    let key_bases = bases(&snap);
    let ctx =
        crate::tables::compute_session(store, space, Some(identity.events_version), false).await?;
    if !ctx.table_exist("identity_keys")? {
        return Err(Error::Usage("identity state without identity_keys".into()));
    }
    let indexed = crate::tables::indexed_events(&ctx)
        .await?
        .ok_or_else(|| Error::Usage("identity state without an events_indexed table".into()))?;
    ctx.register_table("__profiles_all", ctx.table("profiles").await?.into_view())?;
    ctx.register_table(
        "__events_all",
        ctx.table("events_indexed").await?.into_view(),
    )?;
    for t in ["account_links", "traits"] {
        ctx.register_table(
            format!("__{t}_all").as_str(),
            ctx.table(t).await?.into_view(),
        )?;
    }
    // (account_id, profile_idx) of every account link, read when an account key needs them
    let mut all_links: Option<Vec<(String, i64)>> = None;
    let events = CommitLog::new(store, space, TableName::Events)
        .snapshot()
        .await?;
    let mut aff = Affected {
        store,
        space,
        ctx: &ctx,
        events,
        identity_version: identity.version,
        events_version: identity.events_version,
        delta: HashMap::new(),
        identity: HashMap::new(),
        slices: HashMap::new(),
        files_read: HashSet::new(),
        rows_read: 0,
        keymap: None,
        indexed,
    };
    let computed: BTreeSet<String> = defs
        .iter()
        .filter(|(_, s)| s.file.kind == Kind::ComputedTrait)
        .map(|(k, _)| k.clone())
        .collect();
    let account_keys: BTreeSet<String> = defs
        .iter()
        .filter(|(_, s)| s.file.level == Level::Accounts)
        .map(|(k, _)| k.clone())
        .collect();
    let wanted = |k: &String| opts.keys.as_ref().is_none_or(|w| w.contains(k));
    let referenced: BTreeSet<String> = deps.values().flatten().cloned().collect();
    // Current values and members of what is read by other definitions.
    let mut trait_values =
        super::lifecycle::register_references(store, &ctx, &defs, &latest, &referenced).await?;
    tracing::debug!(millis = t0.elapsed().as_millis() as u64, "session ready");
    // Why each key is recomputed in full (None: incremental) and the profiles affected before
    // the changes of this refresh, found for every key first: the keys that read the same
    // events then read them once.
    let t_found = std::time::Instant::now();
    let no_deps = BTreeSet::new();
    let mut found: HashMap<String, (Option<String>, HashSet<i64>)> = HashMap::new();
    let (mut changes_ms, mut slices_ms, mut links_ms) = (0, 0, 0);
    for key in order.iter().filter(|k| wanted(k)) {
        let stored = &defs[key];
        let basis = key_bases.get(key);
        let kdeps = deps.get(key).unwrap_or(&no_deps);
        let time = time_use(&stored.file)?;
        let prev = latest.get(key);
        let mut reason = full_reason(stored, prev, basis, kdeps, &latest, &defs, &time, as_of);
        let mut affected: HashSet<i64> = HashSet::new();
        if let (None, Some(b)) = (&reason, basis) {
            let t = std::time::Instant::now();
            match (
                aff.delta(b.events_version, &time).await,
                aff.identity(b.identity_version).await,
            ) {
                (Ok(d), Ok(i)) => {
                    affected.extend(d.iter());
                    affected.extend(i.iter());
                }
                (Err(e), _) | (_, Err(e)) => reason = Some(e.replace('\n', " ")),
            }
            changes_ms += t.elapsed().as_millis() as u64;
            let t = std::time::Instant::now();
            if b.as_of != as_of {
                for o in &time.offsets {
                    affected.extend(aff.slice(b.as_of, as_of, *o, &time).await?.iter());
                }
            }
            slices_ms += t.elapsed().as_millis() as u64;
        }
        if reason.is_none() && stored.file.level == Level::Accounts && all_links.is_none() {
            let t = std::time::Instant::now();
            all_links = Some(account_links(&ctx).await?);
            links_ms = t.elapsed().as_millis() as u64;
        }
        found.insert(key.clone(), (reason, affected));
    }
    tracing::debug!(
        millis = t_found.elapsed().as_millis() as u64,
        changes_ms,
        slices = aff.slices.len(),
        slices_ms,
        links_ms,
        "affected profiles found"
    );
    let shared = share_events(
        &ctx,
        &mut aff,
        &defs,
        &found,
        all_links.as_deref().unwrap_or_default(),
        &trait_values,
        as_of,
        &computed,
        &account_keys,
    )
    .await?;
    let mut changed: HashMap<String, HashSet<i64>> = HashMap::new();
    let mut reports = Vec::new();
    let mut items = Vec::new();
    let mut unchanged = Vec::new();
    let mut adds: Vec<FileAdd> = Vec::new();
    let mut removes = Vec::new();
    let mut new_versions: BTreeMap<String, u64> = BTreeMap::new();
    for key in order.iter().filter(|k| wanted(k)) {
        let t = std::time::Instant::now();
        let stored = &defs[key];
        let prev = latest.get(key);
        let basis = key_bases.get(key);
        let kdeps = deps.get(key).unwrap_or(&no_deps);
        // The affected profiles (incremental mode): found before the loop, plus the profiles
        // whose values of the definitions it reads changed in this refresh.
        let (reason, mut affected) = found.remove(key).unwrap_or_default();
        if reason.is_none() {
            for d in kdeps {
                affected.extend(changed.get(d).into_iter().flatten());
            }
        }
        let version = prev.map_or(1, |p| p.version + 1);
        let new_basis = Basis {
            definition_version: stored.version,
            identity_version: identity.version,
            events_version: identity.events_version,
            as_of,
            deps: kdeps
                .iter()
                .filter_map(|d| {
                    new_versions
                        .get(d)
                        .copied()
                        .or_else(|| latest.get(d).map(|v| v.version))
                        .map(|v| (d.clone(), v))
                })
                .collect(),
        };
        let incremental = reason.is_none();
        // An account-level key re-evaluates the accounts linked to an affected profile (a
        // group call links its profile, so new account traits are covered too), reading every
        // profile linked to them.
        let mut accounts: Option<HashSet<String>> = None;
        if incremental && stored.file.level == Level::Accounts {
            let (a, p) = account_scope(all_links.as_deref().unwrap_or_default(), &affected);
            (accounts, affected) = (Some(a), p);
        }
        tracing::debug!(key = %key, affected = affected.len(), accounts = accounts.as_ref().map_or(0, |a| a.len()), "affected");
        let mut report = KeyRefresh {
            key: key.clone(),
            kind: match stored.file.kind {
                Kind::Audience => "audience",
                Kind::ComputedTrait => "computed_trait",
            }
            .into(),
            mode: if incremental { "incremental" } else { "full" }.into(),
            reason: reason.clone(),
            affected: match (&accounts, incremental) {
                (Some(a), _) => a.len() as u64,
                (None, true) => affected.len() as u64,
                (None, false) => 0,
            },
            version: None,
            size: 0,
            entered: 0,
            exited: 0,
            changed: 0,
            millis: 0,
        };
        if incremental && affected.is_empty() {
            // Nothing can have changed: no evaluation.
            report.size = prev.map_or(0, |p| p.data.rows);
            unchanged.push(serde_json::json!({"key": key, "basis": new_basis}));
            report.millis = t.elapsed().as_millis() as u64;
            tracing::info!(key = %key, mode = "incremental", affected = 0, "unchanged");
            reports.push(report);
            continue;
        }
        let t_restrict = std::time::Instant::now();
        if incremental {
            let keymap = aff.keymap().await?;
            // Events read once for the keys that share them, when this key's profiles are
            // among them (a definition it reads may have changed others).
            let events = match &shared {
                Some(sh) if sh.keys.contains(key) && affected.is_subset(&sh.profiles) => SHARED,
                _ => "events_raw",
            };
            register_inputs(
                &ctx,
                Some((&affected, &keymap)),
                events,
                accounts.as_ref(),
                &trait_values,
            )
            .await?;
        } else {
            register_inputs(&ctx, None, "events_raw", None, &trait_values).await?;
        }
        let restrict_ms = t_restrict.elapsed().as_millis() as u64;
        let inputs = Inputs {
            ctx: &ctx,
            as_of,
            created_at: stored.created_at,
            computed_traits: &computed,
            account_keys: &account_keys,
        };
        let fail = |e: Error| Error::Usage(format!("refreshing '{key}': {e}"));
        let mut files = Vec::new();
        let has_changes;
        // A new definition version always gets a version of its own.
        let must_version =
            prev.is_none() || basis.is_none_or(|b| b.definition_version != stored.version);
        match stored.file.kind {
            Kind::Audience => {
                let plan = compile_audience(&inputs, &stored.file)
                    .await
                    .map_err(fail)?;
                let level = plan.level;
                let batches = super::collect_traced(key, plan.frame).await.map_err(fail)?;
                let eval_ms = t.elapsed().as_millis() as u64;
                let fresh = MemberSet::evaluated(&batches, level)?;
                let old = MemberSet::read_opt(store, prev, level).await?;
                let old_ms = t.elapsed().as_millis() as u64;
                let replace = match (&accounts, incremental) {
                    (_, false) => Replace::All,
                    (Some(a), true) => Replace::Accounts(a),
                    (None, true) => Replace::Profiles(&affected),
                };
                let next = old.next(&fresh, &replace, as_of)?;
                let (entered, exited) = (next.entered.len(), next.exited.len());
                has_changes = entered + exited > 0;
                changed.insert(key.clone(), next.changed_profiles());
                next.members.register(&ctx, key, level)?;
                report.size = next.members.len() as u64;
                report.entered = entered as u64;
                report.exited = exited as u64;
                let diff_ms = t.elapsed().as_millis() as u64;
                if has_changes || must_version {
                    files = audience_files(store, space, key, version, as_of, &next).await?;
                }
                tracing::debug!(key = %key, restrict_ms, eval_ms, old_ms, diff_ms, written_ms = t.elapsed().as_millis() as u64, "audience phases (ms since the key started)");
            }
            Kind::ComputedTrait => {
                let plan = compile_trait(&inputs, &stored.file).await.map_err(fail)?;
                let batches = super::collect_traced(key, plan.frame).await.map_err(fail)?;
                let fresh =
                    trait_batch(key, version, as_of, &batches, plan.level, plan.json_value)?;
                let eval_ms = t.elapsed().as_millis() as u64;
                let old: Vec<RecordBatch> = match (prev, trait_values.get(key)) {
                    // a trait other definitions read: its version `prev` was read with the
                    // session (and is replaced only below)
                    (Some(_), Some(current)) => current.clone(),
                    (Some(p), None) => super::read_file_parallel(store, &p.data)
                        .await?
                        .iter()
                        .map(|b| conform(b, "trait_values"))
                        .collect::<Result<_>>()?,
                    (None, _) => Vec::new(),
                };
                let old_ms = t.elapsed().as_millis() as u64;
                let mut all = Vec::new();
                // the old rows of the affected profiles (incremental, profile level)
                let mut old_affected = Vec::new();
                if incremental {
                    for b in &old {
                        let keep: arrow::array::BooleanArray = match &accounts {
                            Some(a) => b
                                .column(9)
                                .as_string::<i32>()
                                .iter()
                                .map(|acc| Some(acc.is_none_or(|acc| !a.contains(acc))))
                                .collect(),
                            None => b
                                .column(2)
                                .as_primitive::<Int64Type>()
                                .iter()
                                .map(|i| Some(i.is_none_or(|i| !affected.contains(&i))))
                                .collect(),
                        };
                        all.push(arrow::compute::filter_record_batch(b, &keep)?);
                        if accounts.is_none() {
                            let dropped = arrow::compute::not(&keep)?;
                            old_affected.push(arrow::compute::filter_record_batch(b, &dropped)?);
                        }
                    }
                }
                all.push(fresh.clone());
                let merged = stamp(&all, version, as_of)?;
                let (before, after) = if incremental && accounts.is_none() {
                    // Only the affected profiles' values can change (the others' rows are
                    // kept as they were): compare their old rows with the fresh ones.
                    (
                        trait_map(&old_affected),
                        trait_map(std::slice::from_ref(&fresh)),
                    )
                } else {
                    (trait_map(&old), trait_map(std::slice::from_ref(&merged)))
                };
                let mut ch: HashSet<i64> = HashSet::new();
                for (i, v) in &after {
                    if before.get(i) != Some(v) {
                        ch.insert(*i);
                    }
                }
                ch.extend(before.keys().filter(|i| !after.contains_key(*i)));
                report.changed = ch.len() as u64;
                report.size = merged.num_rows() as u64;
                // Account values are keyed by account: compare the values as a whole.
                has_changes = if plan.level == Level::Accounts {
                    account_values(&old) != account_values(std::slice::from_ref(&merged))
                } else {
                    !ch.is_empty()
                };
                changed.insert(key.clone(), ch);
                trait_values.insert(key.clone(), vec![merged.clone()]);
                let diff_ms = t.elapsed().as_millis() as u64;
                if has_changes || must_version {
                    files = vec![put_batch(store, space, "trait_values", &merged).await?];
                }
                tracing::debug!(key = %key, eval_ms, old_ms, diff_ms, written_ms = t.elapsed().as_millis() as u64, "trait phases (ms since the key started)");
            }
        }
        if !files.is_empty() {
            crate::fault::hit("refresh_after_state");
            new_versions.insert(key.clone(), version);
            report.version = Some(version);
            let data = files
                .iter()
                .find(|f| f.kind.as_deref() != Some("changes"))
                .map(|f| f.path.clone());
            let changes = files
                .iter()
                .find(|f| f.kind.as_deref() == Some("changes"))
                .map(|f| f.path.clone());
            items.push(serde_json::json!({
                "key": key, "version": version, "as_of": as_of,
                "definition_version": stored.version, "inputs": new_basis.inputs(),
                "basis": new_basis, "mode": report.mode, "reason": report.reason,
                "size": report.size, "entered": report.entered, "exited": report.exited,
                "changed": report.changed, "data": data, "changes": changes,
            }));
            removes.extend(prev.map(|p| p.data.path.clone()));
            adds.extend(files);
        } else {
            unchanged.push(serde_json::json!({"key": key, "basis": new_basis}));
        }
        report.millis = t.elapsed().as_millis() as u64;
        tracing::info!(
            key = %key,
            mode = %report.mode,
            reason = report.reason.as_deref().unwrap_or(""),
            affected = report.affected,
            entered = report.entered,
            exited = report.exited,
            changed = report.changed,
            millis = report.millis,
            "refreshed"
        );
        reports.push(report);
    }
    crate::fault::hit("refresh_after_data");
    let mut committed = None;
    if !items.is_empty() {
        let draft = CommitDraft {
            operation: "refresh".into(),
            adds,
            removes,
            info: serde_json::json!({
                "as_of": as_of,
                "identity_version": identity.version,
                "events_version": identity.events_version,
                "versions": items,
                "unchanged": unchanged,
            }),
        };
        if let Some(b) = &opts.before_commit {
            b.wait().await;
        }
        crate::fault::hit("refresh_before_commit");
        match mlog.try_commit(snap.version, draft).await? {
            Some(e) => committed = Some(e.version),
            None => {
                return Err(Error::Conflict(format!(
                    "another refresh or compute committed to space '{space}' while this refresh \
                     ran; nothing of it was committed (run it again)"
                )));
            }
        }
        crate::fault::hit("refresh_after_commit");
    }
    let report = RefreshReport {
        as_of,
        identity_version: identity.version,
        events_version: identity.events_version,
        new_event_files: aff.files_read.len() as u64,
        new_event_rows: aff.rows_read,
        committed,
        keys: reports,
        millis: t0.elapsed().as_millis() as u64,
    };
    tracing::info!(
        as_of,
        new_event_files = report.new_event_files,
        new_event_rows = report.new_event_rows,
        committed = ?report.committed,
        millis = report.millis,
        "refresh done"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_set_agrees_with_a_hash_set_on_runs_of_keys() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for round in 0..50 {
            let mut keys: Vec<i64> = (0..rng.random_range(0..400))
                .map(|_| rng.random_range(-500..5000i64) * 7919)
                .collect();
            keys.sort_unstable();
            keys.dedup();
            let set: HashSet<i64> = keys.iter().copied().collect();
            let f = InKeys::new(keys.clone());
            // a batch as event files hold them: ascending runs with repeats, a null, a restart
            let mut col: Vec<Option<i64>> = Vec::new();
            for _ in 0..rng.random_range(1..4) {
                let mut run: Vec<i64> = (0..rng.random_range(0..300))
                    .map(|_| match rng.random_bool(0.5) {
                        true if !keys.is_empty() => keys[rng.random_range(0..keys.len())],
                        _ => rng.random_range(-600..5100i64) * 7919 + rng.random_range(0..2),
                    })
                    .collect();
                run.sort_unstable();
                col.extend(run.into_iter().flat_map(|k| [Some(k); 2]));
                col.push(None);
            }
            let got = f.contains_all(&Int64Array::from(col.clone()));
            for (i, k) in col.iter().enumerate() {
                assert_eq!(
                    got.value(i),
                    k.is_some_and(|k| set.contains(&k)),
                    "round {round} row {i}"
                );
            }
        }
    }

    #[test]
    fn keys_of_profiles_agree_with_a_scan_of_the_map() {
        // identity key k belongs to profile (k * 7) % 50 (some profiles have none)
        let profile: HashMap<i64, i64> = (0..1000i64)
            .map(|k| (k, (k * 7) % 50))
            .filter(|(_, p)| p % 5 != 3)
            .collect();
        let map = KeyMap::new(Arc::new(crate::tables::indexed::KeyIndex::new(
            profile.iter().map(|(k, p)| (*k, *p)).collect(),
        )));
        let wanted: HashSet<i64> = [0, 3, 8, 13, 49, 77, -1].into_iter().collect();
        let (ks, ps) = map.keys_of(&wanted);
        let mut got: Vec<(i64, i64)> = ks.into_iter().zip(ps).collect();
        got.sort_unstable();
        let mut expected: Vec<(i64, i64)> = profile
            .iter()
            .filter(|(_, p)| wanted.contains(p))
            .map(|(k, p)| (*k, *p))
            .collect();
        expected.sort_unstable();
        assert!(!expected.is_empty());
        assert_eq!(got, expected);
    }

    #[test]
    fn kind_and_time_only_widens_a_filter() {
        let price = col("properties.price:num").gt(lit(100.0));
        let e = col("event")
            .eq(lit("A"))
            .and(price.clone())
            .or(col("type")
                .eq(lit("page"))
                .and(col("timestamp").gt(lit(5i64))))
            .and(col("properties.x:str").is_not_null().or(price));
        let expected = col("event")
            .eq(lit("A"))
            .and(lit(true))
            .or(col("type")
                .eq(lit("page"))
                .and(col("timestamp").gt(lit(5i64))))
            .and(lit(true).or(lit(true)));
        assert_eq!(kind_and_time(e), expected);
    }
}
