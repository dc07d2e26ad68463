//! Memberships as streams and CSV exports (SPEC §8), shared by `audiences export`, the HTTP
//! export endpoint and Flight.
//!
//! A membership stream reads one committed version: its members file (written sorted by member
//! key; sorted here if it is not), and for each batch of members their external ids from an
//! [`IdIndex`] of the space's current identity version (a list column per id type, gathered by
//! dense profile index: no join, no sort per request). The decoded members are held while the
//! stream runs (tens of bytes per member); output batches are built as the client pulls them.
//!
//! Formats: `unformatted` (`key,external_ids`: the profile id, or account id for account
//! audiences, and a JSON object from id type to the sorted array of its values), `formatted`
//! (those two, then per id type present in the audience `t`, `t_1`, ... as many as the largest
//! count), `single` (one column named after the id type, one row per value, normalized: trimmed,
//! and lower-cased for emails; SHA-256 lowercase hex unless raw). Account audiences carry no
//! external ids of their own: their `external_ids` is `{}` and `single` has no rows.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use futures::StreamExt;
use futures::stream::BoxStream;
use sha2::{Digest, Sha256};

use crate::compute::members::MemberSet;
use crate::compute::{MEMBERSHIPS, VersionRef, versions};
use crate::error::{Error, Result};
use crate::store::{CommitLog, Space, Store};

mod cache;
mod ids;
pub use cache::ServingCache;
pub use ids::{IdIndex, IdIndexCache};

/// Rows per streamed batch.
pub const BATCH_ROWS: usize = 8192;

/// Chunks built at once by the export streams: one per core, and one more so that the cores
/// stay busy while the consumer writes the oldest.
fn in_flight() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) + 1
}

/// A stream of record batches.
pub type Batches = BoxStream<'static, Result<RecordBatch>>;

/// Schema of a membership stream.
pub fn membership_schema(accounts: bool, id_types: &[String]) -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let mut fields = vec![
        Field::new(
            if accounts { "account_id" } else { "profile_id" },
            DataType::Utf8,
            false,
        ),
        Field::new("entered_at", ts, false),
    ];
    if !accounts {
        for t in id_types {
            fields.push(Field::new(
                t,
                DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
                false,
            ));
        }
    }
    Arc::new(Schema::new(fields))
}

/// Whether a version is of an account audience (its members carry account ids).
pub async fn is_accounts(store: &Store, v: &VersionRef) -> Result<bool> {
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let bytes = store
        .get(&crate::store::keys::Key::from_committed(&v.data.path))
        .await?;
    // only the account_id column is decoded
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    let mask = ProjectionMask::columns(builder.parquet_schema(), ["account_id"]);
    for b in builder.with_projection(mask).build()? {
        let b = b?;
        if b.column_by_name("account_id")
            .is_some_and(|c| c.null_count() < c.len())
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The current (or `version`) committed version of live audience `key`; None when there is no
/// such audience or version.
pub async fn audience_version(
    store: &Store,
    space: &Space,
    key: &str,
    version: Option<u64>,
) -> Result<Option<VersionRef>> {
    let live = crate::definitions::live(store, space).await?;
    if !live
        .get(key)
        .is_some_and(|s| s.file.kind == crate::lang::definition::Kind::Audience)
    {
        return Ok(None);
    }
    let snap = CommitLog::new(store, space, MEMBERSHIPS).snapshot().await?;
    Ok(versions(&snap)
        .into_iter()
        .filter(|v| v.key == key)
        .rfind(|v| version.is_none_or(|p| v.version == p)))
}

/// The sorted members of version `v` and, for a profile audience, the space's id index.
async fn members_and_ids(
    store: &Store,
    space: &Space,
    v: &VersionRef,
    cache: &ServingCache,
) -> Result<(MemberSet, Option<Arc<IdIndex>>)> {
    // both at once: an account audience drops the index it did not need
    let (members, index) =
        tokio::try_join!(MemberSet::read(store, v), cache.ids.get(store, space))?;
    let index = (!members.accounts).then_some(index);
    Ok((members, index))
}

/// The schema of version `v`'s membership stream when a finished stream of it is in `cache`.
pub async fn cached_membership_schema(
    store: &Store,
    space: &Space,
    v: &VersionRef,
    cache: &ServingCache,
) -> Result<Option<SchemaRef>> {
    if cache.budget() == 0 {
        return Ok(None);
    }
    let key = stream_key(store, space, v, cache).await?;
    Ok(cache.schema(&key))
}

/// The gRPC frames of a `DoGet` response, each the 5-byte prefix and the protobuf encoding of
/// one Flight message.
pub type FrameStream = BoxStream<'static, Result<bytes::Bytes>>;

/// Version `v`'s membership stream as gRPC frames: what the server's `DoGet` of an audience
/// writes. The frames kept from an earlier pull, or else built and encoded as the client
/// reads, and kept once read to the end when the server keeps streams and the whole stream
/// fits its budget. Encoding the messages here rather than through tonic's codec saves
/// copying each into the codec's buffer, and lets the server keep the frames of the first
/// pull for the next ones.
pub async fn membership_frames(
    store: &Store,
    space: &Space,
    v: &VersionRef,
    cache: &Arc<ServingCache>,
) -> Result<FrameStream> {
    use arrow_flight::error::FlightError;
    let key = stream_key(store, space, v, cache).await?;
    if let Some(d) = cache.frames(&key) {
        let n = d.len();
        return Ok(futures::stream::iter((0..n).map(move |i| Ok(d[i].clone()))).boxed());
    }
    let (schema, batches, identity) = build_membership(store, space, v, cache).await?;
    // the index may be of a newer identity version than the one `key` was made with
    let key = (key.0, key.1, key.2, identity.unwrap_or(key.3));
    let batches = batches.map(|b| {
        b.and_then(|b| Ok(for_flight(b)?))
            .map_err(|e| FlightError::ExternalError(Box::new(e)))
    });
    let frames = arrow_flight::encode::FlightDataEncoderBuilder::new()
        .with_schema(Arc::clone(&schema))
        .build(batches)
        .map(|d| {
            let d = d.map_err(|e| Error::Usage(format!("encoding the membership stream: {e}")))?;
            crate::server::frames::grpc_frame(&d).map_err(Error::Usage)
        });
    let budget = cache.budget();
    if budget == 0 {
        return Ok(frames.boxed());
    }
    // keep the frames once a client has read all of them (and while they fit the budget)
    let cache = Arc::clone(cache);
    let mut kept = Some((Vec::new(), 0usize));
    let frames = frames
        .map(Some)
        .chain(futures::stream::iter([None]))
        .filter_map(move |f| {
            let out = match f {
                Some(Ok(f)) => {
                    if let Some((k, size)) = kept.as_mut() {
                        *size += f.len();
                        if *size > budget {
                            kept = None;
                        } else {
                            k.push(f.clone());
                        }
                    }
                    Some(Ok(f))
                }
                Some(Err(e)) => {
                    kept = None;
                    Some(Err(e))
                }
                None => {
                    if let Some((k, _)) = kept.take() {
                        cache.keep(key.clone(), Arc::clone(&schema), k);
                    }
                    None
                }
            };
            futures::future::ready(out)
        });
    Ok(frames.boxed())
}

/// The size above which arrow-flight's encoder cuts a batch into several messages (its
/// default `max_flight_data_size`), measured by the buffers the batch's arrays reference.
const FLIGHT_SPLIT_BYTES: usize = 2 * 1024 * 1024;

/// `b` ready for the Flight encoder: when the buffers it references (shared with other
/// batches, as slices of one built array are) would make the encoder cut it into several
/// messages, a copy in buffers of its own; otherwise `b` itself.
pub(crate) fn for_flight(
    b: RecordBatch,
) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
    let referenced: usize = b.columns().iter().map(|c| c.get_buffer_memory_size()).sum();
    if referenced > FLIGHT_SPLIT_BYTES {
        owned_buffers(&b)
    } else {
        Ok(b)
    }
}

/// `b` with every column copied into buffers holding only its rows.
fn owned_buffers(b: &RecordBatch) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
    let all = arrow::array::UInt32Array::from_iter_values(0..b.num_rows() as u32);
    let columns = b
        .columns()
        .iter()
        .map(|c| arrow::compute::take(c.as_ref(), &all, None))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    RecordBatch::try_new(b.schema(), columns)
}

/// The key of version `v`'s finished stream at the space's current identity version.
async fn stream_key(
    store: &Store,
    space: &Space,
    v: &VersionRef,
    cache: &ServingCache,
) -> Result<cache::StreamKey> {
    let identity = cache.ids.version(store, space).await?;
    Ok((
        space.as_str().to_string(),
        v.key.clone(),
        v.version,
        identity,
    ))
}

/// The membership of one committed version as a stream (see the module docs); external ids
/// from the space's current identity version through `cache`.
pub async fn membership_stream(
    store: &Store,
    space: &Space,
    v: &VersionRef,
    cache: &ServingCache,
) -> Result<(SchemaRef, Batches)> {
    let (schema, batches, _) = build_membership(store, space, v, cache).await?;
    Ok((schema, batches))
}

/// Version `v`'s membership stream, and the identity version of the id index it uses (none
/// for an account audience).
async fn build_membership(
    store: &Store,
    space: &Space,
    v: &VersionRef,
    cache: &ServingCache,
) -> Result<(SchemaRef, Batches, Option<u64>)> {
    let (
        MemberSet {
            accounts,
            keys,
            idx,
            entered,
        },
        index,
    ) = members_and_ids(store, space, v, cache).await?;
    let types = index.as_ref().map(|i| i.types.clone()).unwrap_or_default();
    let schema = membership_schema(accounts, &types);
    let out_schema = Arc::clone(&schema);
    let n = keys.len();
    let identity = index.as_ref().map(|i| i.version);
    let stream = blocking_batches(n, move |start, len| {
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(keys.slice(start, len)),
            Arc::new(entered.slice(start, len)),
        ];
        if let Some(index) = &index {
            cols.extend(index.lists(&idx[start..start + len])?);
        }
        Ok(RecordBatch::try_new(Arc::clone(&out_schema), cols)?)
    });
    Ok((schema, stream, identity))
}

/// An export format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// `key,external_ids`.
    Unformatted,
    /// `key,external_ids` and indexed columns per id type.
    Formatted,
    /// One normalized (hashed unless `raw`) value of `id_type` per row.
    Single {
        /// The id type exported.
        id_type: String,
        /// Unhashed values (needs the `pii` scope over HTTP).
        raw: bool,
    },
}

impl Format {
    /// Parse a format name (`single` takes the id type and hashing apart).
    pub fn parse(name: &str, id_type: Option<&str>, raw: bool) -> Result<Format> {
        match name {
            "unformatted" => Ok(Format::Unformatted),
            "formatted" => Ok(Format::Formatted),
            "single" => Ok(Format::Single {
                id_type: id_type.unwrap_or("email").to_string(),
                raw,
            }),
            other => Err(Error::Usage(format!(
                "unknown export format '{other}': unformatted, formatted or single"
            ))),
        }
    }
}

/// A value as exported by `single`: trimmed, lower-cased for emails.
pub fn normalize(id_type: &str, value: &str) -> String {
    let v = value.trim();
    if id_type == "email" {
        v.to_lowercase()
    } else {
        v.to_string()
    }
}

/// SHA-256 as lowercase hex.
pub fn sha256_hex(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let d = Sha256::digest(s.as_bytes());
    let mut out = String::with_capacity(64);
    for b in d {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
    out
}

/// The `single` export: each member's values of one id type (from the space's id index: the
/// server's full one when built, else one of that type only), in member order and value order,
/// each profile's normalized values once, hashed in parallel.
async fn single_stream(
    store: &Store,
    space: &Space,
    v: &VersionRef,
    id_type: &str,
    raw: bool,
    cache: &ServingCache,
) -> Result<(SchemaRef, Batches)> {
    let schema = Arc::new(Schema::new(vec![Field::new(
        id_type,
        DataType::Utf8,
        false,
    )]));
    let MemberSet { accounts, idx, .. } = MemberSet::read(store, v).await?;
    if accounts {
        // account audiences carry no external ids of their own
        return Ok((schema, futures::stream::empty().boxed()));
    }
    let index = match cache.ids.current(store, space).await? {
        Some(ix) => ix,
        None => Arc::new(IdIndex::load_types(store, space, Some(id_type)).await?),
    };
    let Some(t) = index.type_index(id_type) else {
        return Ok((schema, futures::stream::empty().boxed()));
    };
    let (out_schema, id_type) = (Arc::clone(&schema), id_type.to_string());
    let stream = blocking_batches(idx.len(), move |start, len| {
        let mut values: Vec<String> = Vec::with_capacity(len);
        let mut seen: Vec<String> = Vec::new();
        for &p in &idx[start..start + len] {
            seen.clear();
            for (ti, vs) in index.groups(p) {
                if ti != t {
                    continue;
                }
                for raw_value in vs {
                    let n = normalize(&id_type, raw_value);
                    if n.is_empty() || seen.contains(&n) {
                        continue;
                    }
                    seen.push(n.clone());
                    values.push(n);
                }
            }
        }
        let col: StringArray = if raw {
            StringArray::from(values)
        } else {
            use rayon::prelude::*;
            let hashed: Vec<String> = values.par_iter().map(|n| sha256_hex(n)).collect();
            StringArray::from(hashed)
        };
        Ok(RecordBatch::try_new(
            Arc::clone(&out_schema),
            vec![Arc::new(col)],
        )?)
    });
    Ok((schema, stream))
}

/// A JSON string literal of `v` appended to `out` (escapes as serde_json does).
fn push_json_str(out: &mut String, v: &str) {
    use std::fmt::Write;
    out.push('"');
    if !any_byte(v.as_bytes(), |x| {
        lt_any(x, 0x20) | eq_any(x, b'"') | eq_any(x, b'\\')
    }) {
        out.push_str(v);
        out.push('"');
        return;
    }
    let mut plain = 0; // start of the run not yet copied
    for (i, b) in v.bytes().enumerate() {
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            8 => "\\b",
            12 => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&v[plain..i]);
        if esc.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(esc);
        }
        plain = i + 1;
    }
    out.push_str(&v[plain..]);
    out.push('"');
}

/// Batches of `n` rows built by `build(start, len)` on blocking threads, [`in_flight`] at a
/// time (the consumer writes one while the next are built), in order.
fn blocking_batches(
    n: usize,
    build: impl Fn(usize, usize) -> Result<RecordBatch> + Send + Sync + 'static,
) -> Batches {
    let build = Arc::new(build);
    futures::stream::iter((0..n).step_by(BATCH_ROWS))
        .map(move |start| {
            let build = Arc::clone(&build);
            async move {
                tokio::task::spawn_blocking(move || build(start, BATCH_ROWS.min(n - start)))
                    .await
                    .map_err(|e| Error::Usage(format!("export batch failed: {e}")))?
            }
        })
        .buffered(in_flight())
        .boxed()
}

/// An export of one committed version, as Arrow batches (the CSV columns); external ids from
/// the space's current identity version through `ids`.
pub async fn export_stream(
    store: &Store,
    space: &Space,
    v: &VersionRef,
    format: &Format,
    cache: &Arc<ServingCache>,
) -> Result<(SchemaRef, Batches)> {
    let formatted = match format {
        Format::Single { id_type, raw } => {
            return single_stream(store, space, v, id_type, *raw, cache).await;
        }
        Format::Formatted => true,
        Format::Unformatted => false,
    };
    let rows = Arc::new(Rows::load(store, space, v, formatted, cache).await?);
    let schema = Arc::clone(&rows.schema);
    let stream = blocking_batches(rows.keys.len(), move |start, len| rows.batch(start, len));
    Ok((schema, stream))
}

/// An export of one committed version as CSV chunks with their row counts ([`csv_chunks`] of
/// [`export_stream`]); `formatted` and `unformatted` rows are written as CSV text directly,
/// without Arrow columns and a CSV encoder in between (the same bytes).
pub async fn export_csv(
    store: &Store,
    space: &Space,
    v: &VersionRef,
    format: &Format,
    cache: &Arc<ServingCache>,
) -> Result<BoxStream<'static, Result<(bytes::Bytes, u64)>>> {
    let formatted = match format {
        Format::Single { .. } => {
            let (schema, batches) = export_stream(store, space, v, format, cache).await?;
            return Ok(csv_chunks(schema, batches));
        }
        Format::Formatted => true,
        Format::Unformatted => false,
    };
    let rows = Arc::new(Rows::load(store, space, v, formatted, cache).await?);
    let n = rows.keys.len();
    if n == 0 {
        let header = rows.csv(0, 0, true);
        return Ok(futures::stream::once(async move { header }).boxed());
    }
    Ok(futures::stream::iter((0..n).step_by(BATCH_ROWS))
        .map(move |start| {
            let rows = Arc::clone(&rows);
            async move {
                tokio::task::spawn_blocking(move || {
                    rows.csv(start, BATCH_ROWS.min(n - start), start == 0)
                })
                .await
                .map_err(|e| Error::Usage(format!("CSV export failed: {e}")))?
            }
        })
        .buffered(in_flight())
        .boxed())
}

/// The rows of a `formatted` or `unformatted` export: the members in key order with the
/// space's external id index, and the export's columns.
struct Rows {
    keys: StringArray,
    idx: Vec<Option<i64>>,
    index: Option<Arc<IdIndex>>,
    types: Vec<String>,
    /// The indexed id columns (`formatted` only): (type index, value index), sorted.
    extra: Vec<(usize, usize)>,
    schema: SchemaRef,
}

impl Rows {
    async fn load(
        store: &Store,
        space: &Space,
        v: &VersionRef,
        formatted: bool,
        cache: &ServingCache,
    ) -> Result<Rows> {
        let (MemberSet { keys, idx, .. }, index) = members_and_ids(store, space, v, cache).await?;
        Ok(Rows::with(keys, idx, index, formatted))
    }

    fn with(
        keys: StringArray,
        idx: Vec<Option<i64>>,
        index: Option<Arc<IdIndex>>,
        formatted: bool,
    ) -> Rows {
        let types = index.as_ref().map(|i| i.types.clone()).unwrap_or_default();
        let counts = match (&index, formatted) {
            (Some(ix), true) => ix.max_counts(&idx),
            _ => vec![0; types.len()],
        };
        let utf8 = |n: &str| Field::new(n, DataType::Utf8, false);
        let mut fields = vec![utf8("key"), utf8("external_ids")];
        let mut extra: Vec<(usize, usize)> = Vec::new();
        for (ti, t) in types.iter().enumerate() {
            for i in 0..counts[ti] {
                let name = if i == 0 {
                    t.clone()
                } else {
                    format!("{t}_{i}")
                };
                fields.push(Field::new(&name, DataType::Utf8, true));
                extra.push((ti, i));
            }
        }
        Rows {
            keys,
            idx,
            index,
            types,
            extra,
            schema: Arc::new(Schema::new(fields)),
        }
    }

    /// Row `r`'s external ids: the JSON object into `obj`, the (type, value) entries, sorted,
    /// into `es`.
    fn row<'a>(&'a self, r: usize, obj: &mut String, es: &mut Vec<(usize, &'a str)>) {
        obj.clear();
        es.clear();
        obj.push('{');
        if let Some(ix) = &self.index {
            es.extend(ix.entries(self.idx[r]));
        }
        let mut k = 0;
        while k < es.len() {
            let t = es[k].0;
            if k > 0 {
                obj.push(',');
            }
            push_json_str(obj, &self.types[t]);
            obj.push_str(":[");
            let first = k;
            while k < es.len() && es[k].0 == t {
                if k > first {
                    obj.push(',');
                }
                push_json_str(obj, es[k].1);
                k += 1;
            }
            obj.push(']');
        }
        obj.push('}');
    }

    /// The values of the indexed columns for a row's entries `es`, in column order.
    fn indexed<'a>(
        &'a self,
        es: &'a [(usize, &'a str)],
    ) -> impl Iterator<Item = Option<&'a str>> + 'a {
        // entries of one type are contiguous: `at` is the first of the current column's type
        let mut at = 0;
        self.extra.iter().map(move |&(t, i)| {
            while at < es.len() && es[at].0 < t {
                at += 1;
            }
            es.get(at + i).filter(|e| e.0 == t).map(|e| e.1)
        })
    }

    /// Rows `start..start + len` as a record batch.
    fn batch(&self, start: usize, len: usize) -> Result<RecordBatch> {
        let mut ext = StringBuilder::with_capacity(len, len * 160);
        let mut cols: Vec<StringBuilder> =
            self.extra.iter().map(|_| StringBuilder::new()).collect();
        let (mut obj, mut es) = (String::new(), Vec::new());
        for r in start..start + len {
            self.row(r, &mut obj, &mut es);
            ext.append_value(&obj);
            for (c, v) in cols.iter_mut().zip(self.indexed(&es)) {
                c.append_option(v);
            }
        }
        let mut arrays: Vec<ArrayRef> = vec![
            Arc::new(self.keys.slice(start, len)),
            Arc::new(ext.finish()),
        ];
        arrays.extend(cols.iter_mut().map(|c| Arc::new(c.finish()) as ArrayRef));
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), arrays)?)
    }

    /// Rows `start..start + len` as CSV text (after the header row when `header`), as the
    /// Arrow CSV writer writes them: a field with a comma, quote, CR or LF quoted, its quotes
    /// doubled; a missing value empty; LF after each record.
    fn csv(&self, start: usize, len: usize, header: bool) -> Result<(bytes::Bytes, u64)> {
        let mut out: Vec<u8> = Vec::with_capacity(len * 192 + 256);
        if header {
            for (i, f) in self.schema.fields().iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                push_csv_field(&mut out, f.name());
            }
            out.push(b'\n');
        }
        // `"type":[` of each id type, JSON in a quoted CSV field (quotes doubled)
        let type_keys: Vec<Vec<u8>> = self
            .types
            .iter()
            .map(|t| {
                let mut j = String::new();
                push_json_str(&mut j, t);
                j.push_str(":[");
                let mut b = Vec::new();
                push_doubled(&mut b, j.as_bytes());
                b
            })
            .collect();
        let (ends, types, values) = match &self.index {
            Some(ix) => ix.gather(&self.idx[start..start + len])?,
            None => (vec![0; len], vec![], StringArray::from(Vec::<&str>::new())),
        };
        let (mut es, mut json) = (Vec::new(), String::new());
        let mut from = 0;
        for (r, &end) in (start..start + len).zip(&ends) {
            push_csv_field(&mut out, self.keys.value(r));
            out.push(b',');
            es.clear();
            es.extend((from..end as usize).map(|e| (types[e] as usize, values.value(e))));
            from = end as usize;
            // the JSON object of `row`, written into the field as the CSV writer would quote it
            if es.is_empty() {
                out.extend_from_slice(b"{}");
            } else {
                out.extend_from_slice(b"\"{");
                let mut k = 0;
                while k < es.len() {
                    let t = es[k].0;
                    if k > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(&type_keys[t]);
                    let first = k;
                    while k < es.len() && es[k].0 == t {
                        if k > first {
                            out.push(b',');
                        }
                        let v = es[k].1;
                        if plain(v) {
                            out.extend_from_slice(b"\"\"");
                            out.extend_from_slice(v.as_bytes());
                            out.extend_from_slice(b"\"\"");
                        } else {
                            json.clear();
                            push_json_str(&mut json, v);
                            push_doubled(&mut out, json.as_bytes());
                        }
                        k += 1;
                    }
                    out.push(b']');
                }
                out.extend_from_slice(b"}\"");
            }
            for v in self.indexed(&es) {
                out.push(b',');
                if let Some(v) = v {
                    push_csv_field(&mut out, v);
                }
            }
            out.push(b'\n');
        }
        Ok((out.into(), len as u64))
    }
}

/// Whether `v` is written as it is both in JSON strings and in CSV fields: no control
/// character, quote, backslash or comma.
fn plain(v: &str) -> bool {
    plain_bytes(v.as_bytes())
}

fn plain_bytes(b: &[u8]) -> bool {
    !any_byte(b, |x| {
        lt_any(x, 0x20) | eq_any(x, b'"') | eq_any(x, b'\\') | eq_any(x, b',')
    })
}

/// Whether a CSV field must be quoted: it holds a comma, quote, CR or LF.
fn csv_special(b: &[u8]) -> bool {
    any_byte(b, |x| {
        eq_any(x, b',') | eq_any(x, b'"') | eq_any(x, b'\r') | eq_any(x, b'\n')
    })
}

/// Whether `test` finds a byte of `b` it looks for, eight bytes at a time (`test` gets eight
/// bytes as a little-endian word and answers nonzero when one of them is such a byte; the
/// tail is padded with a byte no test looks for).
fn any_byte(b: &[u8], test: impl Fn(u64) -> u64) -> bool {
    let mut words = b.chunks_exact(8);
    let mut found = 0;
    for w in &mut words {
        found |= test(u64::from_le_bytes([
            w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7],
        ]));
    }
    let mut tail = [b'a'; 8];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    (found | test(u64::from_le_bytes(tail))) != 0
}

const fn bytes8(b: u8) -> u64 {
    0x0101_0101_0101_0101 * b as u64
}

/// Nonzero when a byte of `x` is `b` (exact as a boolean).
fn eq_any(x: u64, b: u8) -> u64 {
    let y = x ^ bytes8(b);
    y.wrapping_sub(bytes8(1)) & !y & bytes8(0x80)
}

/// Nonzero when a byte of `x` is below `n` (`n` at most 128; exact as a boolean).
fn lt_any(x: u64, n: u8) -> u64 {
    x.wrapping_sub(bytes8(n)) & !x & bytes8(0x80)
}

/// `b` with each quote doubled.
fn push_doubled(out: &mut Vec<u8>, b: &[u8]) {
    let mut rest = b;
    while let Some(q) = rest.iter().position(|&c| c == b'"') {
        out.extend_from_slice(&rest[..=q]);
        out.push(b'"');
        rest = &rest[q + 1..];
    }
    out.extend_from_slice(rest);
}

/// One CSV field: quoted, with its quotes doubled, when it holds a comma, quote, CR or LF.
fn push_csv_field(out: &mut Vec<u8>, v: &str) {
    let b = v.as_bytes();
    if !csv_special(b) {
        out.extend_from_slice(b);
        return;
    }
    out.push(b'"');
    push_doubled(out, b);
    out.push(b'"');
}

/// One batch as CSV text (with the header row when `header`).
fn encode_csv(b: &RecordBatch, header: bool) -> Result<(bytes::Bytes, u64)> {
    let mut buf = Vec::with_capacity(b.get_array_memory_size());
    arrow::csv::WriterBuilder::new()
        .with_header(header)
        .build(&mut buf)
        .write(b)?;
    Ok((bytes::Bytes::from(buf), b.num_rows() as u64))
}

/// A stream as CSV text (RFC 4180 quoting, UTF-8, a header row first, even without rows): one
/// chunk per batch with its row count, encoded on blocking threads [`in_flight`] at a time, in
/// order.
pub fn csv_chunks(
    schema: SchemaRef,
    batches: Batches,
) -> BoxStream<'static, Result<(bytes::Bytes, u64)>> {
    let encoded = batches
        .enumerate()
        .map(|(i, b)| async move {
            let b = b?;
            tokio::task::spawn_blocking(move || encode_csv(&b, i == 0))
                .await
                .map_err(|e| Error::Usage(format!("CSV encoding failed: {e}")))?
        })
        .buffered(in_flight());
    futures::stream::unfold(
        (encoded.boxed(), Some(schema)),
        |(mut encoded, schema)| async move {
            match encoded.next().await {
                Some(chunk) => Some((chunk, (encoded, None))),
                // no batch at all: the header alone
                None => schema.map(|s| {
                    (
                        encode_csv(&RecordBatch::new_empty(s), true),
                        (encoded, None),
                    )
                }),
            }
        },
    )
    .boxed()
}

/// Write a stream as CSV ([`csv_chunks`]) into `w`; returns the rows written.
pub async fn write_csv(
    schema: SchemaRef,
    batches: Batches,
    w: &mut (dyn std::io::Write + Send),
) -> Result<u64> {
    write_chunks(csv_chunks(schema, batches), w).await
}

/// Write CSV chunks ([`export_csv`]) into `w`; returns the rows written.
pub async fn write_chunks(
    mut chunks: BoxStream<'static, Result<(bytes::Bytes, u64)>>,
    w: &mut (dyn std::io::Write + Send),
) -> Result<u64> {
    let mut rows = 0;
    while let Some(c) = chunks.next().await {
        let (bytes, n) = c?;
        w.write_all(&bytes)
            .map_err(|e| Error::io("CSV output", e))?;
        rows += n;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-at-a-time byte tests agree with byte-by-byte ones on every byte at every
    /// position of strings of every length up to 20, and next to UTF-8.
    #[test]
    fn word_byte_tests_agree_with_bytes() {
        let slow_plain = |b: &[u8]| {
            !b.iter()
                .any(|&c| c < 0x20 || c == b'"' || c == b'\\' || c == b',')
        };
        let slow_csv = |b: &[u8]| b.iter().any(|&c| matches!(c, b',' | b'"' | b'\r' | b'\n'));
        let check = |v: &[u8]| {
            assert_eq!(csv_special(v), slow_csv(v), "{v:?}");
            assert_eq!(plain_bytes(v), slow_plain(v), "{v:?}");
        };
        for len in 0..=20usize {
            for pos in 0..len.max(1) {
                for c in 0..=255u8 {
                    let mut v = vec![b'x'; len];
                    if len > 0 {
                        v[pos] = c;
                    }
                    check(&v);
                }
            }
        }
        // mixtures of bytes next to the ones looked for (borrows between bytes)
        let alphabet = [
            0u8, 1, 0x1f, 0x20, 0x21, b',', b'"', b'\\', b'\r', b'\n', 0x2b, 0x2d, 0x0b, 0x0e,
            0x5b, 0x5d, 0x7f, 0x80, 0xa2, 0xff, b'a',
        ];
        let mut x: u64 = 99;
        for _ in 0..200_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (x >> 59) as usize + (x >> 62) as usize;
            let v: Vec<u8> = (0..len)
                .map(|i| alphabet[((x >> (i * 2 % 50)) % alphabet.len() as u64) as usize])
                .collect();
            check(&v);
        }
        for s in ["ünï ✓", "ü,", "é\"", "ÿÿÿÿÿÿÿÿ\u{1}"] {
            assert_eq!(plain(s), slow_plain(s.as_bytes()), "{s}");
        }
    }

    /// The CSV text written directly is what the Arrow CSV writer makes of the same rows as
    /// batches, whole or in chunks, with values that need quoting and JSON escapes.
    #[test]
    fn direct_csv_equals_the_arrow_csv_writer() {
        let tricky = [
            "plain",
            "a,b",
            "say \"hi\"",
            "line\nbreak",
            "cr\rx",
            "",
            "ünï ✓",
            "tab\tx",
            "ctl\u{1}",
            "back\\slash",
            "\"",
            ",",
            "x@y.z",
        ];
        let n = tricky.len();
        let (mut t, mut val, mut p) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let mut push = |ty: &str, v: &str| {
                t.push(ty.to_string());
                val.push(v.to_string());
                p.push(i as i64);
            };
            push("email", tricky[i]);
            if i % 2 == 0 {
                push("email", tricky[(i + 3) % n]);
                push("email", tricky[(i + 7) % n]);
            }
            if i % 3 != 0 {
                push("user_id", tricky[(i + 5) % n]);
            }
            if i == 4 {
                push("odd,\"type\"", "v");
            }
        }
        let index = ids::build(1, vec![(StringArray::from(t), StringArray::from(val), p)]).unwrap();
        let index = Some(Arc::new(index));
        let mut keys: Vec<String> = (0..n).map(|i| format!("k-{i}")).collect();
        keys.extend(["k,none".to_string(), "k\"past".to_string()]);
        let mut idx: Vec<Option<i64>> = (0..n as i64).map(Some).collect();
        idx.extend([None, Some(99)]);
        for formatted in [false, true] {
            let rows = Rows::with(
                StringArray::from(keys.clone()),
                idx.clone(),
                index.clone(),
                formatted,
            );
            let m = keys.len();
            for cut in [m, 5] {
                let direct = [
                    rows.csv(0, cut, true).unwrap(),
                    rows.csv(cut, m - cut, false).unwrap(),
                ];
                let arrow = [
                    encode_csv(&rows.batch(0, cut).unwrap(), true).unwrap(),
                    encode_csv(&rows.batch(cut, m - cut).unwrap(), false).unwrap(),
                ];
                assert_eq!(
                    direct,
                    arrow,
                    "formatted {formatted}, cut {cut}:\n{}",
                    String::from_utf8_lossy(&direct[0].0)
                );
            }
            if formatted {
                assert!(rows.extra.len() > 3, "several indexed columns");
            }
        }
        // no rows: the header alone
        let none = Rows::with(StringArray::from(Vec::<&str>::new()), vec![], index, true);
        assert_eq!(
            none.csv(0, 0, true).unwrap().0.as_ref(),
            b"key,external_ids\n"
        );
    }

    /// A slice of a large batch, copied into its own buffers, is encoded as one Flight message
    /// (the slice itself is cut into many, sized by the buffers it shares) with the same rows.
    #[tokio::test]
    async fn a_sliced_batch_in_its_own_buffers_is_one_flight_message() {
        use futures::TryStreamExt;
        let n = 200_000;
        let ids =
            arrow::array::StringArray::from_iter_values((0..n).map(|i| format!("p-{i:016x}")));
        let idx = arrow::array::Int64Array::from_iter_values(0..n as i64);
        let big = RecordBatch::try_from_iter(vec![
            ("profile_id", Arc::new(ids) as arrow::array::ArrayRef),
            ("profile_idx", Arc::new(idx) as arrow::array::ArrayRef),
        ])
        .unwrap();
        let slice = big.slice(1000, 8192);
        let messages = |b: RecordBatch| async move {
            let data: Vec<arrow_flight::FlightData> =
                arrow_flight::encode::FlightDataEncoderBuilder::new()
                    .build(futures::stream::iter(vec![Ok(b)]))
                    .try_collect()
                    .await
                    .unwrap();
            data.len() - 1 // the schema message
        };
        let owned = for_flight(slice.clone()).unwrap();
        assert_eq!(owned, slice);
        assert!(messages(slice).await > 1);
        assert_eq!(messages(owned).await, 1);
        // a batch that references only its own rows is passed as it is
        let small = RecordBatch::try_from_iter(vec![(
            "n",
            Arc::new(arrow::array::Int64Array::from(vec![1, 2])) as arrow::array::ArrayRef,
        )])
        .unwrap();
        let same = for_flight(small.clone()).unwrap();
        assert!(Arc::ptr_eq(same.column(0), small.column(0)));
    }

    #[test]
    fn json_strings_escape_like_serde() {
        for v in [
            "plain",
            "qu\"ote",
            "back\\slash",
            "tab\tnl\ncr\r",
            "ctl\u{1}\u{8}\u{c}\u{1f}",
            "ünï",
        ] {
            let mut s = String::new();
            push_json_str(&mut s, v);
            assert_eq!(s, serde_json::to_string(v).unwrap(), "{v:?}");
        }
    }

    #[test]
    fn normalized_values_hash_to_known_sha256_vectors() {
        // FIPS 180-2 test vectors
        assert_eq!(
            sha256_hex(&normalize("email", "  ABC ")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256_hex(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // other id types keep their case
        assert_eq!(normalize("user_id", " AbC "), "AbC");
    }
}
