//! What a server keeps between requests: the [`IdIndex`] of each space and the finished
//! membership streams of recent versions (their Flight messages as gRPC frames), so that every
//! client pulling the same version after the first is served from memory, as a plain Flight
//! server holding the batches would.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use arrow::datatypes::SchemaRef;
use bytes::Bytes;

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

/// One finished stream: its schema and its Flight messages as gRPC frames (a 10M-member
/// stream is ~0.5 GB).
#[derive(Debug)]
struct Held {
    schema: SchemaRef,
    frames: Arc<Vec<Bytes>>,
    size: usize,
}

impl Streams {
    /// Mark `key` as the most recently used.
    fn touch(&mut self, key: &StreamKey) {
        self.order.retain(|k| k != key);
        self.order.push_back(key.clone());
    }

    /// Evict the least recently used streams until `size` more bytes fit; false when they
    /// cannot.
    fn make_room(&mut self, size: usize) -> bool {
        if size > self.budget {
            return false;
        }
        while self.used + size > self.budget {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(h) = self.held.remove(&old) {
                self.used -= h.size;
            }
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

    /// The most bytes of finished streams kept (0: none are).
    pub(crate) fn budget(&self) -> usize {
        self.streams.lock().map_or(0, |s| s.budget)
    }

    /// The schema of a finished stream.
    pub(crate) fn schema(&self, key: &StreamKey) -> Option<SchemaRef> {
        let s = self.streams.lock().ok()?;
        s.held.get(key).map(|h| h.schema.clone())
    }

    /// The frames of a finished stream, marked as recently used.
    pub(crate) fn frames(&self, key: &StreamKey) -> Option<Arc<Vec<Bytes>>> {
        let mut s = self.streams.lock().ok()?;
        let hit = s.held.get(key).map(|h| Arc::clone(&h.frames))?;
        s.touch(key);
        Some(hit)
    }

    /// Keep a finished stream, evicting the least recently used ones beyond the budget (a
    /// stream larger than the whole budget is not kept; one already kept stays as it is).
    pub(crate) fn keep(&self, key: StreamKey, schema: SchemaRef, frames: Vec<Bytes>) {
        let size = frames.iter().map(|f| f.len()).sum();
        let Ok(mut s) = self.streams.lock() else {
            return;
        };
        if s.held.contains_key(&key) || !s.make_room(size) {
            return;
        }
        s.used += size;
        s.order.push_back(key.clone());
        let frames = Arc::new(frames);
        s.held.insert(
            key,
            Held {
                schema,
                frames,
                size,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field, Schema};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]))
    }

    fn frames(n: usize) -> Vec<Bytes> {
        vec![
            Bytes::from(vec![1u8; n / 2]),
            Bytes::from(vec![2u8; n - n / 2]),
        ]
    }

    fn key(v: u64) -> StreamKey {
        ("s".into(), "a".into(), v, 1)
    }

    #[test]
    fn keeps_within_budget_and_evicts_least_recently_used() {
        let used = |c: &ServingCache| {
            let s = c.streams.lock().unwrap();
            assert_eq!(s.used, s.held.values().map(|h| h.size).sum::<usize>());
            assert_eq!(s.order.len(), s.held.len());
            s.used
        };
        let c = ServingCache::new(2500);
        for v in 1..=2 {
            c.keep(key(v), schema(), frames(1000));
        }
        assert_eq!(used(&c), 2000);
        assert_eq!(c.frames(&key(1)).unwrap().len(), 2); // 1 is now the most recent
        c.keep(key(3), schema(), frames(1000));
        assert!(c.frames(&key(2)).is_none(), "least recently used evicted");
        assert!(c.schema(&key(2)).is_none());
        assert!(c.frames(&key(1)).is_some() && c.frames(&key(3)).is_some());
        assert_eq!(c.schema(&key(3)).unwrap(), schema());
        assert_eq!(used(&c), 2000);
        // kept already: stays as it is
        c.keep(key(3), schema(), frames(10));
        assert_eq!(c.frames(&key(3)).unwrap()[0].len(), 500);
        // larger than the budget: not kept, nothing evicted
        c.keep(key(4), schema(), frames(3000));
        assert!(c.frames(&key(4)).is_none() && c.frames(&key(1)).is_some());
        assert_eq!(used(&c), 2000);
        // as large as the budget: everything else goes
        c.keep(key(5), schema(), frames(2500));
        assert!(c.frames(&key(5)).is_some() && c.frames(&key(1)).is_none());
        assert_eq!(used(&c), 2500);
        assert_eq!(ServingCache::default().budget(), 0);
    }
}
