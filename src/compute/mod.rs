//! `audiences compute`: identities, then computed traits, then audiences, in dependency order;
//! each definition's result committed as a new version in the space's `memberships` log,
//! with the entered/exited changes against its previous version.
//!
//! Files of the `memberships` log are tagged by kind: `members` (the current membership of one
//! audience version; replaced by the next version), `changes` (entered/exited of one version;
//! kept), `trait_values` (a computed trait version; replaced by the next).

pub(crate) mod bits;
pub mod lifecycle;
pub(crate) mod members;
pub mod refresh;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use serde::Serialize;

use crate::definitions::{self, Stored};
use crate::error::{Error, Result};
use crate::events::schema::ts_type;
use crate::events::writer::{encode_parquet, writer_properties};
use crate::identity::IdentityRules;
use crate::identity::persist::ts_array;
use crate::lang::definition::{Kind, Level};
use crate::plan::{Inputs, compile_audience, compile_trait};
use crate::store::keys::{self, Key};
use crate::store::log::{CommitDraft, CommitEntry, FileAdd, Snapshot};
use crate::store::{CommitLog, Space, Store, TableName};
use members::{MemberSet, Replace};

/// The memberships log.
pub const MEMBERSHIPS: TableName = TableName::Named("memberships");

/// Schema of each kind of file in the memberships log.
pub fn schema(kind: &str) -> SchemaRef {
    let s = |n: &str, null: bool| Field::new(n, DataType::Utf8, null);
    let i = |n: &str, null: bool| Field::new(n, DataType::Int64, null);
    let t = |n: &str| Field::new(n, ts_type(), false);
    // Profile-level rows carry profile_id and profile_idx; account-level rows carry account_id.
    Arc::new(Schema::new(match kind {
        "members" => vec![
            s("audience_key", false),
            s("profile_id", true),
            i("profile_idx", true),
            t("entered_at"),
            t("as_of"),
            i("version", false),
            s("account_id", true),
        ],
        "changes" => vec![
            s("audience_key", false),
            s("profile_id", true),
            i("profile_idx", true),
            s("change", false),
            i("version", false),
            t("as_of"),
            s("account_id", true),
        ],
        _ => vec![
            s("key", false),
            s("profile_id", true),
            i("profile_idx", true),
            s("value", false),
            s("value_str", true),
            Field::new("value_num", DataType::Float64, true),
            Field::new("value_bool", DataType::Boolean, true),
            i("version", false),
            t("as_of"),
            s("account_id", true),
        ],
    }))
}

/// A batch of a memberships file in the current schema of its kind (columns added since the
/// file was written are null).
pub fn conform(batch: &RecordBatch, kind: &str) -> Result<RecordBatch> {
    let target = schema(kind);
    let cols = target
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) => Ok(Arc::clone(c)),
            None if f.is_nullable() => Ok(arrow::array::new_null_array(
                f.data_type(),
                batch.num_rows(),
            )),
            None => Err(Error::Usage(format!(
                "memberships file without column {}",
                f.name()
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(target, cols)?)
}

/// The `profile_id` and `account_id` columns of member keys (account ids when `accounts`).
pub(crate) fn key_columns(keys: ArrayRef, accounts: bool) -> (ArrayRef, ArrayRef) {
    let none = arrow::array::new_null_array(&DataType::Utf8, keys.len());
    if accounts { (none, keys) } else { (keys, none) }
}

/// What happened to one definition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyReport {
    /// Key.
    pub key: String,
    /// `audience` or `computed_trait`.
    pub kind: String,
    /// New version.
    pub version: u64,
    /// Members (audiences) or profiles with a value (traits).
    pub size: u64,
    /// Profiles that entered (audiences).
    pub entered: u64,
    /// Profiles that exited (audiences).
    pub exited: u64,
    /// Milliseconds spent.
    pub millis: u64,
}

/// A committed audience or trait version, as recorded in the log.
#[derive(Debug, Clone)]
pub struct VersionRef {
    /// Key.
    pub key: String,
    /// Per-key version.
    pub version: u64,
    /// Evaluation time.
    pub as_of: i64,
    /// The members or trait-values file.
    pub data: FileAdd,
    /// The changes file (audiences).
    pub changes: Option<FileAdd>,
    /// What it was computed from: definition version, identity version, events version and
    /// as-of (a later compute with the same inputs may reuse it).
    pub inputs: Option<String>,
    /// The same inputs, structured, plus the versions of the definitions it read (what a
    /// refresh continues from).
    pub basis: Option<Basis>,
}

/// What a committed version (or a refresh that found nothing to change) is consistent with:
/// a refresh continues from it, reading only what came after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Basis {
    /// Definition version.
    pub definition_version: u64,
    /// Identity log version.
    pub identity_version: u64,
    /// Events log version the identity state covered.
    pub events_version: u64,
    /// Evaluation time.
    pub as_of: i64,
    /// Version of every audience and computed trait the definition reads.
    #[serde(default)]
    pub deps: BTreeMap<String, u64>,
}

impl Basis {
    /// The `inputs` fingerprint of compute's dependency reuse.
    pub fn inputs(&self) -> String {
        format!(
            "{}:{}:{}:{}",
            self.definition_version, self.identity_version, self.events_version, self.as_of
        )
    }
}

/// Every version of every key, in commit order.
pub fn versions(snap: &Snapshot) -> Vec<VersionRef> {
    let mut out = Vec::new();
    for e in snap.entries.iter() {
        // A refresh commits the versions of several keys in one entry.
        if let Some(items) = e.info.get("versions").and_then(|v| v.as_array()) {
            for it in items {
                let file = |field: &str| {
                    let path = it.get(field)?.as_str()?;
                    e.adds.iter().find(|f| f.path == path).cloned()
                };
                let (Some(key), Some(data)) =
                    (it.get("key").and_then(|v| v.as_str()), file("data"))
                else {
                    continue;
                };
                out.push(VersionRef {
                    key: key.to_string(),
                    version: it.get("version").and_then(|v| v.as_u64()).unwrap_or(0),
                    as_of: it.get("as_of").and_then(|v| v.as_i64()).unwrap_or(0),
                    data,
                    changes: file("changes"),
                    inputs: it.get("inputs").and_then(|v| v.as_str()).map(String::from),
                    basis: it
                        .get("basis")
                        .and_then(|b| serde_json::from_value(b.clone()).ok()),
                });
            }
            continue;
        }
        let Some(key) = e.info.get("key").and_then(|v| v.as_str()) else {
            continue;
        };
        let data = e
            .adds
            .iter()
            .find(|f| matches!(f.kind.as_deref(), Some("members") | Some("trait_values")));
        let Some(data) = data else { continue };
        out.push(VersionRef {
            key: key.to_string(),
            version: e.info.get("version").and_then(|v| v.as_u64()).unwrap_or(0),
            as_of: e.info.get("as_of").and_then(|v| v.as_i64()).unwrap_or(0),
            data: data.clone(),
            changes: e
                .adds
                .iter()
                .find(|f| f.kind.as_deref() == Some("changes"))
                .cloned(),
            inputs: e
                .info
                .get("inputs")
                .and_then(|v| v.as_str())
                .map(String::from),
            basis: e
                .info
                .get("basis")
                .and_then(|b| serde_json::from_value(b.clone()).ok()),
        });
    }
    out
}

/// The latest basis of every key: from its latest version, or from a later refresh that found
/// nothing to change for it.
pub fn bases(snap: &Snapshot) -> BTreeMap<String, Basis> {
    let mut out = BTreeMap::new();
    for e in snap.entries.iter() {
        let mut one = |it: &serde_json::Value| {
            if let (Some(k), Some(b)) = (
                it.get("key").and_then(|v| v.as_str()),
                it.get("basis")
                    .and_then(|b| serde_json::from_value::<Basis>(b.clone()).ok()),
            ) {
                out.insert(k.to_string(), b);
            }
        };
        one(&e.info);
        for list in ["versions", "unchanged"] {
            for it in e
                .info
                .get(list)
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
            {
                one(it);
            }
        }
    }
    out
}

/// Read a whole committed file.
pub async fn read_file(store: &Store, f: &FileAdd) -> Result<Vec<RecordBatch>> {
    let bytes = store.get(&Key::from_committed(&f.path)).await?;
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
    Ok(reader.collect::<std::result::Result<Vec<_>, _>>()?)
}

/// A whole Parquet file as [`read_file`] reads it, its row groups decoded on every core.
pub async fn read_file_parallel(store: &Store, f: &FileAdd) -> Result<Vec<RecordBatch>> {
    let bytes = store.get(&Key::from_committed(&f.path)).await?;
    decode_parallel(bytes, None, &f.path).await
}

/// The batches of Parquet file `bytes` (only `columns` when given), its row groups split over
/// the cores and decoded on blocking threads, in file order; `what` names the file in errors.
pub async fn decode_parallel(
    bytes: bytes::Bytes,
    columns: Option<&'static [&'static str]>,
    what: &str,
) -> Result<Vec<RecordBatch>> {
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder};
    let meta = ArrowReaderMetadata::load(&bytes, Default::default())?;
    let groups = meta.metadata().num_row_groups();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per = groups.div_ceil(threads).max(1);
    let tasks: Vec<_> = (0..groups)
        .step_by(per)
        .map(|first| {
            let (bytes, meta) = (bytes.clone(), meta.clone());
            tokio::task::spawn_blocking(move || {
                let rg = (first..groups.min(first + per)).collect();
                let mut builder = ParquetRecordBatchReaderBuilder::new_with_metadata(bytes, meta)
                    .with_row_groups(rg);
                if let Some(c) = columns {
                    let mask = ProjectionMask::columns(builder.parquet_schema(), c.iter().copied());
                    builder = builder.with_projection(mask);
                }
                Ok::<_, Error>(
                    builder
                        .build()?
                        .collect::<std::result::Result<Vec<_>, _>>()?,
                )
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.extend(
            t.await
                .map_err(|e| Error::Usage(format!("reading {what} failed: {e}")))??,
        );
    }
    Ok(out)
}

/// Writer settings of memberships files: no dictionary for the columns that hold a distinct
/// value per row (ids, values), where building one only to abandon it is most of the encoding.
fn memberships_writer_properties() -> parquet::file::properties::WriterProperties {
    let mut b = writer_properties(None).into_builder();
    for c in [
        "profile_id",
        "profile_idx",
        "account_id",
        "value",
        "value_num",
    ] {
        b = b.set_column_dictionary_enabled(c.into(), false);
    }
    b.build()
}

pub(crate) async fn put_batch(
    store: &Store,
    space: &Space,
    kind: &str,
    batch: &RecordBatch,
) -> Result<FileAdd> {
    let bytes = encode_parquet(batch, memberships_writer_properties())?;
    let key = keys::data_file(space, MEMBERSHIPS, None, "parquet");
    let size = bytes.len() as u64;
    store.put(&key, bytes).await?;
    Ok(FileAdd {
        path: key.to_string(),
        size,
        rows: batch.num_rows() as u64,
        kind: Some(kind.into()),
        ..Default::default()
    })
}

/// Commit an entry to the memberships log, retrying only when the winner touched other keys.
async fn commit_version(
    store: &Store,
    space: &Space,
    key: &str,
    mut draft: CommitDraft,
    base: &Snapshot,
) -> Result<CommitEntry> {
    let log = CommitLog::new(store, space, MEMBERSHIPS);
    let mut snap_version = base.version;
    for _ in 0..crate::store::log::MAX_COMMIT_ATTEMPTS {
        if let Some(e) = log.try_commit(snap_version, draft.clone()).await? {
            return Ok(e);
        }
        let snap = log.snapshot().await?;
        if versions(&snap)
            .iter()
            .any(|v| v.key == key && v.version >= draft.info["version"].as_u64().unwrap_or(0))
        {
            return Err(Error::Conflict(format!(
                "'{key}' was committed by a concurrent compute; run again"
            )));
        }
        snap_version = snap.version;
        draft.info["rebased"] = serde_json::json!(true);
    }
    Err(log.conflict_error())
}

/// Compute `keys` (all live definitions when empty, plus whatever they depend on) at `as_of`.
pub async fn compute(
    store: &Store,
    space: &Space,
    rules: &IdentityRules,
    as_of: i64,
    keys: &[String],
) -> Result<Vec<KeyReport>> {
    compute_with_progress(store, space, rules, as_of, keys, false).await
}

/// [`compute`], drawing progress (one tick per definition) on a terminal when `progress`.
pub async fn compute_with_progress(
    store: &Store,
    space: &Space,
    rules: &IdentityRules,
    as_of: i64,
    keys: &[String],
    progress: bool,
) -> Result<Vec<KeyReport>> {
    let bar = crate::progress::counter(progress, "definitions computed");
    let t0 = std::time::Instant::now();
    let identity = crate::identity::resolve(store, space, rules, false).await?;
    tracing::debug!(
        millis = t0.elapsed().as_millis() as u64,
        "identity up to date"
    );
    let defs = definitions::live(store, space).await?;
    for k in keys {
        if !defs.contains_key(k) {
            return Err(Error::Usage(format!(
                "no audience or computed trait '{k}' in space '{space}'"
            )));
        }
    }
    let deps = definitions::dependencies(&defs)?;
    let order = definitions::order(&deps)?;
    let wanted: BTreeSet<String> = if keys.is_empty() {
        defs.keys().cloned().collect()
    } else {
        let mut w = BTreeSet::new();
        let mut stack: Vec<String> = keys.to_vec();
        while let Some(k) = stack.pop() {
            if w.insert(k.clone()) {
                stack.extend(deps.get(&k).into_iter().flatten().cloned());
            }
        }
        w
    };
    let ctx =
        crate::tables::compute_session(store, space, Some(identity.events_version), true).await?;
    tracing::debug!(millis = t0.elapsed().as_millis() as u64, "session ready");
    let computed: BTreeSet<String> = defs
        .iter()
        .filter(|(_, s)| s.file.kind == Kind::ComputedTrait)
        .map(|(k, _)| k.clone())
        .collect();
    // Start from the committed values of every computed trait, replaced as they are recomputed.
    let mlog = CommitLog::new(store, space, MEMBERSHIPS);
    let mut snap = mlog.snapshot().await?;
    let mut trait_values: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
    let mut latest: BTreeMap<String, VersionRef> = BTreeMap::new();
    for v in versions(&snap) {
        latest.insert(v.key.clone(), v);
    }
    let account_keys: BTreeSet<String> = defs
        .iter()
        .filter(|(_, s)| s.file.level == Level::Accounts)
        .map(|(k, _)| k.clone())
        .collect();
    // Committed values and members are read only for what the computed definitions refer to.
    let referenced: BTreeSet<&String> = wanted
        .iter()
        .flat_map(|k| deps.get(k).into_iter().flatten())
        .collect();
    for k in computed.iter().filter(|k| referenced.contains(k)) {
        if let Some(v) = latest.get(k) {
            let batches = read_file(store, &v.data).await?;
            let batches = batches
                .iter()
                .map(|b| conform(b, "trait_values"))
                .collect::<Result<Vec<_>>>()?;
            trait_values.insert(k.clone(), batches);
        }
    }
    for (k, s) in &defs {
        if s.file.kind == Kind::Audience && !wanted.contains(k) && referenced.contains(k) {
            MemberSet::read_opt(store, latest.get(k), s.file.level)
                .await?
                .register(&ctx, k, s.file.level)?;
        }
    }
    let mut reports = Vec::new();
    for key in order.iter().filter(|k| wanted.contains(*k)) {
        let t = std::time::Instant::now();
        let stored: &Stored = &defs[key];
        let inputs_id = format!(
            "{}:{}:{}:{as_of}",
            stored.version, identity.version, identity.events_version
        );
        let prev = latest.get(key);
        // A dependency (not asked for by name) already computed from the same inputs is reused.
        if !keys.is_empty()
            && !keys.contains(key)
            && prev.is_some_and(|p| p.inputs.as_deref() == Some(inputs_id.as_str()))
        {
            if stored.file.kind == Kind::Audience {
                MemberSet::read_opt(store, prev, stored.file.level)
                    .await?
                    .register(&ctx, key, stored.file.level)?;
            }
            tracing::debug!(key = %key, "dependency current: reused");
            continue;
        }
        register_trait_values(&ctx, &trait_values)?;
        let inputs = Inputs {
            ctx: &ctx,
            as_of,
            created_at: stored.created_at,
            computed_traits: &computed,
            account_keys: &account_keys,
        };
        let version = prev.map_or(1, |p| p.version + 1);
        let fail = |e: Error| Error::Compute {
            key: key.clone(),
            source: Box::new(e),
        };
        let (adds, report) = match stored.file.kind {
            Kind::Audience => {
                let plan = compile_audience(&inputs, &stored.file)
                    .await
                    .map_err(fail)?;
                tracing::trace!(key = %key, plan = %plan.frame.logical_plan().display_indent(), "compiled");
                tracing::debug!(key = %key, millis = t.elapsed().as_millis() as u64, "compiled");
                let batches = collect_traced(key, plan.frame).await.map_err(fail)?;
                tracing::debug!(key = %key, millis = t.elapsed().as_millis() as u64, "evaluated");
                let level = plan.level;
                let fresh = MemberSet::evaluated(&batches, level)?;
                let old = MemberSet::read_opt(store, prev, level).await?;
                let next = old.next(&fresh, &Replace::All, as_of)?;
                let adds = audience_files(store, space, key, version, as_of, &next).await?;
                let (n, entered, exited) =
                    (next.members.len(), next.entered.len(), next.exited.len());
                next.members.register(&ctx, key, level)?;
                let report = KeyReport {
                    key: key.clone(),
                    kind: "audience".into(),
                    version,
                    size: n as u64,
                    entered: entered as u64,
                    exited: exited as u64,
                    millis: 0,
                };
                (adds, report)
            }
            Kind::ComputedTrait => {
                let plan = compile_trait(&inputs, &stored.file).await.map_err(fail)?;
                tracing::trace!(key = %key, plan = %plan.frame.logical_plan().display_indent(), "compiled");
                let batches = collect_traced(key, plan.frame).await.map_err(fail)?;
                tracing::debug!(key = %key, millis = t.elapsed().as_millis() as u64, "evaluated");
                let tb = trait_batch(key, version, as_of, &batches, plan.level, plan.json_value)?;
                let n = tb.num_rows();
                trait_values.insert(key.clone(), vec![tb.clone()]);
                let adds = vec![put_batch(store, space, "trait_values", &tb).await?];
                let report = KeyReport {
                    key: key.clone(),
                    kind: "computed_trait".into(),
                    version,
                    size: n as u64,
                    entered: 0,
                    exited: 0,
                    millis: 0,
                };
                (adds, report)
            }
        };
        let basis = Basis {
            definition_version: stored.version,
            identity_version: identity.version,
            events_version: identity.events_version,
            as_of,
            deps: deps
                .get(key)
                .into_iter()
                .flatten()
                .filter_map(|d| latest.get(d).map(|v| (d.clone(), v.version)))
                .collect(),
        };
        let draft = CommitDraft {
            operation: "compute".into(),
            adds,
            removes: prev.map(|p| vec![p.data.path.clone()]).unwrap_or_default(),
            info: serde_json::json!({
                "key": key, "version": version, "as_of": as_of, "definition_version": stored.version,
                "inputs": inputs_id, "basis": basis,
                "size": report.size, "entered": report.entered, "exited": report.exited,
            }),
        };
        tracing::debug!(key = %key, millis = t.elapsed().as_millis() as u64, "files written");
        commit_version(store, space, key, draft, &snap).await?;
        snap = mlog.snapshot().await?;
        for v in versions(&snap) {
            if v.key == *key {
                latest.insert(v.key.clone(), v);
            }
        }
        bar.inc(1);
        bar.set_message(key.clone());
        tracing::info!(key = %key, version, millis = t.elapsed().as_millis() as u64, "committed");
        reports.push(KeyReport {
            millis: t.elapsed().as_millis() as u64,
            ..report
        });
    }
    bar.finish_and_clear();
    Ok(reports)
}

/// Write the members and changes files of audience version `next`.
pub(crate) async fn audience_files(
    store: &Store,
    space: &Space,
    key: &str,
    version: u64,
    as_of: i64,
    next: &members::Next,
) -> Result<Vec<FileAdd>> {
    let m = &next.members;
    let n = m.len();
    let (pids, accs) = m.key_columns();
    let mb = RecordBatch::try_new(
        schema("members"),
        vec![
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(key, n))),
            pids,
            Arc::new(Int64Array::from(m.idx.clone())),
            Arc::new(m.entered.clone()),
            ts_array(vec![as_of; n]),
            Arc::new(Int64Array::from_iter_values(std::iter::repeat_n(
                version as i64,
                n,
            ))),
            accs,
        ],
    )?;
    let (e, x) = (&next.entered, &next.exited);
    let c = e.len() + x.len();
    let ((ep, ea), (xp, xa)) = (e.key_columns(), x.key_columns());
    let cb = RecordBatch::try_new(
        schema("changes"),
        vec![
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(key, c))),
            arrow::compute::concat(&[ep.as_ref(), xp.as_ref()])?,
            Arc::new(Int64Array::from_iter(e.idx.iter().chain(&x.idx).copied())),
            Arc::new(StringArray::from_iter_values(
                std::iter::repeat_n("entered", e.len())
                    .chain(std::iter::repeat_n("exited", x.len())),
            )),
            Arc::new(Int64Array::from_iter_values(std::iter::repeat_n(
                version as i64,
                c,
            ))),
            ts_array(vec![as_of; c]),
            arrow::compute::concat(&[ea.as_ref(), xa.as_ref()])?,
        ],
    )?;
    let members_file = put_batch(store, space, "members", &mb).await?;
    crate::fault::hit("during_changes");
    let changes_file = put_batch(store, space, "changes", &cb).await?;
    Ok(vec![members_file, changes_file])
}

/// Build a trait-values batch from a compiled trait's output (`profile_idx, profile_id` or
/// `account_id`, then the typed value columns).
pub(crate) fn trait_batch(
    key: &str,
    version: u64,
    as_of: i64,
    batches: &[RecordBatch],
    level: Level,
    json_value: bool,
) -> Result<RecordBatch> {
    use arrow::array::{BooleanBuilder, Float64Builder, StringBuilder};
    use std::io::Write as _;
    let mut idx: Vec<Option<i64>> = Vec::new();
    let mut who = StringBuilder::new();
    // the JSON value and its typed forms, built directly (no JSON round trip)
    let mut value = StringBuilder::new();
    let (mut vs, mut vn, mut vb) = (
        StringBuilder::new(),
        Float64Builder::new(),
        BooleanBuilder::new(),
    );
    let mut buf: Vec<u8> = Vec::new();
    let first = match level {
        Level::Users => 2,
        Level::Accounts => 1,
    };
    for b in batches {
        let i = b.column(0).as_primitive_opt::<Int64Type>();
        let p = arrow::compute::cast(b.column(first - 1), &DataType::Utf8)?;
        let p = p.as_string::<i32>();
        let s = arrow::compute::cast(b.column(first), &DataType::Utf8)?;
        let s = s.as_string::<i32>();
        let n = b
            .column(first + 1)
            .as_primitive_opt::<arrow::datatypes::Float64Type>();
        let bo = b.column(first + 2).as_boolean_opt();
        for r in 0..b.num_rows() {
            if !p.is_valid(r) {
                continue;
            }
            buf.clear();
            if s.is_valid(r) && json_value {
                // a list as JSON array text (json_array): the value and its text form
                buf.extend_from_slice(s.value(r).as_bytes());
                vs.append_value(s.value(r));
                vn.append_null();
                vb.append_null();
            } else if s.is_valid(r) {
                serde_json::to_writer(&mut buf, s.value(r))?;
                vs.append_value(s.value(r));
                vn.append_null();
                vb.append_null();
            } else if let Some(n) = n.filter(|n| n.is_valid(r)) {
                let x = n.value(r);
                if x.fract() == 0.0 && x.abs() < 9e15 {
                    let _ = write!(buf, "{}", x as i64);
                } else {
                    serde_json::to_writer(&mut buf, &x)?;
                }
                vs.append_null();
                vn.append_value(x);
                vb.append_null();
            } else if let Some(bo) = bo.filter(|b| b.is_valid(r)) {
                buf.extend_from_slice(if bo.value(r) { b"true" } else { b"false" });
                vs.append_null();
                vn.append_null();
                vb.append_value(bo.value(r));
            } else {
                continue;
            }
            // only JSON text and whole UTF-8 strings were written
            value.append_value(std::str::from_utf8(&buf).map_err(|e| Error::Usage(e.to_string()))?);
            idx.push(match (level, i) {
                (Level::Users, Some(i)) => Some(i.value(r)),
                _ => None,
            });
            who.append_value(p.value(r));
        }
    }
    let n = idx.len();
    let (pids, accs) = key_columns(Arc::new(who.finish()), level == Level::Accounts);
    Ok(RecordBatch::try_new(
        schema("trait_values"),
        vec![
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(key, n))),
            pids,
            Arc::new(Int64Array::from_iter(idx)),
            Arc::new(value.finish()),
            Arc::new(vs.finish()),
            Arc::new(vn.finish()),
            Arc::new(vb.finish()),
            Arc::new(Int64Array::from_iter_values(std::iter::repeat_n(
                version as i64,
                n,
            ))),
            ts_array(vec![as_of; n]),
            accs,
        ],
    )?)
}

pub(crate) fn register_trait_values(
    ctx: &SessionContext,
    values: &BTreeMap<String, Vec<RecordBatch>>,
) -> Result<()> {
    let batches: Vec<RecordBatch> = values.values().flatten().cloned().collect();
    let _ = ctx.deregister_table("__computed_traits");
    ctx.register_table(
        "__computed_traits",
        Arc::new(MemTable::try_new(schema("trait_values"), vec![batches])?),
    )?;
    Ok(())
}

/// The members of an audience at a version (latest when None).
pub async fn members(
    store: &Store,
    space: &Space,
    key: &str,
    version: Option<u64>,
) -> Result<Option<(VersionRef, Vec<RecordBatch>)>> {
    let snap = CommitLog::new(store, space, MEMBERSHIPS).snapshot().await?;
    let found = versions(&snap)
        .into_iter()
        .filter(|v| v.key == key)
        .rfind(|v| version.is_none_or(|n| v.version == n));
    match found {
        None => Ok(None),
        Some(v) => {
            let batches = read_file(store, &v.data).await.map_err(|e| match e {
                Error::ObjectStore(object_store::Error::NotFound { .. }) => {
                    Error::Usage(format!("version {} of '{key}' was vacuumed", v.version))
                }
                other => other,
            })?;
            Ok(Some((v, batches)))
        }
    }
}

/// Runs a compiled plan; with trace logging on, logs its physical plan with the metrics of
/// every operator (rows, time) once it has run.
pub(crate) async fn collect_traced(
    key: &str,
    frame: datafusion::dataframe::DataFrame,
) -> Result<Vec<arrow::array::RecordBatch>> {
    if !tracing::enabled!(tracing::Level::TRACE) {
        return Ok(frame.collect().await?);
    }
    let task = std::sync::Arc::new(frame.task_ctx());
    let plan = frame.create_physical_plan().await?;
    let batches = datafusion::physical_plan::collect(std::sync::Arc::clone(&plan), task).await?;
    let shown =
        datafusion::physical_plan::display::DisplayableExecutionPlan::with_metrics(plan.as_ref())
            .indent(true)
            .to_string();
    tracing::trace!(key = %key, plan = %shown, "executed");
    Ok(batches)
}
