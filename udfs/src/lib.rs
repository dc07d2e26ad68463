//! DataFusion UDFs and UDAFs for audience evaluation: one file per function, registered by
//! [`register_all`] (a test pins that no name is registered twice or shadows a built-in).
//!
//! - [`nested_events`]: the per-profile evaluator of nested event queries (funnels, N-step
//!   sequences, abandonment, parent-property references) that compiled audiences call;
//!   its program format is [`program`].
//! - [`exact_sum`]: a sum of floats that is the same whatever the order of the rows (what
//!   `.sum()` compiles to, so that a refresh and a full compute agree to the bit).
//! - [`json_array`]: a list of strings as JSON array text (the value of `unique(..)` traits).
//! - [`window_funnel`]: ClickHouse-style `window_funnel(window, timestamp, step1, step2, ...)`
//!   for SQL users, with each step measured from the previous one.

pub mod exact_sum;
pub mod json_array;
pub mod nested_events;
pub mod program;
pub mod window_funnel;

use datafusion::error::Result;
use datafusion::logical_expr::{AggregateUDF, ScalarUDF};
use datafusion::prelude::SessionContext;

/// Every scalar function of this crate.
pub fn scalar_functions() -> Vec<ScalarUDF> {
    vec![ScalarUDF::from(json_array::JsonArray::default())]
}

/// Every aggregate function of this crate.
pub fn aggregate_functions() -> Vec<AggregateUDF> {
    vec![
        AggregateUDF::from(exact_sum::ExactSum::default()),
        AggregateUDF::from(nested_events::NestedEvents::default()),
        AggregateUDF::from(window_funnel::WindowFunnel::default()),
    ]
}

/// Register every function of this crate with `ctx`.
pub fn register_all(ctx: &SessionContext) -> Result<()> {
    for f in scalar_functions() {
        ctx.register_udf(f);
    }
    for f in aggregate_functions() {
        ctx.register_udaf(f);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::execution::FunctionRegistry;

    #[test]
    fn no_name_is_registered_twice() {
        let mut names: Vec<String> = scalar_functions()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        names.extend(aggregate_functions().iter().map(|f| f.name().to_string()));
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(n, names.len());
        let ctx = SessionContext::new();
        for n in &names {
            assert!(
                ctx.udf(n).is_err() && ctx.udaf(n).is_err(),
                "{n} shadows a built-in"
            );
        }
    }
}
