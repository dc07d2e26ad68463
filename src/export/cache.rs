//! What a server keeps between requests: the [`IdIndex`] of each space and the finished
//! membership streams of recent versions (Arrow batches with their id lists), so that every
//! client pulling the same version after the first is served from memory, as a plain Flight
//! server holding the batches would.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use super::ids::IdIndexCache;

/// Key of a finished membership stream: space, audience, version, identity version.
pub(crate) type StreamKey = (String, String, u64, u64);

/// Server-side caches of the export paths.
#[derive(Debug)]
pub struct ServingCache {
    /// External ids by profile, per space.
    pub ids: IdIndexCache,
    streams: Mutex<Streams>,
}

#[derive(Debug, Default)]
struct Streams {
    budget: usize,
    used: usize,
    /// Least recently used first.
    order: VecDeque<StreamKey>,
    held: HashMap<StreamKey, Held>,
}

/// One finished stream: its batches, or once a Flight client pulled it, the same rows as
/// encoded Flight messages (so later pulls only send them) in their place: never both, a
/// 10M-member stream is ~0.5 GB either way.
#[derive(Debug)]
struct Held {
    schema: SchemaRef,
    rows: Rows,
    /// Bytes held by `rows`.
    size: usize,
}

/// The rows of a finished stream, in the form the server last needed.
#[derive(Debug)]
enum Rows {
    Batches(Arc<Vec<RecordBatch>>),
    Encoded(Arc<Vec<bytes::Bytes>>),
}

impl Streams {
    /// Mark `key` as the most recently used.
    fn touch(&mut self, key: &StreamKey) {
        self.order.retain(|k| k != key);
        self.order.push_back(key.clone());
    }

    /// Evict the least recently used streams other than `keep` until `size` more bytes fit;
    /// false when they cannot.
    fn make_room(&mut self, size: usize, keep: &StreamKey) -> bool {
        if size > self.budget {
            return false;
        }
        let mut skipped = Vec::new();
        while self.used + size > self.budget {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if &old == keep {
                skipped.push(old);
                continue;
            }
            if let Some(h) = self.held.remove(&old) {
                self.used -= h.size;
            }
        }
        for k in skipped.into_iter().rev() {
            self.order.push_front(k);
        }
        self.used + size <= self.budget
    }
}

impl Default for ServingCache {
    /// No memory for finished streams (one-shot commands): only the id index is kept.
    fn default() -> Self {
        ServingCache::new(0)
    }
}

impl ServingCache {
    /// Caches holding at most `budget` bytes of finished membership streams.
    pub fn new(budget: usize) -> Self {
        ServingCache {
            ids: IdIndexCache::default(),
            streams: Mutex::new(Streams {
                budget,
                ..Default::default()
            }),
        }
    }

    /// Whether finished streams are kept at all.
    pub(crate) fn keeps_streams(&self) -> bool {
        self.streams.lock().is_ok_and(|s| s.budget > 0)
    }

    /// The schema of a finished stream, in whichever form it is kept.
    pub(crate) fn schema(&self, key: &StreamKey) -> Option<SchemaRef> {
        let s = self.streams.lock().ok()?;
        s.held.get(key).map(|h| h.schema.clone())
    }

    /// A finished stream kept as batches (not yet encoded), marked as recently used.
    pub(crate) fn stream(&self, key: &StreamKey) -> Option<(SchemaRef, Arc<Vec<RecordBatch>>)> {
        let mut s = self.streams.lock().ok()?;
        let hit = s.held.get(key).and_then(|h| match &h.rows {
            Rows::Batches(b) => Some((h.schema.clone(), Arc::clone(b))),
            Rows::Encoded(_) => None,
        })?;
        s.touch(key);
        Some(hit)
    }

    /// Keep a finished stream, evicting the least recently used ones beyond the budget (a
    /// stream larger than the whole budget is not kept).
    pub(crate) fn keep(&self, key: StreamKey, schema: SchemaRef, batches: Vec<RecordBatch>) {
        let size = held_bytes(&batches);
        let Ok(mut s) = self.streams.lock() else {
            return;
        };
        if s.held.contains_key(&key) || !s.make_room(size, &key) {
            return;
        }
        s.used += size;
        s.order.push_back(key.clone());
        s.held.insert(
            key,
            Held {
                schema,
                rows: Rows::Batches(Arc::new(batches)),
                size,
            },
        );
    }

    /// The Flight messages of a finished stream as gRPC frames, once encoded; marked as
    /// recently used.
    pub(crate) fn encoded(&self, key: &StreamKey) -> Option<Arc<Vec<bytes::Bytes>>> {
        let mut s = self.streams.lock().ok()?;
        let hit = s.held.get(key).and_then(|h| match &h.rows {
            Rows::Encoded(d) => Some(Arc::clone(d)),
            Rows::Batches(_) => None,
        })?;
        s.touch(key);
        Some(hit)
    }

    /// Keep the Flight messages of a stream kept as batches in place of its batches (when
    /// they fit the budget; otherwise the batches stay).
    pub(crate) fn keep_encoded(&self, key: &StreamKey, data: Arc<Vec<bytes::Bytes>>) {
        let size: usize = data.iter().map(|d| d.len()).sum();
        let Ok(mut s) = self.streams.lock() else {
            return;
        };
        let old = match s.held.get(key) {
            Some(Held {
                rows: Rows::Batches(_),
                size,
                ..
            }) => *size,
            _ => return,
        };
        s.used -= old;
        if !s.make_room(size, key) {
            s.used += old;
            return;
        }
        if let Some(h) = s.held.get_mut(key) {
            h.rows = Rows::Encoded(data);
            h.size = size;
            s.used += size;
        }
    }
}

/// Bytes the batches hold, counting each allocation once (a stream's batches are slices of
/// a few shared arrays, and `get_array_memory_size` would count a shared buffer per batch).
fn held_bytes(batches: &[RecordBatch]) -> usize {
    fn walk(d: &arrow::array::ArrayData, seen: &mut std::collections::HashSet<usize>) -> usize {
        let mut n = 0;
        let bufs = d.buffers().iter().chain(d.nulls().map(|x| x.buffer()));
        for b in bufs {
            if seen.insert(b.data_ptr().as_ptr() as usize) {
                n += b.capacity();
            }
        }
        n + d.child_data().iter().map(|c| walk(c, seen)).sum::<usize>()
    }
    let mut seen = std::collections::HashSet::new();
    batches
        .iter()
        .flat_map(|b| b.columns())
        .map(|c| walk(&c.to_data(), &mut seen))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch(n: usize) -> (SchemaRef, Vec<RecordBatch>) {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let b = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from_iter_values(0..n as i64))],
        )
        .unwrap();
        (schema, vec![b])
    }

    fn key(v: u64) -> StreamKey {
        ("s".into(), "a".into(), v, 1)
    }

    #[test]
    fn keeps_within_budget_and_evicts_least_recently_used() {
        let one = held_bytes(&batch(1000).1);
        // slices of one array count it once
        let (_, b) = batch(1000);
        let halves = vec![b[0].slice(0, 500), b[0].slice(500, 500)];
        assert_eq!(held_bytes(&halves), one);
        let c = ServingCache::new(one * 2 + one / 2);
        for v in 1..=2 {
            let (s, b) = batch(1000);
            c.keep(key(v), s, b);
        }
        assert!(c.stream(&key(1)).is_some()); // 1 is now the most recent
        let (s, b) = batch(1000);
        c.keep(key(3), s, b);
        assert!(c.stream(&key(2)).is_none(), "least recently used evicted");
        assert!(c.stream(&key(1)).is_some() && c.stream(&key(3)).is_some());
        // larger than the budget: not kept, nothing evicted
        let (s, b) = batch(10_000);
        c.keep(key(4), s, b);
        assert!(c.stream(&key(4)).is_none() && c.stream(&key(1)).is_some());
        assert!(!ServingCache::default().keeps_streams());
        // encoded messages replace the batches, evicting others to fit but not their stream
        let msg = |n: usize| Arc::new(vec![bytes::Bytes::from(vec![0u8; n])]);
        let used = |c: &ServingCache| {
            let s = c.streams.lock().unwrap();
            assert_eq!(s.used, s.held.values().map(|h| h.size).sum::<usize>());
            s.used
        };
        assert_eq!(used(&c), 2 * one);
        c.keep_encoded(&key(3), msg(2 * one));
        assert_eq!(c.encoded(&key(3)).unwrap()[0].len(), 2 * one);
        assert!(c.stream(&key(3)).is_none(), "batches dropped once encoded");
        assert!(c.schema(&key(3)).is_some());
        assert!(c.stream(&key(1)).is_none(), "evicted to make room");
        assert_eq!(used(&c), 2 * one);
        c.keep_encoded(&key(3), msg(1)); // already encoded: kept as is
        assert_eq!(c.encoded(&key(3)).unwrap()[0].len(), 2 * one);
        c.keep_encoded(&key(9), msg(1)); // no such stream
        assert!(c.encoded(&key(9)).is_none());
        // messages larger than the budget: the batches stay
        let (s, b) = batch(1000);
        c.keep(key(5), s, b);
        assert!(c.stream(&key(5)).is_some());
        c.keep_encoded(&key(5), msg(3 * one));
        assert!(c.stream(&key(5)).is_some() && c.encoded(&key(5)).is_none());
        assert!(used(&c) <= 2 * one + one / 2);
    }
}
