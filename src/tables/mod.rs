//! The store's committed tables as DataFusion tables, and the SQL session over them.
//!
//! [`EventsTable`] scans exactly the Parquet files named by one snapshot of the commit log
//! (never a directory listing, so uncommitted files are invisible), adds the `date` partition
//! column, fills columns a file lacks with nulls (schema evolution of shredded properties), and
//! prunes files by their committed timestamp ranges before any file is opened.

pub mod indexed;

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::JoinType;
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder};
use datafusion::datasource::physical_plan::{FileSource, ParquetSource};
use datafusion::datasource::table_schema::TableSchema;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::prelude::{SessionConfig, SessionContext, col, lit};

use crate::error::Result;
use crate::events::schema::schema_with;
use crate::store::keys::{Space, TableName};
use crate::store::log::{ColumnSpec, CommitLog, FileAdd, Snapshot};
use crate::store::{DATAFUSION_URL, Store};

/// Committed Parquet files of one snapshot, as a DataFusion table.
#[derive(Debug)]
pub struct CommittedTable {
    file_schema: SchemaRef,
    schema: SchemaRef,
    files: Vec<FileAdd>,
    date_partitioned: bool,
}

/// The events table (kept under its domain name).
pub type EventsTable = CommittedTable;

impl CommittedTable {
    /// The events table for one snapshot of the events log.
    pub fn new(snapshot: &Snapshot) -> Self {
        Self::events(&snapshot.files)
    }

    /// The events table over some committed events files.
    pub fn events(files: &[FileAdd]) -> Self {
        let columns: Vec<ColumnSpec> = files
            .iter()
            .flat_map(|f| f.columns.iter().cloned())
            .collect();
        let file_schema = schema_with(&columns);
        let mut fields: Vec<Field> = file_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(date_field());
        CommittedTable {
            file_schema,
            schema: Arc::new(Schema::new(fields)),
            files: files.to_vec(),
            date_partitioned: true,
        }
    }

    /// The same files with the string columns `names` read as `Utf8View`: the Parquet reader
    /// then points into the dictionary pages instead of copying a string per row, and an
    /// equality with a literal compares the inlined prefix first. Compiled plans scan events
    /// this way through `events_indexed` (their `type` and `event` columns only ever meet
    /// literals); `events` and `events_raw` keep `Utf8`.
    pub fn with_string_views(self, names: &[&str]) -> Self {
        let view = |s: &SchemaRef| {
            let fields: Vec<Field> = s
                .fields()
                .iter()
                .map(|f| {
                    if names.contains(&f.name().as_str()) && f.data_type() == &DataType::Utf8 {
                        f.as_ref().clone().with_data_type(DataType::Utf8View)
                    } else {
                        f.as_ref().clone()
                    }
                })
                .collect();
            Arc::new(Schema::new(fields))
        };
        CommittedTable {
            file_schema: view(&self.file_schema),
            schema: view(&self.schema),
            ..self
        }
    }

    /// A table of files with a fixed schema (no partition column).
    pub fn plain(schema: SchemaRef, files: Vec<FileAdd>) -> Self {
        CommittedTable {
            file_schema: Arc::clone(&schema),
            schema,
            files,
            date_partitioned: false,
        }
    }

    /// Whether `f`, one comparison of `timestamp` with a microsecond literal, holds for every
    /// row of every file that pruning keeps: each file's committed timestamp range is then
    /// either wholly inside the bound or pruned away, so no row needs the filter (a window
    /// whose edges fall on the date partitions' midnights reads no timestamp column at all).
    fn decided_by_pruning(&self, f: &Expr) -> bool {
        let Expr::BinaryExpr(BinaryExpr { left, op, right }) = f else {
            return false;
        };
        let (Expr::Column(c), Expr::Literal(ScalarValue::TimestampMicrosecond(Some(t), _), _)) =
            (left.as_ref(), right.as_ref())
        else {
            return false;
        };
        if c.name != "timestamp" || !self.date_partitioned {
            return false;
        }
        let t = *t;
        let inside = |lo: i64, hi: i64| match op {
            Operator::Gt => lo > t,
            Operator::GtEq => lo >= t,
            Operator::Lt => hi < t,
            Operator::LtEq => hi <= t,
            _ => false,
        };
        let mut b = Bounds::default();
        b.collect(f);
        self.files.iter().all(|file| match file.ts_range {
            Some((lo, hi)) => inside(lo, hi) || !b.admits(file),
            None => false,
        })
    }

    /// The event kinds (`type`/`event`/`name` IN lists, see [`kind_in_lists`]) that `filters`
    /// admit, as a predicate for the Parquet source: its page index prunes with them. The
    /// plan's own filters do not keep them: the optimizer drops such redundant conjuncts.
    fn kinds_predicate(
        &self,
        state: &dyn Session,
        filters: &[Expr],
    ) -> Option<Arc<dyn datafusion::physical_expr::PhysicalExpr>> {
        if !self.date_partitioned {
            return None;
        }
        let lists = filters
            .iter()
            .flat_map(kind_in_lists)
            .map(datafusion::logical_expr::expr_rewriter::unnormalize_col);
        let e = datafusion::logical_expr::utils::conjunction(lists)?;
        let schema = datafusion::common::DFSchema::try_from(self.schema.as_ref().clone()).ok()?;
        match state.create_physical_expr(e, &schema) {
            Ok(p) => Some(p),
            Err(err) => {
                tracing::debug!(error = %err, "no event kind predicate for the scan");
                None
            }
        }
    }

    /// Files that may hold rows satisfying `filters` (by committed timestamp ranges and dates).
    pub fn prune(&self, filters: &[Expr]) -> Vec<&FileAdd> {
        let mut b = Bounds::default();
        for f in filters {
            b.collect(f);
        }
        self.files.iter().filter(|f| b.admits(f)).collect()
    }
}

/// `c IN (...)` conditions on the event kind columns (`type`, `event`, `name`) that every row `e`
/// admits satisfies: redundant with `e`, but a scan can prune with them. The Parquet page index
/// prunes with single-column conjuncts only, so a disjunction such as `event = 'A' AND
/// timestamp >= t OR event = 'B'` alone skips no page; with `event IN ('A', 'B')` beside it the
/// pages of other kinds (event files are sorted by kind) are skipped.
pub fn kind_in_lists(e: &Expr) -> Vec<Expr> {
    use datafusion::logical_expr::{BinaryExpr, Operator};
    fn text(e: &Expr) -> Option<&str> {
        match e {
            Expr::Literal(
                ScalarValue::Utf8(Some(s))
                | ScalarValue::Utf8View(Some(s))
                | ScalarValue::LargeUtf8(Some(s)),
                _,
            ) => Some(s),
            _ => None,
        }
    }
    fn is_col(e: &Expr, c: &str) -> bool {
        matches!(e, Expr::Column(x) if x.name == c)
    }
    /// The values of column `c` every row admitted by `e` has (None: any), and the column as
    /// `e` names it (qualified or not).
    fn values(e: &Expr, c: &str) -> Option<(std::collections::BTreeSet<String>, Expr)> {
        match e {
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::Eq,
                right,
            }) => {
                let (v, column) = match (is_col(left, c), is_col(right, c)) {
                    (true, _) => (text(right), left),
                    (_, true) => (text(left), right),
                    _ => (None, left),
                };
                Some(([v?.to_string()].into(), column.as_ref().clone()))
            }
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::And,
                right,
            }) => match (values(left, c), values(right, c)) {
                (Some((a, column)), Some((b, _))) => {
                    Some((a.intersection(&b).cloned().collect(), column))
                }
                (a, b) => a.or(b),
            },
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::Or,
                right,
            }) => {
                let (mut a, column) = values(left, c)?;
                a.extend(values(right, c)?.0);
                Some((a, column))
            }
            Expr::InList(l) if !l.negated && is_col(&l.expr, c) => {
                let vs = l
                    .list
                    .iter()
                    .map(|v| text(v).map(str::to_string))
                    .collect::<Option<_>>()?;
                Some((vs, l.expr.as_ref().clone()))
            }
            _ => None,
        }
    }
    ["type", "event", "name"]
        .into_iter()
        .filter_map(|c| {
            let (vs, column) = values(e, c).filter(|(v, _)| !v.is_empty())?;
            Some(column.in_list(vs.into_iter().map(lit).collect(), false))
        })
        .collect()
}

fn date_field() -> Field {
    Field::new("date", DataType::Utf8, false)
}

/// Time bounds implied by a conjunction of filters.
#[derive(Default, Debug)]
struct Bounds {
    ts_lo: Option<i64>,
    ts_hi: Option<i64>,
    date_lo: Option<String>,
    date_hi: Option<String>,
}

fn ts_micros(v: &ScalarValue) -> Option<i64> {
    match v {
        ScalarValue::TimestampMicrosecond(Some(x), _) => Some(*x),
        ScalarValue::TimestampNanosecond(Some(x), _) => Some(x.div_euclid(1000)),
        ScalarValue::TimestampMillisecond(Some(x), _) => x.checked_mul(1000),
        ScalarValue::TimestampSecond(Some(x), _) => x.checked_mul(1_000_000),
        _ => None,
    }
}

impl Bounds {
    fn collect(&mut self, e: &Expr) {
        match e {
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::And,
                right,
            }) => {
                self.collect(left);
                self.collect(right);
            }
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                let (col, op, lit) = match (left.as_ref(), right.as_ref()) {
                    (Expr::Column(c), Expr::Literal(v, _)) => (c, *op, v),
                    (Expr::Literal(v, _), Expr::Column(c)) => match op.swap() {
                        Some(o) => (c, o, v),
                        None => return,
                    },
                    _ => return,
                };
                match col.name.as_str() {
                    "timestamp" => {
                        let Some(t) = ts_micros(lit) else { return };
                        match op {
                            Operator::Gt | Operator::GtEq => {
                                self.ts_lo = Some(self.ts_lo.map_or(t, |x| x.max(t)))
                            }
                            Operator::Lt | Operator::LtEq => {
                                self.ts_hi = Some(self.ts_hi.map_or(t, |x| x.min(t)))
                            }
                            Operator::Eq => {
                                self.ts_lo = Some(self.ts_lo.map_or(t, |x| x.max(t)));
                                self.ts_hi = Some(self.ts_hi.map_or(t, |x| x.min(t)));
                            }
                            _ => {}
                        }
                    }
                    "date" => {
                        let ScalarValue::Utf8(Some(d)) = lit else {
                            return;
                        };
                        match op {
                            Operator::Gt | Operator::GtEq => self.date_lo = Some(d.clone()),
                            Operator::Lt | Operator::LtEq => self.date_hi = Some(d.clone()),
                            Operator::Eq => {
                                self.date_lo = Some(d.clone());
                                self.date_hi = Some(d.clone());
                            }
                            _ => {}
                        }
                    }
                    _ => {}
                }
            }
            Expr::Between(b) if !b.negated => {
                if let (Expr::Column(c), Expr::Literal(lo, _), Expr::Literal(hi, _)) =
                    (b.expr.as_ref(), b.low.as_ref(), b.high.as_ref())
                    && c.name == "timestamp"
                {
                    if let Some(t) = ts_micros(lo) {
                        self.ts_lo = Some(self.ts_lo.map_or(t, |x| x.max(t)));
                    }
                    if let Some(t) = ts_micros(hi) {
                        self.ts_hi = Some(self.ts_hi.map_or(t, |x| x.min(t)));
                    }
                }
            }
            _ => {}
        }
    }

    fn admits(&self, f: &FileAdd) -> bool {
        if let Some((min, max)) = f.ts_range
            && (self.ts_lo.is_some_and(|lo| max < lo) || self.ts_hi.is_some_and(|hi| min > hi))
        {
            return false;
        }
        if let Some(d) = &f.date {
            // Exclusive/inclusive differences only widen the set: pruning stays conservative.
            if self.date_lo.as_ref().is_some_and(|lo| d < lo)
                || self.date_hi.as_ref().is_some_and(|hi| d > hi)
            {
                return false;
            }
        }
        true
    }
}

#[async_trait]
impl TableProvider for CommittedTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| {
                if self.decided_by_pruning(f) {
                    TableProviderFilterPushDown::Exact
                } else {
                    TableProviderFilterPushDown::Inexact
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let files = self.prune(filters);
        if files.is_empty() {
            let schema = match projection {
                Some(p) => Arc::new(self.schema.project(p)?),
                None => Arc::clone(&self.schema),
            };
            return Ok(Arc::new(EmptyExec::new(schema)));
        }
        let n_groups = state.config().target_partitions().max(1);
        let mut groups: Vec<Vec<PartitionedFile>> = vec![Vec::new(); n_groups.min(files.len())];
        let mut sizes = vec![0u64; groups.len()];
        let mut by_size = files.clone();
        by_size.sort_by_key(|f| std::cmp::Reverse(f.size));
        for f in by_size {
            let i = (0..sizes.len()).min_by_key(|i| sizes[*i]).unwrap_or(0);
            sizes[i] += f.size;
            let file = PartitionedFile::new(f.path.clone(), f.size);
            groups[i].push(if self.date_partitioned {
                file.with_partition_values(vec![ScalarValue::Utf8(f.date.clone())])
            } else {
                file
            });
        }
        let partition_cols = if self.date_partitioned {
            vec![Arc::new(date_field())]
        } else {
            vec![]
        };
        let table_schema = TableSchema::builder(Arc::clone(&self.file_schema))
            .with_table_partition_cols(partition_cols)
            .build();
        let format = ParquetFormat::default().with_options(state.table_options().parquet.clone());
        let mut source = ParquetSource::new(table_schema)
            .with_table_parquet_options(state.table_options().parquet.clone());
        if let Some(kinds) = self.kinds_predicate(state, filters) {
            source = source.with_predicate(kinds);
        }
        let source: Arc<dyn FileSource> = Arc::new(source);
        let conf = FileScanConfigBuilder::new(ObjectStoreUrl::parse(DATAFUSION_URL)?, source)
            .with_file_groups(groups.into_iter().map(FileGroup::new).collect())
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .build();
        format.create_physical_plan(state, conf).await
    }
}

/// A DataFusion session over one space of the store, with every committed table registered and
/// our UDFs available.
pub async fn session(store: &Store, space: &Space) -> Result<SessionContext> {
    session_at(store, space, None).await
}

/// [`session`] with the events table as of events log version `events_version` (the version
/// an identity state covers, so every event has its profile); latest when None.
pub async fn session_at(
    store: &Store,
    space: &Space,
    events_version: Option<u64>,
) -> Result<SessionContext> {
    session_with(store, space, events_version, None).await
}

/// [`session_at`] for evaluating definitions: every compiled plan joins `profiles`
/// (profile_idx, profile_id, known), so those three columns of the canonical profiles are read
/// once and kept in memory for the session instead of scanned and filtered per definition.
/// With `index_keys`, the identity key index of `events_indexed` is loaded meanwhile (for
/// sessions whose plans scan all events; see [`indexed`]).
pub async fn compute_session(
    store: &Store,
    space: &Space,
    events_version: Option<u64>,
    index_keys: bool,
) -> Result<SessionContext> {
    let ctx = session_at(store, space, events_version).await?;
    let df = ctx.table("profiles").await?.select(vec![
        col("profile_idx"),
        col("profile_id"),
        col("known"),
    ])?;
    let schema = Arc::new(df.schema().as_arrow().clone());
    let state = ctx.state();
    let index = async {
        match indexed_events(&ctx).await? {
            Some(events) if index_keys => events.index(&state).await.map(|_| ()),
            _ => Ok(()),
        }
    };
    let (batches, ()) = futures::try_join!(
        async { df.collect().await.map_err(crate::Error::from) },
        async { index.await.map_err(crate::Error::from) }
    )?;
    // as many partitions as the session runs, so that joins probe them in parallel
    let parts = ctx.state().config().target_partitions().max(1);
    let mut partitions: Vec<Vec<arrow::array::RecordBatch>> = vec![Vec::new(); parts];
    for (i, b) in batches.into_iter().enumerate() {
        partitions[i % parts].push(b);
    }
    ctx.deregister_table("profiles")?;
    ctx.register_table(
        "profiles",
        Arc::new(datafusion::datasource::MemTable::try_new(
            schema, partitions,
        )?),
    )?;
    Ok(ctx)
}

/// The session's `events_indexed` table (None when that name is not an [`indexed::IndexedEvents`]).
pub async fn indexed_events(
    ctx: &SessionContext,
) -> datafusion::error::Result<Option<Arc<indexed::IndexedEvents>>> {
    let provider: Arc<dyn std::any::Any + Send + Sync> =
        ctx.table_provider("events_indexed").await?;
    Ok(provider.downcast::<indexed::IndexedEvents>().ok())
}

/// [`session`] whose queries may use at most `memory_limit` bytes (beyond it, operators that
/// can spill do, and the others fail with a resources-exhausted error).
pub async fn session_limited(
    store: &Store,
    space: &Space,
    memory_limit: Option<usize>,
) -> Result<SessionContext> {
    session_with(store, space, None, memory_limit).await
}

/// Memory limit of this process's queries (0: none); see [`set_memory_limit`].
static MEMORY_LIMIT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Bound the memory of every query this process runs from now on (`--memory-limit`): beyond
/// it, operators that can spill (sorts, aggregations, joins) spill to disk and the others fail
/// with a resources-exhausted error instead of growing until the kernel kills the process.
/// None lifts the bound. A session given its own limit (Flight SQL's `--query-memory`) keeps it.
pub fn set_memory_limit(bytes: Option<usize>) {
    MEMORY_LIMIT.store(bytes.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
}

/// The limit set by [`set_memory_limit`].
pub fn memory_limit() -> Option<usize> {
    match MEMORY_LIMIT.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        n => Some(n),
    }
}

async fn session_with(
    store: &Store,
    space: &Space,
    events_version: Option<u64>,
    memory_limit: Option<usize>,
) -> Result<SessionContext> {
    let memory_limit = memory_limit.or_else(self::memory_limit);
    // DataFusion settings can be tuned with DATAFUSION_* environment variables.
    let mut config = SessionConfig::from_env()?
        .with_information_schema(true)
        .with_target_partitions(std::thread::available_parallelism().map_or(2, |n| n.get()));
    if std::env::var_os("DATAFUSION_EXECUTION_PARQUET_BLOOM_FILTER_ON_READ").is_none() {
        // We write no bloom filters: looking for them costs time per row group.
        config.options_mut().execution.parquet.bloom_filter_on_read = false;
    }
    let ctx = match memory_limit {
        Some(bytes) => {
            let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
                .with_memory_limit(bytes, 1.0)
                .build_arc()?;
            SessionContext::new_with_config_rt(config, runtime)
        }
        None => SessionContext::new_with_config(config),
    };
    let state = datafusion::execution::SessionStateBuilder::new_from_existing(ctx.state())
        .with_physical_optimizer_rule(Arc::new(crate::plan::one_phase::OnePhaseRowAggregates))
        .build();
    let ctx = SessionContext::new_with_state(state);
    let url =
        url::Url::parse(DATAFUSION_URL).map_err(|e| crate::error::Error::Usage(e.to_string()))?;
    ctx.register_object_store(&url, store.object_store());
    audiences_udfs::register_all(&ctx)?;
    let mut events = CommitLog::new(store, space, TableName::Events)
        .snapshot()
        .await?;
    if let Some(v) = events_version {
        // The latest files less those of ingests after `v` (compactions after it only rewrite
        // events up to it, and the files they replaced may be gone).
        let later: std::collections::HashSet<&str> = events
            .entries
            .iter()
            .filter(|e| e.version > v && e.operation != "compact")
            .flat_map(|e| e.adds.iter().map(|f| f.path.as_str()))
            .collect();
        let files = events
            .files
            .iter()
            .filter(|f| !later.contains(f.path.as_str()))
            .cloned()
            .collect();
        events.files = files;
    }
    ctx.register_table("events_raw", Arc::new(EventsTable::new(&events)))?;
    let events_viewed = EventsTable::new(&events).with_string_views(&["type", "event"]);
    let identity = CommitLog::new(store, space, crate::identity::persist::IDENTITY)
        .snapshot()
        .await?;
    register_identity(&ctx, &identity, &crate::identity::persist::KINDS, |kind| {
        if kind == "profiles" {
            "profile_index".into()
        } else {
            kind.into()
        }
    })?;
    let memberships = CommitLog::new(store, space, crate::compute::MEMBERSHIPS)
        .snapshot()
        .await?;
    // Deleted audiences and traits disappear from the current tables (their files stay until
    // vacuumed, and their changes stay in `membership_changes`).
    let live = crate::definitions::live(store, space).await?;
    let deleted_files: std::collections::HashSet<String> = crate::compute::versions(&memberships)
        .into_iter()
        .filter(|v| !live.contains_key(&v.key))
        .map(|v| v.data.path)
        .collect();
    for (name, kind) in [
        ("memberships", "members"),
        ("membership_changes", "changes"),
        ("computed_traits", "trait_values"),
    ] {
        let files = memberships
            .files
            .iter()
            .filter(|f| f.kind.as_deref() == Some(kind) && !deleted_files.contains(&f.path))
            .cloned()
            .collect();
        ctx.register_table(
            name,
            Arc::new(CommittedTable::plain(crate::compute::schema(kind), files)),
        )?;
    }
    // `dead_letters`: messages destinations gave up on, with the reason.
    let dead = CommitLog::new(store, space, crate::destinations::sync::DEAD_LETTERS)
        .snapshot()
        .await?;
    ctx.register_table(
        "dead_letters",
        Arc::new(CommittedTable::plain(
            crate::destinations::sync::dead_letter_schema(),
            dead.files,
        )),
    )?;
    // `profiles`: the canonical profiles only.
    let profiles = ctx
        .table("profile_index")
        .await?
        .filter(col("merged_into").is_null())?
        .drop_columns(&["merged_into", "canonical_idx"])?;
    ctx.register_table("profiles", profiles.into_view())?;
    // `events`: every event with its current canonical profile, through its identity key.
    let keys = ctx
        .table("identities")
        .await?
        .filter(col("id_type").in_list(vec![lit("user_id"), lit("anonymous_id")], false))?
        .select(vec![
            col("identity_key").alias("__key"),
            col("profile_id"),
            col("profile_idx"),
        ])?;
    let events = ctx
        .table("events_raw")
        .await?
        .join(keys, JoinType::Left, &["identity_key"], &["__key"], None)?
        .drop_columns(&["__key"])?;
    ctx.register_table("events", events.into_view())?;
    // `events_indexed`: every event with its canonical profile_idx only, looked up in the
    // integer `identity_keys` table (what compiled plans read; see [`indexed`]). Identity
    // states written before that table existed take the keys from `identities`.
    let has_keys = identity
        .files
        .iter()
        .any(|f| f.kind.as_deref() == Some("identity_keys"));
    let keys = if has_keys {
        ctx.table("identity_keys")
            .await?
            .select(vec![col("identity_key"), col("profile_idx")])?
    } else {
        ctx.table("identities")
            .await?
            .filter(col("id_type").in_list(vec![lit("user_id"), lit("anonymous_id")], false))?
            .select(vec![col("identity_key"), col("profile_idx")])?
    };
    ctx.register_table(
        "events_indexed",
        Arc::new(indexed::IndexedEvents::new(
            Arc::new(events_viewed),
            keys.into_unoptimized_plan(),
        )),
    )?;
    Ok(ctx)
}

/// Register the identity tables `kinds` of a committed identity state (under `name(kind)`):
/// each the checkpoint's rows whose owner is not dirty, plus the delta's (see
/// `identity::persist`), or the checkpoint alone when there is no delta.
pub fn register_identity(
    ctx: &SessionContext,
    snap: &crate::store::log::Snapshot,
    kinds: &[&str],
    name: impl Fn(&str) -> String,
) -> Result<()> {
    use crate::identity::persist::{
        DIRTY_ACCOUNTS, DIRTY_PROFILES, dirty_schema, owner_columns, schema, table_files,
    };
    let of = |k: &str| -> Vec<crate::store::log::FileAdd> {
        snap.files
            .iter()
            .filter(|f| f.kind.as_deref() == Some(k))
            .cloned()
            .collect()
    };
    let dirty = [DIRTY_PROFILES, DIRTY_ACCOUNTS].map(|k| (k, of(k)));
    let has_delta = dirty.iter().any(|(_, f)| !f.is_empty());
    for kind in kinds {
        let (base, delta) = table_files(snap, kind);
        let base = Arc::new(CommittedTable::plain(schema(kind), base));
        if !has_delta {
            ctx.register_table(name(kind), base)?;
            continue;
        }
        let mut df = ctx.read_table(base)?;
        let (pcol, acol) = owner_columns(kind);
        for ((dkind, files), owner) in dirty.iter().zip([pcol, acol]) {
            let Some(owner) = owner else { continue };
            let list = ctx
                .read_table(Arc::new(CommittedTable::plain(
                    dirty_schema(dkind),
                    files.clone(),
                )))?
                .select(vec![col(owner).alias("__dirty")])?;
            df = df.join(list, JoinType::LeftAnti, &[owner], &["__dirty"], None)?;
        }
        let delta = ctx.read_table(Arc::new(CommittedTable::plain(schema(kind), delta)))?;
        ctx.register_table(name(kind), df.union(delta)?.into_view())?;
    }
    Ok(())
}

/// Run a SQL query against a space and collect the result.
pub async fn query(
    store: &Store,
    space: &Space,
    sql: &str,
) -> Result<Vec<arrow::array::RecordBatch>> {
    // A compaction deletes the files it replaced right after its commit (so that readers of
    // the partition directories never see an event twice); a query whose snapshot predates it
    // can find one of its files gone, and then runs again on a fresh snapshot.
    let mut attempt = 0;
    loop {
        let ctx = session(store, space).await?;
        let df = ctx.sql(sql).await?;
        match df.collect().await {
            Ok(b) => return Ok(b),
            Err(e) if attempt < 3 && file_vanished(&e) => {
                attempt += 1;
                tracing::debug!(attempt, error = %e, "a file of the snapshot was compacted away; querying again");
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether a query failed because a committed file it listed no longer exists.
pub fn file_vanished(e: &datafusion::error::DataFusionError) -> bool {
    let text = e.to_string();
    text.contains("not found") && text.contains("/events/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::error::DataFusionError;

    /// A timestamp bound is exact only when every file is wholly inside it or pruned away.
    #[test]
    fn a_timestamp_bound_is_exact_only_when_no_kept_file_straddles_it() {
        let day = 86_400_000_000i64;
        let file = |d: i64, lo: i64, hi: i64| FileAdd {
            path: format!("f{d}"),
            date: Some(format!("2025-01-{:02}", d + 1)),
            ts_range: Some((d * day + lo, d * day + hi)),
            ..Default::default()
        };
        // day 0: whole day; day 1: whole day; day 2: only its first hour
        let t = CommittedTable::events(&[
            file(0, 0, day - 1),
            file(1, 0, day - 1),
            file(2, 0, 3_600_000_000),
        ]);
        let ts = |x: i64| {
            lit(ScalarValue::TimestampMicrosecond(
                Some(x),
                Some("UTC".into()),
            ))
        };
        let exact = |e: Expr| t.decided_by_pruning(&e);
        // midnight bounds: days 1-2 inside, day 0 pruned
        assert!(exact(col("timestamp").gt_eq(ts(day))));
        // `<` midnight: day 1 starts at it, and pruning (conservatively inclusive) keeps it
        assert!(!exact(col("timestamp").lt(ts(day))));
        assert!(exact(col("timestamp").lt_eq(ts(3 * day))));
        // a bound inside day 1 straddles it
        assert!(!exact(col("timestamp").gt_eq(ts(day + 5))));
        assert!(!exact(col("timestamp").lt_eq(ts(day + 5))));
        // `>` at day 0's last instant: day 0 is neither inside nor pruned (its max equals t)
        assert!(!exact(col("timestamp").gt(ts(day - 1))));
        // `<=` at day 0's last instant: day 0 inside, days 1-2 pruned
        assert!(exact(col("timestamp").lt_eq(ts(day - 1))));
        // other columns and literal kinds stay inexact
        assert!(!exact(col("received_at").gt_eq(ts(day))));
        assert!(!exact(col("timestamp").gt_eq(lit(5i64))));
        // a file without a committed range is never decided
        let mut unknown = file(3, 0, 1);
        unknown.ts_range = None;
        let t = CommittedTable::events(&[unknown]);
        assert!(!t.decided_by_pruning(&col("timestamp").gt_eq(ts(0))));
    }

    #[test]
    fn kind_in_lists_are_implied_by_the_filter() {
        let ev = |e: &str| col("event").eq(lit(e));
        let ts = col("timestamp").gt(lit(5));
        let track = col("type").eq(lit("track"));
        let in_list =
            |c: &str, vs: &[&str]| col(c).in_list(vs.iter().map(|v| lit(*v)).collect(), false);
        // every disjunct names its event: the union; `type` only where every disjunct names it
        let e = track
            .clone()
            .and(ev("A").and(ts.clone()))
            .or(track.clone().and(ev("B").or(ev("C"))));
        assert_eq!(
            kind_in_lists(&e),
            vec![
                in_list("type", &["track"]),
                in_list("event", &["A", "B", "C"])
            ]
        );
        // a disjunct that admits any event: no condition on events
        let e = ev("A").or(ts.clone().and(track.clone()));
        assert_eq!(kind_in_lists(&e), vec![]);
        // AND narrows; IN lists count; a contradiction gives nothing to prune with
        let e = in_list("event", &["A", "B"]).and(ev("B").or(ev("C")));
        assert_eq!(kind_in_lists(&e), vec![in_list("event", &["B"])]);
        assert_eq!(kind_in_lists(&ev("A").and(ev("B"))), vec![]);
        // negations and other shapes are not looked into
        assert_eq!(kind_in_lists(&std::ops::Not::not(ev("A"))), vec![]);
        // the column keeps its qualifier (a joined scan may have two columns of that name)
        let q = Expr::Column(datafusion::common::Column::new(Some("t"), "event"));
        let e = q.clone().eq(lit("A")).or(q.clone().eq(lit("B")));
        assert_eq!(
            kind_in_lists(&e),
            vec![q.in_list(vec![lit("A"), lit("B")], false)]
        );
    }

    /// The scan's Parquet predicate names the event kinds a disjunction admits (its page index
    /// then skips the pages of other kinds), and nothing when the filters admit any kind.
    #[test]
    fn the_scan_predicate_names_the_event_kinds_a_disjunction_admits() {
        let file = FileAdd {
            path: "f".into(),
            date: Some("2025-01-01".into()),
            ..Default::default()
        };
        let t = CommittedTable::events(std::slice::from_ref(&file));
        let ctx = SessionContext::new();
        let state = ctx.state();
        let ev = |e: &str| col("event").eq(lit(e));
        let any = ev("Checkout Started")
            .and(
                col("timestamp").gt_eq(lit(ScalarValue::TimestampMicrosecond(
                    Some(5),
                    Some("UTC".into()),
                ))),
            )
            .or(ev("Order Completed"));
        let p = t
            .kinds_predicate(&state, &[col("type").eq(lit("track")), any])
            .expect("a predicate");
        let shown = p.to_string();
        for kind in ["track", "Checkout Started", "Order Completed"] {
            assert!(shown.contains(kind), "{shown}");
        }
        assert!(!shown.contains("timestamp"), "{shown}");
        // an OR that admits any event names no event
        let open = ev("A").or(col("user_id").eq(lit("u")));
        assert!(t.kinds_predicate(&state, &[open]).is_none());
        // tables other than the events are not touched
        let plain = CommittedTable::plain(Arc::clone(&t.file_schema), vec![file]);
        assert!(plain.kinds_predicate(&state, &[ev("A")]).is_none());
    }

    #[test]
    fn a_compacted_away_event_file_is_told_from_other_errors() {
        // the shape DataFusion gives when a listed Parquet file was deleted (seen in CI)
        let gone = DataFusionError::External(Box::new(object_store::Error::NotFound {
            path: "spaces/default/events/date=2026-12-01/part-307e.parquet".into(),
            source: "No such file or directory (os error 2)".into(),
        }));
        assert!(file_vanished(&gone), "{gone}");
        let other = DataFusionError::Plan("table 'nope' not found".into());
        assert!(!file_vanished(&other));
        let trait_file = DataFusionError::External(Box::new(object_store::Error::NotFound {
            path: "spaces/default/memberships/x.parquet".into(),
            source: "gone".into(),
        }));
        assert!(!file_vanished(&trait_file));
    }
}
