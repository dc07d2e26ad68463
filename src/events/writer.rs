//! Writes event batches as sorted, zstd-compressed Parquet files into date partitions.

use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::{SortColumn, lexsort_to_indices, take_record_batch};
use arrow::datatypes::TimestampMicrosecondType;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use crate::error::Result;
use crate::store::Store;
use crate::store::keys::{self, Space, TableName};
use crate::store::log::{ColumnSpec, FileAdd};

/// Rows per Parquet row group.
pub const ROW_GROUP_ROWS: usize = 128 * 1024;

/// Rows per data page (a soft limit, checked every 1024 rows): small pages let the page index
/// skip the rows of other event types.
pub const PAGE_ROWS: usize = 2048;

/// Writer settings shared by every Parquet file we produce.
pub fn writer_properties(sorting: Option<Vec<SortingColumn>>) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_data_page_row_count_limit(PAGE_ROWS)
        .set_sorting_columns(sorting)
        .build()
}

/// Encode one batch as a Parquet file in memory.
pub fn encode_parquet(batch: &RecordBatch, props: WriterProperties) -> Result<bytes::Bytes> {
    let mut buf = Vec::with_capacity(batch.get_array_memory_size() / 4);
    let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props))?;
    w.write(batch)?;
    w.close()?;
    Ok(bytes::Bytes::from(buf))
}

/// The sort order of event files: (type, event, identity_key, timestamp). Audience conditions
/// select events by type and name, so with small pages the page index skips every other kind of
/// event; within one kind, a profile's events are contiguous and in time order.
pub const SORT_COLUMNS: [&str; 4] = ["type", "event", "identity_key", "timestamp"];

const NULLS_LAST: arrow::compute::SortOptions = arrow::compute::SortOptions {
    descending: false,
    nulls_first: false,
};

/// Sort an events batch by [`SORT_COLUMNS`] (nulls last, as declared in the file).
pub fn sort_events(batch: &RecordBatch) -> Result<RecordBatch> {
    let col = |n: &str| -> Result<Arc<dyn Array>> {
        Ok(Arc::clone(batch.column(batch.schema().index_of(n)?)))
    };
    let idx = lexsort_to_indices(
        &[
            SortColumn {
                values: col("type")?,
                options: Some(NULLS_LAST),
            },
            SortColumn {
                values: col("event")?,
                options: Some(NULLS_LAST),
            },
            SortColumn {
                values: col("identity_key")?,
                options: Some(NULLS_LAST),
            },
            SortColumn {
                values: col("timestamp")?,
                options: Some(NULLS_LAST),
            },
        ],
        None,
    )?;
    Ok(take_record_batch(batch, &idx)?)
}

fn min_max_ts(batch: &RecordBatch, name: &str) -> Option<(i64, i64)> {
    let idx = batch.schema().index_of(name).ok()?;
    let a = batch
        .column(idx)
        .as_primitive_opt::<TimestampMicrosecondType>()?;
    Some((arrow::compute::min(a)?, arrow::compute::max(a)?))
}

/// Write one date partition's events as a Parquet file under a unique key; returns its entry.
pub async fn write_events_file(
    store: &Store,
    space: &Space,
    date: &str,
    batch: &RecordBatch,
    columns: &[ColumnSpec],
) -> Result<FileAdd> {
    let sorted = sort_events(batch)?;
    let schema = sorted.schema();
    let sorting = SORT_COLUMNS
        .iter()
        .map(|c| {
            Ok(SortingColumn {
                column_idx: schema.index_of(c)? as i32,
                descending: false,
                nulls_first: false,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let to_encode = sorted.clone();
    let bytes = tokio::task::spawn_blocking(move || {
        encode_parquet(&to_encode, writer_properties(Some(sorting)))
    })
    .await
    .map_err(|e| crate::error::Error::Usage(format!("parquet encoder task failed: {e}")))??;
    let key = keys::data_file(space, TableName::Events, Some(date), "parquet");
    let size = bytes.len() as u64;
    store.put(&key, bytes).await?;
    // Only the columns that hold at least one value in this file.
    let columns = columns
        .iter()
        .filter(|c| {
            sorted
                .column_by_name(&c.name)
                .is_some_and(|a| a.null_count() < a.len())
        })
        .cloned()
        .collect();
    Ok(FileAdd {
        path: key.to_string(),
        size,
        rows: sorted.num_rows() as u64,
        date: Some(date.to_string()),
        ts_range: min_max_ts(&sorted, "timestamp"),
        received_range: min_max_ts(&sorted, "received_at"),
        columns,
        kind: None,
    })
}

/// The UTC date (`YYYY-MM-DD`) of a microsecond timestamp.
pub fn utc_date(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "1970-01-01".into())
}
