//! One profile by any of its ids: what `audiences profile` and the Profile API show.

use std::collections::BTreeMap;

use arrow::array::{Array, AsArray, RecordBatch};
use datafusion::prelude::{col, lit};
use serde::Serialize;

use crate::error::Result;
use crate::store::{Space, Store};

/// A profile with its external ids, custom traits and accounts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProfileView {
    /// Canonical profile id.
    pub profile_id: String,
    /// Has a user_id or an email.
    pub known: bool,
    /// External ids by type, sorted.
    pub external_ids: BTreeMap<String, Vec<String>>,
    /// Custom and computed traits (JSON values).
    pub traits: BTreeMap<String, serde_json::Value>,
    /// Audience keys the profile belongs to (filled once audiences exist).
    pub audiences: Vec<String>,
    /// Account (group) ids.
    pub accounts: Vec<String>,
}

fn strings(batches: &[RecordBatch], idx: usize) -> Vec<String> {
    let mut out = Vec::new();
    for b in batches {
        let a = b.column(idx).as_string::<i32>();
        out.extend(
            (0..a.len())
                .filter(|i| a.is_valid(*i))
                .map(|i| a.value(i).to_string()),
        );
    }
    out
}

/// Look up the profile owning `id_type:value` (`profile_id:p-…` looks up by profile id,
/// following merges).
pub async fn profile(
    store: &Store,
    space: &Space,
    id_type: &str,
    value: &str,
) -> Result<Option<ProfileView>> {
    let ctx = crate::tables::session(store, space).await?;
    let profile_id = if id_type == "profile_id" {
        let b = ctx
            .table("profile_index")
            .await?
            .filter(col("profile_id").eq(lit(value)))?
            .select(vec![col("canonical_idx")])?;
        let idx = b.collect().await?;
        let Some(first) = idx.iter().find(|b| b.num_rows() > 0) else {
            return Ok(None);
        };
        let c = first
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0);
        let ids = ctx
            .table("profile_index")
            .await?
            .filter(col("profile_idx").eq(lit(c)))?
            .select(vec![col("profile_id")])?
            .collect()
            .await?;
        strings(&ids, 0).into_iter().next()
    } else {
        let b = ctx
            .table("identities")
            .await?
            .filter(
                col("id_type")
                    .eq(lit(id_type))
                    .and(col("id_value").eq(lit(value))),
            )?
            .select(vec![col("profile_id")])?
            .collect()
            .await?;
        strings(&b, 0).into_iter().next()
    };
    let Some(pid) = profile_id else {
        return Ok(None);
    };
    let of_profile = col("profile_id").eq(lit(pid.clone()));
    let ids = column_values(
        &ctx,
        "identities",
        of_profile.clone(),
        &["id_type", "id_value"],
    )
    .await?;
    let mut external_ids: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (t, v) in ids[0].iter().zip(&ids[1]) {
        external_ids.entry(t.clone()).or_default().push(v.clone());
    }
    for v in external_ids.values_mut() {
        v.sort();
    }
    let json = |v: &String| serde_json::from_str(v).unwrap_or(serde_json::Value::String(v.clone()));
    let custom = column_values(
        &ctx,
        "traits",
        col("entity").eq(lit("profile")).and(of_profile.clone()),
        &["key", "value"],
    )
    .await?;
    let computed = column_values(
        &ctx,
        "computed_traits",
        of_profile.clone(),
        &["key", "value"],
    )
    .await?;
    let traits: BTreeMap<String, serde_json::Value> = custom[0]
        .iter()
        .zip(&custom[1])
        .chain(computed[0].iter().zip(&computed[1]))
        .map(|(k, v)| (k.clone(), json(v)))
        .collect();
    let mut accounts = column_values(&ctx, "account_links", of_profile.clone(), &["account_id"])
        .await?
        .remove(0);
    accounts.sort();
    accounts.dedup();
    let mut audiences = column_values(&ctx, "memberships", of_profile, &["audience_key"])
        .await?
        .remove(0);
    audiences.sort();
    let known = external_ids.contains_key("user_id") || external_ids.contains_key("email");
    Ok(Some(ProfileView {
        profile_id: pid,
        known,
        external_ids,
        traits,
        audiences,
        accounts,
    }))
}

/// The non-null values of string columns `cols` of `table` rows matching `filter`.
async fn column_values(
    ctx: &datafusion::prelude::SessionContext,
    table: &str,
    filter: datafusion::prelude::Expr,
    cols: &[&str],
) -> Result<Vec<Vec<String>>> {
    let batches = ctx
        .table(table)
        .await?
        .filter(filter)?
        .select(cols.iter().map(|c| col(*c)).collect::<Vec<_>>())?
        .collect()
        .await?;
    Ok((0..cols.len()).map(|i| strings(&batches, i)).collect())
}
