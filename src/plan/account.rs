//! Account-level definitions.
//!
//! An account audience is a condition over accounts: account traits (`trait('plan')`, custom
//! from group calls or account-level computed traits), other account audiences, and junctions
//! over the profiles linked to the account: `ANY(c)` (at least one linked profile satisfies the
//! profile-level condition `c`), `ALL(c)` (the account has linked profiles and every one
//! satisfies `c`), `ALL NOT (c)` (no linked profile satisfies `c`, including accounts without
//! profiles). A profile-level condition written outside a junction (an event condition, or a
//! reference to a profile audience) means `ANY(...)`. Linked profiles are the known ones unless
//! the definition includes anonymous profiles.
//!
//! Account-level computed traits reduce the events of all the account's linked profiles.
//!
//! ```text
//! accounts (linked or with traits)
//!   ⟕ Aggregate[account_id](links ⋈ profiles with one boolean column per junction)
//!   ⟕ account traits / account computed traits   ⟕ referenced account audiences
//!   σ condition        π account_id
//! ```

use datafusion::common::JoinType;
use datafusion::dataframe::DataFrame;
use datafusion::functions_aggregate::expr_fn::{count, sum};
use std::ops::Not;

use datafusion::logical_expr::{Expr, cast};
use datafusion::prelude::{SessionContext, col, lit};

use super::compile::Compiler;
use crate::error::{Error, Result};
use crate::lang::ast::*;
use crate::lang::definition::Level;

/// Which profiles of an account must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Junction {
    /// At least one.
    Any,
    /// Every one (and at least one).
    All,
    /// None.
    AllNot,
}

/// Every account of the space: linked to a profile or carrying a trait.
pub(super) async fn accounts(ctx: &SessionContext) -> Result<DataFrame> {
    let linked = ctx
        .table("account_links")
        .await?
        .select(vec![col("account_id")])?;
    let with_traits = ctx
        .table("traits")
        .await?
        .filter(col("entity").eq(lit("account")))?
        .select(vec![col("account_id")])?;
    Ok(linked.union(with_traits)?.distinct()?)
}

/// `(account_id, profile_idx)` of every link to a canonical profile, once.
pub(super) async fn links(ctx: &SessionContext) -> Result<DataFrame> {
    Ok(ctx
        .table("account_links")
        .await?
        .select(vec![col("account_id"), col("profile_idx")])?
        .distinct()?)
}

fn count_col(i: usize) -> String {
    format!("__jm{i}")
}

/// Whether a condition reads profiles (events or profile audiences) rather than the account.
fn reads_profiles(c: &Compiler, cond: &Condition) -> bool {
    let value = |v: &Value| match v {
        Value::Aggregate { .. } => true,
        Value::Audience { key } => !c.inp.account_keys.contains(key),
        _ => false,
    };
    match cond {
        Condition::Compare {
            value: v, operand, ..
        } => value(v) || matches!(operand, Some(Operand::Value { value: o }) if value(o)),
        Condition::Bare { value: v } => value(v),
        _ => false,
    }
}

impl Compiler<'_> {
    /// Compile an account-level condition; junctions are collected for [`Self::junction_frame`].
    pub(super) fn account_condition(
        &mut self,
        cond: &Condition,
        junctions: &mut Vec<(Junction, Condition)>,
    ) -> Result<Expr> {
        let junction = |j: Junction, item: &Condition, js: &mut Vec<(Junction, Condition)>| {
            js.push((j, item.clone()));
            let m = datafusion::functions::expr_fn::coalesce(vec![
                col(count_col(js.len() - 1)),
                lit(0i64),
            ]);
            let n = datafusion::functions::expr_fn::coalesce(vec![col("__jn"), lit(0i64)]);
            match j {
                Junction::Any => m.gt(lit(0i64)),
                Junction::All => n.clone().gt(lit(0i64)).and(m.eq(n)),
                Junction::AllNot => m.eq(lit(0i64)),
            }
        };
        Ok(match cond {
            Condition::And { items } => {
                let mut e = lit(true);
                for i in items {
                    e = e.and(self.account_condition(i, junctions)?);
                }
                e
            }
            Condition::Or { items } => {
                let mut e = lit(false);
                for i in items {
                    e = e.or(self.account_condition(i, junctions)?);
                }
                e
            }
            Condition::Not { item } => self.account_condition(item, junctions)?.not(),
            Condition::Any { item } => junction(Junction::Any, item, junctions),
            Condition::All { item } => junction(Junction::All, item, junctions),
            Condition::AllNot { item } => junction(Junction::AllNot, item, junctions),
            c if reads_profiles(self, c) => junction(Junction::Any, c, junctions),
            c => super::compile::profile_condition(self, c)?,
        })
    }

    /// Per account: `__jn` linked profiles and `__jm{i}` of them satisfying junction `i`.
    pub(super) async fn junction_frame(
        &self,
        junctions: &[(Junction, Condition)],
        include_anonymous: bool,
    ) -> Result<DataFrame> {
        let mut pc = self.sub_compiler(Level::Users).await?;
        let mut cols = vec![col("profile_idx").alias("__jp")];
        for (i, (_, cond)) in junctions.iter().enumerate() {
            if let Condition::Any { .. } | Condition::All { .. } | Condition::AllNot { .. } = cond {
                return Err(Error::Usage(
                    "ANY/ALL cannot be nested inside another ANY/ALL".into(),
                ));
            }
            let e = super::compile::profile_condition(&mut pc, cond)?;
            cols.push(cast(e, arrow::datatypes::DataType::Int64).alias(format!("__jb{i}")));
        }
        let profiles = super::compile::assemble(&pc, include_anonymous)
            .await?
            .select(cols)?;
        let mut aggs = vec![count(lit(1)).alias("__jn")];
        for i in 0..junctions.len() {
            aggs.push(sum(col(format!("__jb{i}"))).alias(count_col(i)));
        }
        Ok(links(self.inp.ctx)
            .await?
            .join(profiles, JoinType::Inner, &["profile_idx"], &["__jp"], None)?
            .aggregate(vec![col("account_id").alias("__ja")], aggs)?)
    }
}
