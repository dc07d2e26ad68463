//! `window_funnel(window, timestamp, step1, step2, ...)`: the longest prefix of the steps that
//! the group's events complete in order, each step strictly after the previous step's event and
//! at most `window` after it (the semantics of nested `within(parent: ...)` events; ClickHouse's
//! `windowFunnel` instead measures every step from the first, which coincides for two steps).
//!
//! `window` is a literal: microseconds (integer) or an interval. The state of a group is its
//! list of `(timestamp, step mask)` pairs, sorted once at evaluation.
//!
//! ```sql
//! SELECT profile_id,
//!        window_funnel(INTERVAL '7 days', timestamp,
//!                      event = 'Checkout Started', event = 'Order Completed') AS level
//! FROM events GROUP BY profile_id
//! ```

use std::sync::{Arc, LazyLock};

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, ListArray, StructArray};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, FieldRef, Fields, Int64Type};
use datafusion::common::{ScalarValue, exec_err, plan_err};
use datafusion::error::Result;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::window_doc_sections::DOC_SECTION_AGGREGATE;
use datafusion::logical_expr::{
    Accumulator, AggregateUDFImpl, Documentation, EmitTo, GroupsAccumulator, Signature, Volatility,
};
use datafusion::physical_expr::expressions::Literal;

/// The `window_funnel` aggregate.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct WindowFunnel {
    signature: Signature,
}

impl Default for WindowFunnel {
    fn default() -> Self {
        Self {
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }
}

const MAX_STEPS: usize = 63;

fn row_fields() -> Fields {
    Fields::from(vec![
        Field::new("ts", DataType::Int64, true),
        Field::new("mask", DataType::Int64, true),
    ])
}

fn item() -> FieldRef {
    Arc::new(Field::new("item", DataType::Struct(row_fields()), true))
}

static DOC: LazyLock<Documentation> = LazyLock::new(|| {
    Documentation::builder(
        DOC_SECTION_AGGREGATE,
        "Longest prefix of the steps completed in order, each step strictly after the previous one and at most `window` after it.",
        "window_funnel(window, timestamp, step1, step2 [, ...])",
    )
    .with_sql_example(
        "SELECT profile_id, window_funnel(INTERVAL '7 days', timestamp, event = 'Checkout Started', event = 'Order Completed') FROM events GROUP BY profile_id",
    )
    .with_argument("window", "maximum gap between consecutive steps: microseconds or an interval literal")
    .with_argument("timestamp", "event time")
    .with_argument("stepN", "boolean condition of step N")
    .build()
});

impl AggregateUDFImpl for WindowFunnel {
    fn name(&self) -> &str {
        "window_funnel"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        if arg_types.len() < 3 || arg_types.len() - 2 > MAX_STEPS {
            return plan_err!(
                "window_funnel takes (window, timestamp, step1, ...) with 1 to {MAX_STEPS} steps; got {} arguments",
                arg_types.len()
            );
        }
        Ok(DataType::Int64)
    }
    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(FunnelAccumulator(groups(&args)?)))
    }
    fn state_fields(&self, _args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            "rows",
            DataType::List(item()),
            true,
        ))])
    }
    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }
    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(groups(&args)?))
    }
    fn documentation(&self) -> Option<&Documentation> {
        Some(&DOC)
    }
}

fn window_micros(v: &ScalarValue) -> Option<i64> {
    Some(match v {
        ScalarValue::Int64(Some(x)) => *x,
        ScalarValue::Int32(Some(x)) => *x as i64,
        ScalarValue::UInt64(Some(x)) => i64::try_from(*x).ok()?,
        ScalarValue::IntervalDayTime(Some(x)) => {
            x.days as i64 * 86_400_000_000 + x.milliseconds as i64 * 1000
        }
        ScalarValue::IntervalMonthDayNano(Some(x)) if x.months == 0 => {
            x.days as i64 * 86_400_000_000 + x.nanoseconds / 1000
        }
        ScalarValue::DurationMicrosecond(Some(x)) => *x,
        _ => return None,
    })
}

fn groups(args: &AccumulatorArgs) -> Result<FunnelGroups> {
    let window = args.exprs[0]
        .downcast_ref::<Literal>()
        .and_then(|l| window_micros(l.value()));
    let Some(window) = window.filter(|w| *w >= 0) else {
        return plan_err!(
            "window_funnel: the window must be a non-negative integer (microseconds) or an interval of days/hours/minutes literal"
        );
    };
    Ok(FunnelGroups {
        window,
        steps: args.exprs.len() - 2,
        groups: Vec::new(),
    })
}

/// The groups accumulator of `window_funnel`.
pub struct FunnelGroups {
    window: i64,
    steps: usize,
    groups: Vec<Vec<(i64, u64)>>,
}

impl FunnelGroups {
    /// Steps reached by one group's `(timestamp, mask)` rows.
    fn level(&self, rows: &mut [(i64, u64)]) -> i64 {
        rows.sort_unstable_by_key(|r| r.0);
        // latest[k]: latest timestamp (strictly before the current one) at which a chain of
        // k + 1 steps ends; a later end is never worse for the next step's window.
        let mut latest: Vec<Option<i64>> = vec![None; self.steps];
        let mut best = 0usize;
        let mut i = 0;
        let mut pending: Vec<(usize, i64)> = Vec::new();
        while i < rows.len() {
            let t = rows[i].0;
            pending.clear();
            while i < rows.len() && rows[i].0 == t {
                let m = rows[i].1;
                for k in 0..self.steps {
                    if m & (1 << k) == 0 {
                        continue;
                    }
                    let ok = k == 0
                        || latest[k - 1]
                            .is_some_and(|p| p < t && t <= p.saturating_add(self.window));
                    if ok {
                        pending.push((k, t));
                    }
                }
                i += 1;
            }
            for &(k, t) in &pending {
                latest[k] = Some(t);
                best = best.max(k + 1);
            }
        }
        best as i64
    }

    fn add(
        &mut self,
        values: &[ArrayRef],
        g: impl Fn(usize) -> usize,
        keep: impl Fn(usize) -> bool,
    ) -> Result<()> {
        let ts = arrow::compute::cast(&values[1], &DataType::Int64)?;
        let ts = ts.as_primitive::<Int64Type>();
        let mut steps = Vec::with_capacity(self.steps);
        for v in &values[2..] {
            let b = arrow::compute::cast(v, &DataType::Boolean)?;
            steps.push(b.as_boolean().clone());
        }
        for i in 0..ts.len() {
            if !keep(i) || ts.is_null(i) {
                continue;
            }
            let mut mask = 0u64;
            for (k, s) in steps.iter().enumerate() {
                if s.is_valid(i) && s.value(i) {
                    mask |= 1 << k;
                }
            }
            if mask != 0 {
                self.groups[g(i)].push((ts.value(i), mask));
            }
        }
        Ok(())
    }

    fn merge(&mut self, list: &ListArray, g: impl Fn(usize) -> usize) -> Result<()> {
        let Some(rows) = list.values().as_struct_opt() else {
            return exec_err!("window_funnel: state is not a list of rows");
        };
        let (Some(ts), Some(mask)) = (
            rows.column(0).as_primitive_opt::<Int64Type>(),
            rows.column(1).as_primitive_opt::<Int64Type>(),
        ) else {
            return exec_err!("window_funnel: unexpected state columns");
        };
        let off = list.value_offsets();
        for i in 0..list.len() {
            if list.is_null(i) {
                continue;
            }
            let gi = g(i);
            for r in off[i] as usize..off[i + 1] as usize {
                self.groups[gi].push((ts.value(r), mask.value(r) as u64));
            }
        }
        Ok(())
    }

    fn state_of(groups: &[Vec<(i64, u64)>]) -> Result<ArrayRef> {
        let ts = Int64Array::from_iter_values(groups.iter().flatten().map(|r| r.0));
        let mask = Int64Array::from_iter_values(groups.iter().flatten().map(|r| r.1 as i64));
        let rows = StructArray::try_new(row_fields(), vec![Arc::new(ts), Arc::new(mask)], None)?;
        Ok(Arc::new(ListArray::try_new(
            item(),
            OffsetBuffer::from_lengths(groups.iter().map(Vec::len)),
            Arc::new(rows),
            None,
        )?))
    }
}

impl GroupsAccumulator for FunnelGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.groups.resize_with(total_num_groups, Vec::new);
        self.add(
            values,
            |i| group_indices[i],
            |i| opt_filter.is_none_or(|f| f.is_valid(i) && f.value(i)),
        )
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let mut groups = emit_to.take_needed(&mut self.groups);
        Ok(Arc::new(Int64Array::from_iter_values(
            groups.iter_mut().map(|g| self.level(g)),
        )))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let groups = emit_to.take_needed(&mut self.groups);
        Ok(vec![Self::state_of(&groups)?])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.groups.resize_with(total_num_groups, Vec::new);
        let Some(list) = values.first().and_then(|v| v.as_list_opt::<i32>()) else {
            return exec_err!("window_funnel: state is not a list");
        };
        self.merge(list, |i| group_indices[i])
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let n = values[1].len();
        let mut one = FunnelGroups {
            window: self.window,
            steps: self.steps,
            groups: vec![Vec::new(); n],
        };
        one.add(
            values,
            |i| i,
            |i| opt_filter.is_none_or(|f| f.is_valid(i) && f.value(i)),
        )?;
        let valid: Vec<bool> = one.groups.iter().map(|g| !g.is_empty()).collect();
        let list = Self::state_of(&one.groups)?;
        let list = list.as_list::<i32>();
        Ok(vec![Arc::new(ListArray::try_new(
            item(),
            list.offsets().clone(),
            Arc::clone(list.values()),
            Some(NullBuffer::from(valid)),
        )?)])
    }

    fn size(&self) -> usize {
        self.groups.capacity() * 24 + self.groups.iter().map(|g| g.capacity() * 16).sum::<usize>()
    }
}

/// The single-group accumulator.
pub struct FunnelAccumulator(FunnelGroups);

impl std::fmt::Debug for FunnelAccumulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunnelAccumulator").finish_non_exhaustive()
    }
}

impl Accumulator for FunnelAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let n = values[1].len();
        self.0.update_batch(values, &vec![0; n], None, 1)
    }
    fn evaluate(&mut self) -> Result<ScalarValue> {
        self.0.groups.resize_with(1, Vec::new);
        let mut g = self.0.groups[0].clone();
        Ok(ScalarValue::Int64(Some(self.0.level(&mut g))))
    }
    fn size(&self) -> usize {
        self.0.size()
    }
    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.0.groups.resize_with(1, Vec::new);
        let a = FunnelGroups::state_of(&self.0.groups)?;
        Ok(vec![ScalarValue::try_from_array(&a, 0)?])
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.0.groups.resize_with(1, Vec::new);
        let Some(list) = states.first().and_then(|v| v.as_list_opt::<i32>()) else {
            return exec_err!("window_funnel: state is not a list");
        };
        self.0.merge(list, |_| 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(window: i64, steps: usize, rows: &[(i64, u64)]) -> i64 {
        let f = FunnelGroups {
            window,
            steps,
            groups: Vec::new(),
        };
        f.level(&mut rows.to_vec())
    }

    /// A brute-force oracle: try every chain.
    fn oracle(window: i64, steps: usize, rows: &[(i64, u64)]) -> i64 {
        fn go(w: i64, steps: usize, rows: &[(i64, u64)], k: usize, prev: Option<i64>) -> usize {
            if k == steps {
                return k;
            }
            let mut best = k;
            for r in rows {
                if r.1 & (1 << k) == 0 {
                    continue;
                }
                if let Some(p) = prev
                    && !(r.0 > p && r.0 <= p + w)
                {
                    continue;
                }
                best = best.max(go(w, steps, rows, k + 1, Some(r.0)));
            }
            best
        }
        go(window, steps, rows, 0, None) as i64
    }

    #[test]
    fn strictly_later_within_the_window_of_the_previous_step() {
        // child at the parent's instant does not count; at exactly parent + window it does
        assert_eq!(level(10, 2, &[(5, 1), (5, 2)]), 1);
        assert_eq!(level(10, 2, &[(5, 1), (15, 2)]), 2);
        assert_eq!(level(10, 2, &[(5, 1), (16, 2)]), 1);
        // each step from the previous one (ClickHouse would measure 25 - 5 > 10 and stop at 2)
        assert_eq!(level(10, 3, &[(5, 1), (15, 2), (25, 4)]), 3);
        // a repeated parent restarts the window
        assert_eq!(level(10, 2, &[(5, 1), (12, 1), (21, 2)]), 2);
        assert_eq!(level(10, 2, &[]), 0);
    }

    #[test]
    fn agrees_with_a_brute_force_oracle() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..2000 {
            let steps = 1 + next(3) as usize;
            let n = next(7) as usize;
            let rows: Vec<(i64, u64)> = (0..n)
                .map(|_| (next(12) as i64, 1 + next((1 << steps) - 1)))
                .collect();
            let w = next(6) as i64;
            assert_eq!(
                level(w, steps, &rows),
                oracle(w, steps, &rows),
                "{rows:?} w={w}"
            );
        }
    }
}
