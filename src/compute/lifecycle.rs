//! Definition lifecycle around compute: an edit and its recompute under a per-key lock, and
//! previews that evaluate a definition without saving anything.
//!
//! The lock is an object `spaces/<space>/_locks/<key>.json` created with put-if-absent, so of
//! two concurrent edits exactly one proceeds; the other gets a "locked" error naming the edit
//! that holds it. The holder deletes it when its recompute has committed (or failed). A lock
//! left by a killed process expires after [`LOCK_TTL_SECS`].

use std::collections::{BTreeMap, BTreeSet};

use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use super::members::{MemberSet, Replace};
use super::{MEMBERSHIPS, VersionRef, register_trait_values, trait_batch, versions};
use crate::definitions;
use crate::error::{Error, Result};
use crate::identity::IdentityRules;
use crate::lang::definition::{DefinitionFile, Kind};
use crate::plan::{Inputs, compile_audience, compile_trait};
use crate::store::keys::Key;
use crate::store::{CommitLog, Space, Store};

/// A lock older than this many seconds is considered abandoned (its holder died).
pub const LOCK_TTL_SECS: i64 = 3600;

/// The content of a lock object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lock {
    /// Locked key.
    pub key: String,
    /// The definition version being recomputed.
    pub definition_version: u64,
    /// When the edit started (UTC microseconds).
    pub since: i64,
    /// Unique id of the holder.
    pub owner: String,
}

fn lock_key(space: &Space, key: &str) -> Key {
    Key::from_committed(&format!("spaces/{space}/_locks/{key}.json"))
}

/// The current lock of `key`, if any (expired locks included).
pub async fn current_lock(store: &Store, space: &Space, key: &str) -> Result<Option<Lock>> {
    match store.get(&lock_key(space, key)).await {
        Ok(b) => Ok(serde_json::from_slice(&b).ok()),
        Err(Error::ObjectStore(object_store::Error::NotFound { .. })) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Take the edit lock of `key`, or fail with a "locked" error naming the holder.
pub async fn lock(
    store: &Store,
    space: &Space,
    key: &str,
    definition_version: u64,
) -> Result<Lock> {
    let lock = Lock {
        key: key.to_string(),
        definition_version,
        since: chrono::Utc::now().timestamp_micros(),
        owner: uuid::Uuid::new_v4().to_string(),
    };
    let path = lock_key(space, key);
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    for _ in 0..2 {
        let body = PutPayload::from(serde_json::to_vec(&lock)?);
        match store
            .object_store()
            .put_opts(path.path(), body, opts.clone())
            .await
        {
            Ok(_) => return Ok(lock),
            Err(object_store::Error::AlreadyExists { .. }) => {
                let held = current_lock(store, space, key).await?;
                match held {
                    Some(h) if lock.since - h.since < LOCK_TTL_SECS * 1_000_000 => {
                        let since = chrono::DateTime::from_timestamp_micros(h.since)
                            .map(|t| t.to_rfc3339())
                            .unwrap_or_default();
                        return Err(Error::Locked(format!(
                            "'{key}' is locked: the recompute of its edit to definition version \
                             {} has been running since {since}; edit again when it has finished",
                            h.definition_version
                        )));
                    }
                    // abandoned (or unreadable): take it over
                    _ => {
                        let _ = store.object_store().delete(path.path()).await;
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Locked(format!(
        "'{key}' is locked by a concurrent edit; edit again when it has finished"
    )))
}

/// Release a lock taken by [`lock`] (only if it is still ours).
pub async fn unlock(store: &Store, space: &Space, held: &Lock) -> Result<()> {
    if current_lock(store, space, &held.key)
        .await?
        .is_some_and(|l| l.owner == held.owner)
    {
        store
            .object_store()
            .delete(lock_key(space, &held.key).path())
            .await?;
    }
    Ok(())
}

/// Edit a definition and recompute it at `as_of`, holding its lock meanwhile. Returns the new
/// definition version and the compute reports.
pub async fn edit(
    store: &Store,
    space: &Space,
    rules: &IdentityRules,
    file: &DefinitionFile,
    as_of: i64,
) -> Result<(u64, Vec<super::KeyReport>)> {
    let live = definitions::live(store, space).await?;
    let current = live.get(&file.key).map_or(0, |s| s.version);
    if let Some(s) = live.get(&file.key)
        && definitions::same_evaluation(&s.file, file)
    {
        // only the name or the destinations change: nothing to recompute
        definitions::edit(store, space, file).await?;
        return Ok((current, Vec::new()));
    }
    let held = lock(store, space, &file.key, current + 1).await?;
    let run = async {
        definitions::edit(store, space, file).await?;
        let version = definitions::live(store, space)
            .await?
            .get(&file.key)
            .map_or(0, |s| s.version);
        crate::fault::hit("edit_before_recompute");
        // A refresh (the serve loop) may commit the key meanwhile; compute again on top of it.
        let mut attempt = 0;
        let reports = loop {
            match super::compute(store, space, rules, as_of, std::slice::from_ref(&file.key)).await
            {
                Err(Error::Conflict(_)) if attempt < 3 => attempt += 1,
                other => break other?,
            }
        };
        Ok::<_, Error>((version, reports))
    };
    let out = run.await;
    unlock(store, space, &held).await?;
    out
}

/// What a preview found.
#[derive(Debug, Clone, Serialize)]
pub struct Preview {
    /// Key of the previewed definition.
    pub key: String,
    /// `audience` or `computed_trait`.
    pub kind: String,
    /// Members (audience) or profiles with a value (trait).
    pub size: u64,
    /// Up to 10 members (profile or account ids), sorted; for traits `id=value`.
    pub sample: Vec<String>,
    /// A committed version of this key exists.
    pub existing: bool,
    /// Against the current version: members that would enter (traits: values that would change).
    pub would_enter: u64,
    /// Members that would exit (traits: values that would disappear).
    pub would_exit: u64,
    /// Milliseconds spent.
    pub millis: u64,
}

/// Register, in `ctx`, the committed members of the audiences and the values of the computed
/// traits in `keys` (what a definition reads); returns the trait values.
pub(crate) async fn register_references(
    store: &Store,
    ctx: &datafusion::prelude::SessionContext,
    defs: &BTreeMap<String, definitions::Stored>,
    latest: &BTreeMap<String, VersionRef>,
    keys: &BTreeSet<String>,
) -> Result<BTreeMap<String, Vec<arrow::array::RecordBatch>>> {
    let mut values = BTreeMap::new();
    for k in keys {
        let Some(s) = defs.get(k) else { continue };
        match s.file.kind {
            Kind::ComputedTrait => {
                if let Some(v) = latest.get(k) {
                    let b = super::read_file_parallel(store, &v.data).await?;
                    values.insert(
                        k.clone(),
                        b.iter()
                            .map(|b| super::conform(b, "trait_values"))
                            .collect::<Result<_>>()?,
                    );
                }
            }
            Kind::Audience => {
                MemberSet::read_opt(store, latest.get(k), s.file.level)
                    .await?
                    .register(ctx, k, s.file.level)?;
            }
        }
    }
    register_trait_values(ctx, &values)?;
    Ok(values)
}

/// Evaluate `file` at `as_of` over the committed state, saving nothing.
pub async fn preview(
    store: &Store,
    space: &Space,
    file: &DefinitionFile,
    as_of: i64,
) -> Result<Preview> {
    let t = std::time::Instant::now();
    let mut defs = definitions::live(store, space).await?;
    let existing_def = defs.get(&file.key).cloned();
    if let Some(s) = &existing_def
        && s.file.kind != file.kind
    {
        return Err(Error::Usage(format!(
            "'{}' exists as a different kind of definition",
            file.key
        )));
    }
    let body = file
        .validate()
        .map_err(|e| Error::Usage(format!("{}: {e}", file.key)))?;
    let (audiences, traits) = definitions::references(&body);
    for r in audiences.iter().chain(&traits) {
        if r == &file.key {
            return Err(Error::Usage(format!("'{}' refers to itself", file.key)));
        }
        if !defs.contains_key(r) {
            return Err(Error::Usage(format!(
                "'{}' refers to '{r}', which does not exist in space '{space}'",
                file.key
            )));
        }
    }
    let identity = CommitLog::new(store, space, crate::identity::persist::IDENTITY)
        .snapshot()
        .await?;
    let events_version = crate::identity::persist::last_events_version(&identity);
    let ctx = crate::tables::compute_session(store, space, Some(events_version), true).await?;
    let snap = CommitLog::new(store, space, MEMBERSHIPS).snapshot().await?;
    let mut latest: BTreeMap<String, VersionRef> = BTreeMap::new();
    for v in versions(&snap) {
        latest.insert(v.key.clone(), v);
    }
    let refs: BTreeSet<String> = audiences.union(&traits).cloned().collect();
    register_references(store, &ctx, &defs, &latest, &refs).await?;
    let computed: BTreeSet<String> = defs
        .iter()
        .filter(|(_, s)| s.file.kind == Kind::ComputedTrait)
        .map(|(k, _)| k.clone())
        .collect();
    defs.retain(|_, s| s.file.level == crate::lang::definition::Level::Accounts);
    let account_keys: BTreeSet<String> = defs.keys().cloned().collect();
    let inputs = Inputs {
        ctx: &ctx,
        as_of,
        created_at: existing_def
            .as_ref()
            .map_or_else(|| chrono::Utc::now().timestamp_micros(), |s| s.created_at),
        computed_traits: &computed,
        account_keys: &account_keys,
    };
    let prev = latest.get(&file.key).filter(|_| existing_def.is_some());
    let (size, sample, enter, exit) = match file.kind {
        Kind::Audience => {
            let plan = compile_audience(&inputs, file).await?;
            let batches = plan.frame.collect().await?;
            let fresh = MemberSet::evaluated(&batches, plan.level)?;
            let next = MemberSet::read_opt(store, prev, plan.level).await?.next(
                &fresh,
                &Replace::All,
                as_of,
            )?;
            let sample = fresh
                .keys
                .iter()
                .flatten()
                .take(10)
                .map(String::from)
                .collect();
            (fresh.len(), sample, next.entered.len(), next.exited.len())
        }
        Kind::ComputedTrait => {
            let plan = compile_trait(&inputs, file).await?;
            let batches = plan.frame.collect().await?;
            let tb = trait_batch(&file.key, 0, as_of, &batches, plan.level, plan.json_value)?;
            let values = id_values(std::slice::from_ref(&tb));
            let old = match prev {
                Some(p) => id_values(&super::read_file(store, &p.data).await?),
                None => BTreeMap::new(),
            };
            let enter = values
                .iter()
                .filter(|(k, v)| old.get(*k) != Some(v))
                .count();
            let exit = old.keys().filter(|k| !values.contains_key(*k)).count();
            let sample = values
                .iter()
                .take(10)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            (values.len(), sample, enter, exit)
        }
    };
    Ok(Preview {
        key: file.key.clone(),
        kind: match file.kind {
            Kind::Audience => "audience",
            Kind::ComputedTrait => "computed_trait",
        }
        .into(),
        size: size as u64,
        sample,
        existing: prev.is_some(),
        would_enter: enter as u64,
        would_exit: exit as u64,
        millis: t.elapsed().as_millis() as u64,
    })
}

/// Trait values by profile or account id (JSON text).
fn id_values(batches: &[arrow::array::RecordBatch]) -> BTreeMap<String, String> {
    use arrow::array::{Array, AsArray};
    let mut out = BTreeMap::new();
    for b in batches {
        let Ok(b) = super::conform(b, "trait_values") else {
            continue;
        };
        let pid = b.column(1).as_string::<i32>();
        let acc = b.column(9).as_string::<i32>();
        let val = b.column(3).as_string::<i32>();
        for r in 0..b.num_rows() {
            let who = if pid.is_valid(r) {
                pid.value(r)
            } else if acc.is_valid(r) {
                acc.value(r)
            } else {
                continue;
            };
            out.insert(who.to_string(), val.value(r).to_string());
        }
    }
    out
}
