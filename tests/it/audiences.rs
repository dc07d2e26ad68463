//! Audience semantics: the compiled DataFusion plans against a row-at-a-time reference
//! evaluator written here (it reads the original JSON properties, not the shredded columns),
//! on random definitions over generated data; hand-computed window edges; DuckDB agreement on
//! the BENCH.md queries.

use std::collections::{BTreeMap, BTreeSet};

use audiences::lang::ast::*;
use audiences::store::{Space, Store};
use serde_json::{Value as J, json};

use crate::common::*;

const DAY: i64 = 86_400_000_000;

/// One event as the reference sees it.
#[derive(Clone)]
struct Ev {
    message_id: String,
    kind: String,
    event: Option<String>,
    name: Option<String>,
    ts: i64,
    received: i64,
    properties: J,
    context: J,
}

struct World {
    /// profile_id → events
    events: BTreeMap<String, Vec<Ev>>,
    /// profile_id → known
    profiles: BTreeMap<String, bool>,
    /// profile_id → trait key → JSON value
    traits: BTreeMap<String, BTreeMap<String, J>>,
    /// account_id → linked (canonical) profile ids
    links: BTreeMap<String, BTreeSet<String>>,
    /// account_id → account trait key → JSON value
    account_traits: BTreeMap<String, BTreeMap<String, J>>,
}

async fn world(store: &Store) -> World {
    let rows = sql_rows(store, "default", "SELECT profile_id, message_id, type, event, name, CAST(timestamp AS BIGINT) AS ts, CAST(received_at AS BIGINT) AS rc, properties, context FROM events").await;
    let mut events: BTreeMap<String, Vec<Ev>> = BTreeMap::new();
    for r in rows {
        let parse = |k: &str| {
            r.get(k)
                .and_then(|v| v.as_str())
                .map(|s| serde_json::from_str(s).unwrap())
                .unwrap_or(J::Null)
        };
        events
            .entry(r["profile_id"].as_str().unwrap().to_string())
            .or_default()
            .push(Ev {
                message_id: r["message_id"].as_str().unwrap().into(),
                kind: r["type"].as_str().unwrap().into(),
                event: r.get("event").and_then(|v| v.as_str()).map(String::from),
                name: r.get("name").and_then(|v| v.as_str()).map(String::from),
                ts: r["ts"].as_i64().unwrap(),
                received: r["rc"].as_i64().unwrap(),
                properties: parse("properties"),
                context: parse("context"),
            });
    }
    let profiles = sql_rows(store, "default", "SELECT profile_id, known FROM profiles")
        .await
        .into_iter()
        .map(|r| {
            (
                r["profile_id"].as_str().unwrap().to_string(),
                r["known"].as_bool().unwrap(),
            )
        })
        .collect();
    let traits = trait_map(store, "profile", "profile_id").await;
    let mut links: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in sql_rows(
        store,
        "default",
        "SELECT account_id, profile_id FROM account_links",
    )
    .await
    {
        links
            .entry(r["account_id"].as_str().unwrap().into())
            .or_default()
            .insert(r["profile_id"].as_str().unwrap().into());
    }
    let account_traits = trait_map(store, "account", "account_id").await;
    World {
        events,
        profiles,
        traits,
        links,
        account_traits,
    }
}

/// Custom traits of one entity kind: id → key → JSON value.
async fn trait_map(store: &Store, entity: &str, id: &str) -> BTreeMap<String, BTreeMap<String, J>> {
    let mut out: BTreeMap<String, BTreeMap<String, J>> = BTreeMap::new();
    let sql = format!("SELECT {id} AS id, key, value FROM traits WHERE entity = '{entity}'");
    for r in sql_rows(store, "default", &sql).await {
        out.entry(r["id"].as_str().unwrap().into())
            .or_default()
            .insert(
                r["key"].as_str().unwrap().into(),
                serde_json::from_str(r["value"].as_str().unwrap()).unwrap(),
            );
    }
    out
}

/// A reference value.
#[derive(Clone, Debug, PartialEq)]
enum RV {
    Missing,
    S(String),
    N(f64),
    B(bool),
}

fn from_json(v: Option<&J>) -> RV {
    match v {
        Some(J::String(s)) => RV::S(s.clone()),
        Some(J::Number(n)) => RV::N(n.as_f64().unwrap()),
        Some(J::Bool(b)) => RV::B(*b),
        _ => RV::Missing,
    }
}

fn path<'a>(root: &'a J, p: &str) -> Option<&'a J> {
    let mut cur = root;
    for part in p.split('.') {
        cur = cur.get(part)?;
    }
    Some(cur)
}

fn lit(l: &Literal) -> RV {
    match l {
        Literal::String(s) => RV::S(s.clone()),
        Literal::Number(n) => RV::N(*n),
        Literal::Bool(b) => RV::B(*b),
        Literal::Null => RV::Missing,
    }
}

fn cmp(a: &RV, op: CmpOp, operand: Option<&Operand>, rhs: Option<&RV>, as_of: i64) -> bool {
    use std::cmp::Ordering::*;
    let ord = |a: &RV, b: &RV| match (a, b) {
        (RV::S(x), RV::S(y)) => Some(x.cmp(y)),
        (RV::N(x), RV::N(y)) => x.partial_cmp(y),
        (RV::B(x), RV::B(y)) => Some(x.cmp(y)),
        _ => None,
    };
    let time = |a: &RV| match a {
        RV::S(s) => audiences::events::message::parse_timestamp(s),
        _ => None,
    };
    match op {
        CmpOp::IsNull => *a == RV::Missing,
        CmpOp::IsSet => *a != RV::Missing,
        CmpOp::Eq | CmpOp::Neq | CmpOp::Gt | CmpOp::Gte | CmpOp::Lt | CmpOp::Lte => {
            let b = rhs.unwrap();
            let null_literal = matches!(
                operand,
                Some(Operand::Value {
                    value: Value::Literal {
                        value: Literal::Null
                    }
                })
            );
            if null_literal {
                return match op {
                    CmpOp::Eq => *a == RV::Missing,
                    CmpOp::Neq => *a != RV::Missing,
                    _ => false,
                };
            }
            match ord(a, b) {
                None => false,
                Some(o) => match op {
                    CmpOp::Eq => o == Equal,
                    CmpOp::Neq => o != Equal,
                    CmpOp::Gt => o == Greater,
                    CmpOp::Gte => o != Less,
                    CmpOp::Lt => o == Less,
                    _ => o != Greater,
                },
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
                panic!()
            };
            let RV::S(s) = a else { return false };
            match op {
                CmpOp::Contains => s.contains(x.as_str()),
                CmpOp::Omits => !s.contains(x.as_str()),
                CmpOp::StartsWith => s.starts_with(x.as_str()),
                _ => s.ends_with(x.as_str()),
            }
        }
        CmpOp::OneOf | CmpOp::ContainsOne => {
            let Some(Operand::List { items }) = operand else {
                panic!()
            };
            items.iter().any(|i| match (op, i, a) {
                (CmpOp::ContainsOne, Literal::String(x), RV::S(s)) => s.contains(x.as_str()),
                (CmpOp::OneOf, l, v) => lit(l) == *v && *v != RV::Missing,
                _ => false,
            })
        }
        CmpOp::BeforeDate | CmpOp::AfterDate => {
            let Some(Operand::Value {
                value:
                    Value::Literal {
                        value: Literal::String(d),
                    },
            }) = operand
            else {
                panic!()
            };
            let d = audiences::events::message::parse_timestamp(d).unwrap();
            match time(a) {
                Some(t) => {
                    if op == CmpOp::BeforeDate {
                        t < d
                    } else {
                        t > d
                    }
                }
                None => false,
            }
        }
        CmpOp::WithinLast | CmpOp::WithinNext | CmpOp::BeforeLast | CmpOp::AfterNext => {
            let Some(Operand::Duration { duration }) = operand else {
                panic!()
            };
            let d = duration.micros();
            match time(a) {
                None => false,
                Some(t) => match op {
                    CmpOp::WithinLast => t >= as_of - d && t <= as_of,
                    CmpOp::WithinNext => t >= as_of && t <= as_of + d,
                    CmpOp::BeforeLast => t < as_of - d,
                    _ => t > as_of + d,
                },
            }
        }
    }
}

struct Ctx<'a> {
    w: &'a World,
    as_of: i64,
    created_at: i64,
    backfill: bool,
    audiences: &'a BTreeMap<String, BTreeSet<String>>,
}

impl<'a> Ctx<'a> {
    /// The reference at `as_of`, with historical backfill on.
    fn at(w: &'a World, as_of: i64, audiences: &'a BTreeMap<String, BTreeSet<String>>) -> Self {
        Ctx {
            w,
            as_of,
            created_at: 0,
            backfill: true,
            audiences,
        }
    }
}

/// Compute every live definition of the default space at `as_of`.
async fn compute_all(store: &Store, as_of: i64) -> Vec<audiences::compute::KeyReport> {
    audiences::compute::compute(
        store,
        &Space::default(),
        &audiences::identity::IdentityRules::default(),
        as_of,
        &[],
    )
    .await
    .unwrap()
}

/// One profile's (or account's) events, for the reference.
struct Who<'a> {
    pid: &'a str,
    evs: &'a [Ev],
}

fn row_value(cx: &Ctx, who: &Who, v: &Value, e: &Ev, parent: Option<&Ev>) -> RV {
    match v {
        Value::Literal { value } => lit(value),
        Value::Property {
            path: p,
            parent: false,
        } => from_json(path(&e.properties, p)),
        Value::Property {
            path: p,
            parent: true,
        } => from_json(parent.and_then(|pe| path(&pe.properties, p))),
        Value::Context { path: p } => from_json(path(&e.context, p)),
        Value::Trait { key } => trait_of(cx, who.pid, key),
        Value::Aggregate { events, reducer } => {
            reduce(cx, who, &selected(cx, who, events, Some(e)), reducer)
        }
        _ => panic!("not in the tested subset"),
    }
}

fn trait_of(cx: &Ctx, pid: &str, key: &str) -> RV {
    from_json(cx.w.traits.get(pid).and_then(|t| t.get(key)))
}

fn row_cond(cx: &Ctx, who: &Who, c: &Condition, e: &Ev, parent: Option<&Ev>) -> bool {
    match c {
        Condition::And { items } => items.iter().all(|i| row_cond(cx, who, i, e, parent)),
        Condition::Or { items } => items.iter().any(|i| row_cond(cx, who, i, e, parent)),
        Condition::Not { item } => !row_cond(cx, who, item, e, parent),
        Condition::Compare { value, op, operand } => {
            let rhs = match operand {
                Some(Operand::Value { value }) => Some(row_value(cx, who, value, e, parent)),
                _ => None,
            };
            cmp(
                &row_value(cx, who, value, e, parent),
                *op,
                operand.as_ref(),
                rhs.as_ref(),
                cx.as_of,
            )
        }
        Condition::Bare { value } => row_value(cx, who, value, e, parent) == RV::B(true),
        _ => panic!("not in the tested subset"),
    }
}

/// The events an event query selects; `parent` is the parent event of a nested query.
fn selected<'a>(cx: &Ctx, who: &Who<'a>, q: &EventQuery, parent: Option<&Ev>) -> Vec<&'a Ev> {
    let mut out: Vec<&Ev> = who
        .evs
        .iter()
        .filter(|e| match &q.source {
            EventSource::Track { name } => e.kind == "track" && e.event.as_deref() == Some(name),
            EventSource::Page { name } => {
                e.kind == "page" && name.as_ref().is_none_or(|n| e.name.as_ref() == Some(n))
            }
            EventSource::Screen { name } => {
                e.kind == "screen" && name.as_ref().is_none_or(|n| e.name.as_ref() == Some(n))
            }
        })
        .filter(|e| e.ts <= cx.as_of && (cx.backfill || e.received >= cx.created_at))
        .filter(|e| {
            q.filters.iter().all(|f| match f {
                Filter::Where { condition } => row_cond(cx, who, condition, e, parent),
                Filter::Within { duration } => e.ts >= cx.as_of - duration.micros(),
                Filter::Between { from, to } => {
                    e.ts >= cx.as_of - to.micros() && e.ts <= cx.as_of - from.micros()
                }
                Filter::WithinParent { duration } => {
                    let p = parent.expect("parent window outside a nested event").ts;
                    e.ts > p && e.ts <= p + duration.micros()
                }
                Filter::BetweenParent { from, to } => {
                    let p = parent.expect("parent window outside a nested event").ts;
                    e.ts > p && e.ts >= p + from.micros() && e.ts <= p + to.micros()
                }
            })
        })
        .collect();
    out.sort_by(|a, b| (a.ts, &a.message_id).cmp(&(b.ts, &b.message_id)));
    out
}

fn reduce(cx: &Ctx, who: &Who, evs: &[&Ev], reducer: &Reducer) -> RV {
    let val = |v: &Value, e: &Ev| row_value(cx, who, v, e, None);
    let nums = |v: &Value| -> Vec<f64> {
        evs.iter()
            .filter_map(|e| match val(v, e) {
                RV::N(x) => Some(x),
                _ => None,
            })
            .collect()
    };
    let texts = |v: &Value| -> Vec<String> {
        evs.iter()
            .filter_map(|e| match val(v, e) {
                RV::S(s) => Some(s),
                RV::N(n) => Some(format!("{n:?}")),
                RV::B(b) => Some(b.to_string()),
                _ => None,
            })
            .collect()
    };
    match reducer {
        Reducer::Count => RV::N(evs.len() as f64),
        Reducer::Sum { value } => {
            let n = nums(value);
            if n.is_empty() {
                RV::Missing
            } else {
                RV::N(n.iter().sum())
            }
        }
        Reducer::Avg { value } => {
            let n = nums(value);
            if n.is_empty() {
                RV::Missing
            } else {
                RV::N(n.iter().sum::<f64>() / n.len() as f64)
            }
        }
        Reducer::Min { value } => nums(value)
            .into_iter()
            .reduce(f64::min)
            .map_or(RV::Missing, RV::N),
        Reducer::Max { value } => nums(value)
            .into_iter()
            .reduce(f64::max)
            .map_or(RV::Missing, RV::N),
        Reducer::UniqueCount { value } => {
            let s: BTreeSet<String> = texts(value).into_iter().collect();
            RV::N(s.len() as f64)
        }
        Reducer::First { value } => evs
            .iter()
            .map(|e| val(value, e))
            .find(|v| *v != RV::Missing)
            .unwrap_or(RV::Missing),
        Reducer::Last { value } => evs
            .iter()
            .rev()
            .map(|e| val(value, e))
            .find(|v| *v != RV::Missing)
            .unwrap_or(RV::Missing),
        Reducer::Mode { value, min_count } => {
            // most frequent text value with at least min_count occurrences; ties:
            // alphabetically first
            let mut counts: BTreeMap<String, u64> = BTreeMap::new();
            for s in texts(value) {
                *counts.entry(s).or_default() += 1;
            }
            let mut best: Option<(String, u64)> = None;
            for (v, n) in counts {
                if n >= *min_count && best.as_ref().is_none_or(|b| n > b.1) {
                    best = Some((v, n));
                }
            }
            best.map_or(RV::Missing, |b| RV::S(b.0))
        }
        Reducer::Unique { value } => {
            // sorted distinct values, as JSON array text
            let s: BTreeSet<String> = texts(value).into_iter().collect();
            if s.is_empty() {
                RV::Missing
            } else {
                RV::S(serde_json::to_string(&s).unwrap())
            }
        }
    }
}

fn profile_value(cx: &Ctx, v: &Value, pid: &str) -> RV {
    match v {
        Value::Literal { value } => lit(value),
        Value::Trait { key } => trait_of(cx, pid, key),
        Value::Audience { key } => RV::B(cx.audiences[key].contains(pid)),
        Value::Aggregate { events, reducer } => {
            let none = Vec::new();
            let who = Who {
                pid,
                evs: cx.w.events.get(pid).unwrap_or(&none),
            };
            reduce(cx, &who, &selected(cx, &who, events, None), reducer)
        }
        _ => panic!("not in the tested subset"),
    }
}

fn eval(cx: &Ctx, c: &Condition, pid: &str) -> bool {
    match c {
        Condition::And { items } => items.iter().all(|i| eval(cx, i, pid)),
        Condition::Or { items } => items.iter().any(|i| eval(cx, i, pid)),
        Condition::Not { item } => !eval(cx, item, pid),
        Condition::Compare { value, op, operand } => {
            let rhs = match operand {
                Some(Operand::Value { value }) => Some(profile_value(cx, value, pid)),
                _ => None,
            };
            cmp(
                &profile_value(cx, value, pid),
                *op,
                operand.as_ref(),
                rhs.as_ref(),
                cx.as_of,
            )
        }
        Condition::Bare { value } => profile_value(cx, value, pid) == RV::B(true),
        _ => panic!("not in the tested subset"),
    }
}

fn reference(cx: &Ctx, c: &Condition, include_anonymous: bool) -> BTreeSet<String> {
    cx.w.profiles
        .iter()
        .filter(|(_, known)| **known || include_anonymous)
        .map(|(p, _)| p.clone())
        .filter(|p| eval(cx, c, p))
        .collect()
}

/// A small deterministic PRNG (no shared code with the engine).
pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
    pub(crate) fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.next(xs.len() as u64) as usize]
    }
}

pub(crate) fn random_where(r: &mut Rng) -> String {
    let opts = [
        format!("property('price') > {}", r.next(200)),
        format!("property('price') <= {}", r.next(200)),
        format!(
            "property('category') = '{}'",
            r.pick(&["books", "toys", "music", "garden"])
        ),
        "property('category').one_of(['books', 'tools', 'pets'])".to_string(),
        "property('currency') != 'USD'".to_string(),
        "property('product_id').starts_with('prod-1')".to_string(),
        "property('product_id').ends_with('7')".to_string(),
        "property('coupon').is_null()".to_string(),
        "property('quantity').is_set()".to_string(),
        "NOT (property('currency') = 'EUR')".to_string(),
        "property('price') > 20 AND property('price') < 80".to_string(),
        "context('os.name') = 'iOS' OR context('location.country').one_of(['DE', 'FR'])"
            .to_string(),
        "property('price') = '12'".to_string(),
    ];
    r.pick(&opts).clone()
}

pub(crate) fn random_window(r: &mut Rng) -> String {
    match r.next(5) {
        0 => String::new(),
        1 => format!(".within({} days)", r.pick(&[1, 7, 30, 90])),
        2 => format!(".within({} hours)", r.pick(&[12, 48, 200])),
        3 => format!(".between({} days, {} days)", 7, r.pick(&[30, 90])),
        _ => format!(".within({} weeks)", r.pick(&[1, 4])),
    }
}

/// A random event source, a `.where(..)` one time in `where_one_in` (else empty) and a window.
pub(crate) fn random_events(
    r: &mut Rng,
    sources: &[&str],
    where_one_in: u64,
) -> (String, String, String) {
    let source = r.pick(sources).to_string();
    let wh = if r.next(where_one_in) == 0 {
        format!(".where({})", random_where(r))
    } else {
        String::new()
    };
    (source, wh, random_window(r))
}

pub(crate) fn random_atom(r: &mut Rng) -> String {
    let (source, wh, win) = random_events(
        r,
        &[
            "event('Order Completed')",
            "event('Product Viewed')",
            "event('Checkout Started')",
            "event('Logged In')",
            "event(type: 'page', name: 'Pricing')",
            "event(type: 'page')",
            "event(type: 'screen')",
        ],
        2,
    );
    match r.next(9) {
        0..=3 => format!(
            "{source}{wh}{win}.count() {} {}",
            r.pick(&[">=", ">", "=", "<", "!=", "<="]),
            r.next(4)
        ),
        4 => format!("{source}{wh}{win}.sum(property('price')) > {}", r.next(400)),
        5 => format!("{source}{win}.max(property('price')) >= {}", r.next(300)),
        6 => format!(
            "trait('plan') = '{}'",
            r.pick(&["free", "pro", "business", "enterprise"])
        ),
        7 => match r.next(3) {
            0 => format!("trait('logins') {} {}", r.pick(&[">", "<="]), r.next(500)),
            _ => r
                .pick(&[
                    "trait('plan').contains('r')",
                    "trait('plan').starts_with('pro')",
                    "trait('plan').ends_with('e')",
                    "trait('plan').one_of(['free', 'business'])",
                    "trait('email').ends_with('.com')",
                    "trait('email').contains('1')",
                    "trait('name').is_set()",
                    "trait('plan').is_null()",
                    "trait('logins') != 3",
                    "trait('plan') != 'pro'",
                ])
                .to_string(),
        },
        _ => format!(
            "{source}{win}.unique(property('category')).count() >= {}",
            r.next(3)
        ),
    }
}

pub(crate) fn random_condition(r: &mut Rng, depth: u32) -> String {
    if depth == 0 || r.next(3) == 0 {
        return random_atom(r);
    }
    match r.next(3) {
        0 => format!(
            "{} AND {}",
            random_condition(r, depth - 1),
            random_condition(r, depth - 1)
        ),
        1 => format!(
            "({} OR {})",
            random_condition(r, depth - 1),
            random_condition(r, depth - 1)
        ),
        _ => format!("NOT ({})", random_condition(r, depth - 1)),
    }
}

const FUNNEL_EVENTS: [&str; 5] = [
    "event('Product Viewed')",
    "event('Product Added')",
    "event('Checkout Started')",
    "event('Order Completed')",
    "event(type: 'page')",
];

pub(crate) fn parent_window(r: &mut Rng) -> String {
    match r.next(6) {
        0 => String::new(),
        1 => format!(".within(parent: {} hours)", r.pick(&[1, 6, 48])),
        2 => format!(
            ".between(parent: {} hours, {} days)",
            r.pick(&[0, 1, 2]),
            r.pick(&[1, 3])
        ),
        3 => ".within(parent: 30 minutes)".to_string(),
        _ => format!(".within(parent: {} days)", r.pick(&[1, 7])),
    }
}

/// A child `where`: static filters, references to the parent or to traits, or a deeper step.
pub(crate) fn child_where(r: &mut Rng, depth: u32) -> String {
    let opts = [
        "property('product_id') = property(parent: 'product_id')".to_string(),
        "property('price') > property(parent: 'price')".to_string(),
        "property('category') != property(parent: 'category')".to_string(),
        "property(parent: 'category') = 'books'".to_string(),
        "property('price') >= trait('logins')".to_string(),
        random_where(r),
    ];
    let one = r.pick(&opts).clone();
    if depth > 0 && r.next(3) == 0 {
        format!("{one} AND {}", nested_atom(r, depth - 1))
    } else if r.next(4) == 0 {
        format!("({one} OR {})", random_where(r))
    } else {
        one
    }
}

/// `event(B)...` relative to its parent, compared.
pub(crate) fn nested_atom(r: &mut Rng, depth: u32) -> String {
    let src = r.pick(&FUNNEL_EVENTS).to_string();
    let wh = match r.next(3) {
        0 => String::new(),
        _ => format!(".where({})", child_where(r, depth)),
    };
    let win = parent_window(r);
    match r.next(8) {
        0..=2 => format!("{src}{wh}{win}.count() >= {}", 1 + r.next(2)),
        3 | 4 => format!("{src}{wh}{win}.count() = 0"),
        5 => format!("{src}{wh}{win}.sum(property('price')) > {}", r.next(200)),
        6 => format!(
            "{src}{wh}{win}.first(property('category')) = '{}'",
            r.pick(&["books", "toys"])
        ),
        _ => format!("{src}{wh}{win}.unique(property('category')).count() >= 2"),
    }
}

/// A top-level event condition whose `where` holds nested events.
pub(crate) fn random_nested(r: &mut Rng) -> String {
    let parent = r.pick(&FUNNEL_EVENTS).to_string();
    let inner = nested_atom(r, 2);
    let wh = match r.next(5) {
        0 => format!("{} AND {inner}", random_where(r)),
        1 => format!("({} OR {inner})", random_where(r)),
        2 => format!("NOT ({inner})"),
        3 => format!("property('price') >= trait('logins') AND {inner}"),
        _ => inner,
    };
    let win = random_window(r);
    match r.next(6) {
        0..=3 => format!(
            "{parent}.where({wh}){win}.count() {} {}",
            r.pick(&[">=", ">=", "=", "<"]),
            r.next(3)
        ),
        4 => format!(
            "{parent}.where({wh}){win}.sum(property('price')) > {}",
            r.next(300)
        ),
        _ => format!("{parent}.where({wh}){win}.last(property('category')) = 'books'"),
    }
}

async fn create(store: &Store, key: &str, text: &str, include_anonymous: bool) {
    let f: audiences::lang::definition::DefinitionFile = serde_json::from_value(json!({
        "key": key, "kind": "audience", "definition": text, "include_anonymous": include_anonymous
    }))
    .unwrap();
    audiences::definitions::create(store, &Space::default(), &f)
        .await
        .unwrap_or_else(|e| panic!("{text}: {e}"));
}

/// Current members: profile ids, or account ids for account audiences.
async fn members(store: &Store, key: &str) -> BTreeSet<String> {
    let (_, batches) = audiences::compute::members(store, &Space::default(), key, None)
        .await
        .unwrap()
        .unwrap();
    let mut out = BTreeSet::new();
    for b in batches {
        use arrow::array::AsArray;
        for c in ["profile_id", "account_id"] {
            if let Some(p) = b.column_by_name(c) {
                out.extend(p.as_string::<i32>().iter().flatten().map(String::from));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn random_definitions_agree_with_the_reference_evaluator() {
    let store = generated_store(12_000, 5).await;
    let mut r = Rng(0x9E3779B97F4A7C15);
    let mut defs = Vec::new();
    for i in 0..60 {
        let text = random_condition(&mut r, 2);
        let anon = r.next(4) == 0;
        create(&store, &format!("a{i}"), &text, anon).await;
        defs.push((format!("a{i}"), text, anon));
    }
    // references to other audiences
    create(
        &store,
        "ref1",
        "audience('a0') OR NOT (audience('a1'))",
        false,
    )
    .await;
    let as_of = END - 3 * DAY;
    let reports = compute_all(&store, as_of).await;
    assert_eq!(reports.len(), 61);
    let w = world(&store).await;
    let mut memberships: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut nonempty = 0;
    for (key, text, anon) in &defs {
        let cond = audiences::lang::parse(text).unwrap();
        let cx = Ctx::at(&w, as_of, &memberships);
        let want = reference(&cx, &cond, *anon);
        let got = members(&store, key).await;
        assert_eq!(got, want, "{key}: {text} (anonymous included: {anon})");
        nonempty += usize::from(!want.is_empty() && want.len() < w.profiles.len());
        memberships.insert(key.clone(), want);
    }
    let cx = Ctx::at(&w, as_of, &memberships);
    let want = reference(
        &cx,
        &audiences::lang::parse("audience('a0') OR NOT (audience('a1'))").unwrap(),
        false,
    );
    assert_eq!(members(&store, "ref1").await, want);
    assert!(nonempty >= 30, "too many trivial definitions: {nonempty}");
}

#[tokio::test(flavor = "multi_thread")]
async fn random_nested_events_agree_with_the_reference_evaluator() {
    let store = generated_store(12_000, 9).await;
    let mut r = Rng(0xD1B54A32D192ED03);
    let mut defs = Vec::new();
    for i in 0..50 {
        let text = match r.next(4) {
            0 => format!("{} AND {}", random_nested(&mut r), random_atom(&mut r)),
            1 => format!("({} OR {})", random_nested(&mut r), random_nested(&mut r)),
            _ => random_nested(&mut r),
        };
        let anon = r.next(4) == 0;
        create(&store, &format!("n{i}"), &text, anon).await;
        defs.push((format!("n{i}"), text, anon));
    }
    let as_of = END - 3 * DAY;
    compute_all(&store, as_of).await;
    let w = world(&store).await;
    let none = BTreeMap::new();
    let cx = Ctx::at(&w, as_of, &none);
    let mut nonempty = 0;
    for (key, text, anon) in &defs {
        let cond = audiences::lang::parse(text).unwrap();
        let want = reference(&cx, &cond, *anon);
        let got = members(&store, key).await;
        assert_eq!(got, want, "{key}: {text} (anonymous included: {anon})");
        nonempty += usize::from(!want.is_empty() && want.len() < w.profiles.len());
    }
    assert!(nonempty >= 25, "too many trivial definitions: {nonempty}");
}

/// Whether an account-level condition reads profiles (and so means `ANY(...)`).
fn reads_profiles(c: &Condition, account_keys: &BTreeSet<String>) -> bool {
    let v = |v: &Value| match v {
        Value::Aggregate { .. } => true,
        Value::Audience { key } => !account_keys.contains(key),
        _ => false,
    };
    match c {
        Condition::Compare { value, operand, .. } => {
            v(value) || matches!(operand, Some(Operand::Value { value }) if v(value))
        }
        Condition::Bare { value } => v(value),
        _ => false,
    }
}

/// The reference for account audiences.
struct AccountCx<'a> {
    cx: Ctx<'a>,
    include_anonymous: bool,
    account_keys: BTreeSet<String>,
    /// account audience key → member account ids
    account_audiences: BTreeMap<String, BTreeSet<String>>,
}

fn account_eval(ax: &AccountCx, c: &Condition, acct: &str) -> bool {
    let none = BTreeSet::new();
    let profiles: Vec<&String> = ax
        .cx
        .w
        .links
        .get(acct)
        .unwrap_or(&none)
        .iter()
        .filter(|p| ax.include_anonymous || ax.cx.w.profiles.get(*p) == Some(&true))
        .collect();
    let matching = |item: &Condition| profiles.iter().filter(|p| eval(&ax.cx, item, p)).count();
    match c {
        Condition::And { items } => items.iter().all(|i| account_eval(ax, i, acct)),
        Condition::Or { items } => items.iter().any(|i| account_eval(ax, i, acct)),
        Condition::Not { item } => !account_eval(ax, item, acct),
        Condition::Any { item } => matching(item) > 0,
        Condition::All { item } => !profiles.is_empty() && matching(item) == profiles.len(),
        Condition::AllNot { item } => matching(item) == 0,
        c if reads_profiles(c, &ax.account_keys) => matching(c) > 0,
        Condition::Compare { value, op, operand } => {
            let val = |v: &Value| match v {
                Value::Literal { value } => lit(value),
                Value::Trait { key } => {
                    from_json(ax.cx.w.account_traits.get(acct).and_then(|t| t.get(key)))
                }
                _ => panic!("not in the tested subset"),
            };
            let rhs = match operand {
                Some(Operand::Value { value }) => Some(val(value)),
                _ => None,
            };
            cmp(
                &val(value),
                *op,
                operand.as_ref(),
                rhs.as_ref(),
                ax.cx.as_of,
            )
        }
        Condition::Bare {
            value: Value::Audience { key },
        } => ax.account_audiences[key].contains(acct),
        _ => panic!("not in the tested subset"),
    }
}

fn all_accounts(w: &World) -> BTreeSet<String> {
    w.links
        .keys()
        .chain(w.account_traits.keys())
        .cloned()
        .collect()
}

pub(crate) fn random_account_condition(r: &mut Rng, depth: u32) -> String {
    if depth > 0 && r.next(3) == 0 {
        return match r.next(3) {
            0 => format!(
                "{} AND {}",
                random_account_condition(r, depth - 1),
                random_account_condition(r, depth - 1)
            ),
            1 => format!(
                "({} OR {})",
                random_account_condition(r, depth - 1),
                random_account_condition(r, depth - 1)
            ),
            _ => format!("NOT ({})", random_account_condition(r, depth - 1)),
        };
    }
    match r.next(7) {
        0 => format!(
            "trait('plan') = '{}'",
            r.pick(&["free", "pro", "business", "enterprise"])
        ),
        1 => format!("trait('employees') > {}", r.next(5000)),
        2 => format!("ANY({})", random_condition(r, 1)),
        3 => format!("ALL({})", random_condition(r, 1)),
        4 => format!("ALL NOT ({})", random_condition(r, 1)),
        5 => format!("ANY({})", random_nested(r)),
        _ => random_atom(r),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn account_audiences_and_traits_agree_with_the_reference_evaluator() {
    let store = generated_store(40_000, 11).await;
    let mut r = Rng(0x2545F4914F6CDD1D);
    let mut defs: Vec<(String, String, bool)> = vec![
        // BENCH.md query 8 and its variants
        (
            "q8_all".into(),
            "trait('plan') = 'business' AND ALL(event('Logged In').within(30 days).count() >= 1)"
                .into(),
            false,
        ),
        (
            "q8_any".into(),
            "trait('plan') = 'business' AND ANY(event('Logged In').within(30 days).count() >= 1)"
                .into(),
            false,
        ),
        (
            "q8_none".into(),
            "trait('plan') = 'business' AND ALL NOT (event('Logged In').within(30 days).count() >= 1)"
                .into(),
            false,
        ),
    ];
    for i in 0..30 {
        defs.push((
            format!("c{i}"),
            random_account_condition(&mut r, 2),
            r.next(3) == 0,
        ));
    }
    defs.push((
        "cref".into(),
        "audience('q8_any') AND NOT (audience('c0'))".into(),
        false,
    ));
    for (key, text, anon) in &defs {
        let f: audiences::lang::definition::DefinitionFile = serde_json::from_value(json!({
            "key": key, "kind": "audience", "level": "accounts", "definition": text,
            "include_anonymous": anon
        }))
        .unwrap();
        audiences::definitions::create(&store, &Space::default(), &f)
            .await
            .unwrap_or_else(|e| panic!("{text}: {e}"));
    }
    let traits = [
        "event('Order Completed').within(90 days).count()",
        "event('Order Completed').sum(property('price'))",
        "event('Product Viewed').unique(property('category')).count()",
        "event('Product Viewed').last(property('category'))",
        "event('Checkout Started').where(event('Order Completed').within(parent: 7 days).count() = 0).count()",
    ];
    for (i, t) in traits.iter().enumerate() {
        let f: audiences::lang::definition::DefinitionFile = serde_json::from_value(json!({
            "key": format!("at{i}"), "kind": "computed_trait", "level": "accounts", "definition": t
        }))
        .unwrap();
        audiences::definitions::create(&store, &Space::default(), &f)
            .await
            .unwrap_or_else(|e| panic!("{t}: {e}"));
    }
    let as_of = END - 3 * DAY;
    compute_all(&store, as_of).await;
    let w = world(&store).await;
    let accounts = all_accounts(&w);
    assert!(accounts.len() >= 20, "only {} accounts", accounts.len());
    let none = BTreeMap::new();
    let account_keys: BTreeSet<String> = defs.iter().map(|d| d.0.clone()).collect();
    let mut account_audiences = BTreeMap::new();
    let mut nonempty = 0;
    for (key, text, anon) in &defs {
        let ax = AccountCx {
            cx: Ctx::at(&w, as_of, &none),
            include_anonymous: *anon,
            account_keys: account_keys.clone(),
            account_audiences: account_audiences.clone(),
        };
        let cond = audiences::lang::parse(text).unwrap();
        let want: BTreeSet<String> = accounts
            .iter()
            .filter(|a| account_eval(&ax, &cond, a))
            .cloned()
            .collect();
        let got = members(&store, key).await;
        assert_eq!(got, want, "{key}: {text} (anonymous included: {anon})");
        nonempty += usize::from(!want.is_empty() && want.len() < accounts.len());
        account_audiences.insert(key.clone(), want);
    }
    assert!(nonempty >= 15, "too many trivial definitions: {nonempty}");
    // account computed traits: reducers over the events of every linked profile
    let cx = Ctx::at(&w, as_of, &none);
    for (i, t) in traits.iter().enumerate() {
        let rows = sql_rows(
            &store,
            "default",
            &format!("SELECT account_id, value FROM computed_traits WHERE key = 'at{i}'"),
        )
        .await;
        let got: BTreeMap<String, J> = rows
            .into_iter()
            .map(|r| {
                (
                    r["account_id"].as_str().unwrap().to_string(),
                    serde_json::from_str(r["value"].as_str().unwrap()).unwrap(),
                )
            })
            .collect();
        let Condition::Compare {
            value: Value::Aggregate { events, reducer },
            ..
        } = audiences::lang::parse(&format!("{t} = 0")).unwrap()
        else {
            panic!()
        };
        let mut want = BTreeMap::new();
        for a in &accounts {
            let mut evs: Vec<&Ev> = Vec::new();
            for p in w.links.get(a).into_iter().flatten() {
                evs.extend(w.events.get(p).into_iter().flatten());
            }
            evs.sort_by(|a, b| (a.ts, &a.message_id).cmp(&(b.ts, &b.message_id)));
            let owned: Vec<Ev> = evs.iter().map(|e| (*e).clone()).collect();
            let who = Who {
                pid: a,
                evs: &owned,
            };
            let v = reduce(&cx, &who, &selected(&cx, &who, &events, None), &reducer);
            let j = match v {
                RV::Missing => continue,
                RV::N(n) if n.fract() == 0.0 => json!(n as i64),
                RV::N(n) => json!(n),
                RV::S(s) => json!(s),
                RV::B(b) => json!(b),
            };
            want.insert(a.clone(), j);
        }
        let close = |a: &J, b: &J| match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * y.abs().max(1.0),
            _ => a == b,
        };
        assert!(
            got.len() == want.len()
                && got
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| g.0 == w.0 && close(g.1, w.1)),
            "account trait {t}:\n got {got:?}\nwant {want:?}"
        );
        assert!(
            want.len() >= 10,
            "account trait {t}: only {} values",
            want.len()
        );
    }
}

/// Create each hand-written case as an audience `{prefix}{i}`, compute at `as_of`, and compare
/// the members with the hand-computed user ids.
async fn check_hand_cases<T: AsRef<str>>(
    store: &Store,
    prefix: &str,
    as_of: i64,
    cases: &[(T, &[&str])],
) {
    for (i, (text, _)) in cases.iter().enumerate() {
        create(store, &format!("{prefix}{i}"), text.as_ref(), false).await;
    }
    compute_all(store, as_of).await;
    let pid = |u: &str| {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(b"user_id\0");
        h.update(u.as_bytes());
        format!("p-{:016x}", h.digest())
    };
    for (i, (text, want)) in cases.iter().enumerate() {
        let want: BTreeSet<String> = want.iter().map(|u| pid(u)).collect();
        assert_eq!(
            members(store, &format!("{prefix}{i}")).await,
            want,
            "{}",
            text.as_ref()
        );
    }
}

fn m(id: &str, user: &str, event: &str, ts: i64, props: J) -> J {
    json!({"type": "track", "messageId": id, "userId": user, "event": event, "properties": props,
           "timestamp": audiences::events::message::format_timestamp(ts),
           "receivedAt": audiences::events::message::format_timestamp(ts + 1000)})
}

#[tokio::test(flavor = "multi_thread")]
async fn window_edges_missing_values_and_type_conflicts_by_hand() {
    let store = Store::memory();
    let t0 = END;
    let msgs = [
        m(
            "1",
            "edge30",
            "Order Completed",
            t0 - 30 * DAY,
            json!({"price": 10}),
        ), // exactly 30 days: in
        m(
            "2",
            "over30",
            "Order Completed",
            t0 - 30 * DAY - 1,
            json!({"price": 10}),
        ), // 1 µs older: out
        m("3", "atasof", "Order Completed", t0, json!({"price": 10})), // the as-of instant: in
        m(
            "4",
            "future",
            "Order Completed",
            t0 + 1,
            json!({"price": 10}),
        ), // after the as-of: never
        m(
            "5",
            "btw",
            "Order Completed",
            t0 - 7 * DAY,
            json!({"price": "12"}),
        ), // between(7, 30) lower edge, string price
        m(
            "6",
            "btw2",
            "Order Completed",
            t0 - 7 * DAY + 1,
            json!({"price": 12}),
        ), // just inside 7 days: not between
        m("7", "noprice", "Order Completed", t0 - DAY, json!({})),
    ];
    let dir = tempfile::tempdir().unwrap();
    let text: String = msgs.iter().map(|x| x.to_string() + "\n").collect();
    let p = dir.path().join("e.ndjson");
    std::fs::write(&p, text).unwrap();
    ingest_files(&store, "default", &[p], &dir.path().join("d")).await;
    let cases: &[(&str, &[&str])] = &[
        (
            "event('Order Completed').within(30 days).count() >= 1",
            &["edge30", "atasof", "btw", "btw2", "noprice"],
        ),
        (
            "event('Order Completed').between(7 days, 30 days).count() >= 1",
            &["edge30", "btw"],
        ),
        (
            "event('Order Completed').where(property('price') = 12).count() >= 1",
            &["btw2"],
        ),
        (
            "event('Order Completed').where(property('price') = '12').count() >= 1",
            &["btw"],
        ),
        (
            "event('Order Completed').where(property('price') > 11).count() >= 1",
            &["btw2"],
        ),
        (
            "event('Order Completed').where(NOT (property('price') = 10)).count() >= 1",
            &["btw", "btw2", "noprice"],
        ),
        (
            "event('Order Completed').where(property('price').is_null()).count() >= 1",
            &["noprice"],
        ),
        (
            "event('Order Completed').within(1 day).count() = 0",
            &["edge30", "over30", "btw", "btw2", "future"],
        ),
        (
            "event('Order Completed').sum(property('price')) < 11",
            &["edge30", "over30", "atasof"],
        ),
    ];
    check_hand_cases(&store, "h", t0, cases).await;
}

/// Funnels, sequences and dynamic references on hand-made histories: a child at its parent's
/// instant, children exactly at and just past the window edge, repeated and simultaneous
/// parents, missing reference properties, traits inside `where`.
#[tokio::test(flavor = "multi_thread")]
async fn funnels_and_dynamic_references_by_hand() {
    const H: i64 = 3_600_000_000;
    let store = Store::memory();
    let t = END - 10 * DAY;
    let mut msgs = vec![
        m("1", "same", "Checkout Started", t, json!({})),
        m("2", "same", "Order Completed", t, json!({})),
        m("3", "edge", "Checkout Started", t, json!({})),
        m("4", "edge", "Order Completed", t + 7 * DAY, json!({})),
        m("5", "late", "Checkout Started", t, json!({})),
        m("6", "late", "Order Completed", t + 7 * DAY + 1, json!({})),
        m("7", "repeat", "Checkout Started", t, json!({})),
        m("8", "repeat", "Checkout Started", t + DAY, json!({})),
        m("9", "repeat", "Order Completed", t + 2 * DAY, json!({})),
        m("10", "twins", "Checkout Started", t, json!({"n": 1})),
        m("11", "twins", "Checkout Started", t, json!({"n": 2})),
        m("12", "twins", "Order Completed", t + H, json!({})),
        m(
            "13",
            "ref",
            "Product Viewed",
            t,
            json!({"product_id": "a", "price": 150}),
        ),
        m(
            "14",
            "ref",
            "Order Completed",
            t + H,
            json!({"product_id": "a"}),
        ),
        m(
            "15",
            "noref",
            "Product Viewed",
            t,
            json!({"product_id": "a", "price": 150}),
        ),
        m("16", "noref", "Order Completed", t + H, json!({})),
        m("17", "otherref", "Product Viewed", t, json!({"price": 90})),
        m(
            "18",
            "otherref",
            "Order Completed",
            t + H,
            json!({"product_id": "a"}),
        ),
        m("19", "seq", "Product Viewed", t, json!({})),
        m("20", "seq", "Product Added", t + H, json!({})),
        m("21", "seq", "Checkout Started", t + 2 * H, json!({})),
        m("22", "gap", "Product Viewed", t, json!({})),
        m("23", "gap", "Product Added", t + H, json!({})),
        m("24", "gap", "Checkout Started", t + 3 * H, json!({})),
    ];
    for (id, user, limit) in [("25", "ref", 100), ("26", "noref", 200)] {
        msgs.push(json!({"type": "identify", "messageId": id, "userId": user,
            "traits": {"limit": limit},
            "timestamp": audiences::events::message::format_timestamp(t - DAY)}));
    }
    let dir = tempfile::tempdir().unwrap();
    let text: String = msgs.iter().map(|x| x.to_string() + "\n").collect();
    let p = dir.path().join("e.ndjson");
    std::fs::write(&p, text).unwrap();
    ingest_files(&store, "default", &[p], &dir.path().join("d")).await;
    let funnel = |inner: &str| {
        format!(
            "event('Checkout Started').where(event('Order Completed').within(parent: 7 days).count() {inner}).count() >= 1"
        )
    };
    let cases: Vec<(String, &[&str])> = vec![
        (funnel(">= 1"), &["edge", "repeat", "twins"]),
        (funnel("= 0"), &["same", "late", "seq", "gap"]),
        (
            "event('Checkout Started').where(event('Order Completed').within(parent: 7 days).count() >= 1).count() >= 2".into(),
            &["repeat", "twins"],
        ),
        (
            "event('Checkout Started').where(event('Order Completed').between(parent: 1 day, 7 days).count() >= 1).count() >= 1".into(),
            &["edge", "repeat"],
        ),
        (
            "event('Product Viewed').where(event('Order Completed').where(property('product_id') = property(parent: 'product_id')).within(parent: 1 day).count() >= 1).count() >= 1".into(),
            &["ref"],
        ),
        (
            "event('Product Viewed').where(event('Order Completed').where(property('product_id') != property(parent: 'product_id')).within(parent: 1 day).count() >= 1).count() >= 1".into(),
            &[],
        ),
        (
            "event('Product Viewed').where(event('Order Completed').where(NOT (property('product_id') = property(parent: 'product_id'))).within(parent: 1 day).count() >= 1).count() >= 1".into(),
            &["noref", "otherref"],
        ),
        (
            "event('Product Viewed').where(property('price') >= trait('limit')).count() >= 1".into(),
            &["ref"],
        ),
        (
            "event('Product Viewed').where(event('Product Added').where(event('Checkout Started').within(parent: 90 minutes).count() >= 1).within(parent: 90 minutes).count() >= 1).count() >= 1".into(),
            &["seq"],
        ),
    ];
    check_hand_cases(&store, "f", END, &cases).await;
}

/// The compiled plan of a simple definition equals one built by hand with the DataFrame API.
#[tokio::test(flavor = "multi_thread")]
async fn a_simple_definition_compiles_to_the_hand_built_plan() {
    use datafusion::functions_aggregate::expr_fn::count;
    use datafusion::logical_expr::cast;
    use datafusion::prelude::{col, lit};
    let store = generated_store(500, 1).await;
    let space = Space::default();
    audiences::identity::resolve(
        &store,
        &space,
        &audiences::identity::IdentityRules::default(),
        false,
    )
    .await
    .unwrap();
    let ctx = audiences::tables::session(&store, &space).await.unwrap();
    let def: audiences::lang::definition::DefinitionFile = serde_json::from_value(json!({
        "key": "k", "kind": "audience", "definition": "event('Order Completed').within(30 days).count() >= 2"
    }))
    .unwrap();
    let computed = BTreeSet::new();
    let inputs = audiences::plan::Inputs {
        ctx: &ctx,
        as_of: END,
        created_at: 0,
        computed_traits: &computed,
        account_keys: &computed,
    };
    let compiled = audiences::plan::compile_audience(&inputs, &def)
        .await
        .unwrap();

    let ts = |t: i64| {
        lit(datafusion::common::ScalarValue::TimestampMicrosecond(
            Some(t),
            Some("UTC".into()),
        ))
    };
    let lo = END - 30 * DAY;
    let pred = col("type")
        .eq(lit("track"))
        .and(col("event").eq(lit("Order Completed")))
        .and(col("timestamp").gt_eq(ts(lo)))
        .and(col("timestamp").lt_eq(ts(END)));
    let events = ctx
        .table("events_indexed")
        .await
        .unwrap()
        .filter(
            col("profile_idx")
                .is_not_null()
                .and(col("timestamp").lt_eq(ts(END))),
        )
        .unwrap()
        .filter(col("timestamp").gt_eq(ts(lo)))
        .unwrap()
        // the rows any aggregate needs, before the join and the aggregation; with only one
        // row predicate, the aggregate has no FILTER of its own
        .filter(pred)
        .unwrap()
        .aggregate(
            vec![col("profile_idx").alias("__p")],
            vec![count(lit(1)).alias("__f0")],
        )
        .unwrap();
    let coalesce = datafusion::functions::expr_fn::coalesce;
    let count_value = cast(
        coalesce(vec![col("__f0"), lit(0i64)]),
        arrow::datatypes::DataType::Float64,
    );
    let hand = ctx
        .table("profiles")
        .await
        .unwrap()
        .select(vec![col("profile_idx"), col("profile_id"), col("known")])
        .unwrap()
        .filter(col("known"))
        .unwrap()
        .join(
            events,
            datafusion::common::JoinType::Left,
            &["profile_idx"],
            &["__p"],
            None,
        )
        .unwrap()
        .drop_columns(&["__p"])
        .unwrap()
        .filter(coalesce(vec![count_value.gt_eq(lit(2.0)), lit(false)]))
        .unwrap()
        .select(vec![col("profile_idx"), col("profile_id")])
        .unwrap();
    let show = |df: &datafusion::dataframe::DataFrame| {
        format!("{}", df.logical_plan().display_indent_schema())
    };
    assert_eq!(show(&compiled.frame), show(&hand));
    // And it runs to the same members as the hand-built plan.
    let a = compiled.frame.collect().await.unwrap();
    let b = hand.collect().await.unwrap();
    let rows = |bs: &[arrow::array::RecordBatch]| bs.iter().map(|b| b.num_rows()).sum::<usize>();
    assert_eq!(rows(&a), rows(&b));
}

/// Versions: v1 stays readable after v2; v2 = v1 + entered − exited; entered_at is kept for
/// profiles that stay; the window sliding with the as-of alone changes membership.
#[tokio::test(flavor = "multi_thread")]
async fn versions_and_entered_exited_changes() {
    let store = generated_store(8000, 17).await;
    create(
        &store,
        "recent",
        "event('Product Viewed').within(7 days).count() >= 1",
        false,
    )
    .await;
    let space = Space::default();
    let rules = audiences::identity::IdentityRules::default();
    let t1 = END - 20 * DAY;
    let t2 = END - 15 * DAY;
    let r1 = audiences::compute::compute(&store, &space, &rules, t1, &[])
        .await
        .unwrap();
    let r2 = audiences::compute::compute(&store, &space, &rules, t2, &[])
        .await
        .unwrap();
    let set = |batches: &[arrow::array::RecordBatch], col: &str| -> BTreeMap<String, i64> {
        use arrow::array::AsArray;
        let mut out = BTreeMap::new();
        for b in batches {
            let p = b.column_by_name("profile_id").unwrap().as_string::<i32>();
            let e = b
                .column_by_name(col)
                .unwrap()
                .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
            for i in 0..b.num_rows() {
                out.insert(p.value(i).to_string(), e.value(i));
            }
        }
        out
    };
    let (v1, b1) = audiences::compute::members(&store, &space, "recent", Some(1))
        .await
        .unwrap()
        .unwrap();
    let (v2, b2) = audiences::compute::members(&store, &space, "recent", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((v1.version, v2.version), (1, 2));
    let m1 = set(&b1, "entered_at");
    let m2 = set(&b2, "entered_at");
    assert!(m1.values().all(|t| *t == t1));
    let changes = sql_rows(
        &store,
        "default",
        "SELECT profile_id, change, version FROM membership_changes WHERE audience_key = 'recent'",
    )
    .await;
    let of = |c: &str, v: i64| -> BTreeSet<String> {
        changes
            .iter()
            .filter(|r| r["change"] == c && r["version"] == v)
            .map(|r| r["profile_id"].as_str().unwrap().to_string())
            .collect()
    };
    let k1: BTreeSet<String> = m1.keys().cloned().collect();
    let k2: BTreeSet<String> = m2.keys().cloned().collect();
    assert_eq!(of("entered", 1), k1);
    assert!(of("exited", 1).is_empty());
    assert_eq!(
        of("entered", 2),
        k2.difference(&k1).cloned().collect::<BTreeSet<_>>()
    );
    assert_eq!(
        of("exited", 2),
        k1.difference(&k2).cloned().collect::<BTreeSet<_>>()
    );
    assert!(
        !of("entered", 2).is_empty() && !of("exited", 2).is_empty(),
        "the window slid: someone must enter and exit"
    );
    for (p, t) in &m2 {
        assert_eq!(*t, if k1.contains(p) { t1 } else { t2 }, "{p}");
    }
    assert_eq!((r1[0].size, r2[0].size), (k1.len() as u64, k2.len() as u64));
    // A deleted audience leaves the current memberships; its history stays.
    let n = |q: &'static str| count(&store, "default", q);
    assert_eq!(
        n("SELECT count(*) FROM memberships WHERE audience_key = 'recent'").await,
        k2.len() as i64
    );
    audiences::definitions::delete(&store, &space, "recent")
        .await
        .unwrap();
    assert_eq!(
        n("SELECT count(*) FROM memberships WHERE audience_key = 'recent'").await,
        0
    );
    assert!(n("SELECT count(*) FROM membership_changes WHERE audience_key = 'recent'").await > 0);
    assert_eq!(
        (r2[0].entered, r2[0].exited),
        (of("entered", 2).len() as u64, of("exited", 2).len() as u64)
    );
}

/// A random computed-trait expression over the generated events (numbers from `price`, text
/// from string properties, every reducer of the tested subset).
pub(crate) fn random_trait(r: &mut Rng) -> String {
    let (source, wh, win) = random_events(
        r,
        &[
            "event('Order Completed')",
            "event('Product Viewed')",
            "event('Checkout Started')",
            "event(type: 'page')",
        ],
        3,
    );
    let text = r.pick(&[
        "property('category')",
        "property('currency')",
        "property('product_id')",
    ]);
    let reducer = match r.next(11) {
        0 => "count()".to_string(),
        1 => "sum(property('price'))".to_string(),
        2 => "avg(property('price'))".to_string(),
        3 => "min(property('price'))".to_string(),
        4 => "max(property('price'))".to_string(),
        5 => format!("first({})", r.pick(&[text, &"property('price')"])),
        6 => format!("last({})", r.pick(&[text, &"property('price')"])),
        7 => format!("mode({text})"),
        8 => format!("mode({text}, {})", 1 + r.next(3)),
        9 => format!("unique({text}).count()"),
        _ => format!("unique({text})"),
    };
    format!("{source}{wh}{win}.{reducer}")
}

#[tokio::test(flavor = "multi_thread")]
async fn random_computed_traits_agree_with_the_reference_evaluator() {
    let store = generated_store(8_000, 11).await;
    let mut r = Rng(0xD1B54A32D192ED03);
    let mut defs = Vec::new();
    for i in 0..50 {
        let text = random_trait(&mut r);
        let f: audiences::lang::definition::DefinitionFile = serde_json::from_value(json!({
            "key": format!("t{i}"), "kind": "computed_trait", "definition": text
        }))
        .unwrap();
        audiences::definitions::create(&store, &Space::default(), &f)
            .await
            .unwrap_or_else(|e| panic!("{text}: {e}"));
        defs.push((format!("t{i}"), text));
    }
    let as_of = END - 2 * DAY;
    compute_all(&store, as_of).await;
    let w = world(&store).await;
    let mut got: BTreeMap<String, BTreeMap<String, J>> = BTreeMap::new();
    for row in sql_rows(
        &store,
        "default",
        "SELECT key, profile_id, value FROM computed_traits",
    )
    .await
    {
        got.entry(row["key"].as_str().unwrap().into())
            .or_default()
            .insert(
                row["profile_id"].as_str().unwrap().into(),
                serde_json::from_str(row["value"].as_str().unwrap()).unwrap(),
            );
    }
    let none = BTreeMap::new();
    let mut nontrivial = 0;
    for (key, text) in &defs {
        let value = audiences::lang::parse_value(text).unwrap();
        let cx = Ctx::at(&w, as_of, &none);
        let mut want: BTreeMap<String, RV> = BTreeMap::new();
        for p in w.profiles.keys() {
            match profile_value(&cx, &value, p) {
                RV::Missing => {}
                v => {
                    want.insert(p.clone(), v);
                }
            }
        }
        let mine: BTreeMap<String, RV> = got
            .get(key)
            .unwrap_or(&BTreeMap::new())
            .iter()
            .map(|(p, v)| match v {
                J::Array(_) => (p.clone(), RV::S(v.to_string())),
                _ => (p.clone(), from_json(Some(v))),
            })
            .collect();
        assert_eq!(
            mine.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{key}: {text}: profiles with a value differ"
        );
        for (p, v) in &want {
            let m = &mine[p];
            let same = match (m, v) {
                (RV::N(a), RV::N(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                _ => m == v,
            };
            if !same {
                let evs: Vec<String> = w_events(&w, p)
                    .iter()
                    .map(|e| format!("{} {} {:?} {}", e.ts, e.message_id, e.event, e.properties))
                    .collect();
                panic!("{key}: {text}: profile {p}: engine {m:?}, reference {v:?}\n{evs:#?}");
            }
        }
        nontrivial += usize::from(want.len() > 10);
    }
    assert!(nontrivial >= 25, "too many trivial traits: {nontrivial}");
}

fn w_events<'a>(w: &'a World, p: &str) -> &'a [Ev] {
    w.events.get(p).map(Vec::as_slice).unwrap_or(&[])
}

/// `compute KEY` recomputes a dependency unless its latest version was computed from the same
/// inputs (definition version, identity and events versions, as-of).
#[tokio::test(flavor = "multi_thread")]
async fn dependencies_computed_from_the_same_inputs_are_reused() {
    let store = generated_store(3_000, 4).await;
    let space = Space::default();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/definitions");
    for f in ["revenue_180d", "q7_high_value"] {
        let text = std::fs::read_to_string(root.join(format!("{f}.json"))).unwrap();
        let (def, _) = audiences::lang::definition::DefinitionFile::parse(&text).unwrap();
        audiences::definitions::create(&store, &space, &def)
            .await
            .unwrap();
    }
    let rules = audiences::identity::IdentityRules::default();
    let run = |as_of: i64| {
        let store = store.clone();
        let space = space.clone();
        let rules = rules.clone();
        async move {
            audiences::compute::compute(&store, &space, &rules, as_of, &["high_value".into()])
                .await
                .unwrap()
                .into_iter()
                .map(|r| (r.key, r.version))
                .collect::<Vec<_>>()
        }
    };
    let k = |s: &str, v: u64| (s.to_string(), v);
    assert_eq!(
        run(END).await,
        vec![k("revenue_180d", 1), k("high_value", 1)]
    );
    assert_eq!(run(END).await, vec![k("high_value", 2)]);
    assert_eq!(
        run(END - DAY).await,
        vec![k("revenue_180d", 2), k("high_value", 3)]
    );
    // new events: the trait is recomputed
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("more.ndjson");
    std::fs::write(
        &p,
        m(
            "late-1",
            "u-new",
            "Order Completed",
            END - 2 * DAY,
            json!({"revenue": 900}),
        )
        .to_string(),
    )
    .unwrap();
    ingest_files(&store, "default", &[p], &dir.path().join("d")).await;
    assert_eq!(
        run(END - DAY).await,
        vec![k("revenue_180d", 3), k("high_value", 4)]
    );
}

/// profile id → id type → sorted values, as a membership stream serves them.
async fn streamed_ids(
    store: &Store,
    cache: &std::sync::Arc<audiences::export::ServingCache>,
) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    use arrow::array::AsArray;
    use futures::StreamExt;
    let space = Space::default();
    let v = audiences::export::audience_version(store, &space, "buyers", None)
        .await
        .unwrap()
        .unwrap();
    let (schema, mut batches) = audiences::export::membership_stream(store, &space, &v, cache)
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    let mut last = String::new();
    while let Some(b) = batches.next().await {
        let b = b.unwrap();
        let p = b.column(0).as_string::<i32>();
        for r in 0..b.num_rows() {
            assert!(p.value(r) > last.as_str(), "sorted by profile id");
            last = p.value(r).to_string();
            let mut types = BTreeMap::new();
            for (i, f) in schema.fields().iter().enumerate().skip(2) {
                let l = b.column(i).as_list::<i32>().value(r);
                let vals: Vec<String> = l
                    .as_string::<i32>()
                    .iter()
                    .flatten()
                    .map(String::from)
                    .collect();
                if !vals.is_empty() {
                    types.insert(f.name().clone(), vals);
                }
            }
            out.insert(p.value(r).to_string(), types);
        }
    }
    out
}

/// The same from SQL over `memberships` and `identities` (the reference).
async fn sql_ids(store: &Store) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for r in sql_rows(
        store,
        "default",
        "SELECT profile_id FROM memberships WHERE audience_key = 'buyers'",
    )
    .await
    {
        out.insert(r["profile_id"].as_str().unwrap().into(), BTreeMap::new());
    }
    for r in sql_rows(
        store,
        "default",
        "SELECT profile_id, id_type, id_value FROM identities",
    )
    .await
    {
        if let Some(m) = out.get_mut(r["profile_id"].as_str().unwrap()) {
            m.entry(r["id_type"].as_str().unwrap().into())
                .or_default()
                .push(r["id_value"].as_str().unwrap().into());
        }
    }
    out.values_mut()
        .flat_map(|m| m.values_mut())
        .for_each(|v| v.sort());
    out
}

/// Membership streams attach each member's external ids from the dense-index cache; they
/// equal a SQL join of the memberships with the identities, and follow an identity change
/// (a member's new email) through the same caches (id index and finished streams).
#[tokio::test(flavor = "multi_thread")]
async fn membership_ids_follow_identity_changes() {
    let store = generated_store(3000, 23).await;
    create(
        &store,
        "buyers",
        "event('Order Completed').count() >= 1",
        false,
    )
    .await;
    compute_all(&store, END).await;
    // with memory for finished streams: the second pull of a version is served from it
    let cache = std::sync::Arc::new(audiences::export::ServingCache::new(1 << 30));
    let before = streamed_ids(&store, &cache).await;
    assert_eq!(streamed_ids(&store, &cache).await, before);
    assert!(before.len() > 10, "{}", before.len());
    assert_eq!(before, sql_ids(&store).await);
    assert!(
        before.values().any(|m| m.values().any(|v| v.len() > 1)),
        "lists of several values, not only singletons"
    );

    // a member (known by user id) gains an email
    let (pid, uid) = before
        .iter()
        .find_map(|(p, m)| m.get("user_id").map(|u| (p.clone(), u[0].clone())))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("new.ndjson");
    let line = json!({"type": "identify", "userId": uid, "messageId": "new-email-1",
        "timestamp": "2025-12-31T12:00:00Z", "traits": {"email": "zz-new@example.com"}});
    std::fs::write(&f, format!("{line}\n")).unwrap();
    ingest_files(&store, "default", &[f], &dir.path().join("d")).await;
    audiences::identity::resolve(&store, &Space::default(), &Default::default(), false)
        .await
        .unwrap();
    let after = streamed_ids(&store, &cache).await;
    assert_eq!(streamed_ids(&store, &cache).await, after);
    assert!(
        after[&pid]["email"].contains(&"zz-new@example.com".to_string()),
        "{:?}",
        after[&pid]
    );
    assert_eq!(after, sql_ids(&store).await);
}

/// `--memory-limit` bounds every query of a command: far too small, a compute fails with a
/// clear resources-exhausted message (exit 1, no panic, the committed versions untouched); in
/// between, it either completes or fails that way; large enough, it gives exactly the members
/// of an unbounded compute. Definitions: an aggregation (q4), the funnel UDAF (q5), a trait and
/// an audience over it (q7).
#[test]
fn memory_limit_fails_clearly_or_completes_identically() {
    let (_dir, store) = ingested_dir(20_000, 31);
    let store = store.as_str();
    let defs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/definitions");
    for (kind, f) in [
        ("audience", "q4_lapsed.json"),
        ("audience", "q5_checkout_funnel.json"),
        ("trait", "revenue_180d.json"),
        ("audience", "q7_high_value.json"),
    ] {
        run_ok(store, &[kind, "create", defs.join(f).to_str().unwrap()]);
    }
    run_ok(store, &["identity"]);
    let keys = ["lapsed", "checkout_funnel", "high_value"];
    let as_of = "2026-01-01T00:00:00Z";
    // profile ids per key (the version column differs between computes)
    let members = || -> Vec<Vec<String>> {
        keys.iter()
            .map(|k| {
                run_ok(store, &["members", k, "--format", "csv"])
                    .lines()
                    .skip(1)
                    .map(|l| l.split(',').next().unwrap().to_string())
                    .collect()
            })
            .collect()
    };
    let versions = || {
        run_ok(
            store,
            &[
                "--json",
                "sql",
                "SELECT audience_key, max(version) AS v FROM memberships GROUP BY audience_key ORDER BY audience_key",
            ],
        )
    };

    let out = run(
        store,
        &["--memory-limit", "16KiB", "compute", "--as-of", as_of],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("memory limit was reached"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        versions(),
        "[]\n",
        "nothing committed by the failed compute"
    );

    let out = run(
        store,
        &["--memory-limit", "3MiB", "compute", "--as-of", as_of],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            || (out.status.code() == Some(1) && err.contains("memory limit was reached")),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    run_ok(store, &["compute", "--as-of", as_of]);
    let unbounded = members();
    assert!(unbounded.iter().all(|m| !m.is_empty()), "{unbounded:?}");
    let before = versions();
    run_ok(
        store,
        &["--memory-limit", "1GiB", "compute", "--as-of", as_of],
    );
    assert!(
        members() == unbounded,
        "the bounded compute changed a membership"
    );
    assert_ne!(
        versions(),
        before,
        "the bounded compute committed new versions"
    );
}
