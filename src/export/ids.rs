//! Every external id of a space's profiles, indexed by dense profile index, for one identity
//! version: what membership streams and exports attach to each member.
//!
//! Built once from the `identities` table (three columns) with a counting sort by profile
//! index; a member's ids are then the slice `offsets[p]..offsets[p + 1]` (sorted by id type,
//! then value), and a batch of members gets its list columns by one `take` per id type instead
//! of a join with the identities and a sort by profile per request. The server keeps the index
//! of each space in an [`IdIndexCache`] and rebuilds it only when the identity version moves.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, ListArray, StringArray, UInt32Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Int64Type};

use crate::error::{Error, Result};
use crate::identity::persist::IDENTITY;
use crate::store::keys::Key;
use crate::store::{CommitLog, Space, Store};

/// The external ids of every profile of one identity version.
#[derive(Debug)]
pub struct IdIndex {
    /// Identity version the index was built from.
    pub version: u64,
    /// Id types present, sorted.
    pub types: Vec<String>,
    /// Entries of profile `p`: `offsets[p]..offsets[p + 1]` (profiles past the end have none).
    offsets: Vec<u32>,
    /// Id type (index into `types`) of each entry.
    type_of: Vec<u16>,
    /// Value of each entry; entries are sorted by (profile, type, value).
    values: StringArray,
}

impl IdIndex {
    /// Build the index of the space's current identity version.
    pub async fn load(store: &Store, space: &Space) -> Result<IdIndex> {
        let started = std::time::Instant::now();
        let snap = CommitLog::new(store, space, IDENTITY).snapshot().await?;
        let files: Vec<_> = snap
            .files
            .iter()
            .filter(|f| f.kind.as_deref() == Some("identities"))
            .cloned()
            .collect();
        let mut reads = Vec::new();
        for f in files {
            let store = store.clone();
            reads.push(tokio::spawn(async move {
                let bytes = store.get(&Key::from_committed(&f.path)).await?;
                tokio::task::spawn_blocking(move || read_ids(bytes))
                    .await
                    .map_err(|e| Error::Usage(format!("identity read failed: {e}")))?
            }));
        }
        let mut parts = Vec::new();
        for r in reads {
            parts.extend(
                r.await
                    .map_err(|e| Error::Usage(format!("identity read failed: {e}")))??,
            );
        }
        let version = snap.version;
        let read_ms = started.elapsed().as_millis() as u64;
        let ix = tokio::task::spawn_blocking(move || build(version, parts))
            .await
            .map_err(|e| Error::Usage(format!("identity index failed: {e}")))??;
        tracing::debug!(
            space = %space.as_str(),
            version,
            ids = ix.values.len(),
            read_ms,
            millis = started.elapsed().as_millis() as u64,
            "external id index built"
        );
        Ok(ix)
    }

    /// Entries of profile `p` (none for a null or unknown index).
    fn range(&self, p: Option<i64>) -> std::ops::Range<usize> {
        match p {
            Some(p) if p >= 0 && (p as usize) + 1 < self.offsets.len() => {
                self.offsets[p as usize] as usize..self.offsets[p as usize + 1] as usize
            }
            _ => 0..0,
        }
    }

    /// Largest number of values of each id type (by type index) over `profiles`.
    pub fn max_counts(&self, profiles: impl Iterator<Item = Option<i64>>) -> Vec<usize> {
        let mut max = vec![0usize; self.types.len()];
        for p in profiles {
            let r = self.range(p);
            let mut e = r.start;
            while e < r.end {
                let (t, s) = (self.type_of[e], e);
                while e < r.end && self.type_of[e] == t {
                    e += 1;
                }
                max[t as usize] = max[t as usize].max(e - s);
            }
        }
        max
    }

    /// One list column per id type (in `types` order) for `profiles`, in their order.
    pub fn lists(&self, profiles: &[Option<i64>]) -> Result<Vec<ArrayRef>> {
        let k = self.types.len();
        let mut take: Vec<Vec<u32>> = vec![Vec::new(); k];
        let mut offsets: Vec<Vec<i32>> = vec![vec![0i32]; k];
        for p in profiles {
            for e in self.range(*p) {
                take[self.type_of[e] as usize].push(e as u32);
            }
            for t in 0..k {
                offsets[t].push(
                    i32::try_from(take[t].len()).map_err(|_| {
                        Error::Usage("too many external ids in one batch".to_string())
                    })?,
                );
            }
        }
        let item = Arc::new(Field::new("item", DataType::Utf8, true));
        take.into_iter()
            .zip(offsets)
            .map(|(idx, off)| {
                let values = arrow::compute::take(&self.values, &UInt32Array::from(idx), None)?;
                Ok(Arc::new(ListArray::try_new(
                    Arc::clone(&item),
                    OffsetBuffer::new(off.into()),
                    values,
                    None,
                )?) as ArrayRef)
            })
            .collect()
    }

    /// The values of profile `p`, grouped by id type: `(type index, values sorted)`, types in
    /// `types` order (types without values are skipped).
    pub fn groups(&self, p: Option<i64>) -> impl Iterator<Item = (usize, Vec<&str>)> {
        let r = self.range(p);
        let mut e = r.start;
        std::iter::from_fn(move || {
            if e >= r.end {
                return None;
            }
            let t = self.type_of[e];
            let mut vals = Vec::with_capacity(r.end - e);
            while e < r.end && self.type_of[e] == t {
                vals.push(self.values.value(e));
                e += 1;
            }
            Some((t as usize, vals))
        })
    }
}

/// `(id_type, id_value, profile_idx)` of one identities file.
fn read_ids(bytes: bytes::Bytes) -> Result<Vec<(StringArray, StringArray, Vec<i64>)>> {
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    let mask = ProjectionMask::columns(
        builder.parquet_schema(),
        ["id_type", "id_value", "profile_idx"],
    );
    let mut out = Vec::new();
    for b in builder.with_projection(mask).build()? {
        let b = b?;
        let col = |n: &str| {
            b.column_by_name(n)
                .ok_or_else(|| Error::Usage(format!("identities table lacks column {n}")))
        };
        let str_col = |n: &str| -> Result<StringArray> {
            col(n)?
                .as_string_opt::<i32>()
                .cloned()
                .ok_or_else(|| Error::Usage(format!("identities column {n} is not a string")))
        };
        let p = col("profile_idx")?
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| Error::Usage("identities column profile_idx is not Int64".into()))?
            .values()
            .to_vec();
        out.push((str_col("id_type")?, str_col("id_value")?, p));
    }
    Ok(out)
}

/// The index from the identities' rows: a counting sort by profile, then each profile's few
/// entries sorted by (type, value).
fn build(version: u64, parts: Vec<(StringArray, StringArray, Vec<i64>)>) -> Result<IdIndex> {
    let mut type_ids: HashMap<String, u16> = HashMap::new();
    let mut types: Vec<String> = Vec::new();
    let n: usize = parts.iter().map(|(_, _, p)| p.len()).sum();
    let mut prof: Vec<u32> = Vec::with_capacity(n);
    let mut ty: Vec<u16> = Vec::with_capacity(n);
    let mut max_p = 0u32;
    for (t, _, p) in &parts {
        for (r, &pi) in p.iter().enumerate() {
            let pi = u32::try_from(pi)
                .map_err(|_| Error::Usage(format!("identities: bad profile_idx {pi}")))?;
            max_p = max_p.max(pi);
            prof.push(pi);
            let name = t.value(r);
            let id = match type_ids.get(name) {
                Some(id) => *id,
                None => {
                    let id = u16::try_from(types.len())
                        .map_err(|_| Error::Usage("more than 65,535 id types".into()))?;
                    type_ids.insert(name.to_string(), id);
                    types.push(name.to_string());
                    id
                }
            };
            ty.push(id);
        }
    }
    // type indexes in sorted name order
    let mut order: Vec<u16> = (0..types.len() as u16).collect();
    order.sort_by(|a, b| types[*a as usize].cmp(&types[*b as usize]));
    let mut rank = vec![0u16; types.len()];
    for (r, t) in order.iter().enumerate() {
        rank[*t as usize] = r as u16;
    }
    ty.iter_mut().for_each(|t| *t = rank[*t as usize]);
    types.sort();
    let values: Vec<&StringArray> = parts.iter().map(|(_, v, _)| v).collect();
    let values =
        arrow::compute::concat(&values.iter().map(|v| *v as &dyn Array).collect::<Vec<_>>())?;
    let values = values.as_string::<i32>();
    let profiles = if n == 0 { 0 } else { max_p as usize + 1 };
    let mut offsets = vec![0u32; profiles + 1];
    for p in &prof {
        offsets[*p as usize + 1] += 1;
    }
    for i in 1..offsets.len() {
        offsets[i] += offsets[i - 1];
    }
    let mut next = offsets.clone();
    let mut perm = vec![0u32; n];
    for (row, p) in prof.iter().enumerate() {
        let slot = &mut next[*p as usize];
        perm[*slot as usize] = row as u32;
        *slot += 1;
    }
    for w in offsets.windows(2) {
        let s = &mut perm[w[0] as usize..w[1] as usize];
        if s.len() > 1 {
            s.sort_by(|a, b| {
                (ty[*a as usize], values.value(*a as usize))
                    .cmp(&(ty[*b as usize], values.value(*b as usize)))
            });
        }
    }
    let type_of = perm.iter().map(|r| ty[*r as usize]).collect();
    let values = arrow::compute::take(values, &UInt32Array::from(perm), None)?
        .as_string::<i32>()
        .clone();
    Ok(IdIndex {
        version,
        types,
        offsets,
        type_of,
        values,
    })
}

/// The [`IdIndex`] of each space, rebuilt when the space's identity version moves (the server
/// keeps one; a one-shot command uses a fresh one).
#[derive(Debug, Default)]
pub struct IdIndexCache {
    spaces: tokio::sync::Mutex<HashMap<String, Arc<IdIndex>>>,
}

impl IdIndexCache {
    /// The space's current identity version.
    pub async fn version(&self, store: &Store, space: &Space) -> Result<u64> {
        Ok(CommitLog::new(store, space, IDENTITY)
            .snapshot()
            .await?
            .version)
    }

    /// The index of the space's current identity version.
    pub async fn get(&self, store: &Store, space: &Space) -> Result<Arc<IdIndex>> {
        let version = self.version(store, space).await?;
        // one builder at a time: concurrent requests wait for it instead of each building
        let mut spaces = self.spaces.lock().await;
        if let Some(ix) = spaces.get(space.as_str())
            && ix.version == version
        {
            return Ok(Arc::clone(ix));
        }
        let ix = Arc::new(IdIndex::load(store, space).await?);
        spaces.insert(space.as_str().to_string(), Arc::clone(&ix));
        Ok(ix)
    }
}
