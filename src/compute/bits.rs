//! The per-row tests of a refresh: a set of small non-negative integers (dense profile
//! indexes) as a bitmap, one probe per lookup instead of a hash; and a galloping search of a
//! sorted sequence, cheap when the answer is near the last one.

/// The first position at or after `from` (and at most `len`) whose element is not below the
/// target, in a sequence of `len` elements sorted so that `below` holds for a prefix: probes
/// 1, 2, 4, ... ahead of `from`, then a binary search of the last step.
pub(crate) fn gallop(from: usize, len: usize, below: impl Fn(usize) -> bool) -> usize {
    let mut bound = 1;
    while from + bound <= len && below(from + bound - 1) {
        bound *= 2;
    }
    let (mut lo, mut hi) = (from + bound / 2, (from + bound).min(len));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if below(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The set; negative values are never in it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Bits(Vec<u64>);

impl Bits {
    /// The set of `values`.
    pub fn of(values: impl IntoIterator<Item = i64>) -> Bits {
        let mut b = Bits::default();
        for v in values {
            b.insert(v);
        }
        b
    }

    pub fn insert(&mut self, v: i64) {
        if let Ok(v) = usize::try_from(v) {
            if v / 64 >= self.0.len() {
                self.0.resize(v / 64 + 1, 0);
            }
            self.0[v / 64] |= 1 << (v % 64);
        }
    }

    pub fn contains(&self, v: i64) -> bool {
        usize::try_from(v)
            .ok()
            .and_then(|v| self.0.get(v / 64).map(|w| w >> (v % 64) & 1 == 1))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::{Bits, gallop};

    #[test]
    fn gallop_finds_the_first_element_not_below() {
        let v: Vec<i64> = vec![1, 3, 3, 5, 8, 13, 21, 34, 55, 89];
        for from in 0..=v.len() {
            for t in 0..100 {
                let want = from + v[from..].partition_point(|x| *x < t);
                assert_eq!(
                    gallop(from, v.len(), |i| v[i] < t),
                    want,
                    "from {from} target {t}"
                );
            }
        }
        assert_eq!(gallop(0, 0, |_| true), 0);
    }

    #[test]
    fn holds_what_was_inserted() {
        let vals = [0i64, 1, 63, 64, 65, 1000, 4095];
        let b = Bits::of(vals);
        for v in -3..5000 {
            assert_eq!(b.contains(v), vals.contains(&v), "{v}");
        }
        assert!(!Bits::default().contains(0));
        assert!(!Bits::of([-1]).contains(-1));
    }
}
