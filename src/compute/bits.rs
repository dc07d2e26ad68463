//! A set of small non-negative integers (profile indexes, identity keys: both dense) as a
//! bitmap: one probe per lookup instead of a hash, for the per-row tests of a refresh.

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
    use super::Bits;

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
