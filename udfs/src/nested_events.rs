//! `nested_events(program, ts, order_key, mask, s0, n0, b0, s1, n1, b1, ...)`: evaluates a tree
//! of nested event queries (funnels, N-step sequences, abandonment, dynamic references to the
//! parent event's properties) over the events of each group, and reduces the top-level query.
//!
//! The state of a group is a compact list of its rows: timestamp, static-predicate bit mask,
//! an optional tie-breaking order key and the value slots; it is order-insensitive and sorted
//! once at evaluation (the design of ClickHouse's `windowFunnel`), so no global sort is needed.
//! Strings are interned per accumulator. See [`crate::program`] for the program.
//!
//! SQL: `nested_events('{"as_of":0,"slots":0,"root":{"bit":0},"reducer":"count"}',
//! timestamp, NULL, CASE WHEN event = 'A' THEN 1 ELSE 0 END)` counts the `A` events of each
//! group. The result is a struct `{s: Utf8, n: Float64, b: Boolean}` (the reduced value in its
//! typed form).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, BooleanBuilder, Float64Array, Float64Builder,
    Int64Array, ListArray, StringBuilder, StructArray,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, FieldRef, Fields, Float64Type, Int64Type};
use datafusion::common::{ScalarValue, exec_err, plan_err};
use datafusion::error::Result;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::window_doc_sections::DOC_SECTION_AGGREGATE;
use datafusion::logical_expr::{
    Accumulator, AggregateUDFImpl, Documentation, EmitTo, GroupsAccumulator, Signature, Volatility,
};
use datafusion::physical_expr::expressions::Literal;

use crate::program::{Arg, Cond, Lit, Node, Op, Program, Reducer, Val};

/// The `nested_events` aggregate.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct NestedEvents {
    signature: Signature,
}

impl Default for NestedEvents {
    fn default() -> Self {
        Self {
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }
}

/// The result type: the reduced value in its typed form.
pub fn value_fields() -> Fields {
    Fields::from(vec![
        Field::new("s", DataType::Utf8, true),
        Field::new("n", DataType::Float64, true),
        Field::new("b", DataType::Boolean, true),
    ])
}

fn row_fields(slots: usize) -> Fields {
    let mut f = vec![
        Field::new("ts", DataType::Int64, true),
        Field::new("ord", DataType::Utf8, true),
        Field::new("mask", DataType::Int64, true),
    ];
    for i in 0..slots {
        f.push(Field::new(format!("s{i}"), DataType::Utf8, true));
        f.push(Field::new(format!("n{i}"), DataType::Float64, true));
        f.push(Field::new(format!("b{i}"), DataType::Boolean, true));
    }
    Fields::from(f)
}

fn state_field(slots: usize) -> FieldRef {
    Arc::new(Field::new(
        "rows",
        DataType::List(Arc::new(Field::new(
            "item",
            DataType::Struct(row_fields(slots)),
            true,
        ))),
        true,
    ))
}

fn slots_of(n_args: usize) -> Result<usize> {
    if n_args < 4 || !(n_args - 4).is_multiple_of(3) {
        return plan_err!(
            "nested_events takes (program, timestamp, order_key, mask) and three columns (text, number, boolean) per slot; got {n_args} arguments"
        );
    }
    Ok((n_args - 4) / 3)
}

static DOC: LazyLock<Documentation> = LazyLock::new(|| {
    Documentation::builder(
        DOC_SECTION_AGGREGATE,
        "Evaluates a tree of nested event queries (funnels, sequences, abandonment, references to the parent event) over the rows of each group and reduces the top-level query. Returns {s, n, b}.",
        "nested_events(program, timestamp, order_key, mask [, text, number, boolean]...)",
    )
    .with_sql_example(
        "SELECT profile_id, nested_events('{\"as_of\":1700000000000000,\"slots\":0,\"root\":{\"bit\":0,\"cond\":{\"cmp\":{\"left\":{\"agg\":{\"node\":{\"bit\":1,\"window\":{\"lo\":0,\"hi\":604800000000}},\"reducer\":\"count\"}},\"op\":\"gte\",\"right\":{\"value\":{\"lit\":1}}}}},\"reducer\":\"count\"}', timestamp, NULL, CASE WHEN event = 'Checkout Started' THEN 1 WHEN event = 'Order Completed' THEN 2 ELSE 0 END)['n'] AS funnels FROM events GROUP BY profile_id",
    )
    .with_argument("program", "JSON program (a literal): see udfs/src/program.rs")
    .with_argument("timestamp", "event time (timestamp or microseconds)")
    .with_argument("order_key", "tie-breaker among equal timestamps (text, or NULL)")
    .with_argument("mask", "bit i set when the row satisfies static predicate i")
    .build()
});

impl AggregateUDFImpl for NestedEvents {
    fn name(&self) -> &str {
        "nested_events"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        slots_of(arg_types.len())?;
        Ok(DataType::Struct(value_fields()))
    }
    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(NestedEventsAccumulator(groups_accumulator(
            &args,
        )?)))
    }
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![state_field(slots_of(args.input_fields.len())?)])
    }
    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }
    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(groups_accumulator(&args)?))
    }
    fn documentation(&self) -> Option<&Documentation> {
        Some(&DOC)
    }
}

fn groups_accumulator(args: &AccumulatorArgs) -> Result<NestedEventsGroups> {
    let slots = slots_of(args.exprs.len())?;
    let Some(text) = args.exprs[0]
        .downcast_ref::<Literal>()
        .and_then(|l| match l.value() {
            ScalarValue::Utf8(Some(s))
            | ScalarValue::Utf8View(Some(s))
            | ScalarValue::LargeUtf8(Some(s)) => Some(s.clone()),
            _ => None,
        })
    else {
        return plan_err!("nested_events: the program must be a text literal");
    };
    let program = Program::parse(&text).map_err(datafusion::error::DataFusionError::Plan)?;
    if program.slots != slots {
        return plan_err!(
            "nested_events: the program declares {} slots but {slots} are passed",
            program.slots
        );
    }
    Ok(NestedEventsGroups {
        program: Arc::new(program),
        rows: Rows::default(),
        n_groups: 0,
        strings: Interner::default(),
        scratch: Scratch::default(),
    })
}

/// Interned strings of one accumulator.
#[derive(Default)]
struct Interner {
    table: hashbrown::HashTable<u32>,
    strings: Vec<Box<str>>,
    hasher: hashbrown::DefaultHashBuilder,
    bytes: usize,
}

impl Interner {
    fn intern(&mut self, s: &str) -> u32 {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one(s);
        let strings = &self.strings;
        if let Some(i) = self.table.find(h, |i| &*strings[*i as usize] == s) {
            return *i;
        }
        let i = self.strings.len() as u32;
        self.strings.push(s.into());
        self.bytes += s.len();
        let (strings, hasher) = (&self.strings, &self.hasher);
        self.table
            .insert_unique(h, i, |i| hasher.hash_one(&*strings[*i as usize]));
        i
    }
    fn get(&self, i: u32) -> &str {
        &self.strings[i as usize]
    }
}

/// A slot value as stored.
#[derive(Clone, Copy, Debug, PartialEq)]
enum V {
    Missing,
    S(u32),
    N(f64),
    B(bool),
}

/// Rows of many groups in one arena (columns; `group` says whose), unsorted. One arena per
/// accumulator instead of one vector per group: no allocation per profile.
#[derive(Default)]
struct Rows {
    group: Vec<u32>,
    ts: Vec<i64>,
    mask: Vec<u64>,
    ord: Vec<u32>,
    vals: Vec<V>,
}

impl Rows {
    fn len(&self) -> usize {
        self.ts.len()
    }

    /// Append row `r` of `from` (with `k` slots) under group `g`.
    fn push_from(&mut self, from: &Rows, r: usize, k: usize, g: u32) {
        self.group.push(g);
        self.ts.push(from.ts[r]);
        self.mask.push(from.mask[r]);
        if let Some(o) = from.ord.get(r) {
            self.ord.push(*o);
        }
        self.vals.extend_from_slice(&from.vals[r * k..(r + 1) * k]);
    }
}

/// Reusable buffers for evaluation.
#[derive(Default)]
struct Scratch {
    perm: Vec<u32>,
    ts: Vec<i64>,
    mask: Vec<u64>,
    vals: Vec<V>,
}

/// Input or state columns, normalized.
struct Cols {
    ts: Int64Array,
    ord: Option<ArrayRef>,
    mask: Int64Array,
    slots: Vec<(ArrayRef, Float64Array, BooleanArray)>,
}

fn cast(a: &ArrayRef, t: &DataType) -> Result<ArrayRef> {
    if a.data_type() == t {
        Ok(Arc::clone(a))
    } else {
        Ok(arrow::compute::cast(a, t)?)
    }
}

fn text_at(a: &ArrayRef, i: usize) -> Option<&str> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::Utf8 => Some(a.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Some(a.as_string::<i64>().value(i)),
        DataType::Utf8View => Some(a.as_string_view().value(i)),
        _ => None,
    }
}

fn text_col(a: &ArrayRef) -> Result<ArrayRef> {
    match a.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Ok(Arc::clone(a)),
        _ => cast(a, &DataType::Utf8),
    }
}

impl Cols {
    /// From `(timestamp, order_key, mask, slots...)`.
    fn new(cols: &[ArrayRef], slots: usize) -> Result<Cols> {
        if cols.len() != 3 + 3 * slots {
            return exec_err!(
                "nested_events: expected {} columns, got {}",
                3 + 3 * slots,
                cols.len()
            );
        }
        let ts = cast(&cols[0], &DataType::Int64)?;
        let mask = cast(&cols[2], &DataType::Int64)?;
        let ord = (cols[1].data_type() != &DataType::Null && cols[1].null_count() < cols[1].len())
            .then(|| text_col(&cols[1]))
            .transpose()?;
        let mut s = Vec::with_capacity(slots);
        for i in 0..slots {
            let c = &cols[3 + 3 * i..6 + 3 * i];
            s.push((
                text_col(&c[0])?,
                cast(&c[1], &DataType::Float64)?
                    .as_primitive::<Float64Type>()
                    .clone(),
                cast(&c[2], &DataType::Boolean)?.as_boolean().clone(),
            ));
        }
        Ok(Cols {
            ts: ts.as_primitive::<Int64Type>().clone(),
            ord,
            mask: mask.as_primitive::<Int64Type>().clone(),
            slots: s,
        })
    }
}

/// The groups accumulator of `nested_events`.
pub struct NestedEventsGroups {
    program: Arc<Program>,
    rows: Rows,
    n_groups: usize,
    strings: Interner,
    scratch: Scratch,
}

impl NestedEventsGroups {
    fn push(&mut self, g: usize, c: &Cols, i: usize) {
        if c.ts.is_null(i) || c.mask.is_null(i) || c.mask.value(i) == 0 {
            return;
        }
        let rows = &mut self.rows;
        rows.group.push(g as u32);
        rows.ts.push(c.ts.value(i));
        rows.mask.push(c.mask.value(i) as u64);
        if self.program.ordered {
            let o = c.ord.as_ref().and_then(|o| text_at(o, i)).unwrap_or("");
            rows.ord.push(self.strings.intern(o));
        }
        for (s, n, b) in &c.slots {
            let v = if let Some(t) = text_at(s, i) {
                V::S(self.strings.intern(t))
            } else if n.is_valid(i) {
                V::N(n.value(i))
            } else if b.is_valid(i) {
                V::B(b.value(i))
            } else {
                V::Missing
            };
            self.rows.vals.push(v);
        }
    }

    /// Take the rows of the groups `emit_to` names, grouped: the rows in group order and the
    /// offsets of each group's run. Remaining groups are renumbered from 0.
    fn take(&mut self, emit_to: EmitTo) -> (Rows, Vec<usize>) {
        let n = match emit_to {
            EmitTo::All => self.n_groups,
            EmitTo::First(n) => n.min(self.n_groups),
        };
        let k = self.program.slots;
        let mut offsets = vec![0usize; n + 1];
        for &g in &self.rows.group {
            if (g as usize) < n {
                offsets[g as usize + 1] += 1;
            }
        }
        for i in 0..n {
            offsets[i + 1] += offsets[i];
        }
        let taken_len = offsets[n];
        let mut order = vec![0u32; taken_len];
        let mut next = offsets.clone();
        let mut rest = Rows::default();
        for r in 0..self.rows.len() {
            let g = self.rows.group[r] as usize;
            if g < n {
                order[next[g]] = r as u32;
                next[g] += 1;
            } else if n > 0 {
                rest.push_from(&self.rows, r, k, (g - n) as u32);
            }
        }
        let mut taken = Rows::default();
        for &r in &order {
            let r = r as usize;
            let g = self.rows.group[r];
            taken.push_from(&self.rows, r, k, g);
        }
        if n > 0 {
            self.rows = rest;
        }
        self.n_groups -= n;
        (taken, offsets)
    }

    /// Evaluate the group whose rows are `range` of `g`.
    fn eval_group(&mut self, g: &Rows, range: std::ops::Range<usize>) -> Out {
        let k = self.program.slots;
        let sc = &mut self.scratch;
        sc.perm.clear();
        sc.perm.extend(range.start as u32..range.end as u32);
        if self.program.ordered {
            let strings = &self.strings;
            sc.perm.sort_by(|&a, &b| {
                let (a, b) = (a as usize, b as usize);
                g.ts[a]
                    .cmp(&g.ts[b])
                    .then_with(|| strings.get(g.ord[a]).cmp(strings.get(g.ord[b])))
            });
        } else {
            sc.perm.sort_by_key(|&a| g.ts[a as usize]);
        }
        sc.ts.clear();
        sc.mask.clear();
        sc.vals.clear();
        for &p in &sc.perm {
            let p = p as usize;
            sc.ts.push(g.ts[p]);
            sc.mask.push(g.mask[p]);
            sc.vals.extend_from_slice(&g.vals[p * k..(p + 1) * k]);
        }
        let e = Eval {
            ts: &sc.ts,
            mask: &sc.mask,
            vals: &sc.vals,
            k,
            strings: &self.strings,
            as_of: self.program.as_of,
        };
        let program = Arc::clone(&self.program);
        e.reduce(&program.root, &program.reducer, None, None)
            .into_out()
    }

    /// The state of grouped rows (`offsets` delimit the groups) as a list per group.
    fn state_array(&self, g: &Rows, offsets: &[usize]) -> Result<ArrayRef> {
        let k = self.program.slots;
        let mut ord = StringBuilder::new();
        let mut s: Vec<StringBuilder> = (0..k).map(|_| StringBuilder::new()).collect();
        let mut n: Vec<Float64Builder> = (0..k).map(|_| Float64Builder::new()).collect();
        let mut b: Vec<BooleanBuilder> = (0..k).map(|_| BooleanBuilder::new()).collect();
        for r in 0..g.len() {
            match g.ord.get(r) {
                Some(o) => ord.append_value(self.strings.get(*o)),
                None => ord.append_null(),
            }
            for j in 0..k {
                let v = g.vals[r * k + j];
                match v {
                    V::S(x) => s[j].append_value(self.strings.get(x)),
                    _ => s[j].append_null(),
                }
                n[j].append_option(if let V::N(x) = v { Some(x) } else { None });
                b[j].append_option(if let V::B(x) = v { Some(x) } else { None });
            }
        }
        let offsets: Vec<i32> = offsets.iter().map(|o| *o as i32).collect();
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(g.ts.clone())),
            Arc::new(ord.finish()),
            Arc::new(Int64Array::from_iter_values(
                g.mask.iter().map(|m| *m as i64),
            )),
        ];
        for j in 0..k {
            cols.push(Arc::new(s[j].finish()));
            cols.push(Arc::new(n[j].finish()));
            cols.push(Arc::new(b[j].finish()));
        }
        let rows = StructArray::try_new(row_fields(k), cols, None)?;
        let item = Arc::new(Field::new("item", DataType::Struct(row_fields(k)), true));
        Ok(Arc::new(ListArray::try_new(
            item,
            OffsetBuffer::new(offsets.into()),
            Arc::new(rows),
            None,
        )?))
    }

    fn merge_lists(&mut self, list: &ListArray, group_of: impl Fn(usize) -> usize) -> Result<()> {
        let Some(rows) = list.values().as_struct_opt() else {
            return exec_err!("nested_events: state is not a list of rows");
        };
        let c = Cols::new(rows.columns(), self.program.slots)?;
        let offsets = list.value_offsets();
        for i in 0..list.len() {
            if list.is_null(i) {
                continue;
            }
            let g = group_of(i);
            for r in offsets[i] as usize..offsets[i + 1] as usize {
                self.push(g, &c, r);
            }
        }
        Ok(())
    }
}

/// The reduced value.
struct Out {
    s: Option<String>,
    n: Option<f64>,
    b: Option<bool>,
}

fn out_array(outs: Vec<Out>) -> ArrayRef {
    let mut s = StringBuilder::new();
    let mut n = Float64Builder::new();
    let mut b = BooleanBuilder::new();
    for o in outs {
        s.append_option(o.s);
        n.append_option(o.n);
        b.append_option(o.b);
    }
    Arc::new(StructArray::new(
        value_fields(),
        vec![
            Arc::new(s.finish()),
            Arc::new(n.finish()),
            Arc::new(b.finish()),
        ],
        None,
    ))
}

impl GroupsAccumulator for NestedEventsGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.n_groups = self.n_groups.max(total_num_groups);
        let c = Cols::new(&values[1..], self.program.slots)?;
        for (i, &g) in group_indices.iter().enumerate() {
            if opt_filter.is_some_and(|f| !f.is_valid(i) || !f.value(i)) {
                continue;
            }
            self.push(g, &c, i);
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let (rows, offsets) = self.take(emit_to);
        let outs = offsets
            .windows(2)
            .map(|w| self.eval_group(&rows, w[0]..w[1]))
            .collect();
        Ok(out_array(outs))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let (rows, offsets) = self.take(emit_to);
        Ok(vec![self.state_array(&rows, &offsets)?])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.n_groups = self.n_groups.max(total_num_groups);
        let Some(list) = values.first().and_then(|v| v.as_list_opt::<i32>()) else {
            return exec_err!("nested_events: state is not a list");
        };
        self.merge_lists(list, |i| group_indices[i])
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let k = self.program.slots;
        let n = values.first().map_or(0, |v| v.len());
        let c = Cols::new(&values[1..], k)?;
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(c.ts.clone()),
            match &c.ord {
                Some(o) => cast(o, &DataType::Utf8)?,
                None => arrow::array::new_null_array(&DataType::Utf8, n),
            },
            Arc::new(c.mask.clone()),
        ];
        for (s, num, b) in &c.slots {
            cols.push(cast(s, &DataType::Utf8)?);
            cols.push(Arc::new(num.clone()));
            cols.push(Arc::new(b.clone()));
        }
        let rows = StructArray::try_new(row_fields(k), cols, None)?;
        let valid: Vec<bool> = (0..n)
            .map(|i| opt_filter.is_none_or(|f| f.is_valid(i) && f.value(i)))
            .collect();
        let item = Arc::new(Field::new("item", DataType::Struct(row_fields(k)), true));
        Ok(vec![Arc::new(ListArray::try_new(
            item,
            OffsetBuffer::from_lengths(std::iter::repeat_n(1, n)),
            Arc::new(rows),
            Some(NullBuffer::from(valid)),
        )?)])
    }

    fn size(&self) -> usize {
        let r = &self.rows;
        r.group.capacity() * 4
            + r.ts.capacity() * 8
            + r.mask.capacity() * 8
            + r.ord.capacity() * 4
            + r.vals.capacity() * std::mem::size_of::<V>()
            + self.strings.bytes
            + self.strings.strings.capacity() * 16
            + self.strings.table.capacity() * 8
    }
}

/// The single-group accumulator (used where DataFusion does not group, e.g. no GROUP BY).
pub struct NestedEventsAccumulator(NestedEventsGroups);

impl std::fmt::Debug for NestedEventsAccumulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NestedEventsAccumulator")
            .finish_non_exhaustive()
    }
}

impl Accumulator for NestedEventsAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let n = values.first().map_or(0, |v| v.len());
        self.0.update_batch(values, &vec![0; n], None, 1)
    }
    fn evaluate(&mut self) -> Result<ScalarValue> {
        // every row is group 0
        let rows = std::mem::take(&mut self.0.rows);
        let out = self.0.eval_group(&rows, 0..rows.len());
        self.0.rows = rows;
        ScalarValue::try_from_array(&out_array(vec![out]), 0)
    }
    fn size(&self) -> usize {
        self.0.size()
    }
    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let a = self.0.state_array(&self.0.rows, &[0, self.0.rows.len()])?;
        Ok(vec![ScalarValue::try_from_array(&a, 0)?])
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.0.n_groups = 1;
        let Some(list) = states.first().and_then(|v| v.as_list_opt::<i32>()) else {
            return exec_err!("nested_events: state is not a list");
        };
        self.0.merge_lists(list, |_| 0)
    }
}

/// A value during evaluation.
#[derive(Clone, Debug, PartialEq)]
enum X<'a> {
    Missing,
    S(Cow<'a, str>),
    N(f64),
    B(bool),
}

impl X<'_> {
    fn into_out(self) -> Out {
        let mut o = Out {
            s: None,
            n: None,
            b: None,
        };
        match self {
            X::Missing => {}
            X::S(s) => o.s = Some(s.into_owned()),
            X::N(n) => o.n = Some(n),
            X::B(b) => o.b = Some(b),
        }
        o
    }
}

fn lit_x(l: &Lit) -> X<'_> {
    match l {
        Lit::Null => X::Missing,
        Lit::Bool(b) => X::B(*b),
        Lit::Number(n) => X::N(*n),
        Lit::String(s) => X::S(Cow::Borrowed(s)),
    }
}

/// Sorted rows of one group.
struct Eval<'a> {
    ts: &'a [i64],
    mask: &'a [u64],
    vals: &'a [V],
    k: usize,
    strings: &'a Interner,
    as_of: i64,
}

/// Evaluation of a program over one group's sorted rows.
impl<'a> Eval<'a> {
    fn slot(&self, row: usize, s: usize) -> X<'a> {
        match self.vals[row * self.k + s] {
            V::Missing => X::Missing,
            V::S(i) => X::S(Cow::Borrowed(self.strings.get(i))),
            V::N(n) => X::N(n),
            V::B(b) => X::B(b),
        }
    }

    /// Rows a node may select, given its parent row: a range of the sorted rows.
    fn range(&self, node: &Node, parent: Option<usize>) -> std::ops::Range<usize> {
        match (node.window, parent) {
            (Some(w), Some(p)) => {
                let pt = self.ts[p];
                let lo = pt.saturating_add(w.lo);
                let hi = pt.saturating_add(w.hi);
                let start = self.ts.partition_point(|&t| t < lo || t <= pt);
                let end = self.ts.partition_point(|&t| t <= hi);
                start..end.max(start)
            }
            _ => 0..self.ts.len(),
        }
    }

    fn selects(&self, node: &Node, row: usize, parent: Option<usize>) -> bool {
        self.mask[row] & (1u64 << node.bit) != 0
            && node.cond.as_ref().is_none_or(|c| self.cond(c, row, parent))
    }

    /// Reduce the rows `node` selects relative to `parent`; a count stops at `cap`.
    fn reduce(&self, node: &Node, r: &Reducer, parent: Option<usize>, cap: Option<u64>) -> X<'a> {
        let rows = self
            .range(node, parent)
            .filter(|&i| self.selects(node, i, parent));
        let num = |s: usize, i: usize| match self.slot(i, s) {
            X::N(n) => Some(n),
            _ => None,
        };
        match r {
            Reducer::Count => {
                let mut n = 0u64;
                for _ in rows {
                    n += 1;
                    if cap.is_some_and(|c| n >= c) {
                        break;
                    }
                }
                X::N(n as f64)
            }
            Reducer::Sum(s) | Reducer::Avg(s) => {
                let (mut sum, mut n) = (0.0, 0u64);
                for x in rows.filter_map(|i| num(*s, i)) {
                    sum += x;
                    n += 1;
                }
                match (n, r) {
                    (0, _) => X::Missing,
                    (_, Reducer::Sum(_)) => X::N(sum),
                    _ => X::N(sum / n as f64),
                }
            }
            Reducer::Min(s) => rows
                .filter_map(|i| num(*s, i))
                .reduce(f64::min)
                .map_or(X::Missing, X::N),
            Reducer::Max(s) => rows
                .filter_map(|i| num(*s, i))
                .reduce(f64::max)
                .map_or(X::Missing, X::N),
            Reducer::First(s) => rows
                .map(|i| self.slot(i, *s))
                .find(|x| *x != X::Missing)
                .unwrap_or(X::Missing),
            Reducer::Last(s) => rows
                .rev()
                .map(|i| self.slot(i, *s))
                .find(|x| *x != X::Missing)
                .unwrap_or(X::Missing),
            Reducer::Mode { slot, min_count } => {
                let mut counts: HashMap<Cow<'a, str>, u64> = HashMap::new();
                for i in rows {
                    if let X::S(t) = self.slot(i, *slot) {
                        *counts.entry(t).or_default() += 1;
                    }
                }
                counts
                    .into_iter()
                    .filter(|(_, n)| *n >= *min_count)
                    .min_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)))
                    .map_or(X::Missing, |(t, _)| X::S(t))
            }
            Reducer::Unique(s) | Reducer::UniqueCount(s) => {
                let mut set: Vec<Cow<'a, str>> = rows
                    .filter_map(|i| match self.slot(i, *s) {
                        X::S(t) => Some(t),
                        _ => None,
                    })
                    .collect();
                set.sort();
                set.dedup();
                if matches!(r, Reducer::UniqueCount(_)) {
                    X::N(set.len() as f64)
                } else if set.is_empty() {
                    X::Missing
                } else {
                    // JSON array text, like `json_array` over the plain path
                    X::S(Cow::Owned(
                        serde_json::to_string(&set).unwrap_or_else(|_| "[]".into()),
                    ))
                }
            }
        }
    }

    fn value(&self, v: &Val, row: usize, parent: Option<usize>, cap: Option<u64>) -> X<'a> {
        match v {
            Val::Lit(l) => match l {
                Lit::Null => X::Missing,
                Lit::Bool(b) => X::B(*b),
                Lit::Number(n) => X::N(*n),
                Lit::String(s) => X::S(Cow::Owned(s.clone())),
            },
            Val::Slot(s) => self.slot(row, *s),
            Val::ParentSlot(s) => parent.map_or(X::Missing, |p| self.slot(p, *s)),
            Val::Agg { node, reducer } => self.reduce(node, reducer, Some(row), cap),
        }
    }

    fn cond(&self, c: &Cond, row: usize, parent: Option<usize>) -> bool {
        match c {
            Cond::And(xs) => xs.iter().all(|x| self.cond(x, row, parent)),
            Cond::Or(xs) => xs.iter().any(|x| self.cond(x, row, parent)),
            Cond::Not(x) => !self.cond(x, row, parent),
            Cond::Bit(b) => self.mask[row] & (1u64 << b) != 0,
            Cond::Cmp { left, op, right } => {
                // A count compared with a number needs counting only up to just past it.
                let cap = match (left, op, right) {
                    (
                        Val::Agg {
                            reducer: Reducer::Count,
                            ..
                        },
                        Op::Eq | Op::Neq | Op::Gt | Op::Gte | Op::Lt | Op::Lte,
                        Arg::Value(Val::Lit(Lit::Number(k))),
                    ) if *k >= 0.0 && *k < 1e15 => Some(k.floor() as u64 + 2),
                    _ => None,
                };
                let l = self.value(left, row, parent, cap);
                let r = match right {
                    Arg::Value(Val::Lit(l)) => Rhs::Lit(lit_x(l)),
                    Arg::Value(v) => Rhs::Value(self.value(v, row, parent, None)),
                    Arg::None => Rhs::None,
                    Arg::List(items) => Rhs::List(items),
                    Arg::Duration(d) => Rhs::Duration(*d),
                    Arg::Time(t) => Rhs::Time(*t),
                };
                compare(&l, *op, &r, self.as_of)
            }
        }
    }
}

/// The right side of a comparison, resolved.
enum Rhs<'a, 'b> {
    None,
    Lit(X<'b>),
    Value(X<'a>),
    List(&'b [Lit]),
    Duration(i64),
    Time(i64),
}

fn order(a: &X, b: &X) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (X::S(x), X::S(y)) => Some(x.as_ref().cmp(y.as_ref())),
        (X::N(x), X::N(y)) => x.partial_cmp(y),
        (X::B(x), X::B(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// A text value as a UTC microsecond time, exactly as the compiled plans' `try_cast` of the
/// text to `Timestamp(µs, UTC)` reads it (unparseable: none).
fn time_of(x: &X) -> Option<i64> {
    let X::S(s) = x else { return None };
    let a = arrow::array::StringArray::from(vec![s.as_ref()]);
    let t = arrow::compute::cast_with_options(
        &a,
        &DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into())),
        &arrow::compute::CastOptions {
            safe: true,
            ..Default::default()
        },
    )
    .ok()?;
    let t = t.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
    t.is_valid(0).then(|| t.value(0))
}

/// Two-valued comparison, with the semantics of the compiled filters: a missing value makes
/// every comparator false except `is_null()`; values of different types never compare.
fn compare(l: &X, op: Op, r: &Rhs, as_of: i64) -> bool {
    use std::cmp::Ordering::*;
    let by_order = |o: Option<std::cmp::Ordering>| match (o, op) {
        (None, _) => false,
        (Some(o), Op::Eq) => o == Equal,
        (Some(o), Op::Neq) => o != Equal,
        (Some(o), Op::Gt) => o == Greater,
        (Some(o), Op::Gte) => o != Less,
        (Some(o), Op::Lt) => o == Less,
        (Some(o), _) => o != Greater,
    };
    let text = |r: &Rhs| match r {
        Rhs::Lit(X::S(s)) => Some(s.to_string()),
        _ => None,
    };
    match op {
        Op::IsNull => *l == X::Missing,
        Op::IsSet => *l != X::Missing,
        Op::Eq | Op::Neq | Op::Gt | Op::Gte | Op::Lt | Op::Lte => match r {
            Rhs::Lit(X::Missing) => match op {
                Op::Eq => *l == X::Missing,
                Op::Neq => *l != X::Missing,
                _ => false,
            },
            Rhs::Lit(x) | Rhs::Value(x) => by_order(order(l, x)),
            _ => false,
        },
        Op::Contains | Op::Omits | Op::StartsWith | Op::EndsWith => {
            let (X::S(s), Some(x)) = (l, text(r)) else {
                return false;
            };
            match op {
                Op::Contains => s.contains(x.as_str()),
                Op::Omits => !s.contains(x.as_str()),
                Op::StartsWith => s.starts_with(x.as_str()),
                _ => s.ends_with(x.as_str()),
            }
        }
        Op::ContainsOne | Op::OneOf => {
            let Rhs::List(items) = r else { return false };
            items.iter().any(|i| match (op, i) {
                (Op::ContainsOne, Lit::String(x)) => {
                    matches!(l, X::S(s) if s.contains(x.as_str()))
                }
                (_, Lit::Null) => *l == X::Missing,
                (_, i) => order(l, &lit_x(i)) == Some(Equal),
            })
        }
        Op::BeforeDate | Op::AfterDate => {
            let (Some(t), Rhs::Time(d)) = (time_of(l), r) else {
                return false;
            };
            if op == Op::BeforeDate { t < *d } else { t > *d }
        }
        Op::WithinLast | Op::WithinNext | Op::BeforeLast | Op::AfterNext => {
            let (Some(t), Rhs::Duration(d)) = (time_of(l), r) else {
                return false;
            };
            match op {
                Op::WithinLast => t >= as_of - d && t <= as_of,
                Op::WithinNext => t >= as_of && t <= as_of + d,
                Op::BeforeLast => t < as_of - d,
                _ => t > as_of + d,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::program::Window;
    use arrow::array::StringArray;

    const DAY: i64 = 86_400_000_000;

    /// A two-step funnel: bit 0 = A, bit 1 = B; count of A followed by B within 7 days.
    fn funnel(cond_op: Op, k: f64) -> Program {
        Program {
            as_of: 100 * DAY,
            slots: 1,
            ordered: false,
            root: Node {
                bit: 0,
                window: None,
                cond: Some(Cond::Cmp {
                    left: Val::Agg {
                        node: Box::new(Node {
                            bit: 1,
                            window: Some(Window { lo: 0, hi: 7 * DAY }),
                            cond: Some(Cond::Cmp {
                                left: Val::Slot(0),
                                op: Op::Eq,
                                right: Arg::Value(Val::ParentSlot(0)),
                            }),
                        }),
                        reducer: Reducer::Count,
                    },
                    op: cond_op,
                    right: Arg::Value(Val::Lit(Lit::Number(k))),
                }),
            },
            reducer: Reducer::Count,
        }
    }

    fn acc(p: &Program) -> NestedEventsGroups {
        NestedEventsGroups {
            program: Arc::new(p.clone()),
            rows: Rows::default(),
            n_groups: 0,
            strings: Interner::default(),
            scratch: Scratch::default(),
        }
    }

    /// Columns (program, ts, ord, mask, s0, n0, b0) for rows `(ts, mask, product)`.
    fn input(rows: &[(i64, i64, Option<&str>)]) -> Vec<ArrayRef> {
        let n = rows.len();
        vec![
            Arc::new(StringArray::from(vec!["p"; n])),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            arrow::array::new_null_array(&DataType::Utf8, n),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(StringArray::from_iter(rows.iter().map(|r| r.2))),
            arrow::array::new_null_array(&DataType::Float64, n),
            arrow::array::new_null_array(&DataType::Boolean, n),
        ]
    }

    fn counts(out: &ArrayRef) -> Vec<Option<f64>> {
        let s = out.as_struct();
        let n = s.column(1).as_primitive::<Float64Type>();
        (0..n.len())
            .map(|i| n.is_valid(i).then(|| n.value(i)))
            .collect()
    }

    #[test]
    fn funnel_windows_are_relative_to_the_parent_and_strict() {
        // group 0: A at day 1, B same instant (does not count), B at day 8 (edge: counts)
        // group 1: A at day 1, B at day 8 + 1 µs (too late); A at day 2 with B of another product
        // group 2: two A (repeated parents), one B after both
        let rows = [
            (DAY, 1, Some("x")),
            (DAY, 2, Some("x")),
            (8 * DAY, 2, Some("x")),
            (DAY, 1, Some("x")),
            (8 * DAY + 1, 2, Some("x")),
            (2 * DAY, 1, Some("y")),
            (3 * DAY, 2, Some("z")),
            (DAY, 1, Some("x")),
            (3 * DAY, 1, Some("x")),
            (4 * DAY, 2, Some("x")),
        ];
        let groups = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2];
        let mut a = acc(&funnel(Op::Gte, 1.0));
        a.update_batch(&input(&rows), &groups, None, 3).unwrap();
        let out = a.evaluate(EmitTo::All).unwrap();
        assert_eq!(counts(&out), vec![Some(1.0), Some(0.0), Some(2.0)]);
        // abandonment: parents with no matching child
        let mut a = acc(&funnel(Op::Eq, 0.0));
        a.update_batch(&input(&rows), &groups, None, 3).unwrap();
        let out = a.evaluate(EmitTo::All).unwrap();
        assert_eq!(counts(&out), vec![Some(0.0), Some(2.0), Some(0.0)]);
    }

    #[test]
    fn emitting_the_first_groups_keeps_and_renumbers_the_rest() {
        let rows = [
            (DAY, 1, Some("x")),
            (2 * DAY, 2, Some("x")),
            (DAY, 1, Some("x")),
            (DAY, 1, Some("y")),
            (2 * DAY, 2, Some("y")),
            (3 * DAY, 1, Some("y")),
            (4 * DAY, 2, Some("y")),
        ];
        let mut a = acc(&funnel(Op::Gte, 1.0));
        a.update_batch(&input(&rows), &[0, 0, 1, 2, 2, 2, 2], None, 3)
            .unwrap();
        let first = a.evaluate(EmitTo::First(2)).unwrap();
        assert_eq!(counts(&first), vec![Some(1.0), Some(0.0)]);
        // group 2 is now group 0; an x-parent arrives for it (its x-child goes to group 1)
        a.update_batch(&input(&rows[..2]), &[0, 1], None, 2)
            .unwrap();
        let rest = a.evaluate(EmitTo::All).unwrap();
        assert_eq!(counts(&rest), vec![Some(2.0), Some(0.0)]);
    }

    #[test]
    fn state_round_trips_through_merge_and_convert_to_state() {
        let rows = [
            (DAY, 1, Some("x")),
            (2 * DAY, 2, Some("x")),
            (DAY, 1, Some("y")),
            (5 * DAY, 2, None),
        ];
        let p = funnel(Op::Gte, 1.0);
        // direct
        let mut direct = acc(&p);
        direct
            .update_batch(&input(&rows), &[0, 0, 1, 1], None, 2)
            .unwrap();
        let want = counts(&direct.evaluate(EmitTo::All).unwrap());
        assert_eq!(want, vec![Some(1.0), Some(0.0)]);
        // partial accumulators → state → merged
        let mut p1 = acc(&p);
        p1.update_batch(&input(&rows[..2]), &[0, 0], None, 1)
            .unwrap();
        let mut p2 = acc(&p);
        p2.update_batch(&input(&rows[2..]), &[0, 1], None, 2)
            .unwrap();
        let mut fin = acc(&p);
        fin.merge_batch(&p1.state(EmitTo::All).unwrap(), &[0], 2)
            .unwrap();
        fin.merge_batch(&p2.state(EmitTo::All).unwrap(), &[1, 0], 2)
            .unwrap();
        // p2's groups map crosswise: its y-A goes to group 1, its product-less B to group 0
        let got = counts(&fin.evaluate(EmitTo::All).unwrap());
        assert_eq!(got, vec![Some(1.0), Some(0.0)]);
        // convert_to_state, with a filter dropping the second row
        let filter = BooleanArray::from(vec![true, false, true, true]);
        let st = direct
            .convert_to_state(&input(&rows), Some(&filter))
            .unwrap();
        let mut fin = acc(&p);
        fin.merge_batch(&st, &[0, 0, 1, 1], 2).unwrap();
        assert_eq!(
            counts(&fin.evaluate(EmitTo::All).unwrap()),
            vec![Some(0.0), Some(0.0)]
        );
    }

    #[test]
    fn comparisons_are_two_valued_and_typed() {
        let s = |t: &str| X::S(Cow::Owned(t.to_string()));
        let lit = |l: Lit| Rhs::Lit(lit_x(&l).clone_owned());
        assert!(compare(&X::Missing, Op::IsNull, &Rhs::None, 0));
        assert!(!compare(
            &X::Missing,
            Op::Neq,
            &lit(Lit::String("a".into())),
            0
        ));
        assert!(compare(&s("a"), Op::Neq, &lit(Lit::String("b".into())), 0));
        assert!(!compare(&s("1"), Op::Eq, &lit(Lit::Number(1.0)), 0));
        assert!(compare(&X::N(2.0), Op::Gt, &lit(Lit::Number(1.5)), 0));
        assert!(!compare(&s("a"), Op::Eq, &Rhs::Value(X::Missing), 0));
        assert!(compare(
            &s("abc"),
            Op::Contains,
            &lit(Lit::String("b".into())),
            0
        ));
        assert!(!compare(
            &X::Missing,
            Op::Omits,
            &lit(Lit::String("b".into())),
            0
        ));
        let list = [Lit::Number(3.0), Lit::String("x".into())];
        assert!(compare(&X::N(3.0), Op::OneOf, &Rhs::List(&list), 0));
        assert!(!compare(&s("3"), Op::OneOf, &Rhs::List(&list), 0));
        assert_eq!(time_of(&s("not a time")), None);
        assert_eq!(time_of(&s("2026-01-01")), Some(1_767_225_600_000_000));
        let t = s("2026-01-02T00:00:00Z");
        let d = 1_767_225_600_000_000; // 2026-01-01
        assert!(compare(&t, Op::AfterDate, &Rhs::Time(d), 0));
        assert!(compare(
            &t,
            Op::WithinLast,
            &Rhs::Duration(2 * DAY),
            d + DAY
        ));
    }

    impl X<'_> {
        fn clone_owned(&self) -> X<'static> {
            match self {
                X::Missing => X::Missing,
                X::S(s) => X::S(Cow::Owned(s.to_string())),
                X::N(n) => X::N(*n),
                X::B(b) => X::B(*b),
            }
        }
    }
}
