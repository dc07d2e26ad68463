//! The typed AST of the audience query language. Serializes with serde (tagged enums) and
//! prints back to canonical text with [`super::printer`].

use serde::{Deserialize, Serialize};

/// A boolean condition: the root of every audience and of every `where`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Condition {
    /// All must hold.
    And {
        /// Operands.
        items: Vec<Condition>,
    },
    /// At least one must hold.
    Or {
        /// Operands.
        items: Vec<Condition>,
    },
    /// `NOT (...)`.
    Not {
        /// Negated condition.
        item: Box<Condition>,
    },
    /// Account level: at least one profile of the account matches (`ANY(...)`).
    Any {
        /// Profile-level condition.
        item: Box<Condition>,
    },
    /// Account level: every profile matches (`ALL(...)`).
    All {
        /// Profile-level condition.
        item: Box<Condition>,
    },
    /// Account level: no profile matches (`ALL NOT (...)`).
    AllNot {
        /// Profile-level condition.
        item: Box<Condition>,
    },
    /// A comparison of a value.
    Compare {
        /// Left side.
        value: Value,
        /// Comparator.
        op: CmpOp,
        /// Right side (absent for `is_null()` / `is_set()`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        operand: Option<Operand>,
    },
    /// A boolean value used bare: `audience('key')`, or a boolean property or trait.
    Bare {
        /// The value.
        value: Value,
    },
}

/// Something that yields a value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Value {
    /// A literal.
    Literal {
        /// The literal.
        value: Literal,
    },
    /// `property('path')` or `property(parent: 'path')`.
    Property {
        /// Dotted path.
        path: String,
        /// Refers to the parent event of a nested event.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        parent: bool,
    },
    /// `trait('key')`.
    Trait {
        /// Trait key.
        key: String,
    },
    /// `context('path')`.
    Context {
        /// Dotted path.
        path: String,
    },
    /// `audience('key')`.
    Audience {
        /// Audience key.
        key: String,
    },
    /// An event query reduced to a scalar: `event('X')....count()`.
    Aggregate {
        /// Which events.
        events: EventQuery,
        /// How they are reduced.
        reducer: Reducer,
    },
}

/// A literal value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Literal {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number.
    Number(f64),
    /// A string.
    String(String),
}

/// Which events an event query selects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    /// The event type and name.
    pub source: EventSource,
    /// Filters, in the order written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
}

/// The event source of an event query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum EventSource {
    /// A track event by name.
    Track {
        /// Event name.
        name: String,
    },
    /// Page calls, optionally by name.
    Page {
        /// Page name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Screen calls, optionally by name.
    Screen {
        /// Screen name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
}

/// A filter on events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Filter {
    /// `.where(condition)`.
    Where {
        /// The condition over the event's properties (and nested events).
        condition: Box<Condition>,
    },
    /// `.within(N unit)`: `as_of - N <= t <= as_of`.
    Within {
        /// Window length.
        duration: Duration,
    },
    /// `.between(N unit, M unit)`: `as_of - M <= t <= as_of - N`.
    Between {
        /// Nearer bound.
        from: Duration,
        /// Farther bound.
        to: Duration,
    },
    /// `.within(parent: N unit)`: `parent_t < t <= parent_t + N`.
    WithinParent {
        /// Window length.
        duration: Duration,
    },
    /// `.between(parent: N unit, M unit)`: `parent_t + N <= t <= parent_t + M`, `t > parent_t`.
    BetweenParent {
        /// Nearer bound.
        from: Duration,
        /// Farther bound.
        to: Duration,
    },
}

/// A duration with its unit as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Duration {
    /// Amount.
    pub amount: u64,
    /// Unit.
    pub unit: Unit,
}

impl Duration {
    /// Length in microseconds.
    pub fn micros(&self) -> i64 {
        let unit: i64 = match self.unit {
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Week => 7 * 86_400,
        };
        (self.amount as i64)
            .saturating_mul(unit)
            .saturating_mul(1_000_000)
    }
}

/// Time units (a day is 24 hours, a week 7 days).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Minutes.
    Minute,
    /// Hours.
    Hour,
    /// Days.
    Day,
    /// Weeks.
    Week,
}

/// How an event query is reduced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reducer {
    /// `count()`.
    Count,
    /// `sum(value)`.
    Sum {
        /// Summed value.
        value: Box<Value>,
    },
    /// `avg(value)`.
    Avg {
        /// Averaged value.
        value: Box<Value>,
    },
    /// `min(value)`.
    Min {
        /// Value.
        value: Box<Value>,
    },
    /// `max(value)`.
    Max {
        /// Value.
        value: Box<Value>,
    },
    /// `mode(value, n)`: most frequent value occurring at least `min_count` times.
    Mode {
        /// Value.
        value: Box<Value>,
        /// Minimum occurrences (default 2).
        min_count: u64,
    },
    /// `first(value)`.
    First {
        /// Value.
        value: Box<Value>,
    },
    /// `last(value)`.
    Last {
        /// Value.
        value: Box<Value>,
    },
    /// `unique(value)`: sorted list of distinct values.
    Unique {
        /// Value.
        value: Box<Value>,
    },
    /// `unique(value).count()`.
    UniqueCount {
        /// Value.
        value: Box<Value>,
    },
}

/// Comparators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CmpOp {
    /// `=` / `.eq(x)`
    Eq,
    /// `!=` / `.neq(x)`
    Neq,
    /// `>` / `.gt(x)`
    Gt,
    /// `>=` / `.gte(x)`
    Gte,
    /// `<` / `.lt(x)`
    Lt,
    /// `<=` / `.lte(x)`
    Lte,
    /// `.is_null()`
    IsNull,
    /// `.is_set()`
    IsSet,
    /// `.contains(s)`
    Contains,
    /// `.omits(s)`
    Omits,
    /// `.starts_with(s)`
    StartsWith,
    /// `.ends_with(s)`
    EndsWith,
    /// `.contains_one([..])`
    ContainsOne,
    /// `.one_of([..])`
    OneOf,
    /// `.before_date(d)`
    BeforeDate,
    /// `.after_date(d)`
    AfterDate,
    /// `.within_last(N unit)`
    WithinLast,
    /// `.within_next(N unit)`
    WithinNext,
    /// `.before_last(N unit)`
    BeforeLast,
    /// `.after_next(N unit)`
    AfterNext,
}

impl CmpOp {
    /// The chained method name.
    pub fn method(self) -> &'static str {
        match self {
            CmpOp::Eq => "eq",
            CmpOp::Neq => "neq",
            CmpOp::Gt => "gt",
            CmpOp::Gte => "gte",
            CmpOp::Lt => "lt",
            CmpOp::Lte => "lte",
            CmpOp::IsNull => "is_null",
            CmpOp::IsSet => "is_set",
            CmpOp::Contains => "contains",
            CmpOp::Omits => "omits",
            CmpOp::StartsWith => "starts_with",
            CmpOp::EndsWith => "ends_with",
            CmpOp::ContainsOne => "contains_one",
            CmpOp::OneOf => "one_of",
            CmpOp::BeforeDate => "before_date",
            CmpOp::AfterDate => "after_date",
            CmpOp::WithinLast => "within_last",
            CmpOp::WithinNext => "within_next",
            CmpOp::BeforeLast => "before_last",
            CmpOp::AfterNext => "after_next",
        }
    }

    /// The infix symbol, for the six symbolic comparators.
    pub fn symbol(self) -> Option<&'static str> {
        Some(match self {
            CmpOp::Eq => "=",
            CmpOp::Neq => "!=",
            CmpOp::Gt => ">",
            CmpOp::Gte => ">=",
            CmpOp::Lt => "<",
            CmpOp::Lte => "<=",
            _ => return None,
        })
    }

    /// All comparators.
    pub const ALL: [CmpOp; 20] = [
        CmpOp::Eq,
        CmpOp::Neq,
        CmpOp::Gt,
        CmpOp::Gte,
        CmpOp::Lt,
        CmpOp::Lte,
        CmpOp::IsNull,
        CmpOp::IsSet,
        CmpOp::Contains,
        CmpOp::Omits,
        CmpOp::StartsWith,
        CmpOp::EndsWith,
        CmpOp::ContainsOne,
        CmpOp::OneOf,
        CmpOp::BeforeDate,
        CmpOp::AfterDate,
        CmpOp::WithinLast,
        CmpOp::WithinNext,
        CmpOp::BeforeLast,
        CmpOp::AfterNext,
    ];
}

/// The right side of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Operand {
    /// A value (literal, property, trait, ...).
    Value {
        /// The value.
        value: Value,
    },
    /// A list of literals (`contains_one`, `one_of`).
    List {
        /// Items.
        items: Vec<Literal>,
    },
    /// A duration (`within_last` and friends).
    Duration {
        /// The duration.
        duration: Duration,
    },
}
