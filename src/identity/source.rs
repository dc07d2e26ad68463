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
    hash: u64,
    values: Box<[Option<Box<str>>]>,
    timestamp: i64,
    message_id: Box<str>,
}

/// Exact set of distinct id lists with their first (timestamp, messageId).
#[derive(Default)]
struct Firsts {
    table: hashbrown::HashTable<u32>,
    rows: Vec<First>,
    buf: Vec<u8>,
}

impl Firsts {
    fn hash_row(&mut self, arrays: &[&StringArray], r: usize) -> u64 {
        self.buf.clear();
        for a in arrays {
            if a.is_valid(r) {
                self.buf.push(1);
                self.buf.extend_from_slice(a.value(r).as_bytes());
                self.buf.push(0xff); // never inside UTF-8
            } else {
                self.buf.push(0);
            }
        }
        xxhash_rust::xxh3::xxh3_64(&self.buf)
    }

    fn add_batch(&mut self, b: &RecordBatch, cols: &IdColumns) -> Result<()> {
        let arrays = cols.arrays(b)?;
        let (mid, ts) = (s(b, "message_id")?, tss(b, "timestamp")?);
        let same_as_previous = |r: usize| {
            r > 0
                && arrays.iter().all(|a| {
                    a.is_valid(r) == a.is_valid(r - 1)
                        && (!a.is_valid(r) || a.value(r) == a.value(r - 1))
                })
        };
        let mut current = usize::MAX;
        for r in 0..b.num_rows() {
            if current == usize::MAX || !same_as_previous(r) {
                let hash = self.hash_row(&arrays, r);
                let rows = &self.rows;
                let found = self.table.find(hash, |&i| {
                    let f = &rows[i as usize];
                    f.hash == hash
                        && f.values.iter().zip(&arrays).all(|(v, a)| match v {
                            Some(v) => a.is_valid(r) && a.value(r) == &**v,
                            None => a.is_null(r),
                        })
                });
                current = match found {
                    Some(&i) => i as usize,
                    None => {
                        let i = self.rows.len();
                        let idx = u32::try_from(i).map_err(|_| {
                            Error::Usage("more than 4 billion distinct id lists".into())
                        })?;
                        self.rows.push(First {
                            hash,
                            values: arrays
                                .iter()
                                .map(|a| a.is_valid(r).then(|| a.value(r).into()))
                                .collect(),
                            timestamp: ts.value(r),
                            message_id: mid.value(r).into(),
                        });
                        let rows = &self.rows;
                        self.table
                            .insert_unique(hash, idx, |&j| rows[j as usize].hash);
                        current = i;
                        continue;
                    }
                };
            }
            let f = &mut self.rows[current];
            let (t, m) = (ts.value(r), mid.value(r));
            if (t, m) < (f.timestamp, &*f.message_id) {
                f.timestamp = t;
                f.message_id = m.into();
            }
        }
        Ok(())
    }

    /// The firsts in (timestamp, messageId) order.
    fn sorted(mut self) -> Vec<First> {
        self.rows.sort_unstable_by(|a, b| {
            (a.timestamp, &a.message_id).cmp(&(b.timestamp, &b.message_id))
        });
        self.rows
    }
}

fn first_event(cols: &IdColumns, f: &First) -> IdentityEvent {
    let mut e = IdentityEvent {
        message_id: f.message_id.to_string(),
        timestamp: f.timestamp,
        ..Default::default()
    };
    cols.push_ids(&mut e, |i| f.values[i].as_deref());
    e
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
    let cols = IdColumns::new(&datafusion::catalog::TableProvider::schema(&table), rules);
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
    let (tx, mut sorted_calls) = tokio::sync::mpsc::channel(2);
    let feeder = tokio::spawn(async move {
        let mut calls = calls;
        while let Some(b) = calls.next().await {
            if tx.send(b).await.is_err() {
                break;
            }
        }
    });

    // Firsts of the plain calls' id lists.
    let started = std::time::Instant::now();
    let mut firsts = Firsts::default();
    let mut select = vec![col("message_id"), col("timestamp")];
    select.extend(id_cols());
    let mut stream = ctx
        .table("ev")
        .await?
        .filter(plain())?
        .select(select)?
        .execute_stream()
        .await?;
    while let Some(b) = stream.next().await {
        firsts.add_batch(&b?, &cols)?;
    }
    let firsts = firsts.sorted();
    tracing::debug!(
        firsts = firsts.len(),
        ms = started.elapsed().as_millis() as u64,
        "first occurrences of plain calls' id lists found"
    );

    // Merge the firsts into the calls' order.
    let mut pending = firsts.iter().peekable();
    let mut n = 0u64;
    while let Some(b) = sorted_calls.recv().await {
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
                on_event(&first_event(&cols, f));
                n += 1;
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
                        for t in &rules.custom_id_types {
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
            on_event(&e);
            n += 1;
        }
    }
    feeder
        .await
        .map_err(|e| Error::Usage(format!("identity events reader failed: {e}")))?;
    for f in pending {
        on_event(&first_event(&cols, f));
        n += 1;
    }
    Ok(n)
}
