//! `events_indexed`: every event with the `profile_idx` of its canonical profile, attached by a
//! lookup in the identity state's `identity_keys` instead of a hash join with that table.
//!
//! Identity keys are 64-bit hashes of an event's id list, so they are not dense; but the
//! `identity_keys` table is sorted by them, and sorted uniform hashes are found with a bucket
//! directory on their top bits: one read of the directory, one of a bucket of about one key.
//! The [`KeyIndex`] is loaded on the first scan that asks for `profile_idx` and kept by the
//! table for the session, so the definitions of one compute share it, where a join re-read and
//! re-hashed the 1.25M keys of a 10M-event store for each of them. Scans that do not ask for
//! `profile_idx` are the events table's own scans.

use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, AsArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, LogicalPlan, TableProviderFilterPushDown};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::filter_pushdown::{
    ChildFilterDescription, ChildPushdownResult, FilterDescription, FilterPushdownPhase,
    FilterPushdownPropagation,
};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PlanProperties,
};
use futures::StreamExt;

use crate::identity::prefetch;

/// The column the table adds to the events.
pub const PROFILE_IDX: &str = "profile_idx";

/// identity_key → profile_idx, from the rows of `identity_keys`.
pub struct KeyIndex {
    /// (key with the sign bit flipped, so that unsigned order is signed order; its
    /// `profile_idx`), sorted by key: one cache line holds both.
    entries: Vec<(u64, i64)>,
    /// `dir[b]..dir[b + 1]`: the entries whose keys' top bits are `b`.
    dir: Vec<u32>,
    shift: u32,
}

impl fmt::Debug for KeyIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyIndex({} keys)", self.entries.len())
    }
}

fn flip(key: i64) -> u64 {
    (key as u64) ^ (1 << 63)
}

impl KeyIndex {
    /// The index of (identity_key, profile_idx) pairs in any order (a sorted checkpoint is not
    /// sorted again). A key listed twice keeps its first profile.
    pub fn new(mut pairs: Vec<(i64, i64)>) -> Self {
        pairs.sort_by_key(|p| p.0);
        pairs.dedup_by_key(|p| p.0);
        let keys = pairs.iter().map(|p| p.0).collect();
        Self::sorted(keys, pairs.into_iter().map(|p| p.1).collect())
    }

    /// The index of `keys[i]` → `idx[i]`: built as they are when the keys ascend strictly
    /// (a checkpoint read in order), else through [`KeyIndex::new`].
    fn from_columns(keys: Vec<i64>, idx: Vec<i64>) -> Self {
        if keys.windows(2).all(|w| w[0] < w[1]) {
            Self::sorted(keys, idx)
        } else {
            Self::new(keys.into_iter().zip(idx).collect())
        }
    }

    fn sorted(keys: Vec<i64>, idx: Vec<i64>) -> Self {
        let entries: Vec<(u64, i64)> = keys.into_iter().map(flip).zip(idx).collect();
        // about one key per bucket, at most 2^24 buckets (64 MiB of directory)
        let bits = (usize::BITS - entries.len().max(1).leading_zeros()).clamp(1, 24);
        let shift = 64 - bits;
        let buckets = 1usize << bits;
        let mut dir = Vec::with_capacity(buckets + 1);
        let mut i = 0;
        for b in 0..=buckets as u64 {
            while i < entries.len() && (entries[i].0 >> shift) < b {
                i += 1;
            }
            dir.push(i as u32);
        }
        KeyIndex {
            entries,
            dir,
            shift,
        }
    }

    fn bucket(&self, key: i64) -> usize {
        (flip(key) >> self.shift) as usize
    }

    /// Every (identity_key, profile_idx) pair, in key order.
    pub fn pairs(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        self.entries
            .iter()
            .map(|(u, p)| ((u ^ (1 << 63)) as i64, *p))
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is indexed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The profile of identity key `key`, if the identity state has it.
    pub fn get(&self, key: i64) -> Option<i64> {
        let u = flip(key);
        let b = self.bucket(key);
        let lo = self.dir[b] as usize;
        let hi = self.dir[b + 1] as usize;
        self.entries[lo..hi]
            .binary_search_by_key(&u, |e| e.0)
            .ok()
            .map(|i| self.entries[lo + i].1)
    }

    /// The profile of every key of a column (null for a null or unknown key).
    ///
    /// Each lookup reads a directory slot, then the entries it points to: two cache misses
    /// in a table of tens of MiB, which dominated the scans that attach profiles. They are
    /// started ahead: the slot `FAR` rows ahead, the entries `NEAR` rows ahead (their slot
    /// loaded by then), so the misses of many rows overlap. Event files are sorted by kind
    /// and identity key, so a key that repeats the previous row's is not looked up again.
    pub fn attach(&self, keys: &Int64Array) -> Int64Array {
        const FAR: usize = 16;
        const NEAR: usize = 8;
        let v = keys.values();
        let n = v.len();
        let mut values: Vec<i64> = Vec::with_capacity(n);
        let mut valid = arrow::array::BooleanBufferBuilder::new(n);
        let mut last: Option<(i64, Option<i64>)> = None;
        for i in 0..n {
            if let Some(k) = v.get(i + FAR) {
                prefetch(self.dir.as_ptr().wrapping_add(self.bucket(*k)));
            }
            if let Some(k) = v.get(i + NEAR) {
                let lo = self.dir[self.bucket(*k)] as usize;
                prefetch(self.entries.as_ptr().wrapping_add(lo));
            }
            let p = if keys.is_null(i) {
                None
            } else {
                match last {
                    Some((l, p)) if l == v[i] => p,
                    _ => {
                        let p = self.get(v[i]);
                        last = Some((v[i], p));
                        p
                    }
                }
            };
            values.push(p.unwrap_or(0));
            valid.append(p.is_some());
        }
        Int64Array::new(
            values.into(),
            Some(arrow::buffer::NullBuffer::new(valid.finish())),
        )
    }

    /// Read the (identity_key, profile_idx) rows of `keys` (a plan of those two Int64 columns).
    async fn load(state: &dyn Session, keys: &LogicalPlan) -> DfResult<Self> {
        let t = std::time::Instant::now();
        let plan = state.create_physical_plan(keys).await?;
        // Partitions in order: a checkpoint's file ranges are then read back sorted.
        let parts = datafusion::physical_plan::collect_partitioned(plan, state.task_ctx()).await?;
        let n = parts.iter().flatten().map(RecordBatch::num_rows).sum();
        let (mut keys, mut idx) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for b in parts.iter().flatten() {
            let (k, p) = (b.column(0), b.column(1));
            let (Some(k), Some(p)) = (
                k.as_primitive_opt::<Int64Type>(),
                p.as_primitive_opt::<Int64Type>(),
            ) else {
                return Err(DataFusionError::Internal(
                    "identity_keys: identity_key and profile_idx must be Int64".into(),
                ));
            };
            if k.null_count() + p.null_count() == 0 {
                keys.extend_from_slice(k.values());
                idx.extend_from_slice(p.values());
            } else {
                for (k, p) in k.iter().zip(p.iter()) {
                    if let (Some(k), Some(p)) = (k, p) {
                        keys.push(k);
                        idx.push(p);
                    }
                }
            }
        }
        let read = t.elapsed();
        let index = Self::from_columns(keys, idx);
        tracing::debug!(
            keys = index.len(),
            read_millis = read.as_millis() as u64,
            millis = t.elapsed().as_millis() as u64,
            "identity key index loaded"
        );
        Ok(index)
    }
}

/// The events table plus `profile_idx` (see the module documentation).
#[derive(Debug)]
pub struct IndexedEvents {
    events: Arc<dyn TableProvider>,
    /// The identity state's (identity_key, profile_idx) rows.
    keys: LogicalPlan,
    schema: SchemaRef,
    index: tokio::sync::OnceCell<Arc<KeyIndex>>,
}

impl IndexedEvents {
    /// `events` with the profile of each row's `identity_key` in `keys` (a plan of the two
    /// Int64 columns identity_key and profile_idx).
    pub fn new(events: Arc<dyn TableProvider>, keys: LogicalPlan) -> Self {
        let mut fields: Vec<Field> = events
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new(PROFILE_IDX, DataType::Int64, true));
        IndexedEvents {
            events,
            keys,
            schema: Arc::new(Schema::new(fields)),
            index: tokio::sync::OnceCell::new(),
        }
    }

    /// The key index, loaded on first use.
    pub async fn index(&self, state: &dyn Session) -> DfResult<Arc<KeyIndex>> {
        let index = self
            .index
            .get_or_try_init(|| async { KeyIndex::load(state, &self.keys).await.map(Arc::new) })
            .await?;
        Ok(Arc::clone(index))
    }

    fn profile_column(&self) -> usize {
        self.schema.fields().len() - 1
    }
}

fn reads_profile(e: &Expr) -> bool {
    e.column_refs().iter().any(|c| c.name == PROFILE_IDX)
}

#[async_trait]
impl TableProvider for IndexedEvents {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // Filters on the events go to the events table; those on profile_idx stay above.
        let own: Vec<&Expr> = filters
            .iter()
            .copied()
            .filter(|f| !reads_profile(f))
            .collect();
        let mut theirs = self.events.supports_filters_pushdown(&own)?.into_iter();
        filters
            .iter()
            .map(|f| {
                if reads_profile(f) {
                    Ok(TableProviderFilterPushDown::Unsupported)
                } else {
                    theirs.next().ok_or_else(|| {
                        DataFusionError::Internal("filter pushdown answers missing".into())
                    })
                }
            })
            .collect()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let pcol = self.profile_column();
        let wanted: Vec<usize> = projection.cloned().unwrap_or_else(|| (0..=pcol).collect());
        let own: Vec<Expr> = filters
            .iter()
            .filter(|f| !reads_profile(f))
            .cloned()
            .collect();
        if !wanted.contains(&pcol) {
            return self.events.scan(state, Some(&wanted), &own, limit).await;
        }
        let key_col = self.events.schema().index_of("identity_key")?;
        let mut inner: Vec<usize> = wanted.iter().copied().filter(|i| *i != pcol).collect();
        let key_at = match inner.iter().position(|i| *i == key_col) {
            Some(p) => p,
            None => {
                inner.push(key_col);
                inner.len() - 1
            }
        };
        let outputs = wanted
            .iter()
            .map(|i| match inner.iter().position(|j| j == i) {
                Some(p) => Out::Column(p),
                None => Out::Profile(key_at),
            })
            .collect();
        let input = self.events.scan(state, Some(&inner), &own, limit).await?;
        Ok(Arc::new(AttachProfileExec::new(
            input,
            self.index(state).await?,
            outputs,
            Arc::new(self.schema.project(&wanted)?),
        )))
    }
}

/// One output column of [`AttachProfileExec`].
#[derive(Debug, Clone, Copy)]
enum Out {
    /// The input's column at this position.
    Column(usize),
    /// The profile of the identity key at this input position.
    Profile(usize),
}

/// Adds `profile_idx` to each batch of its input by [`KeyIndex`] lookups.
#[derive(Debug)]
struct AttachProfileExec {
    input: Arc<dyn ExecutionPlan>,
    index: Arc<KeyIndex>,
    outputs: Vec<Out>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl AttachProfileExec {
    fn new(
        input: Arc<dyn ExecutionPlan>,
        index: Arc<KeyIndex>,
        outputs: Vec<Out>,
        schema: SchemaRef,
    ) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(input.output_partitioning().partition_count()),
            input.pipeline_behavior(),
            input.boundedness(),
        ));
        AttachProfileExec {
            input,
            index,
            outputs,
            schema,
            properties,
        }
    }
}

fn attach(
    batch: &RecordBatch,
    index: &KeyIndex,
    outputs: &[Out],
    schema: &SchemaRef,
) -> DfResult<RecordBatch> {
    let columns = outputs
        .iter()
        .map(|o| match *o {
            Out::Column(i) => Ok(Arc::clone(batch.column(i))),
            Out::Profile(k) => {
                let keys = batch
                    .column(k)
                    .as_primitive_opt::<Int64Type>()
                    .ok_or_else(|| {
                        DataFusionError::Internal("events: identity_key is not Int64".into())
                    })?;
                Ok(Arc::new(index.attach(keys)) as _)
            }
        })
        .collect::<DfResult<Vec<_>>>()?;
    let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    Ok(RecordBatch::try_new_with_options(
        Arc::clone(schema),
        columns,
        &options,
    )?)
}

impl DisplayAs for AttachProfileExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "AttachProfileExec: {} identity keys", self.index.len())
    }
}

impl ExecutionPlan for AttachProfileExec {
    fn name(&self) -> &str {
        "AttachProfileExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    /// Filters on the events' columns go on down to the scan (where they prune pages);
    /// those on `profile_idx` stay here.
    fn gather_filters_for_pushdown(
        &self,
        _phase: FilterPushdownPhase,
        parent_filters: Vec<Arc<dyn PhysicalExpr>>,
        _config: &ConfigOptions,
    ) -> DfResult<FilterDescription> {
        Ok(
            FilterDescription::new().with_child(ChildFilterDescription::from_child(
                &parent_filters,
                &self.input,
            )?),
        )
    }

    fn handle_child_pushdown_result(
        &self,
        _phase: FilterPushdownPhase,
        child_pushdown_result: ChildPushdownResult,
        _config: &ConfigOptions,
    ) -> DfResult<FilterPushdownPropagation<Arc<dyn ExecutionPlan>>> {
        Ok(FilterPushdownPropagation::if_all(child_pushdown_result))
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal(
                "AttachProfileExec has one input".into(),
            ));
        }
        Ok(Arc::new(AttachProfileExec::new(
            children.swap_remove(0),
            Arc::clone(&self.index),
            self.outputs.clone(),
            Arc::clone(&self.schema),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let (index, outputs, schema) = (
            Arc::clone(&self.index),
            self.outputs.clone(),
            Arc::clone(&self.schema),
        );
        let stream = input.map(move |b| attach(&b?, &index, &outputs, &schema));
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            stream,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_agree_with_a_map() {
        // keys spread over the whole range (as hashes are), plus clustered and extreme ones
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut pairs: Vec<(i64, i64)> = (0..50_000)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x as i64, i)
            })
            .collect();
        pairs.extend((0..100).map(|i| (i, 1_000_000 + i)));
        pairs.extend([(i64::MIN, -1), (i64::MAX, -2), (-1, -3)]);
        let map: std::collections::HashMap<i64, i64> = pairs.iter().copied().collect();
        // unsorted input, one key listed twice
        pairs.push(pairs[7]);
        let index = KeyIndex::new(pairs.clone());
        assert_eq!(index.len(), map.len());
        for (k, p) in &map {
            assert_eq!(index.get(*k), Some(*p), "key {k}");
        }
        for probe in [2i64, 100, 101, -2, i64::MIN + 1, i64::MAX - 1, 12345678901] {
            assert_eq!(index.get(probe), map.get(&probe).copied(), "probe {probe}");
        }
        let keys = Int64Array::from(vec![Some(pairs[3].0), None, Some(424242424242), Some(-1)]);
        let got = index.attach(&keys);
        assert_eq!(
            got.iter().collect::<Vec<_>>(),
            vec![Some(pairs[3].1), None, None, Some(-3)]
        );
        // the same index from columns, sorted (built as they are) or not
        let mut sorted: Vec<(i64, i64)> = map.iter().map(|(k, p)| (*k, *p)).collect();
        sorted.sort();
        let (ks, ps): (Vec<i64>, Vec<i64>) = sorted.iter().copied().unzip();
        let from_sorted = KeyIndex::from_columns(ks.clone(), ps.clone());
        let (rk, rp) = (
            ks.iter().rev().copied().collect(),
            ps.iter().rev().copied().collect(),
        );
        let from_reversed = KeyIndex::from_columns(rk, rp);
        for (k, p) in &sorted {
            assert_eq!(from_sorted.get(*k), Some(*p));
            assert_eq!(from_reversed.get(*k), Some(*p));
        }
        assert_eq!(from_sorted.get(424_242_424_242), None);
        // an empty state finds nothing
        assert_eq!(KeyIndex::new(vec![]).get(0), None);
    }
}
