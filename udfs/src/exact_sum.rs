//! `exact_sum(x)`: the sum of a Float64 column that does not depend on the order of the rows.
//!
//! A plain floating-point sum rounds after every addition, so the same rows summed in another
//! order (other partitions, other batches, a refresh reading a profile's events from memory
//! instead of from the files) can differ in the last bits, and a condition such as
//! `sum > 500` can then hold in one evaluation and not in the other. Here every value is
//! turned into a fixed-point integer of 2^-60 units (exact for any value of magnitude at least
//! 2^-8 below 2^66; smaller ones are rounded to the unit, the same way whatever the order),
//! the integers are added exactly in an `i128`, and the total is rounded to a Float64 once:
//! the correctly rounded sum of the values. Values beyond 2^66, infinities and NaN (and a
//! total beyond the `i128`) fall back to a plain float sum for that group.
//!
//! ```sql
//! SELECT profile_id, exact_sum("properties.revenue:num") FROM events GROUP BY profile_id
//! ```

use std::sync::{Arc, LazyLock};

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array};
use arrow::datatypes::{DataType, Field, FieldRef, Float64Type, Int64Type};
use datafusion::common::{ScalarValue, exec_err};
use datafusion::error::Result;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::window_doc_sections::DOC_SECTION_AGGREGATE;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Documentation, EmitTo, Expr, GroupsAccumulator,
    Signature, Volatility,
};

/// One unit of the fixed-point sum: 2^-60 (values are multiplied by 2^60).
const SCALE: f64 = (1u64 << 60) as f64;
/// Values of at least this magnitude are summed as floats: 2^66 (times 2^60 fits an i128
/// with room for 2^61 of them).
const LIMIT: f64 = (1u128 << 66) as f64;

/// The `exact_sum` aggregate.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ExactSum {
    signature: Signature,
}

impl Default for ExactSum {
    fn default() -> Self {
        Self {
            signature: Signature::uniform(1, vec![DataType::Float64], Volatility::Immutable),
        }
    }
}

/// `exact_sum(e)` as an expression.
pub fn exact_sum(e: Expr) -> Expr {
    AggregateUDF::from(ExactSum::default()).call(vec![e])
}

static DOC: LazyLock<Documentation> = LazyLock::new(|| {
    Documentation::builder(
        DOC_SECTION_AGGREGATE,
        "Sum of the values, correctly rounded and the same whatever the order of the rows.",
        "exact_sum(x)",
    )
    .with_sql_example(
        "SELECT profile_id, exact_sum(\"properties.revenue:num\") FROM events GROUP BY profile_id",
    )
    .with_argument("x", "a numeric value (as Float64)")
    .build()
});

impl AggregateUDFImpl for ExactSum {
    fn name(&self) -> &str {
        "exact_sum"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }
    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(ExactSumAccumulator(Sums::default())))
    }
    fn state_fields(&self, _args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![
            Arc::new(Field::new("exact_hi", DataType::Int64, true)),
            Arc::new(Field::new("exact_lo", DataType::Int64, true)),
            Arc::new(Field::new("float", DataType::Float64, true)),
        ])
    }
    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }
    fn create_groups_accumulator(
        &self,
        _args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(Sums::default()))
    }
    fn documentation(&self) -> Option<&Documentation> {
        Some(&DOC)
    }
}

/// The sums of every group: the exact part, the float part, whether any value was seen.
#[derive(Debug, Default)]
pub struct Sums {
    exact: Vec<i128>,
    float: Vec<f64>,
    seen: Vec<bool>,
}

fn to_f64(e: i128) -> f64 {
    e as f64 / SCALE
}

/// The fixed-point form of `x`, or None when it is summed as a float.
fn fixed(x: f64) -> Option<i128> {
    (x.is_finite() && x.abs() < LIMIT).then(|| (x * SCALE).round_ties_even() as i128)
}

impl Sums {
    fn resize(&mut self, n: usize) {
        self.exact.resize(n, 0);
        self.float.resize(n, 0.0);
        self.seen.resize(n, false);
    }

    fn add_parts(&mut self, g: usize, e: i128, f: f64) {
        self.seen[g] = true;
        match self.exact[g].checked_add(e) {
            Some(s) => self.exact[g] = s,
            None => {
                self.float[g] += to_f64(self.exact[g]);
                self.exact[g] = e;
            }
        }
        self.float[g] += f;
    }

    fn add(&mut self, g: usize, x: f64) {
        match fixed(x) {
            Some(e) => self.add_parts(g, e, 0.0),
            None => self.add_parts(g, 0, x),
        }
    }

    fn value(&self, g: usize) -> Option<f64> {
        self.seen[g].then(|| to_f64(self.exact[g]) + self.float[g])
    }

    fn update(
        &mut self,
        values: &[ArrayRef],
        group: impl Fn(usize) -> usize,
        keep: impl Fn(usize) -> bool,
    ) -> Result<()> {
        let Some(v) = values
            .first()
            .and_then(|v| v.as_primitive_opt::<Float64Type>())
        else {
            return exec_err!("exact_sum: the argument is not Float64");
        };
        for i in 0..v.len() {
            if v.is_valid(i) && keep(i) {
                self.add(group(i), v.value(i));
            }
        }
        Ok(())
    }

    /// The state arrays of `exact`, `float` and `seen`.
    fn state_of(exact: &[i128], float: &[f64], seen: &[bool]) -> Vec<ArrayRef> {
        let valid = |i: usize| seen[i];
        let hi = Int64Array::from_iter(
            exact
                .iter()
                .enumerate()
                .map(|(i, e)| valid(i).then_some((e >> 64) as i64)),
        );
        let lo = Int64Array::from_iter(
            exact
                .iter()
                .enumerate()
                .map(|(i, e)| valid(i).then_some(*e as u64 as i64)),
        );
        let f = Float64Array::from_iter(
            float
                .iter()
                .enumerate()
                .map(|(i, f)| valid(i).then_some(*f)),
        );
        vec![Arc::new(hi), Arc::new(lo), Arc::new(f)]
    }

    fn merge(&mut self, values: &[ArrayRef], group: impl Fn(usize) -> usize) -> Result<()> {
        let (Some(hi), Some(lo), Some(f)) = (
            values
                .first()
                .and_then(|v| v.as_primitive_opt::<Int64Type>()),
            values
                .get(1)
                .and_then(|v| v.as_primitive_opt::<Int64Type>()),
            values
                .get(2)
                .and_then(|v| v.as_primitive_opt::<Float64Type>()),
        ) else {
            return exec_err!("exact_sum: unexpected state");
        };
        for i in 0..hi.len() {
            if hi.is_valid(i) {
                let e = ((hi.value(i) as i128) << 64) | (lo.value(i) as u64 as i128);
                self.add_parts(group(i), e, f.value(i));
            }
        }
        Ok(())
    }
}

impl GroupsAccumulator for Sums {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.resize(total_num_groups);
        self.update(
            values,
            |i| group_indices[i],
            |i| opt_filter.is_none_or(|f| f.is_valid(i) && f.value(i)),
        )
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let n = match emit_to {
            EmitTo::All => self.seen.len(),
            EmitTo::First(n) => n,
        };
        let out = Float64Array::from_iter((0..n).map(|g| self.value(g)));
        emit_to.take_needed(&mut self.exact);
        emit_to.take_needed(&mut self.float);
        emit_to.take_needed(&mut self.seen);
        Ok(Arc::new(out))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let exact = emit_to.take_needed(&mut self.exact);
        let float = emit_to.take_needed(&mut self.float);
        let seen = emit_to.take_needed(&mut self.seen);
        Ok(Self::state_of(&exact, &float, &seen))
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.resize(total_num_groups);
        self.merge(values, |i| group_indices[i])
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let n = values.first().map_or(0, |v| v.len());
        let mut one = Sums::default();
        one.resize(n);
        one.update(
            values,
            |i| i,
            |i| opt_filter.is_none_or(|f| f.is_valid(i) && f.value(i)),
        )?;
        Ok(Self::state_of(&one.exact, &one.float, &one.seen))
    }

    fn size(&self) -> usize {
        self.exact.capacity() * 16 + self.float.capacity() * 8 + self.seen.capacity()
    }
}

/// The single-group accumulator.
#[derive(Debug)]
pub struct ExactSumAccumulator(Sums);

impl Accumulator for ExactSumAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.0.resize(1);
        self.0.update(values, |_| 0, |_| true)
    }
    fn evaluate(&mut self) -> Result<ScalarValue> {
        self.0.resize(1);
        Ok(ScalarValue::Float64(self.0.value(0)))
    }
    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.0.size()
    }
    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.0.resize(1);
        Sums::state_of(&self.0.exact, &self.0.float, &self.0.seen)
            .iter()
            .map(|a| ScalarValue::try_from_array(a, 0))
            .collect()
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.0.resize(1);
        self.0.merge(states, |_| 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic PRNG.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 11
        }
    }

    fn sum_in_groups(values: &[f64], chunks: &[usize]) -> f64 {
        // sum in parts of the given sizes, each part's state merged into the total
        let mut total = Sums::default();
        total.resize(1);
        let mut start = 0;
        for &c in chunks.iter().cycle() {
            if start >= values.len() {
                break;
            }
            let end = (start + c.max(1)).min(values.len());
            let mut part = Sums::default();
            let arr: ArrayRef = Arc::new(Float64Array::from(values[start..end].to_vec()));
            part.update_batch(&[arr], &vec![0; end - start], None, 1)
                .unwrap();
            let state = part.state(EmitTo::All).unwrap();
            total.merge_batch(&state, &[0], 1).unwrap();
            start = end;
        }
        total.value(0).unwrap()
    }

    #[test]
    fn the_order_of_the_rows_does_not_change_the_sum() {
        // prices with cents: a naive sum of these depends on the order
        let mut r = Lcg(7);
        let values: Vec<f64> = (0..500)
            .map(|_| (r.next() % 100_000) as f64 / 100.0)
            .collect();
        let exact = sum_in_groups(&values, &[values.len()]);
        let mut naive_sums = std::collections::BTreeSet::new();
        for round in 0..20 {
            let mut v = values.clone();
            for i in (1..v.len()).rev() {
                v.swap(i, (r.next() % (i as u64 + 1)) as usize);
            }
            naive_sums.insert(v.iter().sum::<f64>().to_bits());
            let chunks = [1 + round, 7, 64, 3];
            assert_eq!(sum_in_groups(&v, &chunks).to_bits(), exact.to_bits());
        }
        // the check above is not vacuous: plain sums of the same values differ by order
        assert!(naive_sums.len() > 1, "{naive_sums:?}");
        // and the result is the decimal total, correctly rounded: every value is k/100,
        // so the exact sum is (sum of k)/100
        let cents: u64 = values.iter().map(|v| (v * 100.0).round() as u64).sum();
        assert!((exact - cents as f64 / 100.0).abs() <= f64::EPSILON * exact);
    }

    #[test]
    fn the_cases_at_the_edges() {
        let s = |v: &[f64]| sum_in_groups(v, &[2]);
        assert_eq!(s(&[0.1, 0.2]), 0.1 + 0.2);
        // beyond the fixed-point range: summed as floats, apart from the exact part
        assert_eq!(s(&[1e30, 1.0, -1e30]), 1.0);
        assert!(s(&[f64::NAN, 1.0]).is_nan());
        assert_eq!(s(&[f64::INFINITY, 1.0]), f64::INFINITY);
        assert_eq!(s(&[-2.5, 2.5]), 0.0);
        assert_eq!(s(&[1e-30]), 0.0);
        // no value: null
        let mut none = Sums::default();
        let arr: ArrayRef = Arc::new(Float64Array::from(vec![None, Some(1.0)]));
        let keep = BooleanArray::from(vec![true, false]);
        none.update_batch(&[arr], &[0, 0], Some(&keep), 1).unwrap();
        assert!(none.evaluate(EmitTo::All).unwrap().is_null(0));
    }
}
