//! A hand-written recursive-descent parser for the audience query language.
//!
//! ```text
//! condition := and ( OR and )*
//! and       := unary ( AND unary )*
//! unary     := NOT '(' condition ')' | ANY '(' condition ')' | ALL NOT '(' condition ')'
//!            | ALL '(' condition ')' | '(' condition ')' | comparison
//! comparison:= value ( ('=' | '!=' | '>' | '>=' | '<' | '<=') value
//!                    | '.' comparator '(' args ')' )?
//! value     := literal | property('p') | property(parent: 'p') | trait('k') | context('p')
//!            | audience('k') | event('Name') filters reducer | event(type: 'page'[, name: 'N']) ...
//! filters   := ( '.where(' condition ')' | '.within(' [parent:] dur ')'
//!            | '.between(' [parent:] dur ',' dur ')' )*
//! reducer   := '.count()' | '.sum(' value ')' | '.avg(..)' | '.min(..)' | '.max(..)'
//!            | '.mode(' value [, n] ')' | '.first(..)' | '.last(..)' | '.unique(' value ')' ['.count()']
//! ```
//!
//! Errors name the line, the column, the offending text and what was expected.

use super::ast::*;

/// At most this many primary expressions (comparisons and bare conditions) per definition.
pub const MAX_PRIMARY: usize = 50;
/// At most this nesting depth (parentheses, NOT/ANY/ALL, where clauses).
pub const MAX_DEPTH: usize = 10;

/// A parse or validation error with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// The offending text (empty at the end of input).
    pub found: String,
    /// What was expected.
    pub expected: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let found = if self.found.is_empty() {
            "end of input".to_string()
        } else {
            format!("'{}'", self.found)
        };
        write!(
            f,
            "line {}, column {}: expected {}, found {}",
            self.line, self.column, self.expected, found
        )
    }
}

impl std::error::Error for ParseError {}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(f64),
    Sym(&'static str),
    End,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    text: String,
    line: usize,
    column: usize,
}

fn lex(src: &str) -> Result<Vec<Token>, ParseError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line, mut col) = (0usize, 1usize, 1usize);
    let advance = |i: &mut usize, line: &mut usize, col: &mut usize, c: char| {
        *i += 1;
        if c == '\n' {
            *line += 1;
            *col = 1;
        } else {
            *col += 1;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            advance(&mut i, &mut line, &mut col, c);
            continue;
        }
        let (start_line, start_col, start) = (line, col, i);
        let err = |expected: &str, found: String| ParseError {
            line: start_line,
            column: start_col,
            found,
            expected: expected.into(),
        };
        if c == '\'' || c == '"' {
            let quote = c;
            advance(&mut i, &mut line, &mut col, c);
            let mut s = String::new();
            loop {
                let Some(&d) = chars.get(i) else {
                    return Err(err(
                        &format!("a closing {quote}"),
                        chars[start..].iter().collect(),
                    ));
                };
                advance(&mut i, &mut line, &mut col, d);
                if d == '\\' {
                    let Some(&e) = chars.get(i) else {
                        return Err(err("an escaped character", String::new()));
                    };
                    advance(&mut i, &mut line, &mut col, e);
                    s.push(match e {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    });
                } else if d == quote {
                    break;
                } else {
                    s.push(d);
                }
            }
            out.push(Token {
                tok: Tok::Str(s),
                text: chars[start..i].iter().collect(),
                line: start_line,
                column: start_col,
            });
            continue;
        }
        if c.is_ascii_digit() || (c == '-' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            advance(&mut i, &mut line, &mut col, c);
            while let Some(&d) = chars.get(i) {
                if d.is_ascii_digit()
                    || d == '.' && chars.get(i + 1).is_some_and(|e| e.is_ascii_digit())
                    || d == 'e'
                    || d == 'E'
                {
                    advance(&mut i, &mut line, &mut col, d);
                } else {
                    break;
                }
            }
            let text: String = chars[start..i].iter().collect();
            let n: f64 = text.parse().map_err(|_| err("a number", text.clone()))?;
            out.push(Token {
                tok: Tok::Num(n),
                text,
                line: start_line,
                column: start_col,
            });
            continue;
        }
        if c.is_alphabetic() || c == '_' {
            while let Some(&d) = chars.get(i) {
                if d.is_alphanumeric() || d == '_' {
                    advance(&mut i, &mut line, &mut col, d);
                } else {
                    break;
                }
            }
            let text: String = chars[start..i].iter().collect();
            out.push(Token {
                tok: Tok::Ident(text.clone()),
                text,
                line: start_line,
                column: start_col,
            });
            continue;
        }
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        let sym: Option<&'static str> = match two.as_str() {
            "!=" => Some("!="),
            ">=" => Some(">="),
            "<=" => Some("<="),
            "==" => Some("=="),
            _ => None,
        };
        let sym = match sym {
            Some(s) => {
                let second = chars[i + 1];
                advance(&mut i, &mut line, &mut col, c);
                advance(&mut i, &mut line, &mut col, second);
                s
            }
            None => {
                let s = match c {
                    '(' => "(",
                    ')' => ")",
                    '[' => "[",
                    ']' => "]",
                    ',' => ",",
                    '.' => ".",
                    ':' => ":",
                    '=' => "=",
                    '>' => ">",
                    '<' => "<",
                    _ => return Err(err("an expression", c.to_string())),
                };
                advance(&mut i, &mut line, &mut col, c);
                s
            }
        };
        let sym = if sym == "==" { "=" } else { sym };
        out.push(Token {
            tok: Tok::Sym(sym),
            text: chars[start..i].iter().collect(),
            line: start_line,
            column: start_col,
        });
    }
    out.push(Token {
        tok: Tok::End,
        text: String::new(),
        line,
        column: col,
    });
    Ok(out)
}

struct Parser {
    toks: Vec<Token>,
    pos: usize,
    depth: usize,
    primaries: usize,
    /// Inside the `where` of an event query (property() allowed).
    in_event: usize,
}

type R<T> = Result<T, ParseError>;

/// Parse a definition into its condition.
pub fn parse(src: &str) -> R<Condition> {
    let mut p = Parser::new(src)?;
    let c = p.condition()?;
    if p.peek().tok != Tok::End {
        return Err(p.error_here("AND, OR, or the end of the definition"));
    }
    Ok(c)
}

/// Parse a scalar expression (a computed trait definition such as
/// `event('Order Completed').within(30 days).sum(property('revenue'))`).
pub fn parse_value(src: &str) -> R<Value> {
    let mut p = Parser::new(src)?;
    let v = p.value()?;
    if p.peek().tok != Tok::End {
        return Err(p.error_here("the end of the definition"));
    }
    if !matches!(v, Value::Aggregate { .. }) {
        return Err(ParseError {
            line: 1,
            column: 1,
            found: src.chars().take(40).collect(),
            expected: "an event query with a reducer, e.g. event('X').count()".into(),
        });
    }
    Ok(v)
}

fn kw(t: &Token, word: &str) -> bool {
    matches!(&t.tok, Tok::Ident(s) if s.eq_ignore_ascii_case(word))
}

impl Parser {
    fn new(src: &str) -> R<Parser> {
        Ok(Parser {
            toks: lex(src)?,
            pos: 0,
            depth: 0,
            primaries: 0,
            in_event: 0,
        })
    }

    fn peek(&self) -> &Token {
        &self.toks[self.pos.min(self.toks.len() - 1)]
    }
    fn peek_at(&self, k: usize) -> &Token {
        &self.toks[(self.pos + k).min(self.toks.len() - 1)]
    }
    fn next(&mut self) -> Token {
        let t = self.peek().clone();
        if self.pos < self.toks.len() - 1 {
            self.pos += 1;
        }
        t
    }
    fn error_at(t: &Token, expected: &str) -> ParseError {
        ParseError {
            line: t.line,
            column: t.column,
            found: t.text.clone(),
            expected: expected.into(),
        }
    }
    fn error_here(&self, expected: &str) -> ParseError {
        Self::error_at(self.peek(), expected)
    }
    fn sym(&mut self, s: &'static str) -> R<()> {
        if self.peek().tok == Tok::Sym(s) {
            self.next();
            Ok(())
        } else {
            Err(self.error_here(&format!("'{s}'")))
        }
    }
    fn is_sym(&self, s: &'static str) -> bool {
        self.peek().tok == Tok::Sym(s)
    }
    fn string(&mut self, what: &str) -> R<String> {
        match self.peek().tok.clone() {
            Tok::Str(s) => {
                self.next();
                Ok(s)
            }
            _ => Err(self.error_here(what)),
        }
    }
    fn enter(&mut self) -> R<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error_here(&format!("at most {MAX_DEPTH} levels of nesting")));
        }
        Ok(())
    }

    fn condition(&mut self) -> R<Condition> {
        self.junction("OR", Self::and, |items| Condition::Or { items })
    }

    fn and(&mut self) -> R<Condition> {
        self.junction("AND", Self::unary, |items| Condition::And { items })
    }

    /// `operand (WORD operand)*`, folded into `make` when there is more than one operand.
    fn junction(
        &mut self,
        word: &str,
        operand: fn(&mut Self) -> R<Condition>,
        make: fn(Vec<Condition>) -> Condition,
    ) -> R<Condition> {
        let mut items = vec![operand(self)?];
        while kw(self.peek(), word) {
            self.next();
            items.push(operand(self)?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            make(items)
        })
    }

    fn group(&mut self) -> R<Condition> {
        self.sym("(")?;
        self.enter()?;
        let c = self.condition()?;
        self.depth -= 1;
        self.sym(")")?;
        Ok(c)
    }

    fn unary(&mut self) -> R<Condition> {
        let t = self.peek().clone();
        if kw(&t, "NOT") {
            self.next();
            return Ok(Condition::Not {
                item: Box::new(self.group()?),
            });
        }
        if kw(&t, "ANY") && self.peek_at(1).tok == Tok::Sym("(") {
            self.next();
            return Ok(Condition::Any {
                item: Box::new(self.group()?),
            });
        }
        if kw(&t, "ALL") {
            self.next();
            if kw(self.peek(), "NOT") {
                self.next();
                return Ok(Condition::AllNot {
                    item: Box::new(self.group()?),
                });
            }
            return Ok(Condition::All {
                item: Box::new(self.group()?),
            });
        }
        if t.tok == Tok::Sym("(") {
            return self.group();
        }
        self.comparison()
    }

    fn comparison(&mut self) -> R<Condition> {
        let start = self.peek().clone();
        let value = self.value()?;
        self.primaries += 1;
        if self.primaries > MAX_PRIMARY {
            return Err(Self::error_at(
                &start,
                &format!("at most {MAX_PRIMARY} primary expressions per definition"),
            ));
        }
        // infix comparators
        for (s, op) in [
            ("=", CmpOp::Eq),
            ("!=", CmpOp::Neq),
            (">=", CmpOp::Gte),
            ("<=", CmpOp::Lte),
            (">", CmpOp::Gt),
            ("<", CmpOp::Lt),
        ] {
            if self.is_sym(s) {
                self.next();
                let rhs = self.value()?;
                return Ok(Condition::Compare {
                    value,
                    op,
                    operand: Some(Operand::Value { value: rhs }),
                });
            }
        }
        // chained comparators (the value parser stops before a '.' it does not own)
        if self.is_sym(".")
            && let Tok::Ident(name) = &self.peek_at(1).tok
            && let Some(op) = CmpOp::ALL
                .iter()
                .find(|o| o.method() == name.as_str())
                .copied()
        {
            self.next();
            self.next();
            self.sym("(")?;
            let operand = self.operand(op)?;
            self.sym(")")?;
            return Ok(Condition::Compare { value, op, operand });
        }
        match &value {
            Value::Aggregate { .. } | Value::Literal { .. } => {
                Err(self.error_here("a comparator such as '>= 1', '= 0' or '.gt(5)'"))
            }
            _ => Ok(Condition::Bare { value }),
        }
    }

    fn operand(&mut self, op: CmpOp) -> R<Option<Operand>> {
        Ok(match op {
            CmpOp::IsNull | CmpOp::IsSet => None,
            CmpOp::ContainsOne | CmpOp::OneOf => {
                self.sym("[")?;
                let mut items = Vec::new();
                if !self.is_sym("]") {
                    loop {
                        items.push(self.literal()?);
                        if self.is_sym(",") {
                            self.next();
                        } else {
                            break;
                        }
                    }
                }
                self.sym("]")?;
                Some(Operand::List { items })
            }
            CmpOp::WithinLast | CmpOp::WithinNext | CmpOp::BeforeLast | CmpOp::AfterNext => {
                Some(Operand::Duration {
                    duration: self.duration()?,
                })
            }
            _ => Some(Operand::Value {
                value: self.value()?,
            }),
        })
    }

    fn literal(&mut self) -> R<Literal> {
        let t = self.peek().clone();
        let lit = match &t.tok {
            Tok::Str(s) => Literal::String(s.clone()),
            Tok::Num(n) => Literal::Number(*n),
            Tok::Ident(w) if w == "true" => Literal::Bool(true),
            Tok::Ident(w) if w == "false" => Literal::Bool(false),
            Tok::Ident(w) if w == "null" => Literal::Null,
            _ => return Err(self.error_here("a literal (a string, number, true, false or null)")),
        };
        self.next();
        Ok(lit)
    }

    fn duration(&mut self) -> R<Duration> {
        let t = self.peek().clone();
        let amount = match t.tok {
            Tok::Num(n) if n >= 0.0 && n.fract() == 0.0 => n as u64,
            _ => return Err(self.error_here("a whole number of minutes, hours, days or weeks")),
        };
        self.next();
        let u = self.peek().clone();
        let unit = match &u.tok {
            Tok::Ident(w) => match w.to_ascii_lowercase().as_str() {
                "minute" | "minutes" => Unit::Minute,
                "hour" | "hours" => Unit::Hour,
                "day" | "days" => Unit::Day,
                "week" | "weeks" => Unit::Week,
                _ => return Err(self.error_here("a unit: minutes, hours, days or weeks")),
            },
            _ => return Err(self.error_here("a unit: minutes, hours, days or weeks")),
        };
        self.next();
        Ok(Duration { amount, unit })
    }

    /// `name(` with a single string argument.
    fn call_string(&mut self, what: &str) -> R<String> {
        self.sym("(")?;
        let s = self.string(what)?;
        self.sym(")")?;
        Ok(s)
    }

    fn value(&mut self) -> R<Value> {
        let t = self.peek().clone();
        let Tok::Ident(word) = &t.tok else {
            return Ok(Value::Literal {
                value: self.literal()?,
            });
        };
        match word.as_str() {
            "true" | "false" | "null" => Ok(Value::Literal {
                value: self.literal()?,
            }),
            "property" => {
                self.next();
                self.sym("(")?;
                let parent = if kw(self.peek(), "parent") && self.peek_at(1).tok == Tok::Sym(":") {
                    self.next();
                    self.next();
                    true
                } else {
                    false
                };
                let path = self.string("a property name in quotes")?;
                self.sym(")")?;
                if self.in_event == 0 {
                    return Err(Self::error_at(
                        &t,
                        "property() only inside .where(...) or a reducer of an event",
                    ));
                }
                if parent && self.in_event < 2 {
                    return Err(Self::error_at(
                        &t,
                        "property(parent: ...) only inside a nested event",
                    ));
                }
                Ok(Value::Property { path, parent })
            }
            "trait" => {
                self.next();
                Ok(Value::Trait {
                    key: self.call_string("a trait key in quotes")?,
                })
            }
            "context" => {
                self.next();
                Ok(Value::Context {
                    path: self.call_string("a context path in quotes")?,
                })
            }
            "audience" => {
                self.next();
                Ok(Value::Audience {
                    key: self.call_string("an audience key in quotes")?,
                })
            }
            "event" => self.event_query(),
            _ => Err(self.error_here(
                "event(...), trait(...), property(...), context(...), audience(...) or a literal",
            )),
        }
    }

    fn event_query(&mut self) -> R<Value> {
        self.next(); // event
        self.sym("(")?;
        let source = if kw(self.peek(), "type") && self.peek_at(1).tok == Tok::Sym(":") {
            self.next();
            self.next();
            let ty_tok = self.peek().clone();
            let ty = self.string("'page' or 'screen'")?;
            let name = if self.is_sym(",") {
                self.next();
                if !(kw(self.peek(), "name") && self.peek_at(1).tok == Tok::Sym(":")) {
                    return Err(self.error_here("name: 'Page Name'"));
                }
                self.next();
                self.next();
                Some(self.string("a page or screen name in quotes")?)
            } else {
                None
            };
            match ty.as_str() {
                "page" => EventSource::Page { name },
                "screen" => EventSource::Screen { name },
                "track" => match name {
                    Some(name) => EventSource::Track { name },
                    None => return Err(self.error_here("name: 'Event Name' for type 'track'")),
                },
                _ => return Err(Self::error_at(&ty_tok, "'page', 'screen' or 'track'")),
            }
        } else {
            EventSource::Track {
                name: self.string("an event name in quotes")?,
            }
        };
        self.sym(")")?;
        let mut filters = Vec::new();
        loop {
            if !self.is_sym(".") {
                return Err(self.error_here("a reducer such as .count()"));
            }
            let name_tok = self.peek_at(1).clone();
            let Tok::Ident(name) = &name_tok.tok else {
                return Err(Self::error_at(&name_tok, "a filter or reducer name"));
            };
            match name.as_str() {
                "where" => {
                    self.next();
                    self.next();
                    self.sym("(")?;
                    self.enter()?;
                    self.in_event += 1;
                    let c = self.condition()?;
                    self.in_event -= 1;
                    self.depth -= 1;
                    self.sym(")")?;
                    filters.push(Filter::Where {
                        condition: Box::new(c),
                    });
                }
                "within" | "between" => {
                    self.next();
                    self.next();
                    self.sym("(")?;
                    let parent = kw(self.peek(), "parent") && self.peek_at(1).tok == Tok::Sym(":");
                    if parent {
                        if self.in_event == 0 {
                            return Err(
                                self.error_here("a window (parent: windows only on nested events)")
                            );
                        }
                        self.next();
                        self.next();
                    }
                    let d1 = self.duration()?;
                    let f = if name == "within" {
                        if parent {
                            Filter::WithinParent { duration: d1 }
                        } else {
                            Filter::Within { duration: d1 }
                        }
                    } else {
                        self.sym(",")?;
                        let at = self.peek().clone();
                        let d2 = self.duration()?;
                        if d1.micros() >= d2.micros() {
                            return Err(Self::error_at(
                                &at,
                                "a second bound larger than the first (between(N, M) needs N < M)",
                            ));
                        }
                        if parent {
                            Filter::BetweenParent { from: d1, to: d2 }
                        } else {
                            Filter::Between { from: d1, to: d2 }
                        }
                    };
                    self.sym(")")?;
                    filters.push(f);
                }
                _ => {
                    let reducer = self.reducer()?;
                    return Ok(Value::Aggregate {
                        events: EventQuery { source, filters },
                        reducer,
                    });
                }
            }
        }
    }

    fn reducer(&mut self) -> R<Reducer> {
        self.next(); // '.'
        let t = self.next();
        let Tok::Ident(name) = &t.tok else {
            return Err(Self::error_at(&t, "a reducer"));
        };
        self.sym("(")?;
        self.in_event += 1;
        let arg = |p: &mut Parser| -> R<Box<Value>> { Ok(Box::new(p.value()?)) };
        let r = match name.as_str() {
            "count" => Reducer::Count,
            "sum" => Reducer::Sum { value: arg(self)? },
            "avg" => Reducer::Avg { value: arg(self)? },
            "min" => Reducer::Min { value: arg(self)? },
            "max" => Reducer::Max { value: arg(self)? },
            "first" => Reducer::First { value: arg(self)? },
            "last" => Reducer::Last { value: arg(self)? },
            "unique" => Reducer::Unique { value: arg(self)? },
            "mode" => {
                let value = arg(self)?;
                let mut min_count = 2;
                if self.is_sym(",") {
                    self.next();
                    match self.peek().tok {
                        Tok::Num(n) if n >= 1.0 && n.fract() == 0.0 => min_count = n as u64,
                        _ => return Err(self.error_here("a whole number of occurrences")),
                    }
                    self.next();
                }
                Reducer::Mode { value, min_count }
            }
            _ => {
                return Err(Self::error_at(
                    &t,
                    "a reducer: count, sum, avg, min, max, mode, first, last or unique",
                ));
            }
        };
        self.in_event -= 1;
        self.sym(")")?;
        if let Reducer::Unique { value } = &r {
            // unique(..) is only followed by count()
            if self.is_sym(".") && kw(self.peek_at(1), "count") {
                self.next();
                self.next();
                self.sym("(")?;
                self.sym(")")?;
                return Ok(Reducer::UniqueCount {
                    value: value.clone(),
                });
            }
        }
        Ok(r)
    }
}
