//! The program of [`crate::nested_events`]: a tree of nested event queries, serialized as JSON so
//! it travels as one literal argument (plans stay serializable for Ballista).
//!
//! Rows are the events of one profile (or account). Each row carries a timestamp, a bit mask of
//! the static predicates it satisfies (computed by the plan: event name, property filters,
//! absolute windows) and a fixed number of value slots (properties the program reads). The
//! program adds what a plain filter cannot express: windows relative to a parent event,
//! comparisons with the parent's properties, and aggregates of child events per parent.

use serde::{Deserialize, Serialize};

/// The whole program.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Program {
    /// Evaluation time (UTC microseconds), for time comparators.
    pub as_of: i64,
    /// Number of value slots per row.
    pub slots: usize,
    /// Whether rows carry a tie-breaking order key (needed by `first` / `last`).
    #[serde(default)]
    pub ordered: bool,
    /// The top-level event query.
    pub root: Node,
    /// How the root's selected events are reduced.
    pub reducer: Reducer,
}

/// One event query of the tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Bit of the static predicate (event source, static filters, absolute windows).
    pub bit: u8,
    /// Window relative to the parent event (children only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    /// The dynamic part of the `where` (absent: always true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cond: Option<Cond>,
}

/// `parent_t + lo <= t <= parent_t + hi` and `t > parent_t` (microseconds).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Nearer bound.
    pub lo: i64,
    /// Farther bound.
    pub hi: i64,
}

/// A boolean condition on a row (and its parent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Cond {
    /// All hold.
    And(Vec<Cond>),
    /// One holds.
    Or(Vec<Cond>),
    /// Negation.
    Not(Box<Cond>),
    /// A static predicate computed by the plan.
    Bit(u8),
    /// A comparison.
    Cmp {
        /// Left value.
        left: Val,
        /// Comparator.
        op: Op,
        /// Right operand.
        #[serde(default)]
        right: Arg,
    },
}

/// A value of the current row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Val {
    /// A literal.
    Lit(Lit),
    /// A slot of the current row.
    Slot(usize),
    /// A slot of the parent row.
    ParentSlot(usize),
    /// An aggregate of child events relative to the current row.
    Agg {
        /// The child query.
        node: Box<Node>,
        /// Its reducer.
        reducer: Reducer,
    },
}

/// A literal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Lit {
    /// `null`.
    Null,
    /// Boolean.
    Bool(bool),
    /// Number.
    Number(f64),
    /// String.
    String(String),
}

/// The right side of a comparison.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Arg {
    /// `is_null()`, `is_set()`.
    #[default]
    None,
    /// A value.
    Value(Val),
    /// A list of literals (`one_of`, `contains_one`).
    List(Vec<Lit>),
    /// A duration in microseconds (`within_last`, ...).
    Duration(i64),
    /// A point in time, UTC microseconds (`before_date`, `after_date`).
    Time(i64),
}

/// Comparators, as in the query language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Op {
    Eq,
    Neq,
    Gt,
    Gte,
    Lt,
    Lte,
    IsNull,
    IsSet,
    Contains,
    Omits,
    StartsWith,
    EndsWith,
    ContainsOne,
    OneOf,
    BeforeDate,
    AfterDate,
    WithinLast,
    WithinNext,
    BeforeLast,
    AfterNext,
}

/// Reducers over selected rows; numbers are slot indices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Reducer {
    /// Number of rows.
    Count,
    /// Sum of the numeric values.
    Sum(usize),
    /// Mean of the numeric values.
    Avg(usize),
    /// Smallest value (numbers).
    Min(usize),
    /// Largest value (numbers).
    Max(usize),
    /// First set value in (timestamp, order key) order.
    First(usize),
    /// Last set value.
    Last(usize),
    /// Most frequent text value occurring at least `min_count` times; ties alphabetical.
    Mode {
        /// Slot holding the value's text.
        slot: usize,
        /// Minimum occurrences.
        min_count: u64,
    },
    /// Sorted distinct text values, as JSON array text (`["a","b"]`).
    Unique(usize),
    /// Number of distinct text values.
    UniqueCount(usize),
}

impl Program {
    /// Parse and check a program.
    pub fn parse(text: &str) -> Result<Program, String> {
        let p: Program = serde_json::from_str(text)
            .map_err(|e| format!("invalid nested_events program: {e}"))?;
        p.check()?;
        Ok(p)
    }

    fn check(&self) -> Result<(), String> {
        fn node(n: &Node, slots: usize, child: bool) -> Result<(), String> {
            if n.bit >= 64 {
                return Err(format!("bit {} out of range (0..64)", n.bit));
            }
            if !child && n.window.is_some() {
                return Err("the root query cannot have a parent window".into());
            }
            if let Some(c) = &n.cond {
                cond(c, slots, child)?;
            }
            Ok(())
        }
        fn reducer(r: &Reducer, slots: usize) -> Result<(), String> {
            let s = match r {
                Reducer::Count => return Ok(()),
                Reducer::Sum(s)
                | Reducer::Avg(s)
                | Reducer::Min(s)
                | Reducer::Max(s)
                | Reducer::First(s)
                | Reducer::Last(s)
                | Reducer::Unique(s)
                | Reducer::UniqueCount(s)
                | Reducer::Mode { slot: s, .. } => *s,
            };
            if s >= slots {
                return Err(format!("slot {s} out of range (program has {slots})"));
            }
            Ok(())
        }
        fn val(v: &Val, slots: usize, child: bool) -> Result<(), String> {
            match v {
                Val::Lit(_) => Ok(()),
                Val::Slot(s) | Val::ParentSlot(s) if *s >= slots => {
                    Err(format!("slot {s} out of range (program has {slots})"))
                }
                Val::ParentSlot(_) if !child => {
                    Err("a parent property outside a nested event".into())
                }
                Val::Slot(_) | Val::ParentSlot(_) => Ok(()),
                Val::Agg {
                    node: n,
                    reducer: r,
                } => {
                    node(n, slots, true)?;
                    reducer(r, slots)
                }
            }
        }
        fn cond(c: &Cond, slots: usize, child: bool) -> Result<(), String> {
            match c {
                Cond::And(xs) | Cond::Or(xs) => xs.iter().try_for_each(|x| cond(x, slots, child)),
                Cond::Not(x) => cond(x, slots, child),
                Cond::Bit(b) if *b >= 64 => Err(format!("bit {b} out of range (0..64)")),
                Cond::Bit(_) => Ok(()),
                Cond::Cmp { left, right, .. } => {
                    val(left, slots, child)?;
                    if let Arg::Value(v) = right {
                        val(v, slots, child)?;
                    }
                    Ok(())
                }
            }
        }
        node(&self.root, self.slots, false)?;
        reducer(&self.reducer, self.slots)
    }
}
