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
#[derive(Default)]
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
    row: u32,
}

/// Exact set of distinct id lists with their first (timestamp, messageId). Each list is kept
/// in one arena record with its first timestamp, and the table entry holds the hash, place
/// and length, so a probe that finds its list costs the table and one arena read (a later
/// timestamp, the common case, needs nothing else).
#[derive(Default)]
struct Firsts {
    table: hashbrown::HashTable<Slot>,
    rows: Vec<First>,
    arena: Vec<u8>,
    buf: Vec<u8>,
}

/// Marks a null id in an encoded list.
const NULL_ID: u8 = 0;
/// Starts a present id in an encoded list.
const SOME_ID: u8 = 1;
/// Ends a present id (never inside UTF-8).
const END_ID: u8 = 0xff;
/// Bytes of the timestamp at the start of an arena record.
const TS: usize = 8;

impl Firsts {
    /// Encode row `r`'s id list into `buf` and hash it.
    fn encode(&mut self, arrays: &[&StringArray], r: usize) -> u64 {
        self.buf.clear();
        for a in arrays {
            if a.is_valid(r) {
                self.buf.push(SOME_ID);
                self.buf.extend_from_slice(a.value(r).as_bytes());
                self.buf.push(END_ID);
            } else {
                self.buf.push(NULL_ID);
            }
        }
        xxhash_rust::xxh3::xxh3_64(&self.buf)
    }

    fn first_ts(&self, start: usize) -> i64 {
        let mut b = [0u8; TS];
        b.copy_from_slice(&self.arena[start..start + TS]);
        i64::from_le_bytes(b)
    }

    /// The slot of the list in `buf` (hashed `hash`), first seen at `(timestamp, message_id)`
    /// unless it is already known from an earlier time.
    fn upsert(&mut self, hash: u64, timestamp: i64, message_id: &str) -> Result<Slot> {
        let (arena, buf) = (&self.arena, &self.buf);
        let found = self.table.find(hash, |e| {
            e.hash == hash
                && e.len as usize == buf.len()
                && &arena[e.start + TS..e.start + TS + e.len as usize] == buf.as_slice()
        });
        if let Some(&slot) = found {
            self.earlier(slot, timestamp, message_id);
            return Ok(slot);
        }
        let too_many = || Error::Usage("more than 4 billion distinct id lists".into());
        let slot = Slot {
            hash,
            start: self.arena.len(),
            len: u32::try_from(self.buf.len()).map_err(|_| too_many())?,
            row: u32::try_from(self.rows.len()).map_err(|_| too_many())?,
        };
        self.rows.push(First {
            start: slot.start + TS,
            len: self.buf.len(),
            timestamp,
            message_id: message_id.into(),
        });
        self.arena.extend_from_slice(&timestamp.to_le_bytes());
        self.arena.extend_from_slice(&self.buf);
        self.table.insert_unique(hash, slot, |e| e.hash);
        Ok(slot)
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
        let mut current: Option<Slot> = None;
        for r in 0..b.num_rows() {
            match current {
                Some(slot) if same_as_previous(r) => {
                    self.earlier(slot, ts.value(r), mid.value(r));
                }
                _ => {
                    let hash = self.encode(&arrays, r);
                    current = Some(self.upsert(hash, ts.value(r), mid.value(r))?);
                }
            }
        }
        Ok(())
    }

    /// Fold the lists of `other` (built from other files) into these.
    fn absorb(&mut self, other: Firsts) -> Result<()> {
        for e in other.table.iter() {
            self.buf.clear();
            self.buf
                .extend_from_slice(&other.arena[e.start + TS..e.start + TS + e.len as usize]);
            let f = &other.rows[e.row as usize];
            self.upsert(e.hash, other.first_ts(e.start), &f.message_id)?;
        }
        Ok(())
    }

    /// The firsts in (timestamp, messageId) order, with the arena their lists are in.
    fn sorted(mut self) -> (Vec<First>, Vec<u8>) {
        for f in &mut self.rows {
            f.timestamp = {
                let mut b = [0u8; TS];
                b.copy_from_slice(&self.arena[f.start - TS..f.start]);
                i64::from_le_bytes(b)
            };
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
/// order, to `on_event`; returns how many were passed.
pub async fn read_identity_events(
    store: &Store,
    files: &[FileAdd],
    rules: &IdentityRules,
    mut on_event: impl FnMut(&IdentityEvent),
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
                if all.rows.len() < part.rows.len() {
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
    let mut n = 0u64;
    while let Some(chunk) = events.recv().await {
        for e in &chunk? {
            on_event(e);
            n += 1;
        }
    }
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
