//! Memberships as streams and CSV exports (SPEC §8), shared by `audiences export`, the HTTP
//! export endpoint and Flight.
//!
//! A membership stream reads one committed version: its members file joined with the space's
//! identities, sorted by profile (DataFusion sorts, spilling if it must), and folded into one row
//! per profile with a list column per external id type, sent in batches through a bounded
//! channel (backpressure: nothing collects the whole result).
//!
//! Formats: `unformatted` (`key,external_ids`: the profile id, or account id for account
//! audiences, and a JSON object from id type to the sorted array of its values), `formatted`
//! (those two, then per id type present in the audience `t`, `t_1`, ... as many as the largest
//! count), `single` (one column named after the id type, one row per value, normalized: trimmed,
//! and lower-cased for emails; SHA-256 lowercase hex unless raw). Account audiences carry no
//! external ids of their own: their `external_ids` is `{}` and `single` has no rows.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, ListArray, ListBuilder, RecordBatch, StringArray, StringBuilder,
    TimestampMicrosecondArray, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};

use crate::compute::{MEMBERSHIPS, VersionRef, versions};
use crate::error::{Error, Result};
use crate::store::{CommitLog, Space, Store};
use crate::tables::CommittedTable;

/// Rows per streamed batch.
pub const BATCH_ROWS: usize = 8192;

/// A stream of record batches.
pub type Batches = BoxStream<'static, Result<RecordBatch>>;

/// The external id types of a space, sorted.
pub async fn id_types(store: &Store, space: &Space) -> Result<Vec<String>> {
    let rows = crate::tables::query(
        store,
        space,
        "SELECT DISTINCT id_type FROM identities ORDER BY id_type",
    )
    .await?;
    Ok(rows
        .iter()
        .flat_map(|b| {
            b.column(0)
                .as_string::<i32>()
                .iter()
                .flatten()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect())
}

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
    let batches = crate::compute::read_file(store, &v.data).await?;
    Ok(batches.iter().any(|b| {
        b.column_by_name("account_id")
            .is_some_and(|c| c.null_count() < c.len())
    }))
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

/// A session of the space with the members file of version `v` as `__version_members`.
async fn version_session(
    store: &Store,
    space: &Space,
    v: &VersionRef,
) -> Result<datafusion::prelude::SessionContext> {
    let ctx = crate::tables::session(store, space).await?;
    ctx.register_table(
        "__version_members",
        Arc::new(CommittedTable::plain(
            crate::compute::schema("members"),
            vec![v.data.clone()],
        )),
    )?;
    Ok(ctx)
}

/// The membership of one committed version as a stream (see the module docs).
pub async fn membership_stream(
    store: &Store,
    space: &Space,
    v: &VersionRef,
) -> Result<(SchemaRef, Batches)> {
    let accounts = is_accounts(store, v).await?;
    let types = if accounts {
        Vec::new()
    } else {
        id_types(store, space).await?
    };
    let schema = membership_schema(accounts, &types);
    let ctx = version_session(store, space, v).await?;
    // Fixed internal SQL: the key only selected the file above.
    let sql = if accounts {
        "SELECT account_id, entered_at, CAST(NULL AS VARCHAR) AS t, CAST(NULL AS VARCHAR) AS v \
         FROM __version_members ORDER BY account_id"
    } else {
        "SELECT m.profile_id, m.entered_at, i.id_type, i.id_value FROM __version_members m \
         LEFT JOIN identities i ON i.profile_id = m.profile_id \
         ORDER BY m.profile_id, i.id_type, i.id_value"
    };
    let input = ctx.sql(sql).await?.execute_stream().await?;
    let (tx, rx) = futures::channel::mpsc::channel(2);
    tokio::spawn(pivot(input, Arc::clone(&schema), types, tx));
    Ok((schema, rx.boxed()))
}

/// Group `(profile_id, entered_at, id_type, id_value)` rows, sorted by profile, into one row
/// per profile with a list column per id type; sends batches of [`BATCH_ROWS`].
async fn pivot(
    mut input: datafusion::physical_plan::SendableRecordBatchStream,
    schema: SchemaRef,
    types: Vec<String>,
    mut out: futures::channel::mpsc::Sender<Result<RecordBatch>>,
) {
    let col_of: BTreeMap<&str, usize> = types
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut ids = StringBuilder::new();
    let mut entered = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let mut lists: Vec<ListBuilder<StringBuilder>> = types
        .iter()
        .map(|_| ListBuilder::new(StringBuilder::new()))
        .collect();
    let mut current: Option<(String, i64)> = None;
    let mut values: Vec<Vec<String>> = vec![Vec::new(); types.len()];
    let mut rows = 0usize;
    macro_rules! finish_row {
        () => {
            if let Some((p, t)) = current.take() {
                ids.append_value(&p);
                entered.append_value(t);
                for (i, l) in lists.iter_mut().enumerate() {
                    for v in values[i].drain(..) {
                        l.values().append_value(v);
                    }
                    l.append(true);
                }
                rows += 1;
            }
        };
    }
    let emit = |ids: &mut StringBuilder,
                entered: &mut TimestampMicrosecondBuilder,
                lists: &mut Vec<ListBuilder<StringBuilder>>|
     -> Result<RecordBatch> {
        let mut cols: Vec<ArrayRef> = vec![Arc::new(ids.finish()), Arc::new(entered.finish())];
        for l in lists.iter_mut() {
            cols.push(Arc::new(l.finish()));
        }
        Ok(RecordBatch::try_new(Arc::clone(&schema), cols)?)
    };
    while let Some(b) = input.next().await {
        let b = match b {
            Ok(b) => b,
            Err(e) => {
                let _ = out.send(Err(e.into())).await;
                return;
            }
        };
        let (p, t, ty, val) = (
            b.column(0).as_string::<i32>(),
            b.column(1)
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>(),
            b.column(2).as_string::<i32>(),
            b.column(3).as_string::<i32>(),
        );
        let Some(t) = t else {
            let _ = out
                .send(Err(Error::Usage("entered_at is not a timestamp".into())))
                .await;
            return;
        };
        for r in 0..b.num_rows() {
            if !p.is_valid(r) {
                continue;
            }
            if current.as_ref().is_none_or(|(c, _)| c != p.value(r)) {
                finish_row!();
                if rows >= BATCH_ROWS {
                    let batch = emit(&mut ids, &mut entered, &mut lists);
                    rows = 0;
                    if out.send(batch).await.is_err() {
                        return; // the client went away
                    }
                }
                current = Some((p.value(r).to_string(), t.value(r)));
            }
            if ty.is_valid(r)
                && val.is_valid(r)
                && let Some(i) = col_of.get(ty.value(r))
            {
                values[*i].push(val.value(r).to_string());
            }
        }
    }
    finish_row!();
    if rows > 0 {
        let batch = emit(&mut ids, &mut entered, &mut lists);
        let _ = out.send(batch).await;
    }
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

/// The `single` export: the version's members joined with their values of one id type only,
/// sorted by (profile, value), each profile's normalized values once, hashed in parallel.
async fn single_stream(
    store: &Store,
    space: &Space,
    v: &VersionRef,
    id_type: &str,
    raw: bool,
) -> Result<(SchemaRef, Batches)> {
    use datafusion::prelude::{col, lit};
    let schema = Arc::new(Schema::new(vec![Field::new(
        id_type,
        DataType::Utf8,
        false,
    )]));
    if is_accounts(store, v).await? {
        // account audiences carry no external ids of their own
        return Ok((schema, futures::stream::empty().boxed()));
    }
    let ctx = version_session(store, space, v).await?;
    let ids = ctx
        .table("identities")
        .await?
        .filter(col("id_type").eq(lit(id_type)))?
        .select(vec![col("profile_id").alias("__p"), col("id_value")])?;
    let input = ctx
        .table("__version_members")
        .await?
        .select(vec![col("profile_id")])?
        .join(
            ids,
            datafusion::prelude::JoinType::Inner,
            &["profile_id"],
            &["__p"],
            None,
        )?
        .select(vec![col("profile_id"), col("id_value")])?
        .sort(vec![
            col("profile_id").sort(true, false),
            col("id_value").sort(true, false),
        ])?
        .execute_stream()
        .await?;
    let out_schema = Arc::clone(&schema);
    let id_type = id_type.to_string();
    // (current profile, its normalized values so far): a profile's rows may span batches
    let state: (String, std::collections::HashSet<String>) = Default::default();
    let stream = input.scan(state, move |(cur, seen), b| {
        let out = (|| -> Result<RecordBatch> {
            let b = b?;
            let (p, val) = (
                b.column(0).as_string::<i32>(),
                b.column(1).as_string::<i32>(),
            );
            let mut values: Vec<String> = Vec::with_capacity(b.num_rows());
            for r in 0..b.num_rows() {
                if !p.is_valid(r) || !val.is_valid(r) {
                    continue;
                }
                if cur.as_str() != p.value(r) {
                    cur.clear();
                    cur.push_str(p.value(r));
                    seen.clear();
                }
                let n = normalize(&id_type, val.value(r));
                if n.is_empty() || seen.contains(&n) {
                    continue;
                }
                seen.insert(n.clone());
                values.push(n);
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
        })();
        futures::future::ready(Some(out))
    });
    Ok((schema, stream.boxed()))
}

/// Largest number of values per id type over the members of a version.
async fn max_counts(
    store: &Store,
    space: &Space,
    v: &VersionRef,
) -> Result<BTreeMap<String, usize>> {
    let ctx = version_session(store, space, v).await?;
    let batches = ctx
        .sql(
            // (an id value belongs to one profile, so a plain count is the distinct count)
            "SELECT id_type, max(n) AS n FROM (SELECT m.profile_id, i.id_type, count(*) AS n \
             FROM __version_members m JOIN identities i ON i.profile_id = m.profile_id \
             GROUP BY m.profile_id, i.id_type) GROUP BY id_type",
        )
        .await?
        .collect()
        .await?;
    let mut out = BTreeMap::new();
    for b in batches {
        let t = b.column(0).as_string::<i32>();
        let n = arrow::compute::cast(b.column(1), &DataType::Int64)?;
        let n = n.as_primitive::<arrow::datatypes::Int64Type>();
        for r in 0..b.num_rows() {
            out.insert(t.value(r).to_string(), n.value(r) as usize);
        }
    }
    Ok(out)
}

fn list_values(a: &ListArray, r: usize) -> Vec<String> {
    if a.is_null(r) {
        return Vec::new();
    }
    let v = a.value(r);
    let s = v.as_string::<i32>();
    s.iter().flatten().map(String::from).collect()
}

/// An export of one committed version, as Arrow batches (the CSV columns).
pub async fn export_stream(
    store: &Store,
    space: &Space,
    v: &VersionRef,
    format: &Format,
) -> Result<(SchemaRef, Batches)> {
    let formatted = match format {
        Format::Single { id_type, raw } => {
            return single_stream(store, space, v, id_type, *raw).await;
        }
        Format::Formatted => true,
        Format::Unformatted => false,
    };
    let (mschema, input) = membership_stream(store, space, v).await?;
    let types: Vec<String> = mschema
        .fields()
        .iter()
        .skip(2)
        .map(|f| f.name().clone())
        .collect();
    let utf8 = |n: &str| Field::new(n, DataType::Utf8, false);
    let counts = if formatted {
        max_counts(store, space, v).await?
    } else {
        BTreeMap::new()
    };
    let mut fields = vec![utf8("key"), utf8("external_ids")];
    let mut extra: Vec<(usize, String, usize)> = Vec::new(); // (type column, type, index)
    for (ti, t) in types.iter().enumerate() {
        for i in 0..counts.get(t).copied().unwrap_or(0) {
            let name = if i == 0 {
                t.clone()
            } else {
                format!("{t}_{i}")
            };
            fields.push(Field::new(&name, DataType::Utf8, true));
            extra.push((ti, t.clone(), i));
        }
    }
    let schema = Arc::new(Schema::new(fields));
    let out_schema = Arc::clone(&schema);
    let stream = input.map(move |b| {
        let b = b?;
        let keys = b.column(0).as_string::<i32>();
        let lists: Vec<&ListArray> = (0..types.len())
            .map(|i| b.column(i + 2).as_list::<i32>())
            .collect();
        let mut ext = StringBuilder::new();
        let mut cols: Vec<StringBuilder> = extra.iter().map(|_| StringBuilder::new()).collect();
        for r in 0..b.num_rows() {
            let mut obj = serde_json::Map::new();
            let vals: Vec<Vec<String>> = lists.iter().map(|l| list_values(l, r)).collect();
            for (ti, t) in types.iter().enumerate() {
                if !vals[ti].is_empty() {
                    obj.insert(t.clone(), serde_json::json!(vals[ti]));
                }
            }
            ext.append_value(serde_json::Value::Object(obj).to_string());
            for (c, (ti, _, i)) in cols.iter_mut().zip(&extra) {
                c.append_option(vals[*ti].get(*i));
            }
        }
        let mut arrays: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                keys.iter().map(|k| k.unwrap_or_default()),
            )),
            Arc::new(ext.finish()),
        ];
        arrays.extend(cols.iter_mut().map(|c| Arc::new(c.finish()) as ArrayRef));
        Ok(RecordBatch::try_new(Arc::clone(&out_schema), arrays)?)
    });
    Ok((schema, stream.boxed()))
}

/// Write a stream as CSV (RFC 4180 quoting, UTF-8, a header row) into `w`.
pub async fn write_csv(
    schema: SchemaRef,
    mut batches: Batches,
    w: &mut (dyn std::io::Write + Send),
) -> Result<u64> {
    let mut writer = arrow::csv::WriterBuilder::new().with_header(true).build(w);
    let mut rows = 0u64;
    let mut wrote = false;
    while let Some(b) = batches.next().await {
        let b = b?;
        rows += b.num_rows() as u64;
        writer.write(&b)?;
        wrote = true;
    }
    if !wrote {
        writer.write(&RecordBatch::new_empty(schema))?;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

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
