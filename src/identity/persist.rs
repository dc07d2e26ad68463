//! Loading, updating and committing the identity state.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, TimestampMicrosecondType};

use serde_json::Value;

use super::graph::{Graph, IdInfo, IdentityEvent, Merge, Profile, ProfileIdx, TraitValue};
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

/// Writer properties of an identity table: dictionary encoding only for the columns that
/// repeat (types, keys, account ids, trait values); ids and message ids are nearly unique, and
/// trying a dictionary for them first costs more than it saves.
fn table_writer_properties(kind: &str) -> parquet::file::properties::WriterProperties {
    let kind = kind.strip_suffix(DELTA).unwrap_or(kind);
    let repeating: &[&str] = match kind {
        "identities" => &["id_type"],
        "traits" => &["entity", "account_id", "key", "value", "value_str"],
        "account_links" => &["account_id"],
        _ => &[],
    };
    // LZ4, not the events' zstd: every one-shot run reads these tables whole and a checkpoint
    // rewrites them, so decompression speed matters more than size (BENCHMARKS.md, session 18).
    // `identity_keys` (hashes and indexes, read by every session that evaluates a definition)
    // does not compress at all.
    let codec = match kind {
        "identity_keys" => parquet::basic::Compression::UNCOMPRESSED,
        _ => parquet::basic::Compression::LZ4_RAW,
    };
    let mut b = writer_properties(None)
        .into_builder()
        .set_dictionary_enabled(false)
        .set_compression(codec);
    for c in repeating {
        b = b.set_column_dictionary_enabled(parquet::schema::types::ColumnPath::from(*c), true);
    }
    b.build()
}

/// A string column, its buffers sized up front (the values are walked twice, their bytes
/// copied once).
fn strs<'a>(values: impl Iterator<Item = &'a str> + Clone) -> ArrayRef {
    opt_strs(values.map(Some))
}

/// A nullable string column, its buffers sized up front.
fn opt_strs<'a>(values: impl Iterator<Item = Option<&'a str>> + Clone) -> ArrayRef {
    let bytes = values.clone().map(|v| v.map_or(0, str::len)).sum();
    let mut b = arrow::array::StringBuilder::with_capacity(values.size_hint().0, bytes);
    for v in values {
        b.append_option(v);
    }
    Arc::new(b.finish())
}

/// Build the columns of one batch on every core.
fn columns(build: Vec<Box<dyn Fn() -> ArrayRef + Send + Sync + '_>>) -> Vec<ArrayRef> {
    use rayon::prelude::*;
    build.par_iter().map(|f| f()).collect()
}

/// The rows of every identity table (`only` None), or of a delta: the rows owned by the dirty
/// profiles and accounts, and the merges from index `merges_from` on. The tables are built at
/// the same time.
fn batches(
    g: &Graph,
    only: Option<&Dirty>,
    merges_from: usize,
) -> Result<Vec<(&'static str, RecordBatch)>> {
    let ((ids, profiles), (merges, (traits, links))) = rayon::join(
        || rayon::join(|| identities(g, only), || profiles(g, only)),
        || {
            rayon::join(
                || profile_merges(g, merges_from),
                || rayon::join(|| traits(g, only), || account_links(g, only)),
            )
        },
    );
    let (identity_keys, identities) = ids?;
    Ok(vec![
        ("identity_keys", identity_keys),
        ("identities", identities),
        ("profiles", profiles?),
        ("profile_merges", merges?),
        ("traits", traits?),
        ("account_links", links?),
    ])
}

/// Is `p`'s canonical profile one whose rows are written?
fn owned(g: &Graph, only: Option<&Dirty>, p: ProfileIdx) -> bool {
    only.is_none_or(|d| d.profiles.contains(&i64::from(g.canonical(p))))
}

/// The canonical profile id of `p`.
fn pid(g: &Graph, p: ProfileIdx) -> &str {
    g.profiles[g.canonical(p) as usize].id.as_str()
}

/// `identity_keys` and `identities`.
fn identities(g: &Graph, only: Option<&Dirty>) -> Result<(RecordBatch, RecordBatch)> {
    use rayon::prelude::*;
    let canon = |p: ProfileIdx| g.canonical(p);
    let ids: Vec<((&String, &String), &IdInfo)> = g
        .ids
        .iter()
        .flat_map(|(t, m)| m.iter().map(move |(v, i)| ((t, v), i)))
        .filter(|(_, i)| owned(g, only, i.profile))
        .collect();
    // Stable order by identity key (cheap to sort: no string comparisons unless keys collide).
    let mut ids: Vec<(i64, (&String, &String), &IdInfo)> = ids
        .into_par_iter()
        .map(|(k, i)| (identity_key(k.0, k.1), k, i))
        .collect();
    ids.par_sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let ids = &ids;
    let identities = RecordBatch::try_new(
        schema("identities"),
        columns(vec![
            Box::new(|| strs(ids.iter().map(|(_, k, _)| k.0.as_str()))),
            Box::new(|| strs(ids.iter().map(|(_, k, _)| k.1.as_str()))),
            Box::new(|| strs(ids.iter().map(|(_, _, i)| pid(g, i.profile)))),
            Box::new(|| {
                Arc::new(Int64Array::from_iter_values(
                    ids.iter().map(|(_, _, i)| canon(i.profile) as i64),
                ))
            }),
            Box::new(|| Arc::new(Int64Array::from_iter_values(ids.iter().map(|x| x.0)))),
            Box::new(|| ts_array(ids.iter().map(|(_, _, i)| i.first_seen).collect())),
            Box::new(|| strs(ids.iter().map(|(_, _, i)| &*i.first_message_id))),
        ]),
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
    Ok((identity_keys, identities))
}

/// `profiles`: a profile's own row belongs to it (not to its canonical profile).
fn profiles(g: &Graph, only: Option<&Dirty>) -> Result<RecordBatch> {
    let canon = |p: ProfileIdx| g.canonical(p);
    let rows: Vec<usize> = match only {
        None => (0..g.profiles.len()).collect(),
        Some(d) => {
            let mut r: Vec<usize> = d
                .profiles
                .iter()
                .map(|p| *p as usize)
                .filter(|p| *p < g.profiles.len())
                .collect();
            r.sort_unstable();
            r
        }
    };
    let rows = &rows;
    Ok(RecordBatch::try_new(
        schema("profiles"),
        columns(vec![
            Box::new(|| Arc::new(Int64Array::from_iter_values(rows.iter().map(|i| *i as i64)))),
            Box::new(|| strs(rows.iter().map(|i| g.profiles[*i].id.as_str()))),
            Box::new(|| {
                opt_strs(rows.iter().map(|&i| {
                    let c = canon(i as ProfileIdx);
                    (c as usize != i).then(|| g.profiles[c as usize].id.as_str())
                }))
            }),
            Box::new(|| {
                Arc::new(Int64Array::from_iter_values(
                    rows.iter().map(|&i| canon(i as ProfileIdx) as i64),
                ))
            }),
            Box::new(|| {
                Arc::new(BooleanArray::from_iter(
                    rows.iter().map(|&i| Some(g.is_known(i as ProfileIdx))),
                ))
            }),
            Box::new(|| ts_array(rows.iter().map(|&i| g.profiles[i].created_at).collect())),
            Box::new(|| {
                strs(
                    rows.iter()
                        .map(|&i| g.profiles[i].first_message_id.as_str()),
                )
            }),
        ]),
    )?)
}

/// `profile_merges` from index `merges_from` on.
fn profile_merges(g: &Graph, merges_from: usize) -> Result<RecordBatch> {
    let new_merges = g.merges.get(merges_from..).unwrap_or_default();
    Ok(RecordBatch::try_new(
        schema("profile_merges"),
        vec![
            strs(new_merges.iter().map(|m| m.from.as_str())),
            strs(new_merges.iter().map(|m| m.into.as_str())),
            ts_array(new_merges.iter().map(|m| m.at).collect()),
            strs(new_merges.iter().map(|m| m.message_id.as_str())),
        ],
    )?)
}

/// `traits`: profile traits (folded to canonical profiles), then account traits.
fn traits(g: &Graph, only: Option<&Dirty>) -> Result<RecordBatch> {
    let canon = |p: ProfileIdx| g.canonical(p);
    // (is profile trait, profile, account, key, value)
    type TraitRow<'a> = (
        bool,
        Option<ProfileIdx>,
        Option<&'a str>,
        &'a str,
        &'a TraitValue,
    );
    let mut rows: Vec<TraitRow> = Vec::new();
    let mut owners: Vec<&ProfileIdx> = g
        .profile_traits
        .keys()
        .filter(|p| owned(g, only, **p))
        .collect();
    owners.sort();
    for p in owners {
        for (k, v) in &g.profile_traits[p] {
            rows.push((true, Some(canon(*p)), None, k, v));
        }
    }
    let account_owned = |a: &String| only.is_none_or(|d| d.accounts.contains(a));
    for (a, t) in g.account_traits.iter().filter(|(a, _)| account_owned(a)) {
        for (k, v) in t {
            rows.push((false, None, Some(a.as_str()), k, v));
        }
    }
    let rows = &rows;
    let (typed, mut rest) = rayon::join(
        || typed_json(rows.iter().map(|r| r.4.value.as_str())),
        || {
            columns(vec![
                Box::new(|| strs(rows.iter().map(|r| if r.0 { "profile" } else { "account" }))),
                Box::new(|| opt_strs(rows.iter().map(|r| r.1.map(|p| pid(g, p))))),
                Box::new(|| {
                    Arc::new(Int64Array::from_iter(
                        rows.iter().map(|r| r.1.map(|p| p as i64)),
                    ))
                }),
                Box::new(|| opt_strs(rows.iter().map(|r| r.2))),
                Box::new(|| strs(rows.iter().map(|r| r.3))),
                Box::new(|| strs(rows.iter().map(|r| r.4.value.as_str()))),
                Box::new(|| ts_array(rows.iter().map(|r| r.4.updated_at).collect())),
                Box::new(|| strs(rows.iter().map(|r| &*r.4.message_id))),
            ])
        },
    );
    // schema order: entity, profile_id, profile_idx, account_id, key, value, the typed three,
    // updated_at, message_id
    let tail = rest.split_off(6);
    rest.extend([typed.0, typed.1, typed.2]);
    rest.extend(tail);
    Ok(RecordBatch::try_new(schema("traits"), rest)?)
}

/// `account_links`.
fn account_links(g: &Graph, only: Option<&Dirty>) -> Result<RecordBatch> {
    let canon = |p: ProfileIdx| g.canonical(p);
    let mut links: Vec<(ProfileIdx, &str, i64)> = Vec::new();
    let mut owners: Vec<&ProfileIdx> = g
        .account_links
        .keys()
        .filter(|p| owned(g, only, **p))
        .collect();
    owners.sort();
    for p in owners {
        for (a, t) in &g.account_links[p] {
            links.push((canon(*p), a, *t));
        }
    }
    Ok(RecordBatch::try_new(
        schema("account_links"),
        vec![
            strs(links.iter().map(|l| pid(g, l.0))),
            Arc::new(Int64Array::from_iter_values(
                links.iter().map(|l| l.0 as i64),
            )),
            strs(links.iter().map(|l| l.1)),
            ts_array(links.iter().map(|l| l.2).collect()),
        ],
    )?)
}

// An incremental resolution does not rewrite the identity tables: it writes, next to the last
// full write (the checkpoint), a delta per table holding every current row owned by the profiles
// and accounts changed since the checkpoint (the dirty ones, listed in two small files), and the
// merges since it. A table is the checkpoint's rows whose owner is not dirty, plus the delta's.
// Each delta is cumulative (it replaces the previous one); a resolution that finds more than
// 1/CHECKPOINT_EVERY of the profiles dirty writes a new checkpoint instead.

/// Kind suffix of the delta files.
pub const DELTA: &str = ".delta";
/// Kind of the file listing the dirty profiles (`profile_idx`).
pub const DIRTY_PROFILES: &str = "dirty_profiles";
/// Kind of the file listing the dirty accounts (`account_id`).
pub const DIRTY_ACCOUNTS: &str = "dirty_accounts";
/// A new checkpoint once more than 1/N of the profiles are dirty (N = 8 unless set).
static CHECKPOINT_EVERY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(8);

/// Write a new checkpoint once more than 1/`n` of the profiles are dirty (1: only on full
/// runs; tests use it to exercise deltas on small data).
pub fn set_checkpoint_every(n: usize) {
    CHECKPOINT_EVERY.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// Schema of a dirty list.
pub fn dirty_schema(kind: &str) -> SchemaRef {
    Arc::new(Schema::new(vec![if kind == DIRTY_ACCOUNTS {
        Field::new("account_id", DataType::Utf8, false)
    } else {
        Field::new("profile_idx", DataType::Int64, false)
    }]))
}

/// The columns naming who owns a row of an identity table: a profile index and, for account
/// traits, an account id. `profile_merges` rows are owned by nobody (a delta only adds).
pub fn owner_columns(kind: &str) -> (Option<&'static str>, Option<&'static str>) {
    match kind {
        "profile_merges" => (None, None),
        "traits" => (Some("profile_idx"), Some("account_id")),
        _ => (Some("profile_idx"), None),
    }
}

/// The committed files of one identity table: the checkpoint's and the delta's.
pub fn table_files(snap: &Snapshot, kind: &str) -> (Vec<FileAdd>, Vec<FileAdd>) {
    let delta = format!("{kind}{DELTA}");
    let of = |k: &str| {
        snap.files
            .iter()
            .filter(|f| f.kind.as_deref() == Some(k))
            .cloned()
            .collect::<Vec<_>>()
    };
    (of(kind), of(&delta))
}

/// Profiles and accounts whose checkpoint rows the delta files replace.
#[derive(Debug, Default, Clone)]
pub struct Dirty {
    /// Dirty profile indexes.
    pub profiles: hashbrown::HashSet<i64>,
    /// Dirty account ids.
    pub accounts: hashbrown::HashSet<String>,
}

impl Dirty {
    /// The dirty lists of a committed identity state (empty after a checkpoint).
    pub async fn read(store: &Store, snap: &Snapshot) -> Result<Dirty> {
        let mut d = Dirty::default();
        for f in snap.files.iter().filter(|f| {
            matches!(
                f.kind.as_deref(),
                Some(DIRTY_PROFILES) | Some(DIRTY_ACCOUNTS)
            )
        }) {
            for b in read_files(store, std::slice::from_ref(f)).await? {
                if let Some(p) = b.column(0).as_primitive_opt::<Int64Type>() {
                    d.profiles.extend(p.values().iter().copied());
                } else if let Some(a) = b.column(0).as_string_opt::<i32>() {
                    d.accounts.extend(a.iter().flatten().map(str::to_string));
                }
            }
        }
        Ok(d)
    }

    /// Whether the delta files exist, so that checkpoint rows must be filtered.
    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty() && self.accounts.is_empty()
    }

    /// Which rows of a checkpoint batch of `kind` are still current (None: all of them).
    pub fn current_rows(&self, kind: &str, b: &RecordBatch) -> Result<Option<BooleanArray>> {
        let (pcol, acol) = owner_columns(kind);
        if self.is_empty() || (pcol.is_none() && acol.is_none()) {
            return Ok(None);
        }
        let mut keep = vec![true; b.num_rows()];
        if let Some(c) = pcol {
            let p = i64s(b, c)?;
            for (r, k) in keep.iter_mut().enumerate() {
                if p.is_valid(r) && self.profiles.contains(&p.value(r)) {
                    *k = false;
                }
            }
        }
        if let Some(c) = acol {
            let a = s(b, c)?;
            for (r, k) in keep.iter_mut().enumerate() {
                if a.is_valid(r) && self.accounts.contains(a.value(r)) {
                    *k = false;
                }
            }
        }
        Ok(Some(BooleanArray::from(keep)))
    }

    /// The dirty lists as record batches.
    fn batches(&self) -> Result<Vec<(&'static str, RecordBatch)>> {
        let mut p: Vec<i64> = self.profiles.iter().copied().collect();
        p.sort_unstable();
        let mut a: Vec<&str> = self.accounts.iter().map(String::as_str).collect();
        a.sort_unstable();
        Ok(vec![
            (
                DIRTY_PROFILES,
                RecordBatch::try_new(
                    dirty_schema(DIRTY_PROFILES),
                    vec![Arc::new(Int64Array::from(p))],
                )?,
            ),
            (
                DIRTY_ACCOUNTS,
                RecordBatch::try_new(
                    dirty_schema(DIRTY_ACCOUNTS),
                    vec![Arc::new(StringArray::from(a))],
                )?,
            ),
        ])
    }
}

async fn read_files(store: &Store, files: &[FileAdd]) -> Result<Vec<RecordBatch>> {
    read_columns(store, files, None).await
}

/// The rows of `files`, with only `columns` decoded (all when None).
async fn read_columns(
    store: &Store,
    files: &[FileAdd],
    columns: Option<&[&str]>,
) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::new();
    for f in files {
        let bytes = store.get(&Key::from_committed(&f.path)).await?;
        let mut builder =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?;
        if let Some(c) = columns {
            let mask = parquet::arrow::ProjectionMask::columns(
                builder.parquet_schema(),
                c.iter().copied(),
            );
            builder = builder.with_projection(mask);
        }
        for b in builder.build()? {
            out.push(b?);
        }
    }
    Ok(out)
}

/// The columns of each identity table a graph load reads (not the profile ids, known flags
/// and typed values the tables repeat for queries).
fn load_columns(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "identities" => Some(&[
            "id_type",
            "id_value",
            "profile_idx",
            "identity_key",
            "first_seen",
            "first_message_id",
        ]),
        "profiles" => Some(&[
            "profile_idx",
            "profile_id",
            "canonical_idx",
            "created_at",
            "first_message_id",
        ]),
        "traits" => Some(&[
            "entity",
            "profile_idx",
            "account_id",
            "key",
            "value",
            "updated_at",
            "message_id",
        ]),
        "account_links" => Some(&["profile_idx", "account_id", "linked_at"]),
        _ => None,
    }
}

/// The current rows of one identity table: the checkpoint's still current, then the delta's
/// (the columns a graph load reads).
pub(crate) async fn read_kind(
    store: &Store,
    snap: &Snapshot,
    dirty: &Dirty,
    kind: &str,
) -> Result<Vec<RecordBatch>> {
    let (base, delta) = table_files(snap, kind);
    let columns = load_columns(kind);
    let mut out = Vec::new();
    for b in read_columns(store, &base, columns).await? {
        match dirty.current_rows(kind, &b)? {
            Some(keep) => out.push(arrow::compute::filter_record_batch(&b, &keep)?),
            None => out.push(b),
        }
    }
    out.extend(read_columns(store, &delta, columns).await?);
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

/// The committed identity tables' current rows, decoded.
struct Committed {
    profiles: Vec<RecordBatch>,
    ids: Vec<RecordBatch>,
    merges: Vec<RecordBatch>,
    traits: Vec<RecordBatch>,
    links: Vec<RecordBatch>,
}

/// Read the five identity tables of `snap` concurrently.
async fn read_committed(store: &Store, snap: &Snapshot) -> Result<Committed> {
    let dirty = Arc::new(Dirty::read(store, snap).await?);
    let read = |kind: &'static str| {
        let (store, snap, dirty) = (store.clone(), snap.clone(), Arc::clone(&dirty));
        tokio::spawn(async move { read_kind(&store, &snap, &dirty, kind).await })
    };
    let tasks = [
        read("profiles"),
        read("identities"),
        read("profile_merges"),
        read("traits"),
        read("account_links"),
    ];
    let mut tables = Vec::new();
    for t in tasks {
        tables.push(
            t.await
                .map_err(|e| Error::Usage(format!("identity read failed: {e}")))??,
        );
    }
    let [profiles, ids, merges, traits, links]: [Vec<RecordBatch>; 5] = tables
        .try_into()
        .map_err(|_| Error::Usage("identity read failed".into()))?;
    Ok(Committed {
        profiles,
        ids,
        merges,
        traits,
        links,
    })
}

/// Which committed rows are built into the graph's maps.
trait Select: Sync {
    /// An id row (type, value, its identity key, owning profile).
    fn id(&self, g: &Graph, t: &str, v: &str, key: i64, p: ProfileIdx) -> bool;
    /// A trait or link row of a profile.
    fn profile(&self, g: &Graph, p: ProfileIdx) -> bool;
    /// A trait row of an account.
    fn account(&self, a: &str) -> bool;
    /// Whether every row is selected (the maps are then sized for all of them first).
    fn all(&self) -> bool {
        false
    }
}

/// Every row.
struct Everything;

impl Select for Everything {
    fn id(&self, _: &Graph, _: &str, _: &str, _: i64, _: ProfileIdx) -> bool {
        true
    }
    fn profile(&self, _: &Graph, _: ProfileIdx) -> bool {
        true
    }
    fn account(&self, _: &str) -> bool {
        true
    }
    fn all(&self) -> bool {
        true
    }
}

/// The rows of `identities` with each row's id type number (into [`Graph::id_types`]).
struct IdRows {
    batches: Vec<RecordBatch>,
    types: Vec<Vec<u16>>,
    /// Rows per type number.
    per_type: Vec<usize>,
}

impl IdRows {
    fn empty() -> IdRows {
        IdRows {
            batches: Vec::new(),
            types: Vec::new(),
            per_type: Vec::new(),
        }
    }

    fn rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

/// The profiles and merges of `c` (the id type names and per-profile id counts included); the
/// id, trait and link rows are built into the graph by [`fill`].
fn graph_base(c: Committed) -> Result<(Graph, IdRows, Vec<RecordBatch>, Vec<RecordBatch>)> {
    let mut g = Graph {
        profiles: load_profiles(c.profiles)?,
        ..Graph::default()
    };
    for b in c.merges {
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
    let ids = id_rows(&mut g, c.ids)?;
    Ok((g, ids, c.traits, c.links))
}

/// Type numbers of the id rows, and every profile's id counts (of all rows, whatever is built
/// into the id map later).
fn id_rows(g: &mut Graph, batches: Vec<RecordBatch>) -> Result<IdRows> {
    let n = g.profiles.len();
    let mut types: Vec<Vec<u16>> = Vec::with_capacity(batches.len());
    let mut per_type: Vec<usize> = Vec::new();
    for b in &batches {
        let t = s(b, "id_type")?;
        let mut of_rows = Vec::with_capacity(b.num_rows());
        for r in 0..b.num_rows() {
            let name = t.value(r);
            let i = match g.id_types.iter().position(|x| x == name) {
                Some(i) => i,
                None => {
                    g.id_types.push(name.to_string());
                    per_type.push(0);
                    g.id_types.len() - 1
                }
            };
            per_type[i] += 1;
            of_rows.push(i as u16);
        }
        types.push(of_rows);
    }
    // Counts in one flat table (profile × type): the rows come in identity key order, so
    // each is a cache miss, started 16 rows ahead.
    const AHEAD: usize = 16;
    let nt = g.id_types.len().max(1);
    let mut flat = vec![0u32; n * nt];
    for (b, tys) in batches.iter().zip(&types) {
        let (v, p) = (s(b, "id_value")?, i64s(b, "profile_idx")?);
        let ps = p.values();
        for (r, t) in tys.iter().enumerate() {
            if let Some(a) = ps.get(r + AHEAD).and_then(|a| usize::try_from(*a).ok())
                && a < n
            {
                crate::identity::prefetch(flat.as_ptr().wrapping_add(a * nt));
            }
            let pi = ps[r];
            let Some(i) = usize::try_from(pi).ok().filter(|i| *i < n) else {
                return Err(Error::Usage(format!(
                    "identity state corrupt: id {}:{} points at missing profile {pi}",
                    g.id_types[*t as usize],
                    v.value(r)
                )));
            };
            flat[i * nt + *t as usize] += 1;
        }
    }
    for (p, c) in g.profiles.iter_mut().zip(flat.chunks_exact(nt)) {
        p.id_counts = c
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(t, n)| (t as u16, *n))
            .collect();
    }
    Ok(IdRows {
        batches,
        types,
        per_type,
    })
}

/// Build the id, trait and link rows `sel` selects into the graph (an id already in the map
/// stays as it is). The ids are built on a thread of their own.
fn fill(
    g: &mut Graph,
    sel: &impl Select,
    ids: &IdRows,
    traits: &[RecordBatch],
    links: &[RecordBatch],
) -> Result<()> {
    // the id maps, by type number, taken out of the graph while they are filled
    let mut maps: Vec<hashbrown::HashMap<String, IdInfo>> = g
        .id_types
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut m = g.ids.remove(t.as_str()).unwrap_or_default();
            if sel.all() && m.is_empty() {
                m.reserve(ids.per_type.get(i).copied().unwrap_or(0));
            }
            m
        })
        .collect();
    let graph: &Graph = g;
    let (filled, trait_part) = std::thread::scope(|scope| {
        let filled = scope.spawn(|| {
            let t = std::time::Instant::now();
            let r = fill_ids(graph, sel, ids, &mut maps);
            tracing::debug!(ms = t.elapsed().as_millis() as u64, "identity ids loaded");
            r
        });
        let t = std::time::Instant::now();
        let traits = load_traits(graph, sel, traits, links);
        tracing::debug!(
            ms = t.elapsed().as_millis() as u64,
            "identity traits loaded"
        );
        let filled = filled
            .join()
            .map_err(|_| Error::Usage("identity load failed".into()));
        (filled, traits)
    });
    filled??;
    for (t, m) in g.id_types.iter().zip(maps) {
        if !m.is_empty() {
            g.ids.insert(t.clone(), m);
        }
    }
    let (pt, at, al) = trait_part?;
    // (the rows of a profile or account are built in one call: no map is merged into another)
    if g.profile_traits.is_empty() {
        g.profile_traits = pt;
    } else {
        g.profile_traits.extend(pt);
    }
    if g.account_traits.is_empty() {
        g.account_traits = at;
    } else {
        g.account_traits.extend(at);
    }
    if g.account_links.is_empty() {
        g.account_links = al;
    } else {
        g.account_links.extend(al);
    }
    Ok(())
}

/// The id rows `sel` selects, into `maps` (by type number).
fn fill_ids(
    g: &Graph,
    sel: &impl Select,
    ids: &IdRows,
    maps: &mut [hashbrown::HashMap<String, IdInfo>],
) -> Result<()> {
    for (b, tys) in ids.batches.iter().zip(&ids.types) {
        let (v, p, k, fs, fm) = (
            s(b, "id_value")?,
            i64s(b, "profile_idx")?,
            i64s(b, "identity_key")?,
            tss(b, "first_seen")?,
            s(b, "first_message_id")?,
        );
        for (r, t) in tys.iter().enumerate() {
            // in range: checked by `id_rows`
            let pi = p.value(r) as ProfileIdx;
            let t = *t as usize;
            if !sel.id(g, &g.id_types[t], v.value(r), k.value(r), pi) {
                continue;
            }
            if let hashbrown::hash_map::EntryRef::Vacant(slot) = maps[t].entry_ref(v.value(r)) {
                slot.insert(IdInfo {
                    profile: pi,
                    first_seen: fs.value(r),
                    first_message_id: fm.value(r).into(),
                });
            }
        }
    }
    Ok(())
}

/// Load the committed identity state.
pub async fn load(store: &Store, snap: &Snapshot) -> Result<Graph> {
    let t = std::time::Instant::now();
    let c = read_committed(store, snap).await?;
    let read_ms = t.elapsed().as_millis() as u64;
    let (mut g, ids, traits, links) = graph_base(c)?;
    fill(&mut g, &Everything, &ids, &traits, &links)?;
    tracing::debug!(
        read_ms,
        ms = t.elapsed().as_millis() as u64,
        "identity graph loaded"
    );
    Ok(g)
}

/// Which committed rows a batch of events can reach: its ids (an alias's previous id as
/// either type) and accounts, the traits and links of the profiles owning those ids.
struct Reach {
    ids: hashbrown::HashMap<String, hashbrown::HashSet<String>>,
    /// Their identity keys (a row's key is tested before its strings).
    keys: hashbrown::HashSet<i64>,
    accounts: hashbrown::HashSet<String>,
    /// By profile: whether its canonical profile (at load) owns one of the ids.
    profiles: Vec<bool>,
}

impl Reach {
    fn of(events: &[IdentityEvent]) -> Reach {
        let mut r = Reach {
            ids: hashbrown::HashMap::new(),
            keys: hashbrown::HashSet::new(),
            accounts: hashbrown::HashSet::new(),
            profiles: Vec::new(),
        };
        let mut add = |t: &str, v: &str| {
            let set = r.ids.entry_ref(t).or_default();
            if !set.contains(v) {
                set.insert(v.to_string());
                r.keys.insert(identity_key(t, v));
            }
        };
        for e in events {
            for (t, v) in &e.ids {
                add(t, v);
            }
            if let Some(prev) = &e.alias_previous {
                add("user_id", prev);
                add("anonymous_id", prev);
            }
        }
        r.accounts = events
            .iter()
            .filter_map(|e| e.group.as_ref().map(|g| g.0.clone()))
            .collect();
        r
    }
}

impl Select for Reach {
    fn id(&self, _: &Graph, t: &str, v: &str, key: i64, _: ProfileIdx) -> bool {
        self.keys.contains(&key) && self.ids.get(t).is_some_and(|s| s.contains(v))
    }
    fn profile(&self, _: &Graph, p: ProfileIdx) -> bool {
        self.profiles.get(p as usize).copied().unwrap_or(false)
    }
    fn account(&self, a: &str) -> bool {
        self.accounts.contains(a)
    }
}

/// The rows a write needs that a partial load left out: those of the profiles and accounts
/// the events did not reach and the write rewrites (the dirty ones; every one for a
/// checkpoint).
struct Rest<'a> {
    reach: &'a Reach,
    dirty: Option<&'a Dirty>,
    /// By profile: whether its canonical profile's rows are written.
    written: Vec<bool>,
}

impl Select for Rest<'_> {
    fn id(&self, _: &Graph, _: &str, _: &str, _: i64, p: ProfileIdx) -> bool {
        // an id the events reach is in the map already (fill keeps it)
        self.written.get(p as usize).copied().unwrap_or(false)
    }
    fn profile(&self, g: &Graph, p: ProfileIdx) -> bool {
        // A profile the events did not reach kept its canonical profile, and no profile
        // reached was merged into one that was not: its rows are all still to be built.
        !self.reach.profile(g, p) && self.written.get(p as usize).copied().unwrap_or(false)
    }
    fn account(&self, a: &str) -> bool {
        !self.reach.accounts.contains(a) && self.dirty.is_none_or(|d| d.accounts.contains(a))
    }
}

/// A graph loaded with only what a batch of events reaches, and what it needs to complete
/// itself for a write ([`Partial::complete`]).
struct Partial {
    reach: Reach,
    ids: IdRows,
    traits: Vec<RecordBatch>,
    links: Vec<RecordBatch>,
    /// Ids in the map after the load.
    loaded_ids: u64,
}

impl Partial {
    /// The graph of `c` holding every profile and merge, and of ids, traits and links only
    /// what `events` reach.
    fn load(c: Committed, events: &[IdentityEvent]) -> Result<(Graph, Partial)> {
        let t = std::time::Instant::now();
        let (mut g, ids, traits, links) = graph_base(c)?;
        let mut reach = Reach::of(events);
        fill(&mut g, &reach, &ids, &[], &[])?;
        let mut reached = vec![false; g.profiles.len()];
        for i in g.ids.values().flat_map(|m| m.values()) {
            reached[g.canonical(i.profile) as usize] = true;
        }
        reach.profiles = (0..g.profiles.len() as ProfileIdx)
            .map(|p| reached[g.canonical(p) as usize])
            .collect();
        fill(&mut g, &reach, &IdRows::empty(), &traits, &links)?;
        let loaded_ids = g.ids.values().map(|m| m.len() as u64).sum();
        tracing::debug!(
            ids = loaded_ids,
            ms = t.elapsed().as_millis() as u64,
            "identity graph loaded for the events"
        );
        Ok((
            g,
            Partial {
                reach,
                ids,
                traits,
                links,
                loaded_ids,
            },
        ))
    }

    /// Build into `g` the rows the write of `dirty` needs (None: a checkpoint, every row);
    /// returns how many ids the space has.
    fn complete(self, g: &mut Graph, dirty: Option<&Dirty>) -> Result<u64> {
        let now: u64 = g.ids.values().map(|m| m.len() as u64).sum();
        let total = self.ids.rows() as u64 + now - self.loaded_ids;
        let written = (0..g.profiles.len() as ProfileIdx)
            .map(|p| dirty.is_none_or(|d| d.profiles.contains(&i64::from(g.canonical(p)))))
            .collect();
        let rest = Rest {
            reach: &self.reach,
            dirty,
            written,
        };
        fill(g, &rest, &self.ids, &self.traits, &self.links)?;
        Ok(total)
    }

    /// The accounts of the committed rows (with traits or links).
    fn accounts(&self) -> Result<std::collections::BTreeSet<String>> {
        let mut out = std::collections::BTreeSet::new();
        for b in self.traits.iter().chain(&self.links) {
            for a in s(b, "account_id")?.iter().flatten() {
                if !out.contains(a) {
                    out.insert(a.to_string());
                }
            }
        }
        Ok(out)
    }
}

/// The profiles of the `profiles` table's current rows (checkpoint rows, then the delta's),
/// in index order.
fn load_profiles(batches: Vec<RecordBatch>) -> Result<Vec<Profile>> {
    // Each row goes to its index (a delta's rows follow the checkpoint's): the indexes must
    // be exactly 0..n.
    let n: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let mut out: Vec<Profile> = Vec::with_capacity(n);
    out.resize_with(n, || Profile {
        id: String::new(),
        parent: 0,
        created_at: 0,
        first_message_id: String::new(),
        id_counts: Vec::new(),
    });
    let mut seen = vec![false; n];
    for b in &batches {
        let (idx, id, canon, created, first) = (
            i64s(b, "profile_idx")?,
            s(b, "profile_id")?,
            i64s(b, "canonical_idx")?,
            tss(b, "created_at")?,
            s(b, "first_message_id")?,
        );
        for r in 0..b.num_rows() {
            let p = idx.value(r);
            let Some(i) = usize::try_from(p).ok().filter(|i| *i < n && !seen[*i]) else {
                return Err(Error::Usage(format!(
                    "identity state corrupt: profile index {p} out of range or repeated"
                )));
            };
            seen[i] = true;
            out[i] = Profile {
                id: id.value(r).to_string(),
                parent: canon.value(r) as ProfileIdx,
                created_at: created.value(r),
                first_message_id: first.value(r).to_string(),
                id_counts: Vec::new(),
            };
        }
    }
    if let Some(bad) = out.iter().find(|p| p.parent as usize >= n) {
        return Err(Error::Usage(format!(
            "identity state corrupt: profile {} points at missing profile {}",
            bad.id, bad.parent
        )));
    }
    Ok(out)
}

/// Profile traits, account traits and account links.
type LoadedTraits = (
    hashbrown::HashMap<ProfileIdx, std::collections::BTreeMap<String, TraitValue>>,
    std::collections::BTreeMap<String, std::collections::BTreeMap<String, TraitValue>>,
    hashbrown::HashMap<ProfileIdx, std::collections::BTreeMap<String, i64>>,
);

/// The trait and link maps of the rows of the `traits` and `account_links` tables `sel`
/// selects.
fn load_traits(
    g: &Graph,
    sel: &impl Select,
    traits: &[RecordBatch],
    links: &[RecordBatch],
) -> Result<LoadedTraits> {
    let n = g.profiles.len();
    let mut out = LoadedTraits::default();
    for b in traits {
        let (e, pidx, acc, k, v, at, m) = (
            s(b, "entity")?,
            i64s(b, "profile_idx")?,
            s(b, "account_id")?,
            s(b, "key")?,
            s(b, "value")?,
            tss(b, "updated_at")?,
            s(b, "message_id")?,
        );
        for r in 0..b.num_rows() {
            let tv = || TraitValue {
                value: v.value(r).into(),
                updated_at: at.value(r),
                message_id: m.value(r).into(),
            };
            if e.value(r) == "profile" && pidx.is_valid(r) {
                let p = pidx.value(r);
                if usize::try_from(p).map_or(true, |p| p >= n) {
                    return Err(Error::Usage(format!(
                        "identity state corrupt: a trait points at missing profile {p}"
                    )));
                }
                if sel.profile(g, p as ProfileIdx) {
                    out.0
                        .entry(p as ProfileIdx)
                        .or_default()
                        .insert(k.value(r).into(), tv());
                }
            } else if acc.is_valid(r) && sel.account(acc.value(r)) {
                out.1
                    .entry(acc.value(r).into())
                    .or_default()
                    .insert(k.value(r).into(), tv());
            }
        }
    }
    for b in links {
        let (p, a, at) = (
            i64s(b, "profile_idx")?,
            s(b, "account_id")?,
            tss(b, "linked_at")?,
        );
        for r in 0..b.num_rows() {
            let pi = p.value(r);
            if usize::try_from(pi).map_or(true, |p| p >= n) {
                return Err(Error::Usage(format!(
                    "identity state corrupt: an account link points at missing profile {pi}"
                )));
            }
            if sel.profile(g, pi as ProfileIdx) {
                out.2
                    .entry(pi as ProfileIdx)
                    .or_default()
                    .insert(a.value(r).into(), at.value(r));
            }
        }
    }
    Ok(out)
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

/// Most new event rows an incremental run without a kept graph resolves over a partial load
/// (it holds their identity events in memory first); beyond, it loads the whole graph.
const PARTIAL_LOAD_MAX_EVENTS: u64 = 1_000_000;

/// How many events ahead the graph's entries for an event's ids are touched, so their cache
/// misses overlap with resolving the events before it.
const WARM_AHEAD: usize = 8;

/// An identity graph kept in memory between runs of one process (the serve loop), with the
/// identity version it was committed as.
pub type GraphCache = std::sync::Arc<tokio::sync::Mutex<Option<(u64, Graph)>>>;

/// The graphs of the spaces one process serves: its refresh loops and the Flight `refresh`
/// action share them, so neither reloads a committed graph the other left in memory.
#[derive(Default)]
pub struct GraphCaches(std::sync::Mutex<std::collections::HashMap<String, GraphCache>>);

impl GraphCaches {
    /// The cache of `space`.
    pub fn of(&self, space: &Space) -> GraphCache {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        std::sync::Arc::clone(m.entry(space.to_string()).or_default())
    }
}

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
    let events_read: u64 = new_files.iter().map(|f| f.rows).sum();
    let cached = match cache {
        Some(c) => c.lock().await.take(),
        None => None,
    };
    let started = std::time::Instant::now();
    // A graph loaded with only what the new events reach, completed before the write.
    let mut partial: Option<Partial> = None;
    let mut buffered: Option<(Vec<IdentityEvent>, u64)> = None;
    let mut graph = if full || snap.version == 0 {
        Graph::default()
    } else {
        match cached {
            Some((v, g)) if v == snap.version => g,
            // A process that does not keep the graph (no cache) and a batch of modest size:
            // the events are read first, then only the ids they name, the traits and links of
            // the profiles owning them and their accounts are built into the graph.
            _ if cache.is_none() && events_read <= PARTIAL_LOAD_MAX_EVENTS => {
                let tables = {
                    let (store, snap) = (store.clone(), snap.clone());
                    tokio::spawn(async move { read_committed(&store, &snap).await })
                };
                let mut evs: Vec<IdentityEvent> = Vec::new();
                let n = super::source::read_identity_events(store, &new_files, rules, |chunk| {
                    evs.extend_from_slice(chunk)
                })
                .await?;
                let c = tables
                    .await
                    .map_err(|e| Error::Usage(format!("identity read failed: {e}")))??;
                let (g, p) = Partial::load(c, &evs)?;
                partial = Some(p);
                buffered = Some((evs, n));
                g
            }
            _ => load(store, &snap).await?,
        }
    };
    // Canonical profile and known flag of every profile before: what changed is recorded with
    // the commit, so a refresh knows which profiles identity moved without diffing tables.
    let before: Vec<(ProfileIdx, bool)> = graph.canonical_known();
    graph.touched.clear();
    graph.touched_accounts.clear();
    let resolved = match buffered {
        Some((evs, n)) => {
            for (i, e) in evs.iter().enumerate() {
                if let Some(ahead) = evs.get(i + WARM_AHEAD) {
                    graph.warm(ahead);
                }
                graph.process(rules, e);
            }
            n
        }
        None => {
            super::source::read_identity_events(store, &new_files, rules, |chunk| {
                for (i, e) in chunk.iter().enumerate() {
                    if let Some(ahead) = chunk.get(i + WARM_AHEAD) {
                        graph.warm(ahead);
                    }
                    graph.process(rules, e);
                }
            })
            .await?
        }
    };
    tracing::debug!(
        files = new_files.len(),
        resolved,
        ms = started.elapsed().as_millis() as u64,
        "identity events read and resolved"
    );
    let started = std::time::Instant::now();
    let mut adds = Vec::new();
    let incremental = !full && snap.version > 0;
    // The checkpoint's files and how many merges it holds (a delta adds the later ones).
    let checkpoint: Vec<&FileAdd> = snap
        .files
        .iter()
        .filter(|f| f.kind.as_deref().is_some_and(|k| KINDS.contains(&k)))
        .collect();
    let has_checkpoint = KINDS
        .iter()
        .all(|k| checkpoint.iter().any(|f| f.kind.as_deref() == Some(k)));
    let checkpoint_merges: u64 = checkpoint
        .iter()
        .filter(|f| f.kind.as_deref() == Some("profile_merges"))
        .map(|f| f.rows)
        .sum();
    let mut dirty = if incremental && has_checkpoint {
        Some(Dirty::read(store, &snap).await?)
    } else {
        None
    };
    let mut tables: Vec<(String, RecordBatch)> = Vec::new();
    let after = graph.canonical_known();
    if incremental {
        let mut changed = std::collections::BTreeSet::new();
        for (p, now) in after.iter().copied().enumerate() {
            let p = p as ProfileIdx;
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
        if let Some(d) = &mut dirty {
            d.profiles.extend(changed.iter().map(|p| i64::from(*p)));
            d.profiles
                .extend(graph.touched.iter().map(|p| i64::from(graph.canonical(*p))));
            d.profiles
                .extend(graph.touched.iter().map(|p| i64::from(*p)));
            d.accounts.extend(graph.touched_accounts.iter().cloned());
            let every = CHECKPOINT_EVERY.load(std::sync::atomic::Ordering::Relaxed);
            if d.profiles.len().saturating_mul(every) > graph.profiles.len() {
                dirty = None;
            }
        }
        tables.push((
            CHANGED_PROFILES.to_string(),
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
    // What a partial load left out and the write needs.
    let (mut ids_total, mut committed_accounts) = (None, None);
    if let Some(p) = partial.take() {
        committed_accounts = Some(p.accounts()?);
        ids_total = Some(p.complete(&mut graph, dirty.as_ref())?);
    }
    match &dirty {
        // a delta: the rows of the dirty profiles and accounts, the merges since the checkpoint
        Some(d) => {
            for (kind, b) in batches(&graph, Some(d), checkpoint_merges as usize)? {
                tables.push((format!("{kind}{DELTA}"), b));
            }
            for (kind, b) in d.batches()? {
                tables.push((kind.to_string(), b));
            }
        }
        None => {
            for (kind, b) in batches(&graph, None, 0)? {
                tables.push((kind.to_string(), b));
            }
        }
    }
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        "identity table rows built"
    );
    // Encode the tables in parallel (they are independent).
    let encoded: Vec<(String, RecordBatch, bytes::Bytes)> = {
        use rayon::prelude::*;
        tables
            .into_par_iter()
            .map(|(kind, batch)| {
                let bytes = encode_parquet(&batch, table_writer_properties(&kind))?;
                Ok((kind, batch, bytes))
            })
            .collect::<Result<_>>()?
    };
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        "identity tables encoded"
    );
    for (kind, batch, bytes) in encoded {
        let key = keys::data_file(space, IDENTITY, None, "parquet");
        let size = bytes.len() as u64;
        store.put(&key, bytes).await?;
        adds.push(FileAdd {
            path: key.to_string(),
            size,
            rows: batch.num_rows() as u64,
            kind: Some(kind),
            ..Default::default()
        });
    }
    tracing::debug!(
        write_ms = started.elapsed().as_millis() as u64,
        delta = dirty.is_some(),
        dirty_profiles = dirty.as_ref().map_or(0, |d| d.profiles.len()),
        "identity tables written"
    );
    // A delta keeps the checkpoint's files; everything else is replaced.
    let removes = snap
        .files
        .iter()
        .filter(|f| dirty.is_none() || !f.kind.as_deref().is_some_and(|k| KINDS.contains(&k)))
        .map(|f| f.path.clone())
        .collect();
    let canonical: Vec<(ProfileIdx, bool)> = after
        .iter()
        .enumerate()
        .filter(|(p, (c, _))| *c as usize == *p)
        .map(|(_, ck)| *ck)
        .collect();
    let mut accounts: std::collections::BTreeSet<&str> =
        graph.account_traits.keys().map(String::as_str).collect();
    for l in graph.account_links.values() {
        accounts.extend(l.keys().map(String::as_str));
    }
    accounts.extend(committed_accounts.iter().flatten().map(String::as_str));
    let mut report = IdentityReport {
        events_read,
        profiles: canonical.len() as u64,
        known: canonical.iter().filter(|(_, known)| *known).count() as u64,
        ids: ids_total.unwrap_or_else(|| graph.ids.values().map(|m| m.len() as u64).sum()),
        merges: graph.merges.len() as u64,
        accounts: accounts.len() as u64,
        version: snap.version + 1,
        events_version: events.version,
    };
    let draft = CommitDraft {
        operation: if full { "identity-full" } else { "identity" }.into(),
        adds,
        removes,
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
    match cache {
        Some(c) => *c.lock().await = Some((entry.version, graph)),
        // freeing millions of small allocations takes a while: not on the caller's time
        None => drop(std::thread::spawn(move || drop(graph))),
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
