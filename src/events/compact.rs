//! Compaction of the events table: the files of a date partition merged into one sorted file
//! (or a few, at most [`MAX_ROWS`] rows each), committed atomically with the removal of the
//! files they replace (operation `compact`).
//!
//! Every ingest chunk writes one file per date it touches, so a backfill of interleaved history
//! leaves many small files per date; per-file costs (footer, page index, open) then dominate
//! scans. Ingest compacts the dates it touched once they hold [`MIN_FILES`] files or more, so
//! the number of files per date stays bounded and rewriting stays amortized.
//!
//! A compaction adds no events: identity resolution and refreshes skip `compact` entries when
//! they look for new data, and only files their watermark already covers are compacted (events
//! of later commits must stay in files of their own commit until they have been read
//! incrementally: the bound is the lowest events version the refresh bases of live audiences and
//! computed traits cover). The replaced files are deleted after the commit, so external readers
//! of the partition directory (DuckDB over `events/*/*.parquet`) never see an event twice; a
//! reader still holding an older snapshot may then have to retry.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use futures::StreamExt as _;
use object_store::ObjectStoreExt;

use crate::error::{Error, Result};
use crate::events::schema::schema_with;
use crate::events::writer::write_events_file;
use crate::store::Store;
use crate::store::keys::{Key, Space, TableName};
use crate::store::log::{ColumnSpec, CommitDraft, CommitLog, FileAdd, MAX_COMMIT_ATTEMPTS};

/// A date partition is compacted once it holds at least this many files.
pub const MIN_FILES: usize = 4;

/// Rows per compacted file, at most.
pub const MAX_ROWS: u64 = 4_000_000;

/// What a compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CompactReport {
    /// Date partitions rewritten.
    pub dates: u64,
    /// Files replaced.
    pub files_removed: u64,
    /// Files written.
    pub files_added: u64,
    /// Rows rewritten.
    pub rows: u64,
    /// Events-table version committed (none when nothing needed compaction).
    pub version: Option<u64>,
}

/// Groups of files to merge: per date, consecutive runs of at most [`MAX_ROWS`] rows.
fn plan(
    files: &[&FileAdd],
    min_files: usize,
    dates: Option<&[String]>,
) -> Vec<(String, Vec<FileAdd>)> {
    let mut by_date: BTreeMap<&str, Vec<&FileAdd>> = BTreeMap::new();
    for &f in files {
        if let Some(d) = f.date.as_deref()
            && dates.is_none_or(|ds| ds.iter().any(|x| x == d))
        {
            by_date.entry(d).or_default().push(f);
        }
    }
    let mut out = Vec::new();
    for (date, mut fs) in by_date {
        if fs.len() < min_files.max(2) {
            continue;
        }
        fs.sort_by(|a, b| a.path.cmp(&b.path));
        let mut group: Vec<FileAdd> = Vec::new();
        let mut rows = 0u64;
        for f in fs {
            if !group.is_empty() && rows + f.rows > MAX_ROWS {
                if group.len() > 1 {
                    out.push((date.to_string(), std::mem::take(&mut group)));
                }
                group.clear();
                rows = 0;
            }
            rows += f.rows;
            group.push(f.clone());
        }
        if group.len() > 1 {
            out.push((date.to_string(), group));
        }
    }
    out
}

/// Read files of the events table as one batch in the union schema of their columns.
async fn read_merged(store: &Store, files: &[FileAdd]) -> Result<(RecordBatch, Vec<ColumnSpec>)> {
    let mut cols: Vec<ColumnSpec> = files.iter().flat_map(|f| f.columns.clone()).collect();
    cols.sort();
    cols.dedup();
    let schema = schema_with(&cols);
    let mut batches = Vec::new();
    for f in files {
        let bytes = store.get(&Key::from_committed(&f.path)).await?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?
            .build()?;
        for b in reader {
            let b = b?;
            let columns = schema
                .fields()
                .iter()
                .map(|field| match b.column_by_name(field.name()) {
                    Some(c) if c.data_type() == field.data_type() => Ok(Arc::clone(c)),
                    Some(c) => Ok(arrow::compute::cast(c, field.data_type())?),
                    None => Ok(arrow::array::new_null_array(
                        field.data_type(),
                        b.num_rows(),
                    )),
                })
                .collect::<Result<Vec<_>>>()?;
            batches.push(RecordBatch::try_new(Arc::clone(&schema), columns)?);
        }
    }
    Ok((arrow::compute::concat_batches(&schema, &batches)?, cols))
}

/// Compact the date partitions (all, or `dates`) that hold at least `min_files` files added by
/// commits up to version `upto` (the lowest watermark of the incremental readers) or by earlier
/// compactions.
pub async fn compact(
    store: &Store,
    space: &Space,
    min_files: usize,
    dates: Option<&[String]>,
    upto: u64,
) -> Result<CompactReport> {
    // Files a refresh has yet to read stay as they are (it reads new events by file).
    let upto = match crate::compute::refresh::compaction_bound(store, space).await? {
        Some(b) => upto.min(b),
        None => upto,
    };
    let log = CommitLog::new(store, space, TableName::Events);
    let snap = log.snapshot().await?;
    let mut eligible_paths = std::collections::HashSet::new();
    for e in snap.entries.iter() {
        if e.operation == "compact" || e.version <= upto {
            eligible_paths.extend(e.adds.iter().map(|f| f.path.as_str()));
        }
    }
    let eligible: Vec<&FileAdd> = snap
        .files
        .iter()
        .filter(|f| eligible_paths.contains(f.path.as_str()))
        .collect();
    let groups = plan(&eligible, min_files, dates);
    let mut report = CompactReport::default();
    if groups.is_empty() {
        return Ok(report);
    }
    let mut adds = Vec::new();
    let mut removes = Vec::new();
    let mut touched = std::collections::BTreeSet::new();
    // Two groups at a time: reading and sorting one while the other is encoded.
    // Boxed and collected first: a lazy `map` of async closures would make the caller's future
    // not `Send` for every lifetime (rust-lang/rust#102211).
    type Merged<'a> = (&'a String, &'a Vec<FileAdd>, u64, FileAdd);
    let merged: Vec<futures::future::BoxFuture<'_, Result<Merged<'_>>>> = groups
        .iter()
        .map(|(date, files)| {
            Box::pin(async move {
                let (batch, cols) = read_merged(store, files).await?;
                let rows: u64 = files.iter().map(|f| f.rows).sum();
                if batch.num_rows() as u64 != rows {
                    return Err(Error::Usage(format!(
                        "compacting {date}: read {} rows from files that declare {rows}",
                        batch.num_rows()
                    )));
                }
                let add = write_events_file(store, space, date, &batch, &cols).await?;
                Ok::<_, Error>((date, files, rows, add))
            }) as futures::future::BoxFuture<'_, Result<Merged<'_>>>
        })
        .collect();
    let mut stream = futures::stream::iter(merged).buffered(2);
    let mut failed = None;
    while let Some(done) = futures::StreamExt::next(&mut stream).await {
        let (date, files, rows, add) = match done {
            Ok(x) => x,
            Err(e) => {
                failed = Some(e);
                break;
            }
        };
        adds.push(add);
        removes.extend(files.iter().map(|f| f.path.clone()));
        report.files_removed += files.len() as u64;
        report.rows += rows;
        touched.insert(date.clone());
    }
    drop(stream);
    if let Some(e) = failed {
        // nothing was committed: the files written so far are not part of the table
        for f in &adds {
            let _ = store
                .object_store()
                .delete(Key::from_committed(&f.path).path())
                .await;
        }
        return Err(e);
    }
    crate::fault::hit("compact_after_data_files");
    let mut base = snap.version;
    let mut entry = None;
    for _ in 0..MAX_COMMIT_ATTEMPTS {
        let draft = CommitDraft {
            operation: "compact".into(),
            adds: adds.clone(),
            removes: removes.clone(),
            info: serde_json::json!({ "dates": touched, "rows": report.rows }),
        };
        if let Some(e) = log.try_commit(base, draft).await? {
            entry = Some(e);
            break;
        }
        // Someone committed first: fine unless they removed a file we replace.
        let now = log.snapshot().await?;
        let live: std::collections::HashSet<&str> =
            now.files.iter().map(|f| f.path.as_str()).collect();
        if removes.iter().any(|r| !live.contains(r.as_str())) {
            for f in &adds {
                let _ = store
                    .object_store()
                    .delete(Key::from_committed(&f.path).path())
                    .await;
            }
            return Err(Error::Usage(
                "a concurrent compaction rewrote the same files; nothing was changed".into(),
            ));
        }
        base = now.version;
    }
    let entry = entry.ok_or_else(|| log.conflict_error())?;
    for r in &removes {
        let _ = store
            .object_store()
            .delete(Key::from_committed(r).path())
            .await;
    }
    report.dates = touched.len() as u64;
    report.files_added = adds.len() as u64;
    report.version = Some(entry.version);
    tracing::info!(
        dates = report.dates,
        files_removed = report.files_removed,
        files_added = report.files_added,
        rows = report.rows,
        version = entry.version,
        "compacted events"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(path: &str, date: &str, rows: u64) -> FileAdd {
        FileAdd {
            path: path.into(),
            rows,
            date: Some(date.into()),
            ..Default::default()
        }
    }

    #[test]
    fn plans_dates_with_enough_files_in_bounded_groups() {
        let files = [
            f("a1", "2025-01-01", 10),
            f("a2", "2025-01-01", 10),
            f("b1", "2025-01-02", 10),
            f("b2", "2025-01-02", 10),
            f("b3", "2025-01-02", 10),
            f("c1", "2025-01-03", MAX_ROWS - 5),
            f("c2", "2025-01-03", 10),
            f("c3", "2025-01-03", 10),
        ];
        let refs: Vec<&FileAdd> = files.iter().collect();
        let p = plan(&refs, 3, None);
        let got: Vec<(String, Vec<String>)> = p
            .iter()
            .map(|(d, fs)| (d.clone(), fs.iter().map(|x| x.path.clone()).collect()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "2025-01-02".to_string(),
                    vec!["b1".into(), "b2".into(), "b3".into()]
                ),
                ("2025-01-03".to_string(), vec!["c2".into(), "c3".into()]),
            ]
        );
        assert!(plan(&refs, 3, Some(&["2025-01-01".to_string()])).is_empty());
    }
}
