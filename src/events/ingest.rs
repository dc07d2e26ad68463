//! `audiences ingest`: streams NDJSON, JSON arrays or `{"batch": [...]}` envelopes (optionally
//! gzipped), validates and deduplicates every message, writes accepted events as partitioned
//! Parquet and commits them; rejected messages go to a dead-letter NDJSON file with their reason.
//!
//! Invariant: accepted + rejected + duplicates = submitted. An event is counted as accepted only
//! once the commit naming its file exists, so a kill -9 after the report cannot lose it.
//!
//! Dedup window: a message is a duplicate when its `messageId` was accepted earlier in the same
//! run, or is in a committed file of the space whose newest `receivedAt` is no more than
//! [`DEDUP_WINDOW_DAYS`] days before the oldest `receivedAt` of the chunk being committed.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{AsArray, BooleanArray, RecordBatch};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rayon::prelude::*;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::message::{Event, Rejection, parse_message};
use super::schema::{EventBatchBuilder, Row};
use super::writer::{utc_date, write_events_file};
use crate::error::{Error, Result};
use crate::store::Store;
use crate::store::keys::{Key, Space, TableName};
use crate::store::log::{ColumnSpec, CommitDraft, CommitLog, FileAdd};

/// Days of received time over which committed messageIds are checked for duplicates.
pub const DEDUP_WINDOW_DAYS: i64 = 7;
const BLOCK: usize = 8192;

/// A message waiting to be parsed: its position and raw bytes, or a rejection already decided.
type Pending = (u64, std::result::Result<Vec<u8>, Rejection>);

/// Where messages come from.
#[derive(Debug, Clone)]
pub enum Input {
    /// Standard input.
    Stdin,
    /// A file (gzip detected by its magic bytes).
    File(PathBuf),
}

impl Input {
    fn label(&self) -> String {
        match self {
            Input::Stdin => "-".into(),
            Input::File(p) => p.display().to_string(),
        }
    }
}

/// Ingest settings.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Accepted events per commit (bounds memory).
    pub chunk_rows: usize,
    /// Dead-letter file (default: `audiences-rejected-<time>.ndjson` in the working directory).
    pub dead_letter: Option<PathBuf>,
    /// Receive time for messages without `receivedAt` (UTC microseconds; default now).
    pub received_now: Option<i64>,
    /// Show progress on stderr.
    pub progress: bool,
    /// Compact date partitions that reach [`crate::events::compact::MIN_FILES`] files.
    pub compact: bool,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            chunk_rows: 1_000_000,
            dead_letter: None,
            received_now: None,
            progress: false,
            compact: true,
        }
    }
}

/// What an ingest did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct IngestReport {
    /// Messages read.
    pub submitted: u64,
    /// Messages committed.
    pub accepted: u64,
    /// Messages rejected (in the dead-letter file).
    pub rejected: u64,
    /// Messages dropped as duplicates.
    pub duplicates: u64,
    /// Path of the dead-letter file, when something was rejected.
    pub dead_letter: Option<PathBuf>,
    /// Versions of the events table committed.
    pub versions: Vec<u64>,
    /// The compaction that followed.
    pub compaction: crate::events::compact::CompactReport,
}

/// One message read from an input, parsed or rejected.
pub struct Item {
    source: Arc<str>,
    /// 1-based line (NDJSON) or item index (arrays, envelopes).
    position: u64,
    positional: &'static str,
    outcome: std::result::Result<Row, (Rejection, Vec<u8>)>,
}

fn hash_id(id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(id.as_bytes())
}

/// Ingest `inputs` into `space`.
pub async fn ingest(
    store: &Store,
    space: &Space,
    inputs: Vec<Input>,
    opts: IngestOptions,
) -> Result<IngestReport> {
    let received_now = opts
        .received_now
        .unwrap_or_else(|| chrono::Utc::now().timestamp_micros());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<Item>>>(4);
    let reader_inputs = inputs.clone();
    let reader = std::thread::spawn(move || {
        for input in reader_inputs {
            let res = read_input(&input, received_now, &mut |block| {
                tx.blocking_send(Ok(block)).is_ok()
            });
            if let Err(e) = res {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    });
    let progress = crate::progress::counter(opts.progress, "messages");
    let mut sink = EventSink::new(store, space, opts.chunk_rows);
    let mut dead = DeadLetter::new(opts.dead_letter.clone());
    let mut report = IngestReport::default();
    while let Some(block) = rx.recv().await {
        let block = block?;
        progress.inc(block.len() as u64);
        for item in block {
            report.submitted += 1;
            match item.outcome {
                Ok(event) => {
                    if !sink.push(event) {
                        report.duplicates += 1;
                    } else if sink.pending() >= opts.chunk_rows {
                        dead.flush()?;
                        sink.flush(&mut report).await?;
                    }
                }
                Err((rej, raw)) => {
                    report.rejected += 1;
                    dead.write(&item.source, item.positional, item.position, &rej, &raw)?;
                }
            }
        }
    }
    let _ = reader.join();
    dead.flush()?;
    sink.flush(&mut report).await?;
    progress.finish_and_clear();
    if opts.compact && !report.versions.is_empty() {
        // Only what identity resolution has already read (it reads new commits by version).
        let identity = CommitLog::new(store, space, crate::identity::persist::IDENTITY)
            .snapshot()
            .await?;
        report.compaction = crate::events::compact::compact(
            store,
            space,
            crate::events::compact::MIN_FILES,
            None,
            crate::identity::persist::last_events_version(&identity),
        )
        .await?;
    }
    report.dead_letter = dead.path_if_used();
    debug_assert_eq!(
        report.submitted,
        report.accepted + report.rejected + report.duplicates
    );
    Ok(report)
}

/// Dead-letter NDJSON writer, created on the first rejection.
struct DeadLetter {
    path: Option<PathBuf>,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl DeadLetter {
    fn new(path: Option<PathBuf>) -> Self {
        DeadLetter { path, file: None }
    }

    fn write(
        &mut self,
        source: &str,
        positional: &str,
        position: u64,
        rej: &Rejection,
        raw: &[u8],
    ) -> Result<()> {
        if self.file.is_none() {
            let path = self.path.clone().unwrap_or_else(|| {
                PathBuf::from(format!(
                    "audiences-rejected-{}.ndjson",
                    chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ")
                ))
            });
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            self.path = Some(path);
            self.file = Some(std::io::BufWriter::new(f));
        }
        let mut obj = serde_json::Map::new();
        obj.insert("source".into(), source.into());
        obj.insert(positional.into(), position.into());
        obj.insert("reason".into(), rej.code.into());
        obj.insert("message".into(), rej.message.clone().into());
        obj.insert(
            "raw".into(),
            String::from_utf8_lossy(raw).into_owned().into(),
        );
        let path = self.path.clone().unwrap_or_default();
        if let Some(f) = self.file.as_mut() {
            serde_json::to_writer(&mut *f, &obj)?;
            f.write_all(b"\n").map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if let (Some(f), Some(p)) = (self.file.as_mut(), &self.path) {
            f.flush().map_err(|e| Error::io(p, e))?;
            f.get_ref().sync_data().map_err(|e| Error::io(p, e))?;
        }
        Ok(())
    }

    fn path_if_used(&self) -> Option<PathBuf> {
        self.file.as_ref().and(self.path.clone())
    }
}

/// Open an input, transparently gunzipping.
fn open(input: &Input) -> Result<Box<dyn BufRead + Send>> {
    let raw: Box<dyn Read + Send> = match input {
        Input::Stdin => Box::new(std::io::stdin()),
        Input::File(p) => Box::new(std::fs::File::open(p).map_err(|e| Error::io(p, e))?),
    };
    let mut br = BufReader::with_capacity(1 << 20, raw);
    let head = br.fill_buf().map_err(|e| Error::io(input.label(), e))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(BufReader::with_capacity(
            1 << 20,
            flate2::bufread::MultiGzDecoder::new(br),
        )))
    } else {
        Ok(Box::new(br))
    }
}

/// Read one input, sending parsed blocks to `emit` (which returns false to stop).
pub fn read_input(
    input: &Input,
    received_now: i64,
    emit: &mut dyn FnMut(Vec<Item>) -> bool,
) -> Result<()> {
    let label: Arc<str> = input.label().into();
    let mut r = open(input)?;
    // Skip leading whitespace and a UTF-8 BOM to find the shape of the document.
    let first = loop {
        let buf = r.fill_buf().map_err(|e| Error::io(&*label, e))?;
        if buf.is_empty() {
            return Ok(());
        }
        let skip = buf
            .iter()
            .take_while(|b| b.is_ascii_whitespace() || **b == 0xEF || **b == 0xBB || **b == 0xBF)
            .count();
        if skip == 0 {
            break buf[0];
        }
        r.consume(skip);
    };
    let mut pending: Vec<Pending> = Vec::with_capacity(BLOCK);
    let mut parse_block = |pending: &mut Vec<Pending>, positional: &'static str| -> bool {
        let items: Vec<Item> = std::mem::take(pending)
            .into_par_iter()
            .map(|(pos, raw)| {
                let outcome = match raw {
                    Ok(raw) => parse_message(&raw, received_now)
                        .map(Row::from_event)
                        .map_err(|rej| (rej, raw)),
                    Err(rej) => Err((rej, Vec::new())),
                };
                Item {
                    source: Arc::clone(&label),
                    position: pos,
                    positional,
                    outcome,
                }
            })
            .collect();
        emit(items)
    };
    if first == b'[' {
        return read_document(r, &mut pending, &mut parse_block, &label);
    }
    // NDJSON, or a one-line envelope, or a pretty-printed envelope / object.
    let mut line = Vec::new();
    let mut line_no = 0u64;
    let n = r
        .read_until(b'\n', &mut line)
        .map_err(|e| Error::io(&*label, e))?;
    if n == 0 {
        return Ok(());
    }
    line_no += 1;
    let trimmed = trim(&line);
    // A single-line envelope (possibly followed by more lines), or the first line of a
    // pretty-printed document: parse the whole input as one document.
    let is_document = match serde_json::from_slice::<serde_json::Value>(trimmed) {
        Ok(serde_json::Value::Object(m)) => {
            matches!(m.get("batch"), Some(serde_json::Value::Array(_)))
        }
        Ok(_) => false,
        Err(_) => trimmed.starts_with(b"{") && !trimmed.ends_with(b"}"),
    };
    if is_document {
        let rest = std::io::Cursor::new(line.clone()).chain(r);
        return read_document(
            Box::new(BufReader::new(rest)),
            &mut pending,
            &mut parse_block,
            &label,
        );
    }
    if !trimmed.is_empty() {
        pending.push((line_no, Ok(trimmed.to_vec())));
    }
    loop {
        line.clear();
        let n = r
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io(&*label, e))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let t = trim(&line);
        if t.is_empty() {
            continue;
        }
        pending.push((line_no, Ok(t.to_vec())));
        if pending.len() >= BLOCK && !parse_block(&mut pending, "line") {
            return Ok(());
        }
    }
    if !pending.is_empty() {
        parse_block(&mut pending, "line");
    }
    Ok(())
}

fn trim(line: &[u8]) -> &[u8] {
    let end = line
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    let start = line[..end]
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(end);
    &line[start..end]
}

/// Stream the elements of a JSON array or of an envelope's `batch` array.
fn read_document(
    r: Box<dyn BufRead + Send + '_>,
    pending: &mut Vec<Pending>,
    parse_block: &mut dyn FnMut(&mut Vec<Pending>, &'static str) -> bool,
    label: &Arc<str>,
) -> Result<()> {
    struct Elements<'a> {
        pending: &'a mut Vec<Pending>,
        parse_block: &'a mut dyn FnMut(&mut Vec<Pending>, &'static str) -> bool,
        count: u64,
        stopped: bool,
    }
    impl<'de> Visitor<'de> for &mut Elements<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON array of messages or an object with a \"batch\" array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
            while let Some(raw) = seq.next_element::<Box<RawValue>>()? {
                self.count += 1;
                if !self.stopped {
                    self.pending
                        .push((self.count, Ok(raw.get().as_bytes().to_vec())));
                    if self.pending.len() >= BLOCK && !(self.parse_block)(self.pending, "item") {
                        self.stopped = true;
                    }
                }
            }
            Ok(())
        }
        fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> std::result::Result<(), M::Error> {
            let mut saw_batch = false;
            while let Some(key) = map.next_key::<String>()? {
                if key == "batch" {
                    map.next_value_seed(&mut *self)?;
                    saw_batch = true;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            if !saw_batch {
                return Err(serde::de::Error::custom("object has no \"batch\" array"));
            }
            Ok(())
        }
    }
    impl<'de> DeserializeSeed<'de> for &mut Elements<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(
            self,
            d: D,
        ) -> std::result::Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    let mut el = Elements {
        pending,
        parse_block,
        count: 0,
        stopped: false,
    };
    let mut de = serde_json::Deserializer::from_reader(r);
    let res = (&mut el).deserialize(&mut de).and_then(|_| de.end());
    if !el.pending.is_empty() && !el.stopped {
        (el.parse_block)(el.pending, "item");
    }
    if let Err(e) = res {
        // The rest of the document cannot be read: count it as one rejected item.
        let _ = label;
        let rej = Rejection::new(
            "malformed_json",
            format!("document unreadable after item {}: {e}", el.count),
        );
        el.pending.push((el.count + 1, Err(rej)));
        (el.parse_block)(el.pending, "item");
    }
    Ok(())
}

/// Accumulates accepted events per date partition and commits them in chunks.
pub struct EventSink {
    store: Store,
    space: Space,
    log: CommitLog,
    partitions: BTreeMap<String, EventBatchBuilder>,
    pending: usize,
    run_ids: hashbrown::HashSet<u128>,
    committed: CommittedIds,
    /// Smallest receivedAt in the pending chunk.
    min_received: i64,
}

impl EventSink {
    /// A sink writing to the events table of `space`.
    pub fn new(store: &Store, space: &Space, _chunk_rows: usize) -> Self {
        EventSink {
            store: store.clone(),
            space: space.clone(),
            log: CommitLog::new(store, space, TableName::Events),
            partitions: BTreeMap::new(),
            pending: 0,
            run_ids: hashbrown::HashSet::new(),
            committed: CommittedIds::default(),
            min_received: i64::MAX,
        }
    }

    /// Events waiting to be committed.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Add an event; false when it duplicates one seen earlier in this run or already loaded
    /// from committed files.
    pub fn push(&mut self, e: Row) -> bool {
        let h = hash_id(&e.message_id);
        if self.committed.ids.contains(&h) || !self.run_ids.insert(h) {
            return false;
        }
        self.min_received = self.min_received.min(e.received_at);
        self.partitions
            .entry(utc_date(e.timestamp))
            .or_default()
            .append_row(&e);
        self.pending += 1;
        true
    }

    /// Write and commit the pending chunk, updating the report's counts.
    pub async fn flush(&mut self, report: &mut IngestReport) -> Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        let mut batches: Vec<(String, RecordBatch, Vec<ColumnSpec>)> = Vec::new();
        for (date, b) in std::mem::take(&mut self.partitions) {
            let (batch, cols) = b.finish()?;
            batches.push((date, batch, cols));
        }
        let chunk_rows = self.pending as u64;
        self.pending = 0;
        let min_received = std::mem::replace(&mut self.min_received, i64::MAX);
        // Load committed ids that fall into the dedup window of this chunk.
        let snapshot = self
            .committed
            .load_latest(&self.store, &self.log, min_received)
            .await?;
        let mut dropped = drop_committed(&mut batches, &self.committed.ids)?;
        let mut files = self.write_all(&batches).await?;
        crate::fault::hit("after_data_files");
        let mut base = snapshot.version;
        let mut entry = None;
        for _ in 0..crate::store::log::MAX_COMMIT_ATTEMPTS {
            let accepted: u64 = files.iter().map(|f| f.rows).sum();
            let draft = CommitDraft {
                operation: "ingest".into(),
                adds: files.clone(),
                removes: vec![],
                info: serde_json::json!({
                    "accepted": accepted,
                    "duplicates_dropped_at_commit": dropped,
                    "chunk_rows": chunk_rows,
                }),
            };
            if let Some(e) = self.log.try_commit(base, draft).await? {
                entry = Some(e);
                break;
            }
            // Another writer committed first: check its files for our messageIds and rebase.
            let snap = self
                .committed
                .load_latest(&self.store, &self.log, min_received)
                .await?;
            base = snap.version;
            let more = drop_committed(&mut batches, &self.committed.ids)?;
            if more > 0 {
                dropped += more;
                for f in &files {
                    let _ = self
                        .store
                        .object_store()
                        .delete(Key::from_committed(&f.path).path())
                        .await;
                }
                files = write_batches(&self.store, &self.space, &batches).await?;
            }
        }
        let entry = entry.ok_or_else(|| self.log.conflict_error())?;
        let accepted: u64 = entry.adds.iter().map(|f| f.rows).sum();
        // Our own files are already in run_ids; never reload them.
        for f in &entry.adds {
            self.committed.loaded.insert(f.path.clone());
        }
        report.accepted += accepted;
        report.duplicates += chunk_rows - accepted;
        report.versions.push(entry.version);
        Ok(())
    }

    async fn write_all(
        &self,
        batches: &[(String, RecordBatch, Vec<ColumnSpec>)],
    ) -> Result<Vec<FileAdd>> {
        write_batches(&self.store, &self.space, batches).await
    }
}

async fn write_batches(
    store: &Store,
    space: &Space,
    batches: &[(String, RecordBatch, Vec<ColumnSpec>)],
) -> Result<Vec<FileAdd>> {
    // Boxed and collected first (keeps callers' futures `Send`; rust-lang/rust#102211).
    let futs: Vec<futures::future::BoxFuture<'_, Result<FileAdd>>> = batches
        .iter()
        .filter(|(_, b, _)| b.num_rows() > 0)
        .map(|(date, batch, cols)| {
            Box::pin(write_events_file(store, space, date, batch, cols))
                as futures::future::BoxFuture<'_, Result<FileAdd>>
        })
        .collect();
    let mut out = Vec::new();
    let mut stream = futures::stream::iter(futs).buffered(4);
    while let Some(f) = stream.next().await {
        out.push(f?);
    }
    Ok(out)
}

/// Remove rows whose messageId is in `ids`; returns how many were removed.
fn drop_committed(
    batches: &mut [(String, RecordBatch, Vec<ColumnSpec>)],
    ids: &hashbrown::HashSet<u128>,
) -> Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    let mut dropped = 0u64;
    for (_, batch, _) in batches.iter_mut() {
        let col = batch.column(0).as_string::<i32>();
        let keep: BooleanArray = col
            .iter()
            .map(|v| Some(!v.is_some_and(|s| ids.contains(&hash_id(s)))))
            .collect();
        let kept = keep.true_count();
        if kept < batch.num_rows() {
            dropped += (batch.num_rows() - kept) as u64;
            *batch = arrow::compute::filter_record_batch(batch, &keep)?;
        }
    }
    Ok(dropped)
}

/// messageIds loaded from committed files, for dedup across runs and writers.
#[derive(Default)]
struct CommittedIds {
    loaded: HashSet<String>,
    ids: hashbrown::HashSet<u128>,
}

impl CommittedIds {
    /// Load the ids of `files`; false when one of them has been compacted away meanwhile (load
    /// again from a fresh snapshot).
    async fn load(&mut self, store: &Store, files: &[FileAdd], min_received: i64) -> Result<bool> {
        let horizon = min_received.saturating_sub(DEDUP_WINDOW_DAYS * 86_400_000_000);
        for f in files {
            if self.loaded.contains(&f.path) {
                continue;
            }
            if f.received_range.is_some_and(|(_, max)| max < horizon) {
                continue;
            }
            let bytes = match store.get(&Key::from_committed(&f.path)).await {
                Ok(b) => b,
                // compacted (and deleted) since the snapshot was taken: its rows are in the
                // compaction's file, which a fresh snapshot names
                Err(Error::ObjectStore(object_store::Error::NotFound { .. })) => {
                    return Ok(false);
                }
                Err(e) => return Err(e),
            };
            self.loaded.insert(f.path.clone());
            let hashes = tokio::task::spawn_blocking(move || -> Result<Vec<u128>> {
                let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
                let mask = ProjectionMask::roots(builder.parquet_schema(), [0]);
                let mut out = Vec::new();
                for batch in builder.with_projection(mask).build()? {
                    let batch = batch?;
                    out.extend(
                        batch
                            .column(0)
                            .as_string::<i32>()
                            .iter()
                            .flatten()
                            .map(hash_id),
                    );
                }
                Ok(out)
            })
            .await
            .map_err(|e| Error::Usage(format!("dedup loader task failed: {e}")))??;
            self.ids.extend(hashes);
        }
        Ok(true)
    }

    /// Load the ids of the latest snapshot, retrying when a concurrent compaction removed a
    /// file between reading the log and reading the file; returns the snapshot.
    async fn load_latest(
        &mut self,
        store: &Store,
        log: &CommitLog,
        min_received: i64,
    ) -> Result<crate::store::log::Snapshot> {
        for _ in 0..8 {
            let snap = log.snapshot().await?;
            if self.load(store, &snap.files, min_received).await? {
                return Ok(snap);
            }
        }
        Err(Error::Usage(
            "event files kept being compacted while loading committed messageIds; retry".into(),
        ))
    }
}

/// Convenience for tests and the HTTP API: ingest already-validated events in one commit.
pub async fn commit_events(
    store: &Store,
    space: &Space,
    events: Vec<Event>,
) -> Result<IngestReport> {
    let mut sink = EventSink::new(store, space, usize::MAX);
    let mut report = IngestReport::default();
    for e in events {
        report.submitted += 1;
        if !sink.push(Row::from_event(e)) {
            report.duplicates += 1;
        }
    }
    sink.flush(&mut report).await?;
    Ok(report)
}

/// The path of a file input, if any (for messages).
pub fn input_path(i: &Input) -> Option<&Path> {
    match i {
        Input::File(p) => Some(p),
        Input::Stdin => None,
    }
}
