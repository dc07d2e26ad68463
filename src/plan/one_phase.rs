//! A physical optimizer rule: the aggregates whose states carry rows (`nested_events` for
//! references to a parent event, `window_funnel`) run in one phase per profile partition.
//!
//! DataFusion plans every grouped aggregate in two phases: a partial aggregate per scan
//! partition, a hash repartition of its states, a final aggregate merging them. For a count
//! the states are single numbers. For these two they are lists of the group's rows (time,
//! flags, referenced values), and a profile's events are spread over every scan partition, so
//! the partial phase barely reduces (880k rows → 410k states for BENCH.md q6) while encoding,
//! sending and decoding every row as a list element costs more than the evaluation itself.
//! Sending the rows themselves, hash-partitioned by the group key, to one aggregate per
//! partition (`SinglePartitioned`) gives the same result: each group's rows all reach one
//! accumulator, which evaluates them as the final phase would after merging.

use std::sync::Arc;

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::error::Result;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::{ExecutionPlan, Partitioning};

/// The aggregate functions whose states carry rows.
const ROW_STATES: [&str; 2] = ["nested_events", "window_funnel"];

/// See the module documentation.
#[derive(Debug, Default)]
pub struct OnePhaseRowAggregates;

/// `plan` as one phase, if it is a final aggregate over a hash repartition of a partial one
/// that computes a row-carrying aggregate.
fn one_phase(plan: &Arc<dyn ExecutionPlan>) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    let Some(fin) = plan.downcast_ref::<AggregateExec>() else {
        return Ok(None);
    };
    let Some(rep) = fin.input().downcast_ref::<RepartitionExec>() else {
        return Ok(None);
    };
    let (Partitioning::Hash(_, n), Some(partial)) = (
        rep.partitioning(),
        rep.input().downcast_ref::<AggregateExec>(),
    ) else {
        return Ok(None);
    };
    let groups = partial.group_expr();
    if *fin.mode() != AggregateMode::FinalPartitioned
        || *partial.mode() != AggregateMode::Partial
        || !groups.is_single()
        || groups.expr().is_empty()
        || !partial
            .aggr_expr()
            .iter()
            .any(|a| ROW_STATES.contains(&a.fun().name()))
    {
        return Ok(None);
    }
    let keys = groups.expr().iter().map(|(e, _)| Arc::clone(e)).collect();
    let rows = Arc::new(RepartitionExec::try_new(
        Arc::clone(partial.input()),
        Partitioning::Hash(keys, *n),
    )?);
    let single = AggregateExec::try_new(
        AggregateMode::SinglePartitioned,
        groups.clone(),
        partial.aggr_expr().to_vec(),
        partial.filter_expr().to_vec(),
        rows,
        partial.input_schema(),
    )?;
    if single.schema().fields() != fin.schema().fields() {
        return Ok(None);
    }
    Ok(Some(Arc::new(single)))
}

impl PhysicalOptimizerRule for OnePhaseRowAggregates {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|p| {
            Ok(match one_phase(&p)? {
                Some(single) => Transformed::yes(single),
                None => Transformed::no(p),
            })
        })
        .data()
    }

    fn name(&self) -> &str {
        "one_phase_row_aggregates"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::execution::SessionStateBuilder;
    use datafusion::prelude::{SessionConfig, SessionContext};

    /// A session over `events` (profile, ts, event) spread over four partitions, with or
    /// without the rule.
    fn session(with_rule: bool) -> SessionContext {
        let schema = Arc::new(Schema::new(vec![
            Field::new("p", DataType::Int64, false),
            Field::new("ts", DataType::Int64, false),
            Field::new("event", DataType::Utf8, false),
        ]));
        let mut parts = vec![Vec::new(); 4];
        let mut x: u64 = 7;
        for part in parts.iter_mut() {
            let (mut p, mut ts, mut ev) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..5_000 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                p.push((x >> 33) as i64 % 700);
                ts.push((x >> 13) as i64 % 10_000);
                ev.push(if x >> 62 == 0 { "A" } else { "B" });
            }
            let b = RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(Int64Array::from(p)),
                    Arc::new(Int64Array::from(ts)),
                    Arc::new(StringArray::from(ev)),
                ],
            )
            .unwrap();
            part.push(b);
        }
        let config = SessionConfig::new().with_target_partitions(4);
        let mut builder = SessionStateBuilder::new()
            .with_config(config)
            .with_default_features();
        if with_rule {
            builder = builder.with_physical_optimizer_rule(Arc::new(OnePhaseRowAggregates));
        }
        let ctx = SessionContext::new_with_state(builder.build());
        audiences_udfs::register_all(&ctx).unwrap();
        ctx.register_table(
            "events",
            Arc::new(MemTable::try_new(schema, parts).unwrap()),
        )
        .unwrap();
        ctx
    }

    const FUNNEL: &str = "SELECT p, window_funnel(50, ts, event = 'A', event = 'B') AS level, \
                          count(*) AS n FROM events GROUP BY p ORDER BY p";

    async fn run(ctx: &SessionContext, sql: &str) -> (String, String) {
        let df = ctx.sql(sql).await.unwrap();
        let plan = df.clone().create_physical_plan().await.unwrap();
        let shown = datafusion::physical_plan::displayable(plan.as_ref())
            .indent(false)
            .to_string();
        let rows = df.collect().await.unwrap();
        (
            shown,
            arrow::util::pretty::pretty_format_batches(&rows)
                .unwrap()
                .to_string(),
        )
    }

    #[tokio::test]
    async fn a_funnel_aggregates_in_one_phase_with_the_same_result() {
        let (two_plan, two) = run(&session(false), FUNNEL).await;
        let (one_plan, one) = run(&session(true), FUNNEL).await;
        assert!(two_plan.contains("mode=Partial"), "{two_plan}");
        assert!(one_plan.contains("mode=SinglePartitioned"), "{one_plan}");
        assert!(!one_plan.contains("mode=Partial"), "{one_plan}");
        assert_eq!(one, two);
        // the funnel reached both steps somewhere, and not everywhere
        assert!(one.contains("| 2 ") && one.contains("| 1 "), "{one}");
        // a plain count keeps its two phases
        let (count_plan, _) =
            run(&session(true), "SELECT p, count(*) FROM events GROUP BY p").await;
        assert!(count_plan.contains("mode=Partial"), "{count_plan}");
    }
}
