//! Loading, updating and committing the identity state.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, TimestampMicrosecondType};

use serde_json::Value;

use super::graph::{Graph, IdInfo, Merge, Profile, ProfileIdx, TraitValue};
use super::rules::IdentityRules;
use crate::error::{Error, Result};
use crate::events::schema::{identity_key, ts_type};
use crate::events::writer::{encode_parquet, writer_properties};
use crate::store::Store;
use crate::store::keys::{self, Key, Space, TableName};
use crate::store::log::{CommitDraft, CommitLog, FileAdd, Snapshot};

/// The identity log's table name.
pub const IDENTITY: TableName = TableName::Named("identity");

/// What a resolution run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdentityReport {
    /// Events read (new since the last run, or all with `full`).
    pub events_read: u64,
    /// Canonical profiles.
    pub profiles: u64,
    /// Known canonical profiles.
    pub known: u64,
    /// Linked ids.
    pub ids: u64,
    /// Merges so far.
    pub merges: u64,
    /// Accounts with traits or links.
    pub accounts: u64,
    /// Committed identity version.
    pub version: u64,
    /// Events version processed up to.
    pub events_version: u64,
}

/// Schemas of the identity tables.
pub fn schema(kind: &str) -> SchemaRef {
    let s = |n: &str, null: bool| Field::new(n, DataType::Utf8, null);
    let i = |n: &str, null: bool| Field::new(n, DataType::Int64, null);
    let t = |n: &str, null: bool| Field::new(n, ts_type(), null);
    Arc::new(Schema::new(match kind {
        "identities" => vec![
            s("id_type", false),
            s("id_value", false),
            s("profile_id", false),
            i("profile_idx", false),
            i("identity_key", false),
            t("first_seen", false),
            s("first_message_id", false),
        ],
        "profiles" => vec![
            i("profile_idx", false),
            s("profile_id", false),
            s("merged_into", true),
            i("canonical_idx", false),
            Field::new("known", DataType::Boolean, false),
            t("created_at", false),
            s("first_message_id", false),
        ],
        "profile_merges" => vec![
            s("from_profile_id", false),
            s("into_profile_id", false),
            t("at", false),
            s("message_id", false),
        ],
        "traits" => vec![
            s("entity", false),
            s("profile_id", true),
            i("profile_idx", true),
            s("account_id", true),
            s("key", false),
            s("value", false),
            s("value_str", true),
            Field::new("value_num", DataType::Float64, true),
            Field::new("value_bool", DataType::Boolean, true),
            t("updated_at", false),
            s("message_id", false),
        ],
        "identity_keys" => vec![i("identity_key", false), i("profile_idx", false)],
        "account_links" => vec![
            s("profile_id", false),
            i("profile_idx", false),
            s("account_id", false),
            t("linked_at", false),
        ],
        _ => vec![],
    }))
}

/// Kind of the file an incremental identity commit adds with the profiles whose canonical
/// profile or known flag it changed, or that it created (profile_idx, old and new canonical).
pub const CHANGED_PROFILES: &str = "changed_profiles";

/// Every identity table kind.
pub const KINDS: [&str; 6] = [
    "identity_keys",
    "identities",
    "profiles",
    "profile_merges",
    "traits",
    "account_links",
];

/// Typed forms (string, number, boolean) of JSON texts, like shredded event properties.
pub fn typed_json<'a>(values: impl Iterator<Item = &'a str>) -> (ArrayRef, ArrayRef, ArrayRef) {
    let mut s = arrow::array::StringBuilder::new();
    let mut n = arrow::array::Float64Builder::new();
    let mut b = arrow::array::BooleanBuilder::new();
    for v in values {
        // Fast paths for the common shapes; anything else goes through the JSON parser.
        match v {
            "true" | "false" => {
                s.append_null();
                n.append_null();
                b.append_value(v == "true");
            }
            _ if v.len() >= 2
                && v.starts_with('"')
                && v.ends_with('"')
                && !v[1..v.len() - 1].contains(['\\', '"']) =>
            {
                s.append_value(&v[1..v.len() - 1]);
                n.append_null();
                b.append_null();
            }
            _ => {
                let parsed: Value = serde_json::from_str(v).unwrap_or(Value::Null);
                s.append_option(parsed.as_str());
                n.append_option(parsed.as_f64());
                b.append_option(parsed.as_bool());
            }
        }
    }
    (
        Arc::new(s.finish()),
        Arc::new(n.finish()),
        Arc::new(b.finish()),
    )
}

/// A UTC microsecond timestamp array.
pub fn ts_array(v: Vec<i64>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
}

fn batches(g: &Graph) -> Result<Vec<(&'static str, RecordBatch)>> {
    let canon = |p: ProfileIdx| g.canonical(p);
    let pid = |p: ProfileIdx| g.profiles[canon(p) as usize].id.as_str();
    // identities, in a stable order
    let ids: Vec<((&String, &String), &IdInfo)> = g
        .ids
        .iter()
        .flat_map(|(t, m)| m.iter().map(move |(v, i)| ((t, v), i)))
        .collect();
    // Stable order by identity key (cheap to sort: no string comparisons unless keys collide).
    let mut ids: Vec<(i64, (&String, &String), &IdInfo)> = ids
        .into_iter()
        .map(|(k, i)| (identity_key(k.0, k.1), k, i))
        .collect();
    ids.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let identities = RecordBatch::try_new(
        schema("identities"),
        vec![
            Arc::new(StringArray::from_iter_values(
                ids.iter().map(|(_, k, _)| k.0.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                ids.iter().map(|(_, k, _)| k.1.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                ids.iter().map(|(_, _, i)| pid(i.profile)),
            )),
            Arc::new(Int64Array::from_iter_values(
                ids.iter().map(|(_, _, i)| canon(i.profile) as i64),
            )),
            Arc::new(Int64Array::from_iter_values(
                ids.iter().map(|(key, _, _)| *key),
            )),
            ts_array(ids.iter().map(|(_, _, i)| i.first_seen).collect()),
            Arc::new(StringArray::from_iter_values(
                ids.iter().map(|(_, _, i)| i.first_message_id.as_str()),
            )),
        ],
    )?;
    let n = g.profiles.len();
    let profiles = RecordBatch::try_new(
        schema("profiles"),
        vec![
            Arc::new(Int64Array::from_iter_values(0..n as i64)),
            Arc::new(StringArray::from_iter_values(
                g.profiles.iter().map(|p| p.id.as_str()),
            )),
            Arc::new(StringArray::from_iter((0..n).map(|i| {
                let c = canon(i as ProfileIdx);
                (c as usize != i).then(|| g.profiles[c as usize].id.as_str())
            }))),
            Arc::new(Int64Array::from_iter_values(
                (0..n).map(|i| canon(i as ProfileIdx) as i64),
            )),
            Arc::new(BooleanArray::from_iter(
                (0..n).map(|i| Some(g.is_known(i as ProfileIdx))),
            )),
            ts_array(g.profiles.iter().map(|p| p.created_at).collect()),
            Arc::new(StringArray::from_iter_values(
                g.profiles.iter().map(|p| p.first_message_id.as_str()),
            )),
        ],
    )?;
    let merges = RecordBatch::try_new(
        schema("profile_merges"),
        vec![
            Arc::new(StringArray::from_iter_values(
                g.merges.iter().map(|m| m.from.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                g.merges.iter().map(|m| m.into.as_str()),
            )),
            ts_array(g.merges.iter().map(|m| m.at).collect()),
            Arc::new(StringArray::from_iter_values(
                g.merges.iter().map(|m| m.message_id.as_str()),
            )),
        ],
    )?;
    // traits: profile traits (folded to canonical profiles), then account traits
    // (is profile trait, profile, account, key, value)
    type TraitRow<'a> = (
        bool,
        Option<ProfileIdx>,
        Option<&'a str>,
        &'a str,
        &'a TraitValue,
    );
    let mut rows: Vec<TraitRow> = Vec::new();
    let mut owners: Vec<&ProfileIdx> = g.profile_traits.keys().collect();
    owners.sort();
    for p in owners {
        for (k, v) in &g.profile_traits[p] {
            rows.push((true, Some(canon(*p)), None, k, v));
        }
    }
    for (a, t) in &g.account_traits {
        for (k, v) in t {
            rows.push((false, None, Some(a.as_str()), k, v));
        }
    }
    let typed = typed_json(rows.iter().map(|r| r.4.value.as_str()));
    let traits = RecordBatch::try_new(
        schema("traits"),
        vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| if r.0 { "profile" } else { "account" }),
            )),
            Arc::new(StringArray::from_iter(rows.iter().map(|r| r.1.map(pid)))),
            Arc::new(Int64Array::from_iter(
                rows.iter().map(|r| r.1.map(|p| p as i64)),
            )),
            Arc::new(StringArray::from_iter(rows.iter().map(|r| r.2))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.3))),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.4.value.as_str()),
            )),
            typed.0,
            typed.1,
            typed.2,
            ts_array(rows.iter().map(|r| r.4.updated_at).collect()),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.4.message_id.as_str()),
            )),
        ],
    )?;
    let mut links: Vec<(ProfileIdx, &str, i64)> = Vec::new();
    let mut owners: Vec<&ProfileIdx> = g.account_links.keys().collect();
    owners.sort();
    for p in owners {
        for (a, t) in &g.account_links[p] {
            links.push((canon(*p), a, *t));
        }
    }
    let account_links = RecordBatch::try_new(
        schema("account_links"),
        vec![
            Arc::new(StringArray::from_iter_values(
                links.iter().map(|l| pid(l.0)),
            )),
            Arc::new(Int64Array::from_iter_values(
                links.iter().map(|l| l.0 as i64),
            )),
            Arc::new(StringArray::from_iter_values(links.iter().map(|l| l.1))),
            ts_array(links.iter().map(|l| l.2).collect()),
        ],
    )?;
    // identity key → canonical profile of the ids events are keyed by, sorted by key: what
    // every plan joins events with (two integer columns, no strings to decode)
    let keyed: Vec<&(i64, (&String, &String), &IdInfo)> = ids
        .iter()
        .filter(|(_, k, _)| k.0 == "user_id" || k.0 == "anonymous_id")
        .collect();
    let identity_keys = RecordBatch::try_new(
        schema("identity_keys"),
        vec![
            Arc::new(Int64Array::from_iter_values(keyed.iter().map(|x| x.0))),
            Arc::new(Int64Array::from_iter_values(
                keyed.iter().map(|x| canon(x.2.profile) as i64),
            )),
        ],
    )?;
    Ok(vec![
        ("identity_keys", identity_keys),
        ("identities", identities),
        ("profiles", profiles),
        ("profile_merges", merges),
        ("traits", traits),
        ("account_links", account_links),
    ])
}

pub(crate) async fn read_kind(
    store: &Store,
    snap: &Snapshot,
    kind: &str,
) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::new();
    for f in snap
        .files
        .iter()
        .filter(|f| f.kind.as_deref() == Some(kind))
    {
        let bytes = store.get(&Key::from_committed(&f.path)).await?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?
            .build()?;
        for b in reader {
            out.push(b?);
        }
    }
    Ok(out)
}

/// The string column `n` of `b` (identity tables and identity scans of events).
pub(super) fn s<'a>(b: &'a RecordBatch, n: &str) -> Result<&'a StringArray> {
    b.column_by_name(n)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or_else(|| Error::Usage(format!("identity input lacks string column {n}")))
}
fn i64s<'a>(b: &'a RecordBatch, n: &str) -> Result<&'a Int64Array> {
    b.column_by_name(n)
        .and_then(|c| c.as_primitive_opt::<Int64Type>())
        .ok_or_else(|| Error::Usage(format!("identity table lacks column {n}")))
}
/// The timestamp column `n` of `b`.
pub(super) fn tss<'a>(b: &'a RecordBatch, n: &str) -> Result<&'a TimestampMicrosecondArray> {
    b.column_by_name(n)
        .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
        .ok_or_else(|| Error::Usage(format!("identity input lacks timestamp column {n}")))
}

/// Load the committed identity state.
pub async fn load(store: &Store, snap: &Snapshot) -> Result<Graph> {
    let mut g = Graph::default();
    for b in read_kind(store, snap, "profiles").await? {
        let (id, canon, created, first) = (
            s(&b, "profile_id")?,
            i64s(&b, "canonical_idx")?,
            tss(&b, "created_at")?,
            s(&b, "first_message_id")?,
        );
        for r in 0..b.num_rows() {
            g.profiles.push(Profile {
                id: id.value(r).to_string(),
                parent: canon.value(r) as ProfileIdx,
                created_at: created.value(r),
                first_message_id: first.value(r).to_string(),
                id_counts: Vec::new(),
            });
        }
    }
    let n = g.profiles.len();
    if let Some(bad) = g.profiles.iter().find(|p| p.parent as usize >= n) {
        return Err(Error::Usage(format!(
            "identity state corrupt: profile {} points at missing profile {}",
            bad.id, bad.parent
        )));
    }
    let mut ids: Vec<(String, String, ProfileIdx, i64, String)> = Vec::new();
    for b in read_kind(store, snap, "identities").await? {
        let (t, v, p, fs, fm) = (
            s(&b, "id_type")?,
            s(&b, "id_value")?,
            i64s(&b, "profile_idx")?,
            tss(&b, "first_seen")?,
            s(&b, "first_message_id")?,
        );
        for r in 0..b.num_rows() {
            ids.push((
                t.value(r).into(),
                v.value(r).into(),
                p.value(r) as ProfileIdx,
                fs.value(r),
                fm.value(r).into(),
            ));
        }
    }
    for (t, v, p, fs, fm) in ids {
        if g.profiles.get(p as usize).is_none() {
            return Err(Error::Usage(format!(
                "identity state corrupt: id {t}:{v} points at missing profile {p}"
            )));
        };
        g.count_id(p, &t);
        g.ids.entry(t).or_default().insert(
            v,
            IdInfo {
                profile: p,
                first_seen: fs,
                first_message_id: fm,
            },
        );
    }
    for b in read_kind(store, snap, "profile_merges").await? {
        let (f, i, at, m) = (
            s(&b, "from_profile_id")?,
            s(&b, "into_profile_id")?,
            tss(&b, "at")?,
            s(&b, "message_id")?,
        );
        for r in 0..b.num_rows() {
            g.merges.push(Merge {
                from: f.value(r).into(),
                into: i.value(r).into(),
                at: at.value(r),
                message_id: m.value(r).into(),
            });
        }
    }
    for b in read_kind(store, snap, "traits").await? {
        let (e, pidx, acc, k, v, at, m) = (
            s(&b, "entity")?,
            i64s(&b, "profile_idx")?,
            s(&b, "account_id")?,
            s(&b, "key")?,
            s(&b, "value")?,
            tss(&b, "updated_at")?,
            s(&b, "message_id")?,
        );
        for r in 0..b.num_rows() {
            let tv = TraitValue {
                value: v.value(r).into(),
                updated_at: at.value(r),
                message_id: m.value(r).into(),
            };
            if e.value(r) == "profile" && pidx.is_valid(r) {
                if pidx.value(r) as usize >= n {
                    return Err(Error::Usage(format!(
                        "identity state corrupt: a trait points at missing profile {}",
                        pidx.value(r)
                    )));
                }
                g.profile_traits
                    .entry(pidx.value(r) as ProfileIdx)
                    .or_default()
                    .insert(k.value(r).into(), tv);
            } else if acc.is_valid(r) {
                g.account_traits
                    .entry(acc.value(r).into())
                    .or_default()
                    .insert(k.value(r).into(), tv);
            }
        }
    }
    for b in read_kind(store, snap, "account_links").await? {
        let (p, a, at) = (
            i64s(&b, "profile_idx")?,
            s(&b, "account_id")?,
            tss(&b, "linked_at")?,
        );
        for r in 0..b.num_rows() {
            if p.value(r) as usize >= n {
                return Err(Error::Usage(format!(
                    "identity state corrupt: an account link points at missing profile {}",
                    p.value(r)
                )));
            }
            g.account_links
                .entry(p.value(r) as ProfileIdx)
                .or_default()
                .insert(a.value(r).into(), at.value(r));
        }
    }
    Ok(g)
}

/// Resolve identities for the events committed since the last run (or all, with `full`), and
/// commit the new state.
pub async fn resolve(
    store: &Store,
    space: &Space,
    rules: &IdentityRules,
    full: bool,
) -> Result<IdentityReport> {
    resolve_cached(store, space, rules, full, None).await
}

/// An identity graph kept in memory between runs of one process (the serve loop), with the
/// identity version it was committed as.
pub type GraphCache = std::sync::Arc<tokio::sync::Mutex<Option<(u64, Graph)>>>;

/// [`resolve`], starting from the cached graph when it is the committed version (no reload),
/// and leaving the new graph in the cache.
pub async fn resolve_cached(
    store: &Store,
    space: &Space,
    rules: &IdentityRules,
    full: bool,
    cache: Option<&GraphCache>,
) -> Result<IdentityReport> {
    let log = CommitLog::new(store, space, IDENTITY);
    let snap = log.snapshot().await?;
    let watermark = if full { 0 } else { last_events_version(&snap) };
    let events = CommitLog::new(store, space, TableName::Events)
        .snapshot()
        .await?;
    let fresh = events
        .entries
        .iter()
        .any(|e| e.version > watermark && e.operation != "compact");
    if !full && snap.version > 0 && !fresh {
        // Nothing new: the committed state is current.
        if let Some(r) = snap
            .entries
            .last()
            .and_then(|e| e.info.get("report"))
            .and_then(|r| serde_json::from_value::<IdentityReport>(r.clone()).ok())
        {
            compact_read_files(store, space, watermark).await?;
            return Ok(IdentityReport {
                events_read: 0,
                ..r
            });
        }
    }
    let cached = match cache {
        Some(c) => c.lock().await.take(),
        None => None,
    };
    let mut graph = if full || snap.version == 0 {
        Graph::default()
    } else {
        match cached {
            Some((v, g)) if v == snap.version => g,
            _ => load(store, &snap).await?,
        }
    };
    // Canonical profile and known flag of every profile before: what changed is recorded with
    // the commit, so a refresh knows which profiles identity moved without diffing tables.
    let before: Vec<(ProfileIdx, bool)> = (0..graph.profiles.len() as ProfileIdx)
        .map(|p| (graph.canonical(p), graph.is_known(p)))
        .collect();
    let new_files: Vec<FileAdd> = if watermark == 0 {
        events.files.clone()
    } else {
        events
            .entries
            .iter()
            // a compaction rewrites committed events and adds none
            .filter(|e| e.version > watermark && e.operation != "compact")
            .flat_map(|e| e.adds.iter().cloned())
            .collect()
    };
    let started = std::time::Instant::now();
    let resolved = super::source::read_identity_events(store, &new_files, rules, |e| {
        graph.process(rules, e);
    })
    .await?;
    tracing::debug!(
        files = new_files.len(),
        resolved,
        ms = started.elapsed().as_millis() as u64,
        "identity events read and resolved"
    );
    let started = std::time::Instant::now();
    let events_read: u64 = new_files.iter().map(|f| f.rows).sum();
    let mut adds = Vec::new();
    let mut tables = batches(&graph)?;
    if !full && snap.version > 0 {
        let mut changed = std::collections::BTreeSet::new();
        for p in 0..graph.profiles.len() as ProfileIdx {
            let now = (graph.canonical(p), graph.is_known(p));
            match before.get(p as usize) {
                Some(b) if *b == now => {}
                Some(b) => {
                    changed.extend([p, b.0, now.0]);
                }
                None => {
                    changed.extend([p, now.0]);
                }
            }
        }
        tables.push((
            CHANGED_PROFILES,
            RecordBatch::try_new(
                Arc::new(Schema::new(vec![Field::new(
                    "profile_idx",
                    DataType::Int64,
                    false,
                )])),
                vec![Arc::new(Int64Array::from_iter_values(
                    changed.into_iter().map(i64::from),
                ))],
            )?,
        ));
    }
    // Encode the tables in parallel (they are independent).
    let encoded: Vec<(&str, RecordBatch, bytes::Bytes)> = {
        use rayon::prelude::*;
        tables
            .into_par_iter()
            .map(|(kind, batch)| {
                let bytes = encode_parquet(&batch, writer_properties(None))?;
                Ok((kind, batch, bytes))
            })
            .collect::<Result<_>>()?
    };
    for (kind, batch, bytes) in encoded {
        let key = keys::data_file(space, IDENTITY, None, "parquet");
        let size = bytes.len() as u64;
        store.put(&key, bytes).await?;
        adds.push(FileAdd {
            path: key.to_string(),
            size,
            rows: batch.num_rows() as u64,
            kind: Some(kind.to_string()),
            ..Default::default()
        });
    }
    tracing::debug!(
        write_ms = started.elapsed().as_millis() as u64,
        "identity tables written"
    );
    let canonical: Vec<ProfileIdx> = (0..graph.profiles.len() as ProfileIdx)
        .filter(|p| graph.canonical(*p) == *p)
        .collect();
    let mut accounts: std::collections::BTreeSet<&str> =
        graph.account_traits.keys().map(String::as_str).collect();
    for l in graph.account_links.values() {
        accounts.extend(l.keys().map(String::as_str));
    }
    let mut report = IdentityReport {
        events_read,
        profiles: canonical.len() as u64,
        known: canonical.iter().filter(|p| graph.is_known(**p)).count() as u64,
        ids: graph.ids.values().map(|m| m.len() as u64).sum(),
        merges: graph.merges.len() as u64,
        accounts: accounts.len() as u64,
        version: snap.version + 1,
        events_version: events.version,
    };
    let draft = CommitDraft {
        operation: if full { "identity-full" } else { "identity" }.into(),
        adds,
        removes: snap.files.iter().map(|f| f.path.clone()).collect(),
        info: serde_json::json!({
            "events_version": events.version,
            "events_read": events_read,
            "report": report,
        }),
    };
    let entry = log.try_commit(snap.version, draft).await?.ok_or_else(|| {
        Error::Usage("another identity resolution committed first; run it again".into())
    })?;
    report.version = entry.version;
    if let Some(c) = cache {
        *c.lock().await = Some((entry.version, graph));
    }
    compact_read_files(store, space, events.version).await?;
    Ok(report)
}

/// The event files identity resolution has read (up to `watermark`) can be merged into fewer,
/// larger ones.
async fn compact_read_files(store: &Store, space: &Space, watermark: u64) -> Result<()> {
    let t = std::time::Instant::now();
    let r = crate::events::compact::compact(
        store,
        space,
        crate::events::compact::MIN_FILES,
        None,
        watermark,
    )
    .await?;
    if r.files_removed > 0 {
        tracing::info!(
            millis = t.elapsed().as_millis() as u64,
            files_removed = r.files_removed,
            files_added = r.files_added,
            "compaction after identity resolution"
        );
    }
    Ok(())
}

/// The events version the committed identity state covers.
pub fn last_events_version(snap: &Snapshot) -> u64 {
    snap.entries
        .last()
        .and_then(|e| e.info.get("events_version"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}
