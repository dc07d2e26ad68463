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
use object_store::ObjectStoreExt;

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
        Self::load_types(store, space, None).await
    }

    /// Build the index of the space's current identity version with only the ids of type
    /// `only` (all types when None).
    ///
    /// The full index of a version is kept in the store once built (see [`persisted_key`]),
    /// and later loads of that version, whatever `only`, read it instead of the identities.
    pub async fn load_types(store: &Store, space: &Space, only: Option<&str>) -> Result<IdIndex> {
        let started = std::time::Instant::now();
        let snap = CommitLog::new(store, space, IDENTITY).snapshot().await?;
        let kept = snap
            .entries
            .last()
            .map(|e| persisted_key(space, snap.version, &e.attempt_id));
        if let Some(key) = &kept {
            match read_persisted(store, key, snap.version).await {
                Ok(Some(ix)) => {
                    tracing::debug!(
                        space = %space.as_str(),
                        version = snap.version,
                        ids = ix.values.len(),
                        millis = started.elapsed().as_millis() as u64,
                        "external id index read"
                    );
                    return Ok(ix);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    key = %key,
                    error = %e,
                    "kept external id index unreadable; building it again"
                ),
            }
        }
        // the checkpoint's rows (less those of dirty profiles) and the delta's
        let (base, delta) = crate::identity::persist::table_files(&snap, "identities");
        let dirty = crate::identity::persist::Dirty::read(store, &snap).await?;
        let checkpoint: std::collections::HashSet<String> =
            base.iter().map(|f| f.path.clone()).collect();
        let mut reads = Vec::new();
        for f in base.into_iter().chain(delta) {
            let store = store.clone();
            let of_checkpoint = checkpoint.contains(&f.path);
            reads.push(tokio::spawn(async move {
                let bytes = store.get(&Key::from_committed(&f.path)).await?;
                const COLUMNS: &[&str] = &["id_type", "id_value", "profile_idx"];
                let batches =
                    crate::compute::decode_parallel(bytes, Some(COLUMNS), &f.path).await?;
                let out = batches.iter().map(id_columns).collect::<Result<Vec<_>>>()?;
                Ok::<_, Error>((of_checkpoint, out))
            }));
        }
        let mut parts: Vec<(StringArray, StringArray, Vec<i64>)> = Vec::new();
        let mut filtered = Vec::new();
        for r in reads {
            let (of_checkpoint, read) = r
                .await
                .map_err(|e| Error::Usage(format!("identity read failed: {e}")))??;
            let dirty_rows = of_checkpoint && !dirty.profiles.is_empty();
            for part in read {
                if only.is_some() || dirty_rows {
                    filtered.push((dirty_rows, part));
                } else {
                    parts.push(part);
                }
            }
        }
        if !filtered.is_empty() {
            let t = only.map(StringArray::new_scalar);
            parts.extend(
                filtered
                    .into_iter()
                    .map(|(dirty_rows, (ty, val, p))| {
                        let mut keep = match &t {
                            Some(t) => arrow::compute::kernels::cmp::eq(&ty, t)?,
                            None => arrow::array::BooleanArray::from(vec![true; ty.len()]),
                        };
                        if dirty_rows {
                            let current = arrow::array::BooleanArray::from_iter(
                                p.iter().map(|p| Some(!dirty.profiles.contains(p))),
                            );
                            keep = arrow::compute::and(&keep, &current)?;
                        }
                        let ty = arrow::compute::filter(&ty, &keep)?
                            .as_string::<i32>()
                            .clone();
                        let val = arrow::compute::filter(&val, &keep)?
                            .as_string::<i32>()
                            .clone();
                        let p = p
                            .iter()
                            .zip(keep.values().iter())
                            .filter_map(|(p, k)| k.then_some(*p))
                            .collect();
                        Ok((ty, val, p))
                    })
                    .collect::<Result<Vec<_>>>()?,
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
        if let (Some(key), None) = (&kept, only) {
            // a failure only costs the next load a build
            if let Err(e) = persist(store, space, key, &ix).await {
                tracing::warn!(key = %key, error = %e, "external id index not kept");
            }
        }
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
    pub fn max_counts(&self, profiles: &[Option<i64>]) -> Vec<usize> {
        use rayon::prelude::*;
        profiles
            .par_chunks(65_536)
            .map(|c| self.max_counts_of(c))
            .reduce(
                || vec![0usize; self.types.len()],
                |a, b| a.iter().zip(b).map(|(x, y)| (*x).max(y)).collect(),
            )
    }

    fn max_counts_of(&self, profiles: &[Option<i64>]) -> Vec<usize> {
        let mut max = vec![0usize; self.types.len()];
        for &p in profiles {
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
        let item = Arc::new(Field::new("item", DataType::Utf8, true));
        let list = |off: Vec<i32>, values: ArrayRef| -> Result<ArrayRef> {
            Ok(Arc::new(ListArray::try_new(
                Arc::clone(&item),
                OffsetBuffer::new(off.into()),
                values,
                None,
            )?))
        };
        // the entries gathered column by column (see `gather`), then split by type: the split
        // reads the gathered entries in order, not the index
        let (ends, types, values) = self.gather(profiles)?;
        if i32::try_from(types.len()).is_err() {
            return Err(Error::Usage("too many external ids in one batch".into()));
        }
        if k == 1 {
            let mut off = Vec::with_capacity(ends.len() + 1);
            off.push(0);
            off.extend(ends.iter().map(|e| *e as i32));
            return Ok(vec![list(off, Arc::new(values))?]);
        }
        let mut take: Vec<Vec<u32>> = vec![Vec::with_capacity(profiles.len()); k];
        let mut offsets: Vec<Vec<i32>> = vec![Vec::with_capacity(profiles.len() + 1); k];
        offsets.iter_mut().for_each(|o| o.push(0));
        let mut e = 0usize;
        for end in &ends {
            for (i, t) in types[e..*end as usize].iter().enumerate() {
                take[*t as usize].push((e + i) as u32);
            }
            e = *end as usize;
            for (o, t) in offsets.iter_mut().zip(&take) {
                o.push(t.len() as i32);
            }
        }
        take.into_iter()
            .zip(offsets)
            .map(|(idx, off)| {
                let values = arrow::compute::take(&values, &UInt32Array::from(idx), None)?;
                list(off, values)
            })
            .collect()
    }

    /// The entries of `profiles`, in their order, gathered into arrays of their own: the end
    /// of each profile's entries, then each entry's type index and value. Gathering column by
    /// column in tight loops lets the processor overlap the index's cache misses, which a
    /// profile-at-a-time walk (the index is in profile order, exports in member order) takes
    /// one after another.
    pub fn gather(&self, profiles: &[Option<i64>]) -> Result<(Vec<u32>, Vec<u16>, StringArray)> {
        let mut ends = Vec::with_capacity(profiles.len());
        let mut entries: Vec<u32> = Vec::with_capacity(profiles.len() * 4);
        for p in profiles {
            entries.extend(self.range(*p).map(|e| e as u32));
            ends.push(entries.len() as u32);
        }
        let types = entries.iter().map(|e| self.type_of[*e as usize]).collect();
        let values = arrow::compute::take(&self.values, &UInt32Array::from(entries), None)?;
        Ok((ends, types, values.as_string::<i32>().clone()))
    }

    /// The entries of profile `p`: (type index, value), sorted by type, then value.
    pub fn entries(&self, p: Option<i64>) -> impl Iterator<Item = (usize, &str)> {
        self.range(p)
            .map(|e| (self.type_of[e] as usize, self.values.value(e)))
    }

    /// Index of id type `t` in `types`.
    pub fn type_index(&self, t: &str) -> Option<usize> {
        self.types.iter().position(|x| x == t)
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

/// Where the full index of identity version `version` is kept: derived data beside the
/// tables, not committed. The name holds the attempt id of the version's commit, so a store
/// rebuilt with the same version numbers never finds another graph's index.
fn persisted_key(space: &Space, version: u64, attempt: &str) -> Key {
    Key::from_committed(&format!(
        "{}/_derived/id_index/{version:020}-{attempt}.arrow",
        crate::store::keys::space_dir(space)
    ))
}

/// Schema of a kept index: one row per entry, sorted by (profile, type, value); the type
/// names in the metadata.
fn persisted_schema(types: &[String]) -> Result<arrow::datatypes::SchemaRef> {
    let meta = [("types".to_string(), serde_json::to_string(types)?)].into();
    Ok(Arc::new(
        arrow::datatypes::Schema::new(vec![
            Field::new("profile_idx", DataType::UInt32, false),
            Field::new("type", DataType::UInt16, false),
            Field::new("value", DataType::Utf8, false),
        ])
        .with_metadata(meta),
    ))
}

/// Keep `ix` at `key` (an Arrow IPC file), then delete the kept indexes of earlier versions.
async fn persist(store: &Store, space: &Space, key: &Key, ix: &IdIndex) -> Result<()> {
    use arrow::array::{UInt16Array, UInt32Array};
    let profile: UInt32Array = (0..ix.offsets.len().saturating_sub(1))
        .flat_map(|p| {
            let n = (ix.offsets[p + 1] - ix.offsets[p]) as usize;
            std::iter::repeat_n(p as u32, n)
        })
        .collect();
    let batch = arrow::array::RecordBatch::try_new(
        persisted_schema(&ix.types)?,
        vec![
            Arc::new(profile),
            Arc::new(UInt16Array::from(ix.type_of.clone())),
            Arc::new(ix.values.clone()),
        ],
    )?;
    let mut buf = Vec::with_capacity(batch.get_array_memory_size() + 4096);
    let mut w = arrow::ipc::writer::FileWriter::try_new(&mut buf, &batch.schema())?;
    w.write(&batch)?;
    w.finish()?;
    drop(w);
    store.put(key, buf.into()).await?;
    // earlier versions' indexes: nobody loads them again (a reader racing this falls back)
    use futures::TryStreamExt;
    let dir = object_store::path::Path::from(format!(
        "{}/_derived/id_index",
        crate::store::keys::space_dir(space)
    ));
    let os = store.object_store();
    let old: Vec<object_store::ObjectMeta> = os.list(Some(&dir)).try_collect().await?;
    for m in old {
        if m.location.as_ref() < key.path().as_ref() {
            let _ = os.delete(&m.location).await;
        }
    }
    Ok(())
}

/// The index kept at `key`, if any; an error when the object is not a well-formed index.
async fn read_persisted(store: &Store, key: &Key, version: u64) -> Result<Option<IdIndex>> {
    let bytes = match store.object_store().get(key.path()).await {
        Ok(r) => r.bytes().await?,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    tokio::task::spawn_blocking(move || decode_persisted(bytes, version).map(Some))
        .await
        .map_err(|e| Error::Usage(format!("reading the external id index failed: {e}")))?
}

fn decode_persisted(bytes: bytes::Bytes, version: u64) -> Result<IdIndex> {
    use arrow::datatypes::{UInt16Type, UInt32Type};
    let bad = |why: &str| Error::Usage(format!("not an external id index: {why}"));
    let reader = arrow::ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes), None)?;
    let schema = reader.schema();
    let types: Vec<String> = serde_json::from_str(
        schema
            .metadata()
            .get("types")
            .ok_or_else(|| bad("no type names"))?,
    )?;
    if *schema != *persisted_schema(&types)? {
        return Err(bad("unexpected columns"));
    }
    let mut batches = reader.collect::<std::result::Result<Vec<_>, _>>()?;
    // (one batch as written: a concat would copy it)
    let batch = match batches.len() {
        1 => batches.remove(0),
        _ => arrow::compute::concat_batches(&schema, &batches)?,
    };
    let profile = batch.column(0).as_primitive::<UInt32Type>().values();
    let type_of: Vec<u16> = batch
        .column(1)
        .as_primitive::<UInt16Type>()
        .values()
        .to_vec();
    if type_of.iter().any(|t| *t as usize >= types.len()) {
        return Err(bad("a type outside the type names"));
    }
    let profiles = profile.last().map_or(0, |p| *p as usize + 1);
    let mut offsets = vec![0u32; profiles + 1];
    let mut prev = 0u32;
    for p in profile.iter() {
        if *p < prev {
            return Err(bad("entries not sorted by profile"));
        }
        prev = *p;
        offsets[*p as usize + 1] += 1;
    }
    for i in 1..offsets.len() {
        offsets[i] += offsets[i - 1];
    }
    Ok(IdIndex {
        version,
        types,
        offsets,
        type_of,
        values: batch.column(2).as_string::<i32>().clone(),
    })
}

/// `(id_type, id_value, profile_idx)` of a batch of the identities table.
fn id_columns(b: &arrow::array::RecordBatch) -> Result<(StringArray, StringArray, Vec<i64>)> {
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
    Ok((str_col("id_type")?, str_col("id_value")?, p))
}

/// The index from the identities' rows: a counting sort by profile, then each profile's few
/// entries sorted by (type, value).
pub(super) fn build(
    version: u64,
    parts: Vec<(StringArray, StringArray, Vec<i64>)>,
) -> Result<IdIndex> {
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
            // a handful of types: a scan beats hashing every row
            let known = if types.len() <= 16 {
                types.iter().position(|x| x == name).map(|i| i as u16)
            } else {
                type_ids.get(name).copied()
            };
            let id = match known {
                Some(id) => id,
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
    let values: ArrayRef = if values.is_empty() {
        Arc::new(StringArray::from(Vec::<&str>::new()))
    } else {
        arrow::compute::concat(&values.iter().map(|v| *v as &dyn Array).collect::<Vec<_>>())?
    };
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
    // each profile's entries by (type, value), profiles split in chunks over the cores
    {
        use rayon::prelude::*;
        let mut chunks: Vec<(&[u32], &mut [u32])> = Vec::new();
        let (mut rest, mut at) = (perm.as_mut_slice(), 0usize);
        let profiles = offsets.len() - 1;
        for start in (0..profiles).step_by(65_536) {
            // chunks share their boundary offset
            let offs = &offsets[start..=profiles.min(start + 65_536)];
            let end = offs[offs.len() - 1] as usize;
            let (head, tail) = rest.split_at_mut(end - at);
            chunks.push((offs, head));
            (rest, at) = (tail, end);
        }
        chunks.into_par_iter().for_each(|(offs, part)| {
            let base = offs[0] as usize;
            for w in offs.windows(2) {
                let s = &mut part[w[0] as usize - base..w[1] as usize - base];
                if s.len() > 1 {
                    s.sort_unstable_by(|a, b| {
                        (ty[*a as usize], values.value(*a as usize))
                            .cmp(&(ty[*b as usize], values.value(*b as usize)))
                    });
                }
            }
        });
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

    /// The index of the space's current identity version if it is already built.
    pub async fn current(&self, store: &Store, space: &Space) -> Result<Option<Arc<IdIndex>>> {
        let version = self.version(store, space).await?;
        let spaces = self.spaces.lock().await;
        Ok(spaces
            .get(space.as_str())
            .filter(|ix| ix.version == version)
            .cloned())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The index against a map built row by row, over more profiles than one sort chunk, with
    /// rows in a scrambled order and profiles without ids.
    #[test]
    fn index_equals_a_map_of_the_rows() {
        let types = ["user_id", "email", "anonymous_id", "phone"];
        let (mut t, mut v, mut p) = (Vec::new(), Vec::new(), Vec::new());
        let mut want: BTreeMap<i64, BTreeMap<usize, Vec<String>>> = BTreeMap::new();
        let mut x: u64 = 7;
        for i in 0..200_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let prof = ((x >> 33) % 150_000) as i64 * 2; // odd profiles have no ids
            let ty = ((x >> 20) % 4) as usize;
            let val = format!("v{}-{i}", (x >> 40) % 1000);
            t.push(types[ty]);
            v.push(val.clone());
            p.push(prof);
            want.entry(prof)
                .or_default()
                .entry(ty)
                .or_default()
                .push(val);
        }
        // two parts, as two files or row groups would give
        let half = t.len() / 2;
        let part = |r: std::ops::Range<usize>| {
            (
                StringArray::from(t[r.clone()].to_vec()),
                StringArray::from(v[r.clone()].to_vec()),
                p[r].to_vec(),
            )
        };
        let ix = build(3, vec![part(0..half), part(half..t.len())]).unwrap();
        let mut sorted_types: Vec<&str> = types.to_vec();
        sorted_types.sort();
        assert_eq!(ix.types, sorted_types);
        assert_eq!(ix.version, 3);
        for prof in 0..300_001i64 {
            let got: Vec<(String, Vec<String>)> = ix
                .groups(Some(prof))
                .map(|(ti, vs)| {
                    (
                        ix.types[ti].clone(),
                        vs.iter().map(|s| s.to_string()).collect(),
                    )
                })
                .collect();
            let mut exp: Vec<(String, Vec<String>)> = want
                .get(&prof)
                .map(|m| {
                    m.iter()
                        .map(|(ty, vs)| {
                            let mut vs = vs.clone();
                            vs.sort();
                            (types[*ty].to_string(), vs)
                        })
                        .collect()
                })
                .unwrap_or_default();
            exp.sort();
            assert_eq!(got, exp, "profile {prof}");
        }
        assert_eq!(ix.groups(None).count(), 0);
        assert_eq!(ix.groups(Some(-1)).count(), 0);
        assert_eq!(ix.groups(Some(10_000_000)).count(), 0);
        // list columns and max counts agree with the groups
        let some: Vec<Option<i64>> = vec![Some(0), Some(1), None, Some(2), Some(299_998)];
        let lists = ix.lists(&some).unwrap();
        let max = ix.max_counts(&some);
        for (ti, l) in lists.iter().enumerate() {
            let l = l.as_list::<i32>();
            let mut m = 0;
            for (r, p) in some.iter().enumerate() {
                let vals: Vec<String> = l
                    .value(r)
                    .as_string::<i32>()
                    .iter()
                    .flatten()
                    .map(String::from)
                    .collect();
                let exp: Vec<String> = ix
                    .groups(*p)
                    .filter(|(t, _)| *t == ti)
                    .flat_map(|(_, vs)| vs.into_iter().map(String::from))
                    .collect();
                assert_eq!(vals, exp);
                m = m.max(vals.len());
            }
            assert_eq!(max[ti], m);
        }
        // one id type (its list is the gathered entries as they are)
        let one = build(
            4,
            vec![(
                StringArray::from(vec!["email"; 4]),
                StringArray::from(vec!["c@x", "a@x", "d@x", "b@x"]),
                vec![3, 0, 3, 3],
            )],
        )
        .unwrap();
        let l = one
            .lists(&[Some(3), None, Some(1), Some(0), Some(9)])
            .unwrap();
        assert_eq!(l.len(), 1);
        let l = l[0].as_list::<i32>();
        let rows: Vec<Vec<String>> = (0..l.len())
            .map(|r| {
                let v = l.value(r);
                v.as_string::<i32>()
                    .iter()
                    .flatten()
                    .map(String::from)
                    .collect()
            })
            .collect();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            rows,
            vec![
                s(&["b@x", "c@x", "d@x"]),
                s(&[]),
                s(&[]),
                s(&["a@x"]),
                s(&[])
            ]
        );
    }

    /// A kept index reads back as the one built; a kept one of an earlier version is deleted;
    /// a missing one is None and a broken one an error (the load then builds the index).
    #[tokio::test]
    async fn a_kept_index_reads_back_as_built() {
        let (store, space) = (Store::memory(), Space::default());
        let part = (
            StringArray::from(vec!["email", "user_id", "email", "anonymous_id", "email"]),
            StringArray::from(vec!["b@x", "u-4", "a@x", "an-1", "c@x"]),
            vec![4, 4, 4, 1, 2],
        );
        let ix = build(2, vec![part]).unwrap();
        let (older, key) = (
            persisted_key(&space, 1, "attempt-a"),
            persisted_key(&space, 2, "attempt-b"),
        );
        store.put(&older, "old".into()).await.unwrap();
        persist(&store, &space, &key, &ix).await.unwrap();
        let back = read_persisted(&store, &key, 2).await.unwrap().unwrap();
        assert_eq!(back.types, ["anonymous_id", "email", "user_id"]);
        let groups = |p: i64| -> Vec<(usize, Vec<String>)> {
            back.groups(Some(p))
                .map(|(t, vs)| (t, vs.into_iter().map(String::from).collect()))
                .collect()
        };
        assert_eq!(groups(1), [(0, vec!["an-1".to_string()])]);
        assert_eq!(groups(2), [(1, vec!["c@x".to_string()])]);
        assert_eq!(
            groups(4),
            [
                (1, vec!["a@x".to_string(), "b@x".to_string()]),
                (2, vec!["u-4".to_string()])
            ]
        );
        assert!(groups(0).is_empty() && groups(3).is_empty() && groups(5).is_empty());
        assert_eq!(
            (&back.offsets, &back.type_of, &back.values, back.version),
            (&ix.offsets, &ix.type_of, &ix.values, 2)
        );
        assert!(read_persisted(&store, &older, 1).await.unwrap().is_none());
        store.put(&key, "not an index".into()).await.unwrap();
        assert!(read_persisted(&store, &key, 2).await.is_err());
        // no ids at all
        let empty = build(3, vec![]).unwrap();
        let key = persisted_key(&space, 3, "attempt-c");
        persist(&store, &space, &key, &empty).await.unwrap();
        let back = read_persisted(&store, &key, 3).await.unwrap().unwrap();
        assert_eq!((back.offsets, back.values.len()), (vec![0], 0));
    }
}
