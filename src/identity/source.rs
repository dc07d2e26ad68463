//! Reading the events identity resolution needs, in (timestamp, messageId) order.
//!
//! identify/group/alias calls carry traits, accounts and aliases: every one is resolved, in the
//! order DataFusion sorts them (spilling beyond [`IDENTITY_SORT_MEMORY`]). Other calls only carry
//! ids, and a repeat of an id list can no longer change the graph (ids never leave a profile,
//! profiles only grow, so limits only tighten): only the first occurrence of each distinct id
//! list, by (timestamp, messageId), is resolved. Those firsts are found in one pass over the
//! scan with an exact hash table of id lists (rows of a file are sorted by identity, so most
//! rows repeat the previous row's list and skip the table), then merged into the calls' order.

use std::sync::Arc;

use arrow::array::{Array, RecordBatch, StringArray};
use datafusion::prelude::{SessionConfig, SessionContext, col, ident, lit};
use futures::StreamExt;
use serde_json::Value;
use std::ops::Not;

use super::graph::IdentityEvent;
use super::persist::{s, tss};
use super::rules::IdentityRules;
use crate::error::{Error, Result};
use crate::store::Store;
use crate::store::log::FileAdd;
use crate::tables::CommittedTable;

/// Memory for sorting events during identity resolution (beyond it, the sort spills to disk).
pub const IDENTITY_SORT_MEMORY: usize = 2 << 30;

const USER_ID: &str = "user_id";
const ANONYMOUS_ID: &str = "anonymous_id";
const CONTEXT_EMAIL: &str = "context.traits.email:str";
const EXTERNAL_IDS: &str = "context.externalIds:json";

/// The id-bearing columns, in the order their ids are pushed: `user_id`, `anonymous_id`, then the
/// optional columns present in the files (context email, custom id types, `externalIds`).
struct IdColumns {
    names: Vec<String>,
    /// For `context.traits.<t>:str` columns, the custom id type `t`.
    custom: Vec<Option<String>>,
}

impl IdColumns {
    fn new(schema: &arrow::datatypes::Schema, rules: &IdentityRules) -> Self {
        let mut names = vec![USER_ID.to_string(), ANONYMOUS_ID.to_string()];
        let mut custom = vec![None, None];
        let mut optional = vec![(CONTEXT_EMAIL.to_string(), None)];
        for t in &rules.custom_id_types {
            optional.push((format!("context.traits.{t}:str"), Some(t.clone())));
        }
        optional.push((EXTERNAL_IDS.to_string(), None));
        for (n, t) in optional {
            if schema.field_with_name(&n).is_ok() {
                names.push(n);
                custom.push(t);
            }
        }
        Self { names, custom }
    }

    fn arrays<'a>(&self, b: &'a RecordBatch) -> Result<Vec<&'a StringArray>> {
        self.names.iter().map(|n| s(b, n)).collect()
    }

    /// Push the ids of one row, given the value of each id column.
    fn push_ids<'v>(&self, e: &mut IdentityEvent, value: impl Fn(usize) -> Option<&'v str>) {
        for (i, name) in self.names.iter().enumerate() {
            let Some(v) = value(i) else { continue };
            match (name.as_str(), &self.custom[i]) {
                (USER_ID, _) => e.ids.push((USER_ID.into(), v.into())),
                (ANONYMOUS_ID, _) => e.ids.push((ANONYMOUS_ID.into(), v.into())),
                (CONTEXT_EMAIL, _) => e.ids.push(("email".into(), v.trim().into())),
                (EXTERNAL_IDS, _) => {
                    if let Ok(Value::Array(items)) = serde_json::from_str::<Value>(v) {
                        for it in items {
                            let coll = it
                                .get("collection")
                                .and_then(Value::as_str)
                                .unwrap_or("users");
                            if let (Some(id), Some(t), "users") = (
                                it.get("id").and_then(Value::as_str),
                                it.get("type").and_then(Value::as_str),
                                coll,
                            ) {
                                e.ids.push((t.to_string(), id.trim().to_string()));
                            }
                        }
                    }
                }
                (_, Some(t)) => e.ids.push((t.clone(), v.trim().into())),
                _ => {}
            }
        }
    }
}

/// The first occurrence of one distinct id list among plain (track/page/screen) calls.
struct First {
    /// Where the list's encoding (see [`Firsts::encode`]) sits in the arena.
    start: usize,
    len: usize,
    /// Filled by [`Firsts::sorted`] (while collecting, the arena holds it).
    timestamp: i64,
    message_id: Box<str>,
}

/// A hash-table entry: enough to compare a list without touching [`Firsts::rows`].
#[derive(Clone, Copy)]
struct Slot {
    hash: u64,
    /// Arena offset of the record: the first timestamp (8 bytes), then the encoded list.
    start: usize,
    len: u32,
    /// Index into [`Firsts::rows`]; [`EMPTY`] for a free slot.
    row: u32,
}

/// The `row` of a free slot.
const EMPTY: u32 = u32::MAX;

const FREE: Slot = Slot {
    hash: 0,
    start: 0,
    len: 0,
    row: EMPTY,
};

/// One run of rows with the same id list: its encoding (a range of a buffer), hash and
/// earliest (timestamp, messageId).
struct Run<'a> {
    key: std::ops::Range<usize>,
    hash: u64,
    timestamp: i64,
    message_id: &'a str,
}

/// Exact set of distinct id lists with their first (timestamp, messageId). Each list is kept
/// in one arena record with its first timestamp, and the table (open addressing, linear
/// probing) holds the hash, place and length, so finding a list costs one table read and one
/// arena read (a later timestamp, the common case, needs nothing else). The table is far
/// larger than the caches: lookups go by batches, each one's table slot and arena record
/// prefetched a few lookups ahead, so the memory latencies overlap.
struct Firsts {
    slots: Vec<Slot>,
    used: usize,
    rows: Vec<First>,
    arena: Vec<u8>,
    buf: Vec<u8>,
}

impl Default for Firsts {
    fn default() -> Self {
        Self {
            slots: vec![FREE; 1 << 16],
            used: 0,
            rows: Vec::new(),
            arena: Vec::new(),
            buf: Vec::new(),
        }
    }
}

/// Marks a null id in an encoded list.
const NULL_ID: u8 = 0;
/// Starts a present id in an encoded list.
const SOME_ID: u8 = 1;
/// Ends a present id (never inside UTF-8).
const END_ID: u8 = 0xff;
/// Bytes of the timestamp at the start of an arena record.
const TS: usize = 8;
/// How many lookups ahead a table slot is prefetched (its arena record: half as many).
const AHEAD: usize = 16;

/// Ask the CPU to start loading the cache line at `p` (a hint only: no access happens).
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and does not dereference in the language's sense; any
    // address is allowed.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The first timestamp of the arena record at `start`.
fn ts_at(arena: &[u8], start: usize) -> i64 {
    let mut b = [0u8; TS];
    b.copy_from_slice(&arena[start..start + TS]);
    i64::from_le_bytes(b)
}

impl Firsts {
    /// Append row `r`'s id list, encoded, to `buf`.
    fn encode(buf: &mut Vec<u8>, arrays: &[&StringArray], r: usize) {
        for a in arrays {
            if a.is_valid(r) {
                buf.push(SOME_ID);
                buf.extend_from_slice(a.value(r).as_bytes());
                buf.push(END_ID);
            } else {
                buf.push(NULL_ID);
            }
        }
    }

    fn first_ts(&self, start: usize) -> i64 {
        ts_at(&self.arena, start)
    }

    fn home(&self, hash: u64) -> usize {
        hash as usize & (self.slots.len() - 1)
    }

    /// Record every run (`keys` holds their encodings), prefetching ahead.
    fn upsert_runs(&mut self, keys: &[u8], runs: &[Run]) -> Result<()> {
        for (j, run) in runs.iter().enumerate() {
            if let Some(r) = runs.get(j + AHEAD) {
                prefetch(&self.slots[self.home(r.hash)]);
            }
            if let Some(r) = runs.get(j + AHEAD / 2) {
                let s = self.slots[self.home(r.hash)];
                if s.row != EMPTY {
                    prefetch(self.arena.as_ptr().wrapping_add(s.start));
                }
            }
            self.upsert(
                &keys[run.key.clone()],
                run.hash,
                run.timestamp,
                run.message_id,
            )?;
        }
        Ok(())
    }

    /// Record the list `key` (hashed `hash`) as first seen at `(timestamp, message_id)`
    /// unless it is already known from an earlier time.
    fn upsert(&mut self, key: &[u8], hash: u64, timestamp: i64, message_id: &str) -> Result<()> {
        if (self.used + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(hash);
        loop {
            let s = self.slots[i];
            if s.row == EMPTY {
                break;
            }
            if s.hash == hash
                && s.len as usize == key.len()
                && &self.arena[s.start + TS..s.start + TS + key.len()] == key
            {
                self.earlier(s, timestamp, message_id);
                return Ok(());
            }
            i = (i + 1) & mask;
        }
        let too_many = || Error::Usage("more than 4 billion distinct id lists".into());
        let slot = Slot {
            hash,
            start: self.arena.len(),
            len: u32::try_from(key.len()).map_err(|_| too_many())?,
            row: u32::try_from(self.rows.len())
                .ok()
                .filter(|r| *r != EMPTY)
                .ok_or_else(too_many)?,
        };
        self.rows.push(First {
            start: slot.start + TS,
            len: key.len(),
            timestamp,
            message_id: message_id.into(),
        });
        self.arena.extend_from_slice(&timestamp.to_le_bytes());
        self.arena.extend_from_slice(key);
        self.slots[i] = slot;
        self.used += 1;
        Ok(())
    }

    /// Double the table.
    fn grow(&mut self) {
        let doubled = vec![FREE; self.slots.len() * 2];
        let old = std::mem::replace(&mut self.slots, doubled);
        let mask = self.slots.len() - 1;
        for s in old.into_iter().filter(|s| s.row != EMPTY) {
            let mut i = self.home(s.hash);
            while self.slots[i].row != EMPTY {
                i = (i + 1) & mask;
            }
            self.slots[i] = s;
        }
    }

    /// Keep `(timestamp, message_id)` as the slot's first occurrence when it is earlier.
    fn earlier(&mut self, slot: Slot, timestamp: i64, message_id: &str) {
        let first = self.first_ts(slot.start);
        if timestamp > first {
            return;
        }
        let f = &mut self.rows[slot.row as usize];
        if timestamp < first || message_id < &*f.message_id {
            self.arena[slot.start..slot.start + TS].copy_from_slice(&timestamp.to_le_bytes());
            f.message_id = message_id.into();
        }
    }

    fn add_batch(&mut self, b: &RecordBatch, cols: &IdColumns) -> Result<()> {
        let arrays = cols.arrays(b)?;
        let (mid, ts) = (s(b, "message_id")?, tss(b, "timestamp")?);
        let key = b
            .column_by_name("identity_key")
            .and_then(|c| c.as_any().downcast_ref::<arrow::array::Int64Array>())
            .ok_or_else(|| Error::Usage("events without an identity_key column".into()))?;
        // Rows of a file are sorted by identity key, so most rows repeat the previous row's
        // list; a different key (the hash of the list's user or anonymous id) means a
        // different list without comparing strings.
        let same_as_previous = |r: usize| {
            r > 0
                && key.value(r) == key.value(r - 1)
                && arrays.iter().all(|a| {
                    a.is_valid(r) == a.is_valid(r - 1)
                        && (!a.is_valid(r) || a.value(r) == a.value(r - 1))
                })
        };
        let mut keys = std::mem::take(&mut self.buf);
        keys.clear();
        let mut runs: Vec<Run> = Vec::new();
        for r in 0..b.num_rows() {
            let (t, m) = (ts.value(r), mid.value(r));
            match runs.last_mut() {
                Some(run) if same_as_previous(r) => {
                    if (t, m) < (run.timestamp, run.message_id) {
                        (run.timestamp, run.message_id) = (t, m);
                    }
                }
                _ => {
                    let start = keys.len();
                    Self::encode(&mut keys, &arrays, r);
                    runs.push(Run {
                        hash: xxhash_rust::xxh3::xxh3_64(&keys[start..]),
                        key: start..keys.len(),
                        timestamp: t,
                        message_id: m,
                    });
                }
            }
        }
        let done = self.upsert_runs(&keys, &runs);
        self.buf = keys;
        done
    }

    /// Fold the lists of `other` (built from other files) into these.
    fn absorb(&mut self, other: Firsts) -> Result<()> {
        let runs: Vec<Run> = other
            .slots
            .iter()
            .filter(|s| s.row != EMPTY)
            .map(|s| Run {
                key: s.start + TS..s.start + TS + s.len as usize,
                hash: s.hash,
                timestamp: other.first_ts(s.start),
                message_id: &other.rows[s.row as usize].message_id,
            })
            .collect();
        self.upsert_runs(&other.arena, &runs)
    }

    /// The firsts in (timestamp, messageId) order, with the arena their lists are in.
    fn sorted(mut self) -> (Vec<First>, Vec<u8>) {
        for f in &mut self.rows {
            f.timestamp = ts_at(&self.arena, f.start - TS);
        }
        self.rows.sort_unstable_by(|a, b| {
            (a.timestamp, &a.message_id).cmp(&(b.timestamp, &b.message_id))
        });
        (self.rows, self.arena)
    }
}

/// The event of a first occurrence: its ids decoded from the arena.
fn first_event(cols: &IdColumns, f: &First, arena: &[u8]) -> Result<IdentityEvent> {
    let mut values: Vec<Option<&str>> = Vec::with_capacity(cols.names.len());
    let mut rest = &arena[f.start..f.start + f.len];
    let broken = || Error::Usage("internal: a broken id-list encoding".into());
    while let Some((&tag, tail)) = rest.split_first() {
        if tag == NULL_ID {
            values.push(None);
            rest = tail;
        } else {
            let end = tail.iter().position(|&c| c == END_ID).ok_or_else(broken)?;
            values.push(Some(
                std::str::from_utf8(&tail[..end]).map_err(|_| broken())?,
            ));
            rest = &tail[end + 1..];
        }
    }
    if values.len() != cols.names.len() {
        return Err(broken());
    }
    let mut e = IdentityEvent {
        message_id: f.message_id.to_string(),
        timestamp: f.timestamp,
        distinct: true,
        ..Default::default()
    };
    cols.push_ids(&mut e, |i| values[i]);
    Ok(e)
}

/// Stream the events of `files` that can change the identity graph, in (timestamp, messageId)
/// order, to `on_chunk` in chunks; returns how many were passed.
pub async fn read_identity_events(
    store: &Store,
    files: &[FileAdd],
    rules: &IdentityRules,
    mut on_chunk: impl FnMut(&[IdentityEvent]),
) -> Result<u64> {
    if files.is_empty() {
        return Ok(0);
    }
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_limit(
            crate::tables::memory_limit()
                .map_or(IDENTITY_SORT_MEMORY, |m| m.min(IDENTITY_SORT_MEMORY)),
            1.0,
        )
        .build_arc()?;
    // Late materialization: the calls scan decodes the wide columns only for matching rows.
    let config = SessionConfig::new()
        .set_bool("datafusion.execution.parquet.pushdown_filters", true)
        .set_bool("datafusion.execution.parquet.reorder_filters", true);
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    let url =
        url::Url::parse(crate::store::DATAFUSION_URL).map_err(|e| Error::Usage(e.to_string()))?;
    ctx.register_object_store(&url, store.object_store());
    let table = CommittedTable::events(files);
    let cols = Arc::new(IdColumns::new(
        &datafusion::catalog::TableProvider::schema(&table),
        rules,
    ));
    ctx.register_table("ev", Arc::new(table))?;
    let plain = || col("type").in_list(vec![lit("track"), lit("page"), lit("screen")], false);
    let id_cols = || cols.names.iter().map(ident);

    // The calls, sorted by DataFusion in a task of their own, so the sort consumes its input
    // while the firsts are collected below.
    let mut select = vec![
        col("message_id"),
        col("type"),
        col("previous_id"),
        col("group_id"),
        col("timestamp"),
        col("traits"),
    ];
    select.extend(id_cols());
    let calls = ctx
        .table("ev")
        .await?
        .filter(plain().not())?
        .select(select)?
        .sort(vec![
            col("timestamp").sort(true, false),
            col("message_id").sort(true, false),
        ])?
        .execute_stream()
        .await?;
    let (tx, sorted_calls) = tokio::sync::mpsc::channel(2);
    let feeder = tokio::spawn(async move {
        let mut calls = calls;
        while let Some(b) = calls.next().await {
            if tx.send(b).await.is_err() {
                break;
            }
        }
    });

    // Firsts of the plain calls' id lists: one table per scan partition, on every core, then
    // folded into one.
    let started = std::time::Instant::now();
    let mut select = vec![col("message_id"), col("timestamp"), col("identity_key")];
    select.extend(id_cols());
    let plan = ctx
        .table("ev")
        .await?
        .filter(plain())?
        .select(select)?
        .create_physical_plan()
        .await?;
    let streams = datafusion::physical_plan::execute_stream_partitioned(plan, ctx.task_ctx())?;
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            let cols = cols.clone();
            tokio::spawn(async move {
                let mut firsts = Firsts::default();
                while let Some(b) = stream.next().await {
                    firsts.add_batch(&b?, &cols)?;
                }
                Ok::<_, Error>(firsts)
            })
        })
        .collect();
    let mut firsts: Option<Firsts> = None;
    for t in tasks {
        let part = t
            .await
            .map_err(|e| Error::Usage(format!("identity events reader failed: {e}")))??;
        firsts = Some(match firsts {
            None => part,
            Some(mut all) => {
                let mut part = part;
                if all.used < part.used {
                    std::mem::swap(&mut all, &mut part);
                }
                all.absorb(part)?;
                all
            }
        });
    }
    let (firsts, arena) = firsts.unwrap_or_default().sorted();
    tracing::debug!(
        firsts = firsts.len(),
        ms = started.elapsed().as_millis() as u64,
        "first occurrences of plain calls' id lists found"
    );

    // The events are built (ids copied out, traits parsed) in a task of their own while the
    // caller resolves the previous chunk.
    let (etx, mut events) = tokio::sync::mpsc::channel(4);
    let custom_id_types = rules.custom_id_types.clone();
    let producer = tokio::spawn(async move {
        let built = merge_events(
            &cols,
            &custom_id_types,
            &firsts,
            &arena,
            sorted_calls,
            &etx,
            started,
        )
        .await;
        if let Err(e) = built {
            let _ = etx.send(Err(e)).await;
        }
    });
    // Freeing a resolved chunk's strings is left to a thread of its own.
    let (spent, to_free) = std::sync::mpsc::channel::<Vec<IdentityEvent>>();
    let freer = std::thread::spawn(move || to_free.into_iter().for_each(drop));
    let mut n = 0u64;
    while let Some(chunk) = events.recv().await {
        let chunk = chunk?;
        on_chunk(&chunk);
        n += chunk.len() as u64;
        let _ = spent.send(chunk);
    }
    drop(spent);
    let _ = freer.join();
    producer
        .await
        .map_err(|e| Error::Usage(format!("identity events builder failed: {e}")))?;
    feeder
        .await
        .map_err(|e| Error::Usage(format!("identity events reader failed: {e}")))?;
    Ok(n)
}

/// Events are handed to the graph in chunks of this many.
const EVENT_CHUNK: usize = 4096;

/// Merge the firsts into the sorted calls' order, building each event, and send them in
/// chunks to `out`.
async fn merge_events(
    cols: &IdColumns,
    custom_id_types: &[String],
    firsts: &[First],
    arena: &[u8],
    mut sorted_calls: tokio::sync::mpsc::Receiver<datafusion::error::Result<RecordBatch>>,
    out: &tokio::sync::mpsc::Sender<Result<Vec<IdentityEvent>>>,
    started: std::time::Instant,
) -> Result<()> {
    let mut chunk = Vec::with_capacity(EVENT_CHUNK);
    let send = async |chunk: &mut Vec<IdentityEvent>, force: bool| -> bool {
        if chunk.is_empty() || (!force && chunk.len() < EVENT_CHUNK) {
            return true;
        }
        let full = std::mem::replace(chunk, Vec::with_capacity(EVENT_CHUNK));
        out.send(Ok(full)).await.is_ok()
    };
    let mut pending = firsts.iter().peekable();
    let mut first_batch = true;
    while let Some(b) = sorted_calls.recv().await {
        if std::mem::take(&mut first_batch) {
            tracing::debug!(
                ms = started.elapsed().as_millis() as u64,
                "first sorted identify/group/alias batch"
            );
        }
        let b = &b?;
        let arrays = cols.arrays(b)?;
        let (mid, ty, prev, gid, traits) = (
            s(b, "message_id")?,
            s(b, "type")?,
            s(b, "previous_id")?,
            s(b, "group_id")?,
            s(b, "traits")?,
        );
        let ts = tss(b, "timestamp")?;
        for r in 0..b.num_rows() {
            let key = (ts.value(r), mid.value(r));
            while let Some(f) = pending.next_if(|f| (f.timestamp, &*f.message_id) < key) {
                chunk.push(first_event(cols, f, arena)?);
                if !send(&mut chunk, false).await {
                    return Ok(());
                }
            }
            let mut e = IdentityEvent {
                message_id: mid.value(r).into(),
                timestamp: ts.value(r),
                ..Default::default()
            };
            cols.push_ids(&mut e, |i| {
                arrays[i].is_valid(r).then(|| arrays[i].value(r))
            });
            let trait_obj = match traits
                .is_valid(r)
                .then(|| serde_json::from_str(traits.value(r)))
            {
                Some(Ok(Value::Object(m))) => Some(m),
                _ => None,
            };
            match ty.value(r) {
                "identify" => {
                    if let Some(m) = &trait_obj {
                        if let Some(Value::String(em)) = m.get("email") {
                            e.ids.push(("email".into(), em.trim().into()));
                        }
                        for t in custom_id_types {
                            if let Some(Value::String(v)) = m.get(t) {
                                e.ids.push((t.clone(), v.trim().into()));
                            }
                        }
                        e.traits = m.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
                    }
                }
                "group" if gid.is_valid(r) => {
                    let t = trait_obj
                        .as_ref()
                        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.to_string())).collect())
                        .unwrap_or_default();
                    e.group = Some((gid.value(r).to_string(), t));
                }
                "alias" if prev.is_valid(r) => {
                    e.alias_previous = Some(prev.value(r).to_string());
                }
                _ => {}
            }
            chunk.push(e);
            if !send(&mut chunk, false).await {
                return Ok(());
            }
        }
    }
    for f in pending {
        chunk.push(first_event(cols, f, arena)?);
        if !send(&mut chunk, false).await {
            return Ok(());
        }
    }
    send(&mut chunk, true).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, TimestampMicrosecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use std::collections::BTreeMap;

    /// Rows: (user_id, anonymous_id, timestamp, message_id).
    type Row = (Option<String>, Option<String>, i64, String);

    fn batch(rows: &[Row]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("message_id", DataType::Utf8, false),
            Field::new(
                "timestamp",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("identity_key", DataType::Int64, false),
            Field::new("user_id", DataType::Utf8, true),
            Field::new("anonymous_id", DataType::Utf8, true),
        ]));
        let key = |r: &Row| match (&r.0, &r.1) {
            (Some(u), _) => crate::events::schema::identity_key("user_id", u),
            (None, Some(a)) => crate::events::schema::identity_key("anonymous_id", a),
            (None, None) => 0,
        };
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.3))),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.2))
                        .with_timezone("UTC"),
                ),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(key))),
                Arc::new(StringArray::from_iter(rows.iter().map(|r| r.0.as_deref()))),
                Arc::new(StringArray::from_iter(rows.iter().map(|r| r.1.as_deref()))),
            ],
        )
        .unwrap()
    }

    /// Lists drawn from a small pool (so they repeat, in and across batches, with the table
    /// growing several times), folded in two halves like two scan partitions, agree with a
    /// map of each list's minimum (timestamp, messageId).
    #[test]
    fn firsts_agree_with_a_map_of_minimums() {
        let mut seed = 7u64;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let mut rows: Vec<Row> = Vec::new();
        for i in 0..300_000 {
            let u = next(4) > 0;
            let list = next(60_000);
            rows.push((
                u.then(|| format!("u{}", list % 20_000)),
                (!u || list % 3 == 0).then(|| format!("a{list}")),
                next(1_000) as i64,
                format!("m{:06}", next(1_000_000) + i % 2),
            ));
            // runs of the same list, as sorted files have
            if next(3) == 0 {
                let last = rows.last().unwrap().clone();
                rows.push((last.0, last.1, next(1_000) as i64, format!("m{}", next(99))));
            }
        }
        let mut expected: BTreeMap<(Option<String>, Option<String>), (i64, String)> =
            BTreeMap::new();
        for r in &rows {
            let e = expected
                .entry((r.0.clone(), r.1.clone()))
                .or_insert((r.2, r.3.clone()));
            if (r.2, &r.3) < (e.0, &e.1) {
                *e = (r.2, r.3.clone());
            }
        }
        let b = batch(&rows);
        let cols = IdColumns::new(&b.schema(), &IdentityRules::default());
        let half = rows.len() / 2;
        let mut parts = Vec::new();
        for range in [0..half, half..rows.len()] {
            let mut f = Firsts::default();
            for start in range.clone().step_by(8192) {
                let len = 8192.min(range.end - start);
                f.add_batch(&b.slice(start, len), &cols).unwrap();
            }
            parts.push(f);
        }
        let second = parts.pop().unwrap();
        let mut all = parts.pop().unwrap();
        all.absorb(second).unwrap();
        let (firsts, arena) = all.sorted();
        let mut got = BTreeMap::new();
        for f in &firsts {
            let e = first_event(&cols, f, &arena).unwrap();
            let id = |t: &str| e.ids.iter().find(|i| i.0 == t).map(|i| i.1.clone());
            got.insert(
                (id("user_id"), id("anonymous_id")),
                (f.timestamp, e.message_id),
            );
        }
        assert_eq!(got.len(), expected.len());
        assert_eq!(got, expected);
        // sorted by (timestamp, messageId)
        assert!(
            firsts
                .windows(2)
                .all(|w| (w[0].timestamp, &w[0].message_id) <= (w[1].timestamp, &w[1].message_id))
        );
    }
}
