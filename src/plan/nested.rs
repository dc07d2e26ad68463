//! Event queries with nested events (funnels, N-step sequences, abandonment) and references to
//! the parent event's properties compile to one `nested_events` aggregate per top-level query.
//!
//! Everything that depends on a single event row is still evaluated by DataFusion: each query
//! of the tree gets a static predicate (source, absolute windows, static `where` parts, and
//! whole static subtrees of a mixed `where`), packed into a bit mask; the properties the tree
//! compares or reduces travel as typed value slots. The aggregate keeps per profile only the
//! rows with a non-zero mask and evaluates the tree once per profile on the rows sorted by time
//! (see `audiences_udfs::program`).

use audiences_udfs::program as p;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{Expr, when};
use datafusion::prelude::{col, lit};

use super::compile::{Compiler, Typed, value_text};
use crate::error::{Error, Result};
use crate::lang::ast::*;

/// Whether a condition reads only the current event row (no nested events, no parent).
pub(super) fn cond_is_static(c: &Condition) -> bool {
    match c {
        Condition::And { items } | Condition::Or { items } => items.iter().all(cond_is_static),
        Condition::Not { item }
        | Condition::Any { item }
        | Condition::All { item }
        | Condition::AllNot { item } => cond_is_static(item),
        Condition::Compare { value, operand, .. } => {
            value_is_static(value)
                && match operand {
                    Some(Operand::Value { value }) => value_is_static(value),
                    _ => true,
                }
        }
        Condition::Bare { value } => value_is_static(value),
    }
}

fn value_is_static(v: &Value) -> bool {
    !matches!(
        v,
        Value::Aggregate { .. } | Value::Property { parent: true, .. }
    )
}

/// Reducers read the event's own values.
fn own_value(v: &Value) -> Result<()> {
    if value_is_static(v) {
        Ok(())
    } else {
        Err(Error::Usage(
            "a reducer reads the event's own properties, not its parent's or nested events".into(),
        ))
    }
}

/// Whether an event query needs the nested-events evaluator.
pub(super) fn query_is_nested(q: &EventQuery) -> bool {
    q.filters.iter().any(|f| match f {
        Filter::Where { condition } => !cond_is_static(condition),
        _ => false,
    })
}

/// The parts of a program under construction.
#[derive(Default)]
pub(super) struct Program {
    /// Static predicates, one per bit.
    bits: Vec<Expr>,
    /// Value slots: a key for deduplication and the typed expressions.
    slots: Vec<(String, Typed)>,
    ordered: bool,
}

impl Program {
    fn bit(&mut self, e: Expr) -> Result<u8> {
        if let Some(i) = self.bits.iter().position(|b| *b == e) {
            return Ok(i as u8);
        }
        if self.bits.len() >= 64 {
            return Err(Error::Usage(
                "too many distinct event conditions in one nested event query (at most 64)".into(),
            ));
        }
        self.bits.push(e);
        Ok((self.bits.len() - 1) as u8)
    }

    fn slot(&mut self, t: Typed) -> usize {
        let key = format!("{:?}|{:?}|{:?}", t.s, t.n, t.b);
        if let Some(i) = self.slots.iter().position(|(k, _)| *k == key) {
            return i;
        }
        self.slots.push((key, t));
        self.slots.len() - 1
    }
}

fn lit_of(l: &Literal) -> p::Lit {
    match l {
        Literal::Null => p::Lit::Null,
        Literal::Bool(b) => p::Lit::Bool(*b),
        Literal::Number(n) => p::Lit::Number(*n),
        Literal::String(s) => p::Lit::String(s.clone()),
    }
}

fn op_of(op: CmpOp) -> p::Op {
    match op {
        CmpOp::Eq => p::Op::Eq,
        CmpOp::Neq => p::Op::Neq,
        CmpOp::Gt => p::Op::Gt,
        CmpOp::Gte => p::Op::Gte,
        CmpOp::Lt => p::Op::Lt,
        CmpOp::Lte => p::Op::Lte,
        CmpOp::IsNull => p::Op::IsNull,
        CmpOp::IsSet => p::Op::IsSet,
        CmpOp::Contains => p::Op::Contains,
        CmpOp::Omits => p::Op::Omits,
        CmpOp::StartsWith => p::Op::StartsWith,
        CmpOp::EndsWith => p::Op::EndsWith,
        CmpOp::ContainsOne => p::Op::ContainsOne,
        CmpOp::OneOf => p::Op::OneOf,
        CmpOp::BeforeDate => p::Op::BeforeDate,
        CmpOp::AfterDate => p::Op::AfterDate,
        CmpOp::WithinLast => p::Op::WithinLast,
        CmpOp::WithinNext => p::Op::WithinNext,
        CmpOp::BeforeLast => p::Op::BeforeLast,
        CmpOp::AfterNext => p::Op::AfterNext,
    }
}

impl Compiler<'_> {
    /// Compile a nested event query reduced by `r` into one `nested_events` aggregate.
    pub(super) fn nested_aggregate(&mut self, q: &EventQuery, r: &Reducer) -> Result<Typed> {
        let mut prog = Program::default();
        let mut lowers = Vec::new();
        let root = self.nested_node(&mut prog, q, None, &mut lowers)?;
        let reducer = self.nested_reducer(&mut prog, r)?;
        let program = p::Program {
            as_of: self.inp.as_of,
            slots: prog.slots.len(),
            ordered: prog.ordered,
            root,
            reducer,
        };
        let json = serde_json::to_string(&program)
            .map_err(|e| Error::Usage(format!("nested event program: {e}")))?;
        let mut mask = lit(0i64);
        for (i, b) in prog.bits.iter().enumerate() {
            mask = mask + when(b.clone(), lit(1i64 << i)).otherwise(lit(0i64))?;
        }
        let mut args = vec![
            lit(json),
            col("timestamp"),
            if prog.ordered {
                col("message_id")
            } else {
                lit(ScalarValue::Utf8(None))
            },
            mask,
        ];
        for (_, t) in &prog.slots {
            args.extend([t.s.clone(), t.n.clone(), t.b.clone()]);
        }
        let udaf = datafusion::execution::FunctionRegistry::udaf(self.inp.ctx, "nested_events")?;
        let rows = prog
            .bits
            .iter()
            .cloned()
            .reduce(Expr::or)
            .unwrap_or_else(|| lit(false));
        let name = self.push_aggregate(udaf.call(args), lowers, rows);
        let field = |f: &str| datafusion::functions::core::expr_fn::get_field(col(&name), f);
        Ok(match r {
            Reducer::Count | Reducer::UniqueCount { .. } => {
                Typed::num(datafusion::functions::expr_fn::coalesce(vec![
                    field("n"),
                    lit(0f64),
                ]))
            }
            _ => Typed {
                s: field("s"),
                n: field("n"),
                b: field("b"),
            },
        })
    }

    /// One query of the tree; `parent_lo` is the parent's lower time bound (children only).
    fn nested_node(
        &mut self,
        prog: &mut Program,
        q: &EventQuery,
        parent_lo: Option<Option<i64>>,
        lowers: &mut Vec<Option<i64>>,
    ) -> Result<p::Node> {
        let child = parent_lo.is_some();
        let parts = self.event_parts(q)?;
        let window = match (parts.parent_windows.as_slice(), child) {
            ([], _) => None,
            (_, false) => {
                return Err(Error::Usage(
                    "within(parent: ...) and between(parent: ...) apply to nested events only"
                        .into(),
                ));
            }
            (ws, true) => Some(p::Window {
                lo: ws.iter().map(|w| w.0).max().unwrap_or(0),
                hi: ws.iter().map(|w| w.1).min().unwrap_or(i64::MAX),
            }),
        };
        // Lower time bound of the rows this query can select, for pruning.
        let from_parent = match (parent_lo, window) {
            (Some(Some(l)), Some(w)) => Some(l.saturating_add(w.lo)),
            _ => None,
        };
        let lo = match (parts.lo, from_parent) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        lowers.push(lo);
        let bit = prog.bit(parts.pred)?;
        let mut conds = Vec::new();
        for c in parts.dynamic {
            conds.push(self.nested_cond(prog, &c, child, lo, lowers)?);
        }
        let cond = match conds.len() {
            0 => None,
            1 => conds.pop(),
            _ => Some(p::Cond::And(conds)),
        };
        Ok(p::Node { bit, window, cond })
    }

    fn nested_cond(
        &mut self,
        prog: &mut Program,
        c: &Condition,
        child: bool,
        lo: Option<i64>,
        lowers: &mut Vec<Option<i64>>,
    ) -> Result<p::Cond> {
        if cond_is_static(c) {
            let e = self.row_condition(c)?;
            return Ok(p::Cond::Bit(prog.bit(e)?));
        }
        Ok(match c {
            Condition::And { items } => p::Cond::And(
                items
                    .iter()
                    .map(|i| self.nested_cond(prog, i, child, lo, lowers))
                    .collect::<Result<_>>()?,
            ),
            Condition::Or { items } => p::Cond::Or(
                items
                    .iter()
                    .map(|i| self.nested_cond(prog, i, child, lo, lowers))
                    .collect::<Result<_>>()?,
            ),
            Condition::Not { item } => {
                p::Cond::Not(Box::new(self.nested_cond(prog, item, child, lo, lowers)?))
            }
            Condition::Compare { value, op, operand } => {
                let left = self.nested_value(prog, value, child, lo, lowers)?;
                let right = match operand {
                    None => p::Arg::None,
                    Some(Operand::List { items }) => {
                        p::Arg::List(items.iter().map(lit_of).collect())
                    }
                    Some(Operand::Duration { duration }) => p::Arg::Duration(duration.micros()),
                    Some(Operand::Value {
                        value:
                            Value::Literal {
                                value: Literal::String(d),
                            },
                    }) if matches!(op, CmpOp::BeforeDate | CmpOp::AfterDate) => {
                        p::Arg::Time(super::compile::parse_date(*op, d)?)
                    }
                    Some(Operand::Value { value }) => {
                        p::Arg::Value(self.nested_value(prog, value, child, lo, lowers)?)
                    }
                };
                p::Cond::Cmp {
                    left,
                    op: op_of(*op),
                    right,
                }
            }
            Condition::Bare { value } => p::Cond::Cmp {
                left: self.nested_value(prog, value, child, lo, lowers)?,
                op: p::Op::Eq,
                right: p::Arg::Value(p::Val::Lit(p::Lit::Bool(true))),
            },
            Condition::Any { .. } | Condition::All { .. } | Condition::AllNot { .. } => {
                return Err(Error::Usage(
                    "ANY/ALL are account-level junctions; they cannot appear inside where".into(),
                ));
            }
        })
    }

    fn nested_value(
        &mut self,
        prog: &mut Program,
        v: &Value,
        child: bool,
        lo: Option<i64>,
        lowers: &mut Vec<Option<i64>>,
    ) -> Result<p::Val> {
        Ok(match v {
            Value::Literal { value } => p::Val::Lit(lit_of(value)),
            Value::Property { path, parent: true } => {
                if !child {
                    return Err(Error::Usage(format!(
                        "property(parent: '{path}') is only meaningful inside a nested event"
                    )));
                }
                let t = self.row_value(&Value::Property {
                    path: path.clone(),
                    parent: false,
                })?;
                p::Val::ParentSlot(prog.slot(t))
            }
            Value::Aggregate { events, reducer } => {
                let node = self.nested_node(prog, events, Some(lo), lowers)?;
                let reducer = self.nested_reducer(prog, reducer)?;
                p::Val::Agg {
                    node: Box::new(node),
                    reducer,
                }
            }
            other => {
                let t = self.row_value(other)?;
                p::Val::Slot(prog.slot(t))
            }
        })
    }

    fn nested_reducer(&mut self, prog: &mut Program, r: &Reducer) -> Result<p::Reducer> {
        Ok(match r {
            Reducer::Count => p::Reducer::Count,
            Reducer::Sum { value } => p::Reducer::Sum(self.typed_slot(prog, value)?),
            Reducer::Avg { value } => p::Reducer::Avg(self.typed_slot(prog, value)?),
            Reducer::Min { value } => p::Reducer::Min(self.typed_slot(prog, value)?),
            Reducer::Max { value } => p::Reducer::Max(self.typed_slot(prog, value)?),
            Reducer::First { value } => {
                prog.ordered = true;
                p::Reducer::First(self.typed_slot(prog, value)?)
            }
            Reducer::Last { value } => {
                prog.ordered = true;
                p::Reducer::Last(self.typed_slot(prog, value)?)
            }
            Reducer::Mode { value, min_count } => p::Reducer::Mode {
                slot: self.text_slot(prog, value)?,
                min_count: *min_count,
            },
            Reducer::Unique { value } => p::Reducer::Unique(self.text_slot(prog, value)?),
            Reducer::UniqueCount { value } => p::Reducer::UniqueCount(self.text_slot(prog, value)?),
        })
    }

    fn typed_slot(&mut self, prog: &mut Program, v: &Value) -> Result<usize> {
        own_value(v)?;
        let t = self.row_value(v)?;
        Ok(prog.slot(t))
    }

    fn text_slot(&mut self, prog: &mut Program, v: &Value) -> Result<usize> {
        own_value(v)?;
        let t = self.row_value(v)?;
        Ok(prog.slot(Typed {
            s: value_text(&t),
            ..Typed::nulls()
        }))
    }
}
