//! The sync engine: for every destination of every live audience, continue from its cursor.
//!
//! A destination's cursor (`spaces/S/_destinations/AUDIENCE/NAME.json`) names the audience
//! version the destination has acknowledged. A sync pass moves it forward in *steps*:
//! - no cursor (first sync, a destination connected later, or one whose url, mode, id type or
//!   kind changed): a backfill of the whole current membership, as entries;
//! - identify, list and group modes: one step to the current version with the net change of
//!   each member since the cursor (only the final state matters to them);
//! - track mode: one step per version, so every `Audience Entered`/`Audience Exited` event is
//!   sent, in order.
//!
//! A step is written to the cursor as pending before its first request; its requests are
//! deterministic (see `payload`), and the cursor records how many from the start have been
//! acknowledged (checkpoints every few seconds), so a killed sync resumes the same step where it
//! stopped: every change is delivered at least once and repeats carry the same idempotency key.
//! The next step starts only when every request of this one is acknowledged or dead-lettered,
//! so a profile's changes arrive in order (a stale exit never overwrites a newer entry).
//! Dead letters are committed to the `dead_letters` table before the cursor passes them.

use std::collections::BTreeSet;

use hashbrown::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Array, AsArray, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimestampMicrosecondType};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::config::{Destination, FileFormat, SinkKind, parse_all};
use super::deliver::{Clock, Limiter, SystemClock, Verdict, Webhook};
use super::payload::{Change, Entry, Ids, Message, Sender};
use crate::compute::{MEMBERSHIPS, VersionRef, conform, read_file, versions};
use crate::definitions::Stored;
use crate::error::{Error, Result};
use crate::lang::definition::{Kind, Level};
use crate::store::keys::{self, Key};
use crate::store::log::{CommitDraft, FileAdd};
use crate::store::{CommitLog, Space, Store, TableName};

/// The dead-letter table: messages given up on, with the reason.
pub const DEAD_LETTERS: TableName = TableName::Named("dead_letters");

/// Seconds between checkpoints of a step's progress.
pub const CHECKPOINT_SECS: f64 = 2.0;

/// A step in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Cursor version the step starts from (0: backfill).
    pub from: u64,
    /// Version it reaches.
    pub to: u64,
    /// Whole membership (true) or changes.
    pub backfill: bool,
    /// Requests acknowledged (or dead-lettered) from the start of the step.
    pub done: u64,
}

/// The state of one destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Fingerprint of the receiving side (a change means a new connection and a backfill).
    pub fingerprint: String,
    /// Audience version acknowledged (0: nothing yet).
    pub version: u64,
    /// Step in progress.
    #[serde(default)]
    pub pending: Option<Pending>,
    /// Messages acknowledged, all time.
    #[serde(default)]
    pub sent: u64,
    /// Requests retried, all time.
    #[serde(default)]
    pub retried: u64,
    /// Messages dead-lettered, all time.
    #[serde(default)]
    pub dead_lettered: u64,
    /// Members skipped because they have no value of the id type, all time.
    #[serde(default)]
    pub skipped_no_id: u64,
    /// Backfills made.
    #[serde(default)]
    pub backfills: u64,
    /// Identity log version of the last state-mode step.
    #[serde(default)]
    pub identity_version: u64,
    /// Last error (delivery or sync), if any.
    #[serde(default)]
    pub last_error: Option<String>,
    /// When it happened (UTC microseconds).
    #[serde(default)]
    pub last_error_at: Option<i64>,
    /// Last finished sync (UTC microseconds).
    #[serde(default)]
    pub last_sync_at: Option<i64>,
}

/// The cursor of destination `name` of `audience`.
pub async fn load_cursor(
    store: &Store,
    space: &Space,
    audience: &str,
    name: &str,
) -> Result<Option<Cursor>> {
    match store
        .get(&keys::destination_cursor(space, audience, name))
        .await
    {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).map_err(|e| {
            Error::CorruptLog {
                path: keys::destination_cursor(space, audience, name).to_string(),
                reason: e.to_string(),
            }
        })?)),
        Err(Error::ObjectStore(object_store::Error::NotFound { .. })) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn save_cursor(
    store: &Store,
    space: &Space,
    audience: &str,
    name: &str,
    c: &Cursor,
) -> Result<()> {
    store
        .put(
            &keys::destination_cursor(space, audience, name),
            serde_json::to_vec_pretty(c)?.into(),
        )
        .await
}

/// How a sync pass runs.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Scheduling clock (tests use a fast one).
    pub clock: Arc<dyn Clock>,
    /// Only these audiences (default: all with destinations).
    pub audiences: Option<BTreeSet<String>>,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            clock: Arc::new(SystemClock),
            audiences: None,
        }
    }
}

/// What one sync pass did for one destination.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncReport {
    /// Audience key.
    pub audience: String,
    /// Destination name.
    pub destination: String,
    /// Sink kind.
    pub kind: String,
    /// Cursor version before.
    pub from_version: u64,
    /// Cursor version after.
    pub to_version: u64,
    /// Steps that were backfills.
    pub backfills: u64,
    /// Messages built.
    pub messages: u64,
    /// Requests (or files) made.
    pub requests: u64,
    /// Messages acknowledged.
    pub sent: u64,
    /// Requests retried.
    pub retried: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Members without a value of the id type.
    pub skipped_no_id: u64,
    /// Milliseconds.
    pub millis: u64,
    /// Why the pass stopped early, if it did.
    pub error: Option<String>,
}

/// One sync pass over every destination of the space (concurrently; each in its own order).
pub async fn sync(store: &Store, space: &Space, opts: &SyncOptions) -> Result<Vec<SyncReport>> {
    let defs = crate::definitions::live(store, space).await?;
    let snap = CommitLog::new(store, space, MEMBERSHIPS).snapshot().await?;
    let all = versions(&snap);
    let client = http_client()?;
    let mut work = Vec::new();
    for (key, stored) in &defs {
        if stored.file.kind != Kind::Audience
            || opts.audiences.as_ref().is_some_and(|a| !a.contains(key))
        {
            continue;
        }
        let dests = destinations_of(stored)?;
        let vs: Vec<VersionRef> = all.iter().filter(|v| &v.key == key).cloned().collect();
        for d in dests {
            work.push(sync_destination(
                store,
                space,
                stored,
                d,
                vs.clone(),
                client.clone(),
                opts,
            ));
        }
    }
    Ok(futures::future::join_all(work).await)
}

/// The HTTP client of webhooks: no redirects (a 3xx is a configuration error), pooled.
fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("audiences/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::Usage(format!("http client: {e}")))
}

/// The parsed destinations of a stored definition.
pub fn destinations_of(stored: &Stored) -> Result<Vec<Destination>> {
    match &stored.file.destinations {
        Some(v) => parse_all(v, stored.file.level)
            .map_err(|e| Error::Usage(format!("{}: {e}", stored.file.key))),
        None => Ok(Vec::new()),
    }
}

async fn sync_destination(
    store: &Store,
    space: &Space,
    stored: &Stored,
    dest: Destination,
    vs: Vec<VersionRef>,
    client: reqwest::Client,
    opts: &SyncOptions,
) -> SyncReport {
    let started = Instant::now();
    let audience = stored.file.key.clone();
    let mut report = SyncReport {
        audience: audience.clone(),
        destination: dest.name.clone(),
        kind: format!("{:?}", dest.kind).to_ascii_lowercase(),
        ..Default::default()
    };
    let result = run_destination(store, space, stored, &dest, &vs, client, opts, &mut report).await;
    if let Err(e) = result {
        let msg = e.to_string();
        tracing::warn!(audience = %audience, destination = %dest.name, error = %msg, "sync failed");
        if let Ok(Some(mut c)) = load_cursor(store, space, &audience, &dest.name).await {
            c.last_error = Some(msg.clone());
            c.last_error_at = Some(chrono::Utc::now().timestamp_micros());
            let _ = save_cursor(store, space, &audience, &dest.name, &c).await;
        }
        report.error = Some(msg);
    }
    report.millis = started.elapsed().as_millis() as u64;
    report
}

#[allow(clippy::too_many_arguments)]
async fn run_destination(
    store: &Store,
    space: &Space,
    stored: &Stored,
    dest: &Destination,
    vs: &[VersionRef],
    client: reqwest::Client,
    opts: &SyncOptions,
    report: &mut SyncReport,
) -> Result<()> {
    let audience = stored.file.key.as_str();
    let mut cur = load_cursor(store, space, audience, &dest.name)
        .await?
        .unwrap_or_default();
    let fp = dest.fingerprint();
    let reconnected = cur.fingerprint != fp;
    if reconnected {
        // a new connection (or a changed receiving side): start over with a backfill
        cur.fingerprint = fp;
        cur.version = 0;
        cur.pending = None;
    }
    report.from_version = cur.version;
    report.to_version = cur.version;
    let Some(latest) = vs.last() else {
        return Ok(());
    };
    if dest.kind == SinkKind::Flight {
        // Flight clients pull and acknowledge; nothing is pushed. The pass records only a new
        // connection: rewriting an unchanged cursor it read before a client's `ack` wrote its
        // own would undo that acknowledgement (seen as a flaky server test).
        if reconnected {
            save_cursor(store, space, audience, &dest.name, &cur).await?;
        }
        return Ok(());
    }
    let accounts = stored.file.level == Level::Accounts;
    let webhook = match dest.kind {
        SinkKind::Webhook => Some(Arc::new(webhook_of(dest, client, &opts.clock)?)),
        _ => None,
    };
    let file_store = match (dest.kind, &dest.url) {
        (SinkKind::File, Some(u)) => Some(Store::open(u, &Default::default())?),
        (SinkKind::File, None) => Some(store.clone()),
        _ => None,
    };
    let sender = Sender {
        space: space.as_str(),
        audience,
        dest,
    };
    let track = dest.mode.list().contains(&super::config::Mode::Track);
    // State modes also re-check members whose ids changed since the last step.
    let identity_version = CommitLog::new(store, space, crate::identity::persist::IDENTITY)
        .snapshot()
        .await?
        .version;
    loop {
        let resumed = cur.pending.is_some();
        let step = if let Some(p) = cur.pending.clone() {
            p
        } else if cur.version == 0 {
            Pending {
                from: 0,
                to: latest.version,
                backfill: true,
                done: 0,
            }
        } else if cur.version < latest.version
            || (!track && cur.identity_version < identity_version)
        {
            let to = if track {
                vs.iter()
                    .map(|v| v.version)
                    .find(|v| *v > cur.version)
                    .unwrap_or(latest.version)
            } else {
                latest.version
            };
            Pending {
                from: cur.version,
                to,
                backfill: false,
                done: 0,
            }
        } else {
            break;
        };
        let Some(to_ref) = vs.iter().find(|v| v.version == step.to) else {
            return Err(Error::Usage(format!(
                "version {} of '{audience}' is gone; the destination starts over with a backfill",
                step.to
            )));
        };
        // What the destination holds (state modes): nothing before a backfill.
        let held: BTreeSet<Entry> = if track || step.backfill {
            BTreeSet::new()
        } else {
            load_entries(store, space, audience, &dest.name, "state").await?
        };
        let saved = if resumed {
            load_pending(store, space, audience, dest, &step).await?
        } else {
            None
        };
        let msgs: Vec<Message> = match saved {
            Some(m) => m, // a resumed step sends exactly what it was sending
            None => {
                let (msgs, no_id) = if track {
                    let changes = if step.backfill {
                        backfill_changes(store, to_ref).await?
                    } else {
                        let mut all = Vec::new();
                        for v in vs
                            .iter()
                            .filter(|v| v.version > step.from && v.version <= step.to)
                        {
                            all.extend(version_changes(store, v).await?);
                        }
                        all
                    };
                    let ids = load_ids(store, space, &changes, dest, accounts).await?;
                    sender.messages(&changes, accounts, &ids)
                } else {
                    // State modes: the difference between what the destination holds and
                    // what it should hold now (membership changes, and ids added to or gone
                    // from members).
                    let members = backfill_changes(store, to_ref).await?;
                    let ids = load_ids(store, space, &members, dest, accounts).await?;
                    let names: Vec<String> = members.into_iter().map(|c| c.member).collect();
                    let (want, no_id) = sender.desired(&names, accounts, &ids);
                    let want: BTreeSet<Entry> = want.into_iter().collect();
                    let adds: Vec<&Entry> = want.difference(&held).collect();
                    let removes: Vec<&Entry> = held.difference(&want).collect();
                    (
                        sender.entry_messages(&adds, &removes, step.to, to_ref.as_of, &ids),
                        no_id,
                    )
                };
                report.skipped_no_id += no_id;
                cur.skipped_no_id += no_id;
                if step.backfill {
                    report.backfills += 1;
                    cur.backfills += 1;
                }
                save_pending(store, space, audience, dest, &step, &msgs).await?;
                cur.pending = Some(step.clone());
                cur.identity_version = identity_version;
                save_cursor(store, space, audience, &dest.name, &cur).await?;
                msgs
            }
        };
        report.messages += msgs.len() as u64;
        match (&webhook, &file_store) {
            (Some(w), _) => {
                let reqs = sender.requests(&msgs, step.to, to_ref.as_of)?;
                report.requests += reqs.len() as u64;
                deliver_step(
                    store, space, audience, dest, w, &msgs, &reqs, &mut cur, report,
                )
                .await?;
            }
            (None, Some(fs)) => {
                if !msgs.is_empty() {
                    write_file(fs, space, audience, dest, &step, &msgs, to_ref.as_of).await?;
                    report.requests += 1;
                }
                report.sent += msgs.len() as u64;
                cur.sent += msgs.len() as u64;
            }
            _ => {}
        }
        if !track {
            let mut now_held = held;
            for m in &msgs {
                let e: Entry = (
                    m.mode,
                    m.member.clone(),
                    m.profile.clone().unwrap_or_default(),
                    m.id_value.clone().unwrap_or_default(),
                );
                if m.entered {
                    now_held.insert(e);
                } else {
                    now_held.remove(&e);
                }
            }
            save_entries(store, space, audience, &dest.name, "state", &now_held).await?;
        }
        crate::fault::hit("sync_before_cursor");
        cur.version = step.to;
        cur.pending = None;
        cur.last_sync_at = Some(chrono::Utc::now().timestamp_micros());
        save_cursor(store, space, audience, &dest.name, &cur).await?;
        crate::fault::hit("sync_after_cursor");
        report.to_version = cur.version;
    }
    cur.last_sync_at = Some(chrono::Utc::now().timestamp_micros());
    save_cursor(store, space, audience, &dest.name, &cur).await
}

fn webhook_of(
    dest: &Destination,
    client: reqwest::Client,
    clock: &Arc<dyn Clock>,
) -> Result<Webhook> {
    let mut headers = reqwest::header::HeaderMap::new();
    for (k, v) in &dest.headers {
        let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| Error::Usage(format!("{}: header '{k}' is invalid", dest.name)))?;
        let mut value = reqwest::header::HeaderValue::from_str(v).map_err(|_| {
            Error::Usage(format!("{}: header '{k}' has an invalid value", dest.name))
        })?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    Ok(Webhook {
        client,
        url: dest.url.clone().unwrap_or_default(),
        headers,
        limiter: Limiter::new(
            dest.rate_limit.per_second,
            dest.rate_limit.burst,
            Arc::clone(clock),
        ),
        clock: Arc::clone(clock),
        retry_period: dest.retry_period().as_secs_f64(),
        timeout: dest.timeout(),
    })
}

/// Send the requests of a step from its `done` mark on, `concurrency` at a time; checkpoint the
/// acknowledged prefix (dead letters first) every [`CHECKPOINT_SECS`].
#[allow(clippy::too_many_arguments)]
async fn deliver_step(
    store: &Store,
    space: &Space,
    audience: &str,
    dest: &Destination,
    w: &Arc<Webhook>,
    msgs: &[Message],
    reqs: &[super::payload::Outgoing],
    cur: &mut Cursor,
    report: &mut SyncReport,
) -> Result<()> {
    let Some(mut step) = cur.pending.clone() else {
        return Ok(());
    };
    let n = reqs.len();
    let start = (step.done as usize).min(n);
    let mut finished = vec![false; n];
    let mut prefix = start;
    let mut dead: Vec<DeadLetter> = Vec::new();
    let mut last_checkpoint = Instant::now();
    let mut stream = futures::stream::iter((start..n).map(|i| {
        let w = Arc::clone(w);
        let (body, key) = (reqs[i].body.clone(), reqs[i].key.clone());
        async move {
            let mut retries = 0u64;
            let mut last = None;
            let v = w
                .deliver(&body, &key, |e| {
                    retries += 1;
                    last = Some(e.to_string());
                })
                .await;
            (i, v, retries, last)
        }
    }))
    .buffer_unordered(dest.concurrency);
    while let Some((i, verdict, retries, last)) = stream.next().await {
        finished[i] = true;
        report.retried += retries;
        cur.retried += retries;
        if let Some(e) = last {
            cur.last_error = Some(e);
            cur.last_error_at = Some(chrono::Utc::now().timestamp_micros());
        }
        let count = reqs[i].messages.len() as u64;
        match verdict {
            Verdict::Acked { .. } => {
                report.sent += count;
                cur.sent += count;
            }
            Verdict::Dead { reason, attempts } => {
                tracing::warn!(audience, destination = %dest.name, reason = %reason, "dead-lettered");
                report.dead_lettered += count;
                cur.dead_lettered += count;
                cur.last_error = Some(reason.clone());
                cur.last_error_at = Some(chrono::Utc::now().timestamp_micros());
                for &m in &reqs[i].messages {
                    dead.push(DeadLetter {
                        message: msgs[m].clone(),
                        request_key: reqs[i].key.clone(),
                        reason: reason.clone(),
                        attempts,
                        step_to: step.to,
                    });
                }
            }
        }
        while prefix < n && finished[prefix] {
            prefix += 1;
        }
        if crate::fault::active("sync_mid_step") && prefix * 2 >= n && n >= 2 {
            crate::fault::hit("sync_mid_step");
        }
        if last_checkpoint.elapsed().as_secs_f64() >= CHECKPOINT_SECS && prefix > step.done as usize
        {
            commit_dead_letters(store, space, audience, dest, std::mem::take(&mut dead)).await?;
            step.done = prefix as u64;
            cur.pending = Some(step.clone());
            save_cursor(store, space, audience, &dest.name, cur).await?;
            crate::fault::hit("sync_after_checkpoint");
            last_checkpoint = Instant::now();
        }
    }
    commit_dead_letters(store, space, audience, dest, dead).await?;
    step.done = n as u64;
    cur.pending = Some(step);
    Ok(())
}

/// Gzipped JSON lines of `T` at `key` (None when absent).
async fn load_lines<T: serde::de::DeserializeOwned>(
    store: &Store,
    key: &Key,
) -> Result<Option<Vec<T>>> {
    let bytes = match store.get(key).await {
        Ok(b) => b,
        Err(Error::ObjectStore(object_store::Error::NotFound { .. })) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut text)
        .map_err(|e| Error::io(key.as_str(), e))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        out.push(serde_json::from_str(line).map_err(|e| Error::CorruptLog {
            path: key.to_string(),
            reason: e.to_string(),
        })?);
    }
    Ok(Some(out))
}

/// Write JSON lines (a header line, if any, then `items`), gzipped in one piece.
async fn save_lines<H: Serialize, T: Serialize>(
    store: &Store,
    key: &Key,
    header: Option<H>,
    items: impl Iterator<Item = T>,
) -> Result<()> {
    use std::io::Write;
    let mut buf = Vec::new();
    if let Some(h) = header {
        serde_json::to_writer(&mut buf, &h)?;
        buf.push(b'\n');
    }
    for it in items {
        serde_json::to_writer(&mut buf, &it)?;
        buf.push(b'\n');
    }
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(buf.len() / 4),
        flate2::Compression::fast(),
    );
    gz.write_all(&buf).map_err(|e| Error::io(key.as_str(), e))?;
    let bytes = gz.finish().map_err(|e| Error::io(key.as_str(), e))?;
    store.put(key, bytes.into()).await
}

/// What a state-mode destination holds (`which` = "state").
async fn load_entries(
    store: &Store,
    space: &Space,
    audience: &str,
    name: &str,
    which: &str,
) -> Result<BTreeSet<Entry>> {
    let key = keys::destination_data(space, audience, name, which);
    Ok(load_lines::<Entry>(store, &key)
        .await?
        .unwrap_or_default()
        .into_iter()
        .collect())
}

async fn save_entries(
    store: &Store,
    space: &Space,
    audience: &str,
    name: &str,
    which: &str,
    e: &BTreeSet<Entry>,
) -> Result<()> {
    let key = keys::destination_data(space, audience, name, which);
    save_lines(store, &key, None::<()>, e.iter()).await
}

/// The messages of a step in progress, saved before its first request.
#[derive(Serialize, serde::Deserialize)]
struct PendingHeader {
    fingerprint: String,
    from: u64,
    to: u64,
    backfill: bool,
}

async fn load_pending(
    store: &Store,
    space: &Space,
    audience: &str,
    dest: &Destination,
    step: &Pending,
) -> Result<Option<Vec<Message>>> {
    let key = keys::destination_data(space, audience, &dest.name, "pending");
    let Some(lines) = load_lines::<serde_json::Value>(store, &key).await? else {
        return Ok(None);
    };
    let Some((head, rest)) = lines.split_first() else {
        return Ok(None);
    };
    let head: PendingHeader = serde_json::from_value(head.clone())?;
    if (head.fingerprint.as_str(), head.from, head.to, head.backfill)
        != (
            dest.fingerprint().as_str(),
            step.from,
            step.to,
            step.backfill,
        )
    {
        return Ok(None);
    }
    Ok(Some(
        rest.iter()
            .map(|v| serde_json::from_value(v.clone()))
            .collect::<std::result::Result<Vec<Message>, _>>()?,
    ))
}

async fn save_pending(
    store: &Store,
    space: &Space,
    audience: &str,
    dest: &Destination,
    step: &Pending,
    msgs: &[Message],
) -> Result<()> {
    let key = keys::destination_data(space, audience, &dest.name, "pending");
    let head = PendingHeader {
        fingerprint: dest.fingerprint(),
        from: step.from,
        to: step.to,
        backfill: step.backfill,
    };
    save_lines(store, &key, Some(head), msgs.iter()).await
}

/// Every member of a version, as entries.
async fn backfill_changes(store: &Store, v: &VersionRef) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    for b in read_file(store, &v.data).await? {
        let b = conform(&b, "members")?;
        let (pid, acc) = member_cols(&b)?;
        for r in 0..b.num_rows() {
            if let Some(m) = member_at(pid, acc, r) {
                out.push(Change {
                    member: m,
                    entered: true,
                    version: v.version,
                    as_of: v.as_of,
                });
            }
        }
    }
    out.sort_by(|a, b| a.member.cmp(&b.member));
    Ok(out)
}

/// The changes of one version, sorted by member.
async fn version_changes(store: &Store, v: &VersionRef) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    let Some(f) = &v.changes else { return Ok(out) };
    for b in read_file(store, f).await? {
        let b = conform(&b, "changes")?;
        let (pid, acc) = member_cols(&b)?;
        let change = b
            .column_by_name("change")
            .map(|c| c.as_string::<i32>().clone())
            .ok_or_else(|| Error::Usage("changes file without 'change'".into()))?;
        for r in 0..b.num_rows() {
            if let Some(m) = member_at(pid, acc, r) {
                out.push(Change {
                    member: m,
                    entered: change.value(r) == "entered",
                    version: v.version,
                    as_of: v.as_of,
                });
            }
        }
    }
    out.sort_by(|a, b| a.member.cmp(&b.member));
    Ok(out)
}

fn member_cols(b: &RecordBatch) -> Result<(&StringArray, &StringArray)> {
    let col = |n: &str| {
        b.column_by_name(n)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| Error::Usage(format!("memberships file without {n}")))
    };
    Ok((col("profile_id")?, col("account_id")?))
}

fn member_at(pid: &StringArray, acc: &StringArray, r: usize) -> Option<String> {
    if pid.is_valid(r) {
        Some(pid.value(r).to_string())
    } else if acc.is_valid(r) {
        Some(acc.value(r).to_string())
    } else {
        None
    }
}

/// The ids the messages of `changes` need.
async fn load_ids(
    store: &Store,
    space: &Space,
    changes: &[Change],
    dest: &Destination,
    accounts: bool,
) -> Result<Ids> {
    let mut ids = Ids::default();
    if changes.is_empty() {
        return Ok(ids);
    }
    let members: HashSet<&str> = changes.iter().map(|c| c.member.as_str()).collect();
    let ctx = crate::tables::session(store, space).await?;
    let mut profiles: HashSet<String> = HashSet::new();
    if accounts {
        let links = ctx
            .table("account_links")
            .await?
            .select_columns(&["account_id", "profile_id"])?
            .collect()
            .await?;
        for b in &links {
            let (a, p) = (
                b.column(0).as_string::<i32>(),
                b.column(1).as_string::<i32>(),
            );
            for r in 0..b.num_rows() {
                if members.contains(a.value(r)) {
                    ids.links
                        .entry(a.value(r).to_string())
                        .or_default()
                        .push(p.value(r).to_string());
                    profiles.insert(p.value(r).to_string());
                }
            }
        }
        for v in ids.links.values_mut() {
            v.sort();
            v.dedup();
        }
    } else {
        profiles = members.iter().map(|s| s.to_string()).collect();
    }
    use datafusion::prelude::{col, lit};
    let rows = ctx
        .table("identities")
        .await?
        .filter(col("id_type").in_list(
            vec![
                lit(dest.id_type.clone()),
                lit("user_id"),
                lit("anonymous_id"),
            ],
            false,
        ))?
        .select_columns(&["profile_id", "id_type", "id_value", "first_seen"])?
        .collect()
        .await?;
    let mut firsts: HashMap<(String, &str), (i64, String)> = HashMap::new();
    for b in &rows {
        let (p, t, v) = (
            b.column(0).as_string::<i32>(),
            b.column(1).as_string::<i32>(),
            b.column(2).as_string::<i32>(),
        );
        let seen = b.column(3).as_primitive::<TimestampMicrosecondType>();
        for r in 0..b.num_rows() {
            if !profiles.contains(p.value(r)) {
                continue;
            }
            let (pv, tv, vv) = (p.value(r), t.value(r), v.value(r));
            if tv == dest.id_type {
                ids.values
                    .entry(pv.to_string())
                    .or_default()
                    .push(vv.to_string());
            }
            for which in ["user_id", "anonymous_id"] {
                if tv == which {
                    let e = firsts
                        .entry((pv.to_string(), which))
                        .or_insert((seen.value(r), vv.to_string()));
                    if (seen.value(r), vv) < (e.0, e.1.as_str()) {
                        *e = (seen.value(r), vv.to_string());
                    }
                }
            }
        }
    }
    for v in ids.values.values_mut() {
        v.sort();
        v.dedup();
    }
    for ((p, which), (_, v)) in firsts {
        if which == "user_id" {
            ids.user_id.insert(p, v);
        } else {
            ids.anonymous_id.insert(p, v);
        }
    }
    Ok(ids)
}

/// Write the messages of a step as one object (atomic: it appears whole or not at all). Its
/// name is fixed by the step, so a re-run after a crash rewrites the same object.
async fn write_file(
    fs: &Store,
    space: &Space,
    audience: &str,
    dest: &Destination,
    step: &Pending,
    msgs: &[Message],
    as_of: i64,
) -> Result<()> {
    let format = dest.format.unwrap_or_default();
    let own = dest.url.is_none();
    let ext = match format {
        FileFormat::Ndjson => "ndjson",
        FileFormat::Parquet => "parquet",
    };
    let key = keys::destination_file(
        own.then_some(space),
        audience,
        &dest.name,
        step.from,
        step.to,
        ext,
    );
    let data: bytes::Bytes = match format {
        FileFormat::Ndjson => {
            let mut buf = Vec::new();
            for m in msgs {
                let mut line = m.body.clone();
                if m.mode == super::config::Mode::List {
                    line = serde_json::json!({
                        "type": "audience_list", "messageId": format!("aud-{}", m.key),
                        "audience_key": audience, "id_type": dest.id_type,
                        "version": m.version,
                        "add": if m.entered { vec![&m.id_value] } else { vec![] },
                        "remove": if m.entered { vec![] } else { vec![&m.id_value] },
                    });
                }
                serde_json::to_writer(&mut buf, &line)?;
                buf.push(b'\n');
            }
            buf.into()
        }
        FileFormat::Parquet => {
            let batch = message_batch(msgs, audience, &dest.name, &dest.id_type, as_of)?;
            crate::events::writer::encode_parquet(
                &batch,
                crate::events::writer::writer_properties(None),
            )?
        }
    };
    fs.put(&key, data).await
}

fn message_schema() -> SchemaRef {
    let s = |n: &str, null: bool| Field::new(n, DataType::Utf8, null);
    Arc::new(Schema::new(vec![
        s("message_id", false),
        s("type", false),
        s("audience_key", false),
        s("destination", false),
        Field::new("version", DataType::UInt64, false),
        s("change", false),
        s("member", false),
        s("profile_id", true),
        s("id_type", false),
        s("id_value", true),
        Field::new("as_of", crate::events::schema::ts_type(), false),
        s("payload", false),
    ]))
}

fn message_batch(
    msgs: &[Message],
    audience: &str,
    dest: &str,
    id_type: &str,
    as_of: i64,
) -> Result<RecordBatch> {
    let strs = |f: &dyn Fn(&Message) -> Option<String>| -> Arc<dyn Array> {
        Arc::new(msgs.iter().map(f).collect::<StringArray>())
    };
    let payloads = msgs
        .iter()
        .map(|m| serde_json::to_string(&m.body))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(
        message_schema(),
        vec![
            strs(&|m| Some(format!("aud-{}", m.key))),
            strs(&|m| Some(format!("{:?}", m.mode).to_ascii_lowercase())),
            strs(&|_| Some(audience.to_string())),
            strs(&|_| Some(dest.to_string())),
            Arc::new(msgs.iter().map(|m| m.version).collect::<UInt64Array>()),
            strs(&|m| Some(if m.entered { "entered" } else { "exited" }.to_string())),
            strs(&|m| Some(m.member.clone())),
            strs(&|m| m.profile.clone()),
            strs(&|_| Some(id_type.to_string())),
            strs(&|m| m.id_value.clone()),
            Arc::new(
                arrow::array::TimestampMicrosecondArray::from(vec![as_of; msgs.len()])
                    .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from(payloads)),
        ],
    )?)
}

struct DeadLetter {
    message: Message,
    request_key: String,
    reason: String,
    attempts: u32,
    step_to: u64,
}

/// Schema of the dead-letter table.
pub fn dead_letter_schema() -> SchemaRef {
    let s = |n: &str, null: bool| Field::new(n, DataType::Utf8, null);
    Arc::new(Schema::new(vec![
        Field::new("at", crate::events::schema::ts_type(), false),
        s("audience_key", false),
        s("destination", false),
        Field::new("version", DataType::UInt64, false),
        s("member", false),
        s("id_value", true),
        s("change", false),
        s("message_id", false),
        s("idempotency_key", false),
        s("reason", false),
        Field::new("attempts", DataType::UInt64, false),
        s("payload", false),
    ]))
}

async fn commit_dead_letters(
    store: &Store,
    space: &Space,
    audience: &str,
    dest: &Destination,
    dead: Vec<DeadLetter>,
) -> Result<()> {
    if dead.is_empty() {
        return Ok(());
    }
    let now = chrono::Utc::now().timestamp_micros();
    let n = dead.len();
    let col = |f: &dyn Fn(&DeadLetter) -> Option<String>| -> Arc<dyn Array> {
        Arc::new(dead.iter().map(f).collect::<StringArray>())
    };
    let payloads = dead
        .iter()
        .map(|d| serde_json::to_string(&d.message.body))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let batch = RecordBatch::try_new(
        dead_letter_schema(),
        vec![
            Arc::new(
                arrow::array::TimestampMicrosecondArray::from(vec![now; n]).with_timezone("UTC"),
            ),
            col(&|_| Some(audience.to_string())),
            col(&|_| Some(dest.name.clone())),
            Arc::new(dead.iter().map(|d| d.step_to).collect::<UInt64Array>()),
            col(&|d| Some(d.message.member.clone())),
            col(&|d| d.message.id_value.clone()),
            col(&|d| {
                Some(
                    if d.message.entered {
                        "entered"
                    } else {
                        "exited"
                    }
                    .to_string(),
                )
            }),
            col(&|d| Some(format!("aud-{}", d.message.key))),
            col(&|d| Some(d.request_key.clone())),
            col(&|d| Some(d.reason.clone())),
            Arc::new(
                dead.iter()
                    .map(|d| d.attempts as u64)
                    .collect::<UInt64Array>(),
            ),
            Arc::new(StringArray::from(payloads)),
        ],
    )?;
    let bytes = crate::events::writer::encode_parquet(
        &batch,
        crate::events::writer::writer_properties(None),
    )?;
    let key = keys::data_file(space, DEAD_LETTERS, None, "parquet");
    let size = bytes.len() as u64;
    store.put(&key, bytes).await?;
    let add = FileAdd {
        path: key.to_string(),
        size,
        rows: n as u64,
        ..Default::default()
    };
    CommitLog::new(store, space, DEAD_LETTERS)
        .commit(|_| {
            Ok(CommitDraft {
                operation: "dead-letter".into(),
                adds: vec![add.clone()],
                removes: vec![],
                info: serde_json::json!({"audience": audience, "destination": dest.name, "messages": n}),
            })
        })
        .await?;
    Ok(())
}

/// The state of one destination, for `audiences destinations status`.
#[derive(Debug, Clone, Serialize)]
pub struct DestinationStatus {
    /// Audience key.
    pub audience: String,
    /// Destination name.
    pub destination: String,
    /// Sink kind.
    pub kind: String,
    /// Modes.
    pub mode: String,
    /// Id type.
    pub id_type: String,
    /// Version acknowledged (0: never synced).
    pub cursor_version: u64,
    /// Current audience version.
    pub current_version: u64,
    /// Versions behind.
    pub lag_versions: u64,
    /// Seconds since the oldest version not yet acknowledged was computed.
    pub lag_seconds: Option<f64>,
    /// A step in progress (killed sync, or running now).
    pub pending: Option<Pending>,
    /// Messages acknowledged.
    pub sent: u64,
    /// Requests retried.
    pub retried: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Members without a value of the id type.
    pub skipped_no_id: u64,
    /// Last error.
    pub last_error: Option<String>,
    /// Last finished sync (RFC 3339).
    pub last_sync_at: Option<String>,
}

/// Status of every destination of every live audience.
pub async fn status(store: &Store, space: &Space) -> Result<Vec<DestinationStatus>> {
    let defs = crate::definitions::live(store, space).await?;
    let snap = CommitLog::new(store, space, MEMBERSHIPS).snapshot().await?;
    let all = versions(&snap);
    let now = chrono::Utc::now().timestamp_micros();
    let mut out = Vec::new();
    for (key, stored) in &defs {
        if stored.file.kind != Kind::Audience {
            continue;
        }
        let vs: Vec<&VersionRef> = all.iter().filter(|v| &v.key == key).collect();
        let current = vs.last().map_or(0, |v| v.version);
        for d in destinations_of(stored)? {
            let mut c = load_cursor(store, space, key, &d.name)
                .await?
                .unwrap_or_default();
            if c.fingerprint != d.fingerprint() {
                c.version = 0;
                c.pending = None;
            }
            let oldest = vs.iter().find(|v| v.version > c.version);
            out.push(DestinationStatus {
                audience: key.clone(),
                destination: d.name.clone(),
                kind: format!("{:?}", d.kind).to_ascii_lowercase(),
                mode: d
                    .mode
                    .list()
                    .iter()
                    .map(|m| format!("{m:?}").to_ascii_lowercase())
                    .collect::<Vec<_>>()
                    .join("+"),
                id_type: d.id_type.clone(),
                cursor_version: c.version,
                current_version: current,
                lag_versions: current.saturating_sub(c.version),
                lag_seconds: oldest.map(|v| ((now - v.as_of) as f64 / 1e6).max(0.0)),
                pending: c.pending,
                sent: c.sent,
                retried: c.retried,
                dead_lettered: c.dead_lettered,
                skipped_no_id: c.skipped_no_id,
                last_error: c.last_error,
                last_sync_at: c
                    .last_sync_at
                    .and_then(chrono::DateTime::from_timestamp_micros)
                    .map(|t| t.to_rfc3339()),
            });
        }
    }
    Ok(out)
}

/// A Flight destination's pending range: (cursor version, current version). From 0 the client
/// gets the whole membership; else the changes after the cursor.
pub async fn flight_range(
    store: &Store,
    space: &Space,
    audience: &str,
    name: &str,
) -> Result<Option<(u64, VersionRef)>> {
    let defs = crate::definitions::live(store, space).await?;
    let Some(stored) = defs.get(audience).filter(|s| s.file.kind == Kind::Audience) else {
        return Ok(None);
    };
    let Some(d) = destinations_of(stored)?
        .into_iter()
        .find(|d| d.name == name && d.kind == SinkKind::Flight)
    else {
        return Ok(None);
    };
    let snap = CommitLog::new(store, space, MEMBERSHIPS).snapshot().await?;
    let Some(latest) = versions(&snap).into_iter().rfind(|v| v.key == audience) else {
        return Ok(None);
    };
    let c = load_cursor(store, space, audience, name)
        .await?
        .unwrap_or_default();
    let from = if c.fingerprint == d.fingerprint() {
        c.version
    } else {
        0
    };
    Ok(Some((from.min(latest.version), latest)))
}

/// A Flight client acknowledges everything up to `version` of a Flight destination.
pub async fn acknowledge(
    store: &Store,
    space: &Space,
    audience: &str,
    name: &str,
    version: u64,
) -> Result<Cursor> {
    let Some((from, latest)) = flight_range(store, space, audience, name).await? else {
        return Err(Error::Usage(format!(
            "no flight destination '{name}' of audience '{audience}'"
        )));
    };
    if version > latest.version {
        return Err(Error::Usage(format!(
            "version {version} of '{audience}' does not exist (current: {})",
            latest.version
        )));
    }
    let defs = crate::definitions::live(store, space).await?;
    let fp = defs
        .get(audience)
        .map(destinations_of)
        .transpose()?
        .and_then(|ds| ds.into_iter().find(|d| d.name == name))
        .map(|d| d.fingerprint())
        .unwrap_or_default();
    let mut c = load_cursor(store, space, audience, name)
        .await?
        .unwrap_or_default();
    if c.fingerprint != fp {
        c = Cursor {
            fingerprint: fp,
            ..c
        };
        c.version = 0;
    }
    if version > from {
        c.version = version;
        c.last_sync_at = Some(chrono::Utc::now().timestamp_micros());
        save_cursor(store, space, audience, name, &c).await?;
    }
    Ok(c)
}
