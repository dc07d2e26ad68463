//! The compiler.

use std::collections::BTreeMap;

use std::ops::Not;

use arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::{JoinType, ScalarValue};
use datafusion::dataframe::DataFrame;
use datafusion::functions_aggregate::expr_fn::{count, first_value, max, min};
use datafusion::logical_expr::expr::Like;
use datafusion::logical_expr::{Expr, ExprFunctionExt, SortExpr, cast, try_cast};
use datafusion::prelude::{SessionContext, col, ident, lit};

use crate::error::{Error, Result};
use crate::events::schema::{LeafKind, dynamic_column};
use crate::lang::ast::*;
use crate::lang::definition::{Body, DefinitionFile, Level};

/// What a compilation needs besides the definition.
pub struct Inputs<'a> {
    /// Session with `events`, `profiles`, `traits` registered, plus one table
    /// `__members_<key>` per referenced audience and `__computed_traits` for computed traits.
    pub ctx: &'a SessionContext,
    /// Evaluation time (UTC microseconds).
    pub as_of: i64,
    /// When the definition was created (for `historical_backfill: false`).
    pub created_at: i64,
    /// Keys of computed traits of this space (a `trait('k')` reads their values).
    pub computed_traits: &'a std::collections::BTreeSet<String>,
    /// Keys of account-level definitions of this space.
    pub account_keys: &'a std::collections::BTreeSet<String>,
}

/// A compiled definition.
pub struct Compiled {
    /// The plan. Profile level: `(profile_idx, profile_id)` for audiences, plus the typed
    /// `value_str`, `value_num`, `value_bool` for computed traits. Account level: `account_id`
    /// instead of the two profile columns.
    pub frame: DataFrame,
    /// The level.
    pub level: Level,
    /// The value column holds JSON text (a `unique(..)` list) rather than a string.
    pub json_value: bool,
}

fn ts_lit(micros: i64) -> Expr {
    lit(ScalarValue::TimestampMicrosecond(
        Some(micros),
        Some("UTC".into()),
    ))
}

fn null_of(t: DataType) -> Expr {
    lit(ScalarValue::try_from(&t).unwrap_or(ScalarValue::Null))
}

/// A value in its three typed forms (null where the value is not of that type).
#[derive(Clone)]
pub(super) struct Typed {
    pub(super) s: Expr,
    pub(super) n: Expr,
    pub(super) b: Expr,
}

impl Typed {
    pub(super) fn nulls() -> Typed {
        Typed {
            s: null_of(DataType::Utf8),
            n: null_of(DataType::Float64),
            b: null_of(DataType::Boolean),
        }
    }
    pub(super) fn num(e: Expr) -> Typed {
        Typed {
            n: cast(e, DataType::Float64),
            ..Typed::nulls()
        }
    }
}

fn escape_like(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn like(e: Expr, pattern: String) -> Expr {
    Expr::Like(Like::new(
        false,
        Box::new(e),
        Box::new(lit(pattern)),
        Some('\\'),
        false,
    ))
}

fn false_if_null(e: Expr) -> Expr {
    datafusion::functions::expr_fn::coalesce(vec![e, lit(false)])
}

/// Compile a comparison of typed value `v` (two-valued: never null).
fn compare(
    v: &Typed,
    op: CmpOp,
    operand: Option<&Operand>,
    rhs: Option<&Typed>,
    as_of: i64,
) -> Result<Expr> {
    let bad = |what: &str| Error::Usage(format!("{} needs {what}", op.method()));
    let e = match op {
        CmpOp::IsNull => {
            v.s.clone()
                .is_null()
                .and(v.n.clone().is_null())
                .and(v.b.clone().is_null())
        }
        CmpOp::IsSet => {
            v.s.clone()
                .is_not_null()
                .or(v.n.clone().is_not_null())
                .or(v.b.clone().is_not_null())
        }
        CmpOp::Eq | CmpOp::Neq | CmpOp::Gt | CmpOp::Gte | CmpOp::Lt | CmpOp::Lte => {
            let cmp = |a: Expr, b: Expr| match op {
                CmpOp::Eq => a.eq(b),
                CmpOp::Neq => a.not_eq(b),
                CmpOp::Gt => a.gt(b),
                CmpOp::Gte => a.gt_eq(b),
                CmpOp::Lt => a.lt(b),
                _ => a.lt_eq(b),
            };
            match operand {
                Some(Operand::Value {
                    value: Value::Literal { value: l },
                }) => match l {
                    Literal::String(x) => cmp(v.s.clone(), lit(x.clone())),
                    Literal::Number(x) => cmp(v.n.clone(), lit(*x)),
                    Literal::Bool(x) => cmp(v.b.clone(), lit(*x)),
                    Literal::Null => match op {
                        CmpOp::Eq => return compare(v, CmpOp::IsNull, None, None, as_of),
                        CmpOp::Neq => return compare(v, CmpOp::IsSet, None, None, as_of),
                        _ => lit(false),
                    },
                },
                Some(Operand::Value { .. }) => {
                    let r = rhs.ok_or_else(|| bad("a value"))?;
                    false_if_null(cmp(v.s.clone(), r.s.clone()))
                        .or(false_if_null(cmp(v.n.clone(), r.n.clone())))
                        .or(false_if_null(cmp(v.b.clone(), r.b.clone())))
                }
                _ => return Err(bad("a value")),
            }
        }
        CmpOp::Contains | CmpOp::Omits | CmpOp::StartsWith | CmpOp::EndsWith => {
            let Some(Operand::Value {
                value:
                    Value::Literal {
                        value: Literal::String(x),
                    },
            }) = operand
            else {
                return Err(bad("a string"));
            };
            let x = escape_like(x);
            match op {
                CmpOp::Contains => like(v.s.clone(), format!("%{x}%")),
                CmpOp::Omits => {
                    v.s.clone()
                        .is_not_null()
                        .and(like(v.s.clone(), format!("%{x}%")).not())
                }
                CmpOp::StartsWith => like(v.s.clone(), format!("{x}%")),
                _ => like(v.s.clone(), format!("%{x}")),
            }
        }
        CmpOp::ContainsOne | CmpOp::OneOf => {
            let Some(Operand::List { items }) = operand else {
                return Err(bad("a list"));
            };
            let mut any = lit(false);
            for it in items {
                let one = match (op, it) {
                    (CmpOp::ContainsOne, Literal::String(x)) => {
                        like(v.s.clone(), format!("%{}%", escape_like(x)))
                    }
                    (_, Literal::String(x)) => v.s.clone().eq(lit(x.clone())),
                    (_, Literal::Number(x)) => v.n.clone().eq(lit(*x)),
                    (_, Literal::Bool(x)) => v.b.clone().eq(lit(*x)),
                    (_, Literal::Null) => compare(v, CmpOp::IsNull, None, None, as_of)?,
                };
                any = any.or(false_if_null(one));
            }
            any
        }
        CmpOp::BeforeDate | CmpOp::AfterDate => {
            let Some(Operand::Value {
                value:
                    Value::Literal {
                        value: Literal::String(d),
                    },
            }) = operand
            else {
                return Err(bad("a date string"));
            };
            let t = parse_date(op, d)?;
            let vt = as_time(v);
            if op == CmpOp::BeforeDate {
                vt.lt(ts_lit(t))
            } else {
                vt.gt(ts_lit(t))
            }
        }
        CmpOp::WithinLast | CmpOp::WithinNext | CmpOp::BeforeLast | CmpOp::AfterNext => {
            let Some(Operand::Duration { duration }) = operand else {
                return Err(bad("a duration"));
            };
            let d = duration.micros();
            let vt = as_time(v);
            match op {
                CmpOp::WithinLast => vt
                    .clone()
                    .gt_eq(ts_lit(as_of - d))
                    .and(vt.lt_eq(ts_lit(as_of))),
                CmpOp::WithinNext => vt
                    .clone()
                    .gt_eq(ts_lit(as_of))
                    .and(vt.lt_eq(ts_lit(as_of + d))),
                CmpOp::BeforeLast => vt.lt(ts_lit(as_of - d)),
                _ => vt.gt(ts_lit(as_of + d)),
            }
        }
    };
    Ok(false_if_null(e))
}

/// The operand of `before_date` / `after_date`: a date or an RFC 3339 time.
pub(super) fn parse_date(op: CmpOp, d: &str) -> Result<i64> {
    crate::events::message::parse_timestamp(d)
        .or_else(|| crate::events::message::parse_timestamp(&format!("{d}T00:00:00Z")))
        .ok_or_else(|| {
            Error::Usage(format!(
                "{}('{d}'): not a date (YYYY-MM-DD or RFC 3339)",
                op.method()
            ))
        })
}

fn as_time(v: &Typed) -> Expr {
    try_cast(
        v.s.clone(),
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
    )
}

/// The row predicate of an event query, split.
pub(super) struct Parts {
    /// Source, absolute windows, backfill and the static `where` conditions.
    pub(super) pred: Expr,
    /// Lower time bound (None: unbounded).
    pub(super) lo: Option<i64>,
    /// `where` conditions that need the nested-events evaluator.
    pub(super) dynamic: Vec<Condition>,
    /// Windows relative to the parent event, as `(lo, hi)` microseconds.
    pub(super) parent_windows: Vec<(i64, i64)>,
}

/// Compiles one definition; accumulates the aggregates and joins it needs.
pub(super) struct Compiler<'a> {
    pub(super) inp: &'a Inputs<'a>,
    /// Whose values are computed: profiles or accounts (events of all linked profiles).
    level: Level,
    schema_cols: std::collections::HashSet<String>,
    /// Aggregate expressions over events, by alias.
    aggs: Vec<Expr>,
    /// Lower time bound of every aggregate (None = unbounded), for pruning.
    lower_bounds: Vec<Option<i64>>,
    /// The row predicate of every aggregate: their disjunction filters the events before the
    /// join and the aggregation (each aggregate still applies its own as a FILTER).
    agg_rows: Vec<Expr>,
    /// Trait keys joined, by key → alias prefix.
    traits: BTreeMap<String, String>,
    /// Audience keys joined, by key → alias.
    audiences: BTreeMap<String, String>,
    /// Traits read inside `where` (joined to the events), by key → alias prefix.
    row_traits: BTreeMap<String, String>,
    /// Mode sub-plans: alias → (event predicate, value column).
    modes: Vec<(String, Expr, Expr, u64)>,
    backfill_from: Option<i64>,
}

impl<'a> Compiler<'a> {
    /// The column that identifies whose value is computed.
    pub(super) fn key(&self) -> &'static str {
        match self.level {
            Level::Users => "profile_idx",
            Level::Accounts => "account_id",
        }
    }

    fn prop(&self, prefix: &str, path: &str) -> Typed {
        let c = |k: LeafKind, t: DataType| {
            let name = dynamic_column(prefix, path, k);
            if self.schema_cols.contains(&name) {
                ident(name)
            } else {
                null_of(t)
            }
        };
        Typed {
            s: c(LeafKind::Str, DataType::Utf8),
            n: c(LeafKind::Num, DataType::Float64),
            b: c(LeafKind::Bool, DataType::Boolean),
        }
    }

    /// A value usable at the profile level.
    fn profile_value(&mut self, v: &Value) -> Result<Typed> {
        match v {
            Value::Literal { value } => Ok(literal_typed(value)),
            Value::Trait { key } => {
                let n = self.traits.len();
                let alias = self.traits.entry(key.clone()).or_insert_with(|| format!("__t{n}")).clone();
                Ok(Typed { s: col(format!("{alias}_s")), n: col(format!("{alias}_n")), b: col(format!("{alias}_b")) })
            }
            Value::Audience { key } => {
                let n = self.audiences.len();
                let alias = self.audiences.entry(key.clone()).or_insert_with(|| format!("__a{n}")).clone();
                Ok(Typed { b: datafusion::functions::expr_fn::coalesce(vec![col(alias), lit(false)]), ..Typed::nulls() })
            }
            Value::Aggregate { events, reducer } => self.aggregate(events, reducer),
            Value::Property { .. } | Value::Context { .. } => Err(Error::Usage(
                "property()/context() refer to an event: use them inside event(...).where(...) or a reducer".into(),
            )),
        }
    }

    /// A value of the current event row (inside `where` and reducers).
    pub(super) fn row_value(&mut self, v: &Value) -> Result<Typed> {
        match v {
            Value::Literal { value } => Ok(literal_typed(value)),
            Value::Property {
                path,
                parent: false,
            } => Ok(self.prop("properties", path)),
            Value::Context { path } => Ok(self.prop("context", path)),
            Value::Trait { key } => {
                let n = self.row_traits.len();
                let alias = self
                    .row_traits
                    .entry(key.clone())
                    .or_insert_with(|| format!("__rt{n}"))
                    .clone();
                Ok(Typed {
                    s: col(format!("{alias}_s")),
                    n: col(format!("{alias}_n")),
                    b: col(format!("{alias}_b")),
                })
            }
            Value::Property { parent: true, path } => Err(Error::Usage(format!(
                "property(parent: '{path}') is only meaningful inside a nested event"
            ))),
            Value::Aggregate { .. } => Err(Error::Usage(
                "an event query inside where must be compared (for example `.count() >= 1`)".into(),
            )),
            Value::Audience { key } => Err(Error::Usage(format!(
                "audience('{key}') is a profile-level condition; it cannot appear inside where"
            ))),
        }
    }

    pub(super) fn row_condition(&mut self, c: &Condition) -> Result<Expr> {
        Ok(match c {
            Condition::And { items } => {
                let mut e = lit(true);
                for i in items {
                    e = e.and(self.row_condition(i)?);
                }
                e
            }
            Condition::Or { items } => {
                let mut e = lit(false);
                for i in items {
                    e = e.or(self.row_condition(i)?);
                }
                e
            }
            Condition::Not { item } => self.row_condition(item)?.not(),
            Condition::Compare { value, op, operand } => {
                let v = self.row_value(value)?;
                let rhs = match operand {
                    Some(Operand::Value { value }) => Some(self.row_value(value)?),
                    _ => None,
                };
                compare(&v, *op, operand.as_ref(), rhs.as_ref(), self.inp.as_of)?
            }
            Condition::Bare { value } => false_if_null(self.row_value(value)?.b.eq(lit(true))),
            Condition::Any { .. } | Condition::All { .. } | Condition::AllNot { .. } => {
                return Err(Error::Usage(
                    "ANY/ALL are account-level junctions; they cannot appear inside where".into(),
                ));
            }
        })
    }

    /// The row predicate of an event query (source, windows, where), and its lower time bound.
    fn event_predicate(&mut self, q: &EventQuery) -> Result<(Expr, Option<i64>)> {
        let parts = self.event_parts(q)?;
        if !parts.parent_windows.is_empty() {
            return Err(Error::Usage(
                "within(parent: ...) and between(parent: ...) apply to nested events only".into(),
            ));
        }
        if !parts.dynamic.is_empty() {
            return Err(Error::Usage(
                "internal: nested condition on the plain path".into(),
            ));
        }
        Ok((parts.pred, parts.lo))
    }

    /// The parts of an event query's row predicate.
    pub(super) fn event_parts(&mut self, q: &EventQuery) -> Result<Parts> {
        let mut dynamic = Vec::new();
        let mut parent_windows = Vec::new();
        let as_of = self.inp.as_of;
        let mut pred = match &q.source {
            EventSource::Track { name } => col("type")
                .eq(lit("track"))
                .and(col("event").eq(lit(name.clone()))),
            EventSource::Page { name } => {
                let p = col("type").eq(lit("page"));
                match name {
                    Some(n) => p.and(col("name").eq(lit(n.clone()))),
                    None => p,
                }
            }
            EventSource::Screen { name } => {
                let p = col("type").eq(lit("screen"));
                match name {
                    Some(n) => p.and(col("name").eq(lit(n.clone()))),
                    None => p,
                }
            }
        };
        let mut lo: Option<i64> = None;
        let mut hi = as_of;
        for f in &q.filters {
            match f {
                Filter::Where { condition } if super::nested::cond_is_static(condition) => {
                    pred = pred.and(self.row_condition(condition)?)
                }
                Filter::Where { condition } => dynamic.push((**condition).clone()),
                Filter::Within { duration } => {
                    let l = as_of - duration.micros();
                    lo = Some(lo.map_or(l, |x| x.max(l)));
                }
                Filter::Between { from, to } => {
                    let l = as_of - to.micros();
                    lo = Some(lo.map_or(l, |x| x.max(l)));
                    hi = hi.min(as_of - from.micros());
                }
                Filter::WithinParent { duration } => parent_windows.push((0, duration.micros())),
                Filter::BetweenParent { from, to } => {
                    parent_windows.push((from.micros(), to.micros()))
                }
            }
        }
        if let Some(l) = lo {
            pred = pred.and(col("timestamp").gt_eq(ts_lit(l)));
        }
        pred = pred.and(col("timestamp").lt_eq(ts_lit(hi)));
        if let Some(from) = self.backfill_from {
            pred = pred.and(col("received_at").gt_eq(ts_lit(from)));
        }
        Ok(Parts {
            pred,
            lo,
            dynamic,
            parent_windows,
        })
    }

    /// Add an aggregate over events (with the lower time bounds of the rows it reads and
    /// the predicate of those rows); returns its column name.
    pub(super) fn push_aggregate(
        &mut self,
        e: Expr,
        lowers: Vec<Option<i64>>,
        rows: Expr,
    ) -> String {
        let name = format!("__f{}", self.aggs.len());
        self.aggs.push(e.alias(name.clone()));
        self.lower_bounds.extend(lowers);
        if !self.agg_rows.contains(&rows) {
            self.agg_rows.push(rows);
        }
        name
    }

    fn aggregate(&mut self, q: &EventQuery, r: &Reducer) -> Result<Typed> {
        if super::nested::query_is_nested(q) {
            return self.nested_aggregate(q, r);
        }
        let (pred, lo) = self.event_predicate(q)?;
        let n = self.aggs.len();
        let alias = format!("__f{n}");
        let ts_order = || {
            vec![
                SortExpr::new(col("timestamp"), true, false),
                SortExpr::new(col("message_id"), true, false),
            ]
        };
        let row_pred = pred.clone();
        let push = |c: &mut Compiler, e: Expr, suffix: &str| -> Result<Expr> {
            let name = format!("{alias}{suffix}");
            c.aggs.push(e.alias(name.clone()));
            c.lower_bounds.push(lo);
            if !c.agg_rows.contains(&row_pred) {
                c.agg_rows.push(row_pred.clone());
            }
            Ok(col(name))
        };
        let arg = |c: &mut Compiler, v: &Value| c.row_value(v);
        Ok(match r {
            Reducer::Count => {
                let e = count(lit(1)).filter(pred).build()?;
                let c = push(self, e, "")?;
                Typed::num(datafusion::functions::expr_fn::coalesce(vec![c, lit(0i64)]))
            }
            // Sums and averages are the same whatever the order of the rows (a refresh reads
            // them in another order than a full compute): an exact sum, divided by the count.
            Reducer::Avg { value } => {
                let v = arg(self, value)?.n;
                let s = audiences_udfs::exact_sum::exact_sum(v.clone());
                let s = push(self, s.filter(pred.clone()).build()?, "_sum")?;
                let n = push(self, count(v).filter(pred).build()?, "_count")?;
                Typed::num(s / cast(n, DataType::Float64))
            }
            Reducer::Sum { value } | Reducer::Min { value } | Reducer::Max { value } => {
                let v = arg(self, value)?.n;
                let f = match r {
                    Reducer::Sum { .. } => audiences_udfs::exact_sum::exact_sum(v),
                    Reducer::Min { .. } => min(v),
                    _ => max(v),
                };
                Typed::num(push(self, f.filter(pred).build()?, "")?)
            }
            Reducer::First { value } | Reducer::Last { value } => {
                let v = arg(self, value)?;
                let mut out = Typed::nulls();
                for (suffix, e) in [
                    ("_s", v.s.clone()),
                    ("_n", v.n.clone()),
                    ("_b", v.b.clone()),
                ] {
                    if matches!(e, Expr::Literal(..)) {
                        continue;
                    }
                    // Through the builder: `first_value(e, order)` followed by `.filter()`
                    // would rebuild the call without its ORDER BY.
                    let f = if matches!(r, Reducer::First { .. }) {
                        datafusion::functions_aggregate::first_last::first_value_udaf()
                    } else {
                        datafusion::functions_aggregate::first_last::last_value_udaf()
                    };
                    let agg = f
                        .call(vec![e.clone()])
                        .order_by(ts_order())
                        .filter(pred.clone().and(e.is_not_null()))
                        .build()?;
                    let c = push(self, agg, suffix)?;
                    match suffix {
                        "_s" => out.s = c,
                        "_n" => out.n = c,
                        _ => out.b = c,
                    }
                }
                out
            }
            Reducer::UniqueCount { value } => {
                let v = arg(self, value)?;
                let text = value_text(&v);
                // Through the builder: `count_distinct(x).filter(..)` would drop DISTINCT.
                let agg = count(text).distinct().filter(pred).build()?;
                let c = push(self, agg, "")?;
                Typed::num(datafusion::functions::expr_fn::coalesce(vec![c, lit(0i64)]))
            }
            Reducer::Unique { value } => {
                let v = arg(self, value)?;
                let text = value_text(&v);
                let agg = datafusion::functions_aggregate::expr_fn::array_agg(text.clone())
                    .distinct()
                    .filter(pred.and(text.is_not_null()))
                    .build()?;
                let c = push(self, agg, "")?;
                let sorted = datafusion::functions_nested::expr_fn::array_sort(
                    c,
                    lit("ASC"),
                    lit("NULLS LAST"),
                );
                // The list as JSON array text: the trait's value is that array, and string
                // comparators see the text.
                let json =
                    datafusion::execution::FunctionRegistry::udf(self.inp.ctx, "json_array")?;
                Typed {
                    s: json.call(vec![sorted]),
                    ..Typed::nulls()
                }
            }
            Reducer::Mode { value, min_count } => {
                let v = arg(self, value)?;
                let text = value_text(&v);
                let name = format!("__m{}", self.modes.len());
                self.modes.push((name.clone(), pred, text, *min_count));
                self.lower_bounds.push(lo);
                Typed {
                    s: col(name),
                    ..Typed::nulls()
                }
            }
        })
    }
}

fn literal_typed(l: &Literal) -> Typed {
    match l {
        Literal::String(s) => Typed {
            s: lit(s.clone()),
            ..Typed::nulls()
        },
        Literal::Number(n) => Typed {
            n: lit(*n),
            ..Typed::nulls()
        },
        Literal::Bool(b) => Typed {
            b: lit(*b),
            ..Typed::nulls()
        },
        Literal::Null => Typed::nulls(),
    }
}

/// The text form of a typed value (string as is, numbers and booleans printed).
pub(super) fn value_text(v: &Typed) -> Expr {
    datafusion::functions::expr_fn::coalesce(vec![
        v.s.clone(),
        cast(v.n.clone(), DataType::Utf8),
        cast(v.b.clone(), DataType::Utf8),
    ])
}

pub(super) fn profile_condition(c: &mut Compiler, cond: &Condition) -> Result<Expr> {
    Ok(match cond {
        Condition::And { items } => {
            let mut e = lit(true);
            for i in items {
                e = e.and(profile_condition(c, i)?);
            }
            e
        }
        Condition::Or { items } => {
            let mut e = lit(false);
            for i in items {
                e = e.or(profile_condition(c, i)?);
            }
            e
        }
        Condition::Not { item } => profile_condition(c, item)?.not(),
        Condition::Compare { value, op, operand } => {
            let v = c.profile_value(value)?;
            let rhs = match operand {
                Some(Operand::Value { value }) => Some(c.profile_value(value)?),
                _ => None,
            };
            compare(&v, *op, operand.as_ref(), rhs.as_ref(), c.inp.as_of)?
        }
        Condition::Bare { value } => false_if_null(c.profile_value(value)?.b.eq(lit(true))),
        Condition::Any { .. } | Condition::All { .. } | Condition::AllNot { .. } => {
            return Err(Error::Usage(
                "ANY/ALL/ALL NOT are account-level junctions: use them in a definition with \"level\": \"accounts\"".into(),
            ));
        }
    })
}

/// Build the per-profile frame: universe ⟕ aggregates ⟕ modes ⟕ traits ⟕ audiences.
pub(super) async fn assemble(c: &Compiler<'_>, include_anonymous: bool) -> Result<DataFrame> {
    assemble_with(c, include_anonymous, false).await
}

/// The filter of the rows the aggregates read (`scan` already applied), as the conjuncts
/// common to every aggregate's row predicate and the disjunction of what is left of each;
/// with every conjunct the rows then satisfy (those common ones and the scan's).
fn rows_filter(scan: &[Expr], agg_rows: &[Expr]) -> (Expr, Vec<Expr>) {
    use datafusion::logical_expr::utils::{conjunction, disjunction, split_conjunction};
    let split: Vec<Vec<&Expr>> = agg_rows.iter().map(|p| split_conjunction(p)).collect();
    let mut common: Vec<Expr> = Vec::new();
    if let Some((first, rest)) = split.split_first() {
        for c in first {
            if rest.iter().all(|r| r.contains(c)) && !common.contains(*c) {
                common.push((*c).clone());
            }
        }
    }
    // a predicate left with nothing of its own admits every row the common part admits
    let residuals: Option<Vec<Expr>> = split
        .iter()
        .map(|p| {
            conjunction(
                p.iter()
                    .filter(|c| !common.contains(**c))
                    .map(|c| (*c).clone()),
            )
        })
        .collect();
    let mut filter = common.clone();
    if let Some(any) = residuals.and_then(disjunction) {
        filter.extend(crate::tables::kind_in_lists(&any));
        filter.push(any);
    }
    let rows = conjunction(filter).unwrap_or_else(|| lit(true));
    let mut implied = common;
    for f in scan {
        implied.extend(split_conjunction(f).into_iter().cloned());
    }
    (rows, implied)
}

/// `agg` (an aliased aggregate) without the conjuncts of its FILTER that are `implied` (hold
/// for every row it sees); no FILTER when none is left.
fn without_implied(agg: Expr, implied: &[Expr]) -> Expr {
    use datafusion::logical_expr::utils::{conjunction, split_conjunction};
    match agg {
        Expr::Alias(a) => {
            let inner = without_implied(*a.expr, implied);
            inner.alias_qualified(a.relation, a.name)
        }
        Expr::AggregateFunction(mut f) => {
            f.params.filter = f.params.filter.take().and_then(|e| {
                conjunction(
                    split_conjunction(&e)
                        .into_iter()
                        .filter(|c| !implied.contains(*c))
                        .cloned(),
                )
                .map(Box::new)
            });
            Expr::AggregateFunction(f)
        }
        other => other,
    }
}

/// [`assemble`]; with `only_with_events`, keep only the profiles (accounts) the event
/// aggregates (or, without those, the most-frequent-value plans) have rows for: for a value
/// that is missing without events, the other profiles could not have one anyway.
async fn assemble_with(
    c: &Compiler<'_>,
    include_anonymous: bool,
    only_with_events: bool,
) -> Result<DataFrame> {
    let ctx = c.inp.ctx;
    let key = c.key();
    let mut frame = match c.level {
        Level::Users => {
            let f = ctx.table("profiles").await?.select(vec![
                col("profile_idx"),
                col("profile_id"),
                col("known"),
            ])?;
            if include_anonymous {
                f
            } else {
                f.filter(col("known"))?
            }
        }
        Level::Accounts => super::account::accounts(ctx).await?,
    };
    let events_lo = if c.lower_bounds.iter().all(Option::is_some) {
        c.lower_bounds.iter().flatten().min().copied()
    } else {
        None
    };
    // What every scanned row satisfies.
    let mut scan_filters = vec![
        col("profile_idx")
            .is_not_null()
            .and(col("timestamp").lt_eq(ts_lit(c.inp.as_of))),
    ];
    if let Some(lo) = events_lo {
        scan_filters.push(col("timestamp").gt_eq(ts_lit(lo)));
    }
    let scan = || async {
        let mut ev = ctx.table("events_indexed").await?;
        for f in &scan_filters {
            ev = ev.filter(f.clone())?;
        }
        if c.level == Level::Accounts {
            let links = super::account::links(ctx)
                .await?
                .select(vec![col("account_id"), col("profile_idx").alias("__lp")])?;
            ev = ev
                .join(links, JoinType::Inner, &["profile_idx"], &["__lp"], None)?
                .drop_columns(&["__lp"])?;
        }
        for (tkey, alias) in &c.row_traits {
            let t = trait_frame(c, tkey, alias).await?;
            let p = format!("{alias}_p");
            ev = ev
                .join(t, JoinType::Left, &[key], &[p.as_str()], None)?
                .drop_columns(&[p.as_str()])?;
        }
        Ok::<_, Error>(ev)
    };
    if !c.aggs.is_empty() {
        let (rows, implied) = rows_filter(&scan_filters, &c.agg_rows);
        // Each aggregate's FILTER keeps only what the rows it sees do not already satisfy
        // (a window's timestamp bound decided by pruning then reads no timestamp column).
        let aggs = c
            .aggs
            .iter()
            .map(|a| without_implied(a.clone(), &implied))
            .collect();
        let agg = scan()
            .await?
            .filter(rows)?
            .aggregate(vec![col(key).alias("__p")], aggs)?;
        let how = if only_with_events {
            JoinType::Inner
        } else {
            JoinType::Left
        };
        frame = frame
            .join(agg, how, &[key], &["__p"], None)?
            .drop_columns(&["__p"])?;
    }
    for (name, pred, text, min_count) in &c.modes {
        // value counts per profile, then the most frequent (ties: alphabetically first)
        let counts = scan()
            .await?
            .filter(pred.clone().and(text.clone().is_not_null()))?
            .aggregate(
                vec![col(key).alias("__mp"), text.clone().alias("__mv")],
                vec![count(lit(1)).alias("__mc")],
            )?
            .filter(col("__mc").gt_eq(lit(*min_count as i64)))?;
        let best = counts.aggregate(
            vec![col("__mp")],
            vec![
                first_value(
                    col("__mv"),
                    vec![
                        SortExpr::new(col("__mc"), false, false),
                        SortExpr::new(col("__mv"), true, false),
                    ],
                )
                .alias(name.clone()),
            ],
        )?;
        frame = frame
            .join(
                best,
                if only_with_events && c.aggs.is_empty() {
                    JoinType::Inner
                } else {
                    JoinType::Left
                },
                &[key],
                &["__mp"],
                None,
            )?
            .drop_columns(&["__mp"])?;
    }
    for (tkey, alias) in &c.traits {
        let t = trait_frame(c, tkey, alias).await?;
        let p = format!("{alias}_p");
        frame = frame
            .join(t, JoinType::Left, &[key], &[p.as_str()], None)?
            .drop_columns(&[p.as_str()])?;
    }
    for (akey, alias) in &c.audiences {
        let m = ctx
            .table(
                ident(format!("__members_{akey}"))
                    .to_string()
                    .trim_matches('"'),
            )
            .await?
            .select(vec![
                col(key).alias(format!("{alias}_p")),
                lit(true).alias(alias.clone()),
            ])?;
        let p = format!("{alias}_p");
        frame = frame
            .join(m, JoinType::Left, &[key], &[p.as_str()], None)?
            .drop_columns(&[p.as_str()])?;
    }
    Ok(frame)
}

/// The values of trait `key` per profile (or account), as `{alias}_p` (the key column) and
/// typed columns.
pub(super) async fn trait_frame(c: &Compiler<'_>, key: &str, alias: &str) -> Result<DataFrame> {
    let ctx = c.inp.ctx;
    let kc = c.key();
    let t = if c.inp.computed_traits.contains(key) {
        ctx.table("__computed_traits").await?.filter(
            col("key")
                .eq(lit(key.to_string()))
                .and(col(kc).is_not_null()),
        )?
    } else {
        let entity = match c.level {
            Level::Users => "profile",
            Level::Accounts => "account",
        };
        ctx.table("traits").await?.filter(
            col("entity")
                .eq(lit(entity))
                .and(col("key").eq(lit(key.to_string()))),
        )?
    };
    Ok(t.select(vec![
        col(kc).alias(format!("{alias}_p")),
        col("value_str").alias(format!("{alias}_s")),
        col("value_num").alias(format!("{alias}_n")),
        col("value_bool").alias(format!("{alias}_b")),
    ])?)
}

async fn compiler<'a>(
    inp: &'a Inputs<'a>,
    def: &DefinitionFile,
    level: Level,
) -> Result<Compiler<'a>> {
    new_compiler(
        inp,
        (!def.historical_backfill).then_some(inp.created_at),
        level,
    )
    .await
}

impl<'a> Compiler<'a> {
    /// A fresh compiler over the same inputs (for the profile-level part of an account
    /// definition).
    pub(super) async fn sub_compiler(&self, level: Level) -> Result<Compiler<'a>> {
        new_compiler(self.inp, self.backfill_from, level).await
    }
}

async fn new_compiler<'a>(
    inp: &'a Inputs<'a>,
    backfill_from: Option<i64>,
    level: Level,
) -> Result<Compiler<'a>> {
    let schema = inp.ctx.table("events_indexed").await?.schema().clone();
    Ok(Compiler {
        inp,
        level,
        schema_cols: schema.fields().iter().map(|f| f.name().clone()).collect(),
        aggs: Vec::new(),
        lower_bounds: Vec::new(),
        agg_rows: Vec::new(),
        traits: BTreeMap::new(),
        audiences: BTreeMap::new(),
        row_traits: BTreeMap::new(),
        modes: Vec::new(),
        backfill_from,
    })
}

/// Compile an audience into a plan of its members `(profile_idx, profile_id)`.
pub async fn compile_audience(inp: &Inputs<'_>, def: &DefinitionFile) -> Result<Compiled> {
    let Body::Audience(cond) = def
        .validate()
        .map_err(|e| Error::Usage(format!("{}: {e}", def.key)))?
    else {
        return Err(Error::Usage(format!("{} is not an audience", def.key)));
    };
    let mut c = compiler(inp, def, def.level).await?;
    let frame = match def.level {
        Level::Users => {
            let pred = profile_condition(&mut c, &cond)?;
            assemble(&c, def.include_anonymous)
                .await?
                .filter(pred)?
                .select(vec![col("profile_idx"), col("profile_id")])?
        }
        Level::Accounts => {
            let mut junctions = Vec::new();
            let pred = c.account_condition(&cond, &mut junctions)?;
            let mut frame = assemble(&c, def.include_anonymous).await?;
            if !junctions.is_empty() {
                let j = c.junction_frame(&junctions, def.include_anonymous).await?;
                frame = frame
                    .join(j, JoinType::Left, &["account_id"], &["__ja"], None)?
                    .drop_columns(&["__ja"])?;
            }
            frame.filter(pred)?.select(vec![col("account_id")])?
        }
    };
    Ok(Compiled {
        frame,
        level: def.level,
        json_value: false,
    })
}

/// Compile a computed trait into a plan of `(profile_idx, profile_id, value_str, value_num,
/// value_bool)` for every profile that has a value.
pub async fn compile_trait(inp: &Inputs<'_>, def: &DefinitionFile) -> Result<Compiled> {
    let Body::Trait(value) = def
        .validate()
        .map_err(|e| Error::Usage(format!("{}: {e}", def.key)))?
    else {
        return Err(Error::Usage(format!("{} is not a computed trait", def.key)));
    };
    let mut c = compiler(inp, def, def.level).await?;
    let v = c.profile_value(&value)?;
    let mut cols = match def.level {
        Level::Users => vec![col("profile_idx"), col("profile_id")],
        Level::Accounts => vec![col("account_id")],
    };
    cols.extend([
        v.s.alias("value_str"),
        v.n.alias("value_num"),
        v.b.alias("value_bool"),
    ]);
    // A reduced value other than a count is missing for profiles without selected events.
    let only_with_events = matches!(
        &value,
        Value::Aggregate { reducer, .. }
            if !matches!(reducer, Reducer::Count | Reducer::UniqueCount { .. })
    );
    let frame = assemble_with(&c, true, only_with_events)
        .await?
        .select(cols)?
        .filter(
            col("value_str")
                .is_not_null()
                .or(col("value_num").is_not_null())
                .or(col("value_bool").is_not_null()),
        )?;
    Ok(Compiled {
        frame,
        level: def.level,
        json_value: matches!(
            value,
            Value::Aggregate {
                reducer: Reducer::Unique { .. },
                ..
            }
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::functions_aggregate::expr_fn::count;

    #[test]
    fn an_aggregate_keeps_only_the_part_of_its_filter_the_rows_do_not_already_satisfy() {
        let (a, b, x, y) = (
            col("event").eq(lit("a")),
            col("event").eq(lit("b")),
            col("x").gt(lit(1)),
            col("y").is_not_null(),
        );
        let scan = [col("profile_idx").is_not_null()];
        let filtered = |f: Expr| count(lit(1)).filter(f).build().unwrap().alias("__f0");
        let bare = count(lit(1)).alias("__f0");

        // one predicate: the rows are filtered by it, and it leaves every FILTER
        let p = a.clone().and(x.clone());
        let (rows, implied) = rows_filter(&scan, std::slice::from_ref(&p));
        assert_eq!(rows, a.clone().and(x.clone()));
        assert_eq!(without_implied(filtered(p.clone()), &implied), bare);
        assert_eq!(
            without_implied(filtered(p.clone().and(y.clone())), &implied),
            filtered(y.clone())
        );
        // a scan filter's conjuncts go too; conjuncts that are not implied stay
        let nn = col("profile_idx").is_not_null();
        assert_eq!(
            without_implied(filtered(nn.and(b.clone())), &implied),
            filtered(b.clone())
        );
        assert_eq!(
            without_implied(filtered(b.clone()), &implied),
            filtered(b.clone())
        );

        // two predicates sharing `a`: rows = a AND (x OR y); only `a` is implied
        let (p1, p2) = (a.clone().and(x.clone()), a.clone().and(y.clone()));
        let (rows, implied) = rows_filter(&scan, &[p1.clone(), p2.clone()]);
        assert_eq!(rows, a.clone().and(x.clone().or(y.clone())));
        assert_eq!(without_implied(filtered(p1), &implied), filtered(x.clone()));
        assert_eq!(without_implied(filtered(p2), &implied), filtered(y.clone()));

        // one predicate is all common: every row of the common part counts
        let (rows, implied) = rows_filter(&scan, &[a.clone(), a.clone().and(x.clone())]);
        assert_eq!(rows, a.clone());
        assert_eq!(
            without_implied(filtered(a.clone().and(x.clone())), &implied),
            filtered(x)
        );

        // nothing in common: the disjunction (with the kinds it admits, for pruning), and every
        // FILTER stays
        let (rows, implied) = rows_filter(&scan, &[a.clone(), b.clone()]);
        let kinds = col("event").in_list(vec![lit("a"), lit("b")], false);
        assert_eq!(rows, kinds.and(a.clone().or(b.clone())));
        assert_eq!(without_implied(filtered(a.clone()), &implied), filtered(a));

        // no FILTER, or not an aggregate: unchanged
        assert_eq!(without_implied(bare.clone(), &implied), bare);
        assert_eq!(without_implied(col("z"), &implied), col("z"));
    }
}
