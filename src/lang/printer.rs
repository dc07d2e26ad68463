//! Prints an AST back to canonical text: `parse(print(ast)) == ast`.

use super::ast::*;

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Print a literal.
pub fn literal(l: &Literal) -> String {
    match l {
        Literal::Null => "null".into(),
        Literal::Bool(b) => b.to_string(),
        Literal::Number(n) => {
            if n.fract() == 0.0 && n.abs() < 1e15 {
                format!("{}", *n as i64)
            } else {
                format!("{n}")
            }
        }
        Literal::String(s) => quote(s),
    }
}

fn duration(d: &Duration) -> String {
    let unit = match (d.unit, d.amount == 1) {
        (Unit::Minute, true) => "minute",
        (Unit::Minute, false) => "minutes",
        (Unit::Hour, true) => "hour",
        (Unit::Hour, false) => "hours",
        (Unit::Day, true) => "day",
        (Unit::Day, false) => "days",
        (Unit::Week, true) => "week",
        (Unit::Week, false) => "weeks",
    };
    format!("{} {unit}", d.amount)
}

/// Print a value.
pub fn value(v: &Value) -> String {
    match v {
        Value::Literal { value } => literal(value),
        Value::Property {
            path,
            parent: false,
        } => format!("property({})", quote(path)),
        Value::Property { path, parent: true } => format!("property(parent: {})", quote(path)),
        Value::Trait { key } => format!("trait({})", quote(key)),
        Value::Context { path } => format!("context({})", quote(path)),
        Value::Audience { key } => format!("audience({})", quote(key)),
        Value::Aggregate { events, reducer } => {
            let mut s = match &events.source {
                EventSource::Track { name } => format!("event({})", quote(name)),
                EventSource::Page { name: None } => "event(type: 'page')".into(),
                EventSource::Screen { name: None } => "event(type: 'screen')".into(),
                EventSource::Page { name: Some(n) } => {
                    format!("event(type: 'page', name: {})", quote(n))
                }
                EventSource::Screen { name: Some(n) } => {
                    format!("event(type: 'screen', name: {})", quote(n))
                }
            };
            for f in &events.filters {
                s.push_str(&match f {
                    Filter::Where { condition: c } => format!(".where({})", condition(c)),
                    Filter::Within { duration: d } => format!(".within({})", duration(d)),
                    Filter::Between { from, to } => {
                        format!(".between({}, {})", duration(from), duration(to))
                    }
                    Filter::WithinParent { duration: d } => {
                        format!(".within(parent: {})", duration(d))
                    }
                    Filter::BetweenParent { from, to } => {
                        format!(".between(parent: {}, {})", duration(from), duration(to))
                    }
                });
            }
            s.push_str(&match reducer {
                Reducer::Count => ".count()".to_string(),
                Reducer::Sum { value: v } => format!(".sum({})", value(v)),
                Reducer::Avg { value: v } => format!(".avg({})", value(v)),
                Reducer::Min { value: v } => format!(".min({})", value(v)),
                Reducer::Max { value: v } => format!(".max({})", value(v)),
                Reducer::Mode {
                    value: v,
                    min_count,
                } => format!(".mode({}, {min_count})", value(v)),
                Reducer::First { value: v } => format!(".first({})", value(v)),
                Reducer::Last { value: v } => format!(".last({})", value(v)),
                Reducer::Unique { value: v } => format!(".unique({})", value(v)),
                Reducer::UniqueCount { value: v } => format!(".unique({}).count()", value(v)),
            });
            s
        }
    }
}

fn operand(o: &Operand) -> String {
    match o {
        Operand::Value { value: v } => value(v),
        Operand::List { items } => format!(
            "[{}]",
            items.iter().map(literal).collect::<Vec<_>>().join(", ")
        ),
        Operand::Duration { duration: d } => duration(d),
    }
}

fn needs_parens(c: &Condition, parent_is_and: bool) -> bool {
    match c {
        Condition::Or { .. } => parent_is_and,
        _ => false,
    }
}

/// Print a condition.
pub fn condition(c: &Condition) -> String {
    match c {
        Condition::And { items } => items
            .iter()
            .map(|i| {
                if needs_parens(i, true) {
                    format!("({})", condition(i))
                } else {
                    condition(i)
                }
            })
            .collect::<Vec<_>>()
            .join(" AND "),
        Condition::Or { items } => items.iter().map(condition).collect::<Vec<_>>().join(" OR "),
        Condition::Not { item } => format!("NOT ({})", condition(item)),
        Condition::Any { item } => format!("ANY ({})", condition(item)),
        Condition::All { item } => format!("ALL ({})", condition(item)),
        Condition::AllNot { item } => format!("ALL NOT ({})", condition(item)),
        Condition::Bare { value: v } => value(v),
        Condition::Compare {
            value: v,
            op,
            operand: o,
        } => match (op.symbol(), o) {
            (Some(sym), Some(o)) => format!("{} {sym} {}", value(v), operand(o)),
            (_, Some(o)) => format!("{}.{}({})", value(v), op.method(), operand(o)),
            (_, None) => format!("{}.{}()", value(v), op.method()),
        },
    }
}
