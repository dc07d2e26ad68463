//! The audience query language: a typed AST ([`ast`]), a parser with positioned errors
//! ([`parser`]) and a printer back to canonical text ([`printer`]).

pub mod ast;
pub mod definition;
pub mod parser;
pub mod printer;

pub use ast::Condition;
pub use parser::{ParseError, parse, parse_value};

#[cfg(test)]
mod tests {
    use super::*;

    /// Definitions in the style of Segment's documentation and of SPEC §5.
    pub const CORPUS: &[&str] = &[
        "event('Order Completed').within(30 days).count() >= 2",
        "event('Order Completed').where(property('price') > 100).within(30 days).count() >= 2",
        "event('Product Viewed').where(property('price') > 100).within(30 days).count() >= 1 AND NOT (event('Order Completed').within(30 days).count() >= 1)",
        "event('Checkout Started').where(event('Order Completed').within(parent: 7 days).count() = 0).within(30 days).count() >= 1",
        "event('Product Viewed').where(property('price') >= trait('avg_spend') AND event('Order Completed').where(property('product_id') = property(parent: 'product_id')).within(parent: 7 days).count() >= 1).within(30 days).count() >= 1",
        "event(type: 'page', name: 'Pricing').between(30 days, 90 days).count() >= 1 OR trait('plan') = 'pro'",
        "event(type: 'screen').within(2 weeks).count() >= 3",
        "trait('email').ends_with('@example.com') AND trait('age').gte(21)",
        "trait('plan').one_of(['pro', 'business']) AND trait('tags').contains_one(['vip', 'beta'])",
        "trait('churned').is_null() OR trait('last_seen').within_last(7 days)",
        "trait('trial_end').before_date('2026-02-01') AND trait('renewal').within_next(30 days)",
        "audience('cart_abandoners') AND audience('vip') = false",
        "event('Order Completed').within(180 days).sum(property('revenue')) > 500",
        "event('Product Viewed').mode(property('category'), 3) = 'books'",
        "event('Order Completed').unique(property('product_id')).count() >= 5",
        "context('os.name').starts_with('iOS') OR trait('signup_at').after_next(1 hour)",
        "ANY (event('Logged In').within(30 days).count() >= 1) AND trait('plan') = 'business'",
        "ALL (event('Logged In').within(30 days).count() >= 1)",
        "ALL NOT (event('Logged In').within(30 days).count() >= 1)",
        "(trait('a') = 1 OR trait('b') = 2) AND trait('c') != \"it's\"",
        "event('A').where(event('B').where(event('C').within(parent: 1 day).count() >= 1).within(parent: 1 day).count() >= 1).within(7 days).count() >= 1",
        "trait('x').omits('spam') AND trait('n').lt(-2.5) AND trait('m').lte(3) AND trait('k').neq(null)",
    ];

    #[test]
    fn corpus_round_trips_text_ast_text() {
        for src in CORPUS {
            let ast = parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
            let text = printer::condition(&ast);
            let again = parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(ast, again, "{src}");
            assert_eq!(text, printer::condition(&again));
            let json = serde_json::to_string(&ast).unwrap();
            let back: Condition = serde_json::from_str(&json).unwrap();
            assert_eq!(back, ast, "{json}");
        }
    }

    #[test]
    fn infix_and_chained_comparators_mean_the_same() {
        assert_eq!(
            parse("event('A').count() >= 2").unwrap(),
            parse("event('A').count().gte(2)").unwrap()
        );
        assert_eq!(
            parse("trait('p') = 'x'").unwrap(),
            parse("trait('p').eq(\"x\")").unwrap()
        );
        assert_eq!(
            parse("trait('a') = 1 or trait('b') = 2 and trait('c') = 3").unwrap(),
            parse("trait('a') = 1 OR (trait('b') = 2 AND trait('c') = 3)").unwrap()
        );
    }

    #[test]
    fn the_spec_example_has_the_expected_shape() {
        use ast::*;
        let c = parse(CORPUS[3]).unwrap();
        let Condition::Compare {
            value:
                Value::Aggregate {
                    events,
                    reducer: Reducer::Count,
                },
            op: CmpOp::Gte,
            operand,
        } = c
        else {
            panic!("shape")
        };
        assert_eq!(
            operand,
            Some(Operand::Value {
                value: Value::Literal {
                    value: Literal::Number(1.0)
                }
            })
        );
        assert_eq!(
            events.source,
            EventSource::Track {
                name: "Checkout Started".into()
            }
        );
        assert!(matches!(
            events.filters[1],
            Filter::Within {
                duration: Duration {
                    amount: 30,
                    unit: Unit::Day
                }
            }
        ));
        let Filter::Where { condition } = &events.filters[0] else {
            panic!("where")
        };
        let Condition::Compare {
            value: Value::Aggregate { events: inner, .. },
            op: CmpOp::Eq,
            ..
        } = condition.as_ref()
        else {
            panic!("inner")
        };
        assert!(matches!(inner.filters[0], Filter::WithinParent { .. }));
    }

    #[test]
    fn errors_name_line_column_text_and_expectation() {
        let cases: &[(&str, usize, usize, &str, &str)] = &[
            ("event('A').count() >=", 1, 22, "", "a literal"),
            (
                "event('A').within(30 dayz).count() > 1",
                1,
                22,
                "dayz",
                "a unit",
            ),
            ("event('A').count()", 1, 19, "", "a comparator"),
            ("event('A') >= 1", 1, 12, ">=", "a reducer"),
            (
                "trait('a') = 1 AND\n  trait('b') == ",
                2,
                17,
                "",
                "a literal",
            ),
            ("trait('a') = 1 trait('b')", 1, 16, "trait", "AND, OR"),
            (
                "property('p') = 1",
                1,
                1,
                "property",
                "property() only inside",
            ),
            (
                "event('A').between(30 days, 7 days).count() > 0",
                1,
                29,
                "7",
                "a second bound larger",
            ),
            (
                "event('A').within(1 day).frobnicate() > 0",
                1,
                26,
                "frobnicate",
                "a reducer",
            ),
            (
                "trait('a') = 'unterminated",
                1,
                14,
                "'unterminated",
                "a closing '",
            ),
            (
                "event('A').where(property(parent: 'x') = 1).count() > 0",
                1,
                18,
                "property",
                "nested event",
            ),
            (
                "event(type: 'pagez').count() > 0",
                1,
                13,
                "'pagez'",
                "'page', 'screen'",
            ),
            ("trait('a') = 1 AND @", 1, 20, "@", "an expression"),
        ];
        for (src, line, col, found, expected) in cases {
            let e = parse(src).unwrap_err();
            assert_eq!((e.line, e.column), (*line, *col), "{src}: {e}");
            assert_eq!(e.found, *found, "{src}: {e}");
            assert!(e.expected.contains(expected), "{src}: {e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("line {line}, column {col}"))
            );
        }
    }

    #[test]
    fn limits_are_enforced() {
        let fifty: Vec<String> = (0..50).map(|i| format!("trait('t{i}') = {i}")).collect();
        assert!(parse(&fifty.join(" AND ")).is_ok());
        let fifty_one: Vec<String> = (0..51).map(|i| format!("trait('t{i}') = {i}")).collect();
        let e = parse(&fifty_one.join(" AND ")).unwrap_err();
        assert!(e.expected.contains("50 primary"), "{e}");
        let deep = format!("{}trait('a') = 1{}", "(".repeat(10), ")".repeat(10));
        assert!(parse(&deep).is_ok());
        let deeper = format!("{}trait('a') = 1{}", "(".repeat(11), ")".repeat(11));
        assert!(parse(&deeper).unwrap_err().expected.contains("10 levels"));
    }

    #[test]
    fn computed_trait_values_parse() {
        let v = parse_value("event('Order Completed').within(30 days).sum(property('revenue'))")
            .unwrap();
        assert_eq!(
            printer::value(&v),
            "event('Order Completed').within(30 days).sum(property('revenue'))"
        );
        assert!(parse_value("trait('a')").is_err());
        assert!(parse_value("event('A').mode(property('c'))").is_ok());
    }
}

#[cfg(test)]
mod robustness {
    /// No input, however malformed, makes the parser panic.
    #[test]
    fn random_and_mutated_inputs_never_panic() {
        let mut x: u64 = 0x2545F4914F6CDD1D;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let alphabet: Vec<char> = "event('X').within(30 days).count() >= 2 AND OR NOT ( ) [ ] , : . = ! < > 'q\" \\ 1.5e9 -3 trait property parent: type: é😀\n\t"
            .chars()
            .collect();
        for _ in 0..20_000 {
            let len = next(80) as usize;
            let s: String = (0..len)
                .map(|_| alphabet[next(alphabet.len() as u64) as usize])
                .collect();
            let _ = super::parse(&s);
            let _ = super::parse_value(&s);
        }
        for src in super::tests::CORPUS {
            let chars: Vec<char> = src.chars().collect();
            for cut in 0..chars.len() {
                let s: String = chars[..cut].iter().collect();
                let _ = super::parse(&s);
            }
        }
    }
}
