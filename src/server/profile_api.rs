//! The Profile API (SPEC §7), shaped like Segment's:
//! `GET /v1/spaces/{space}/collections/{users|accounts}/profiles/{id_type}:{value}/{endpoint}`
//! with `endpoint` one of `traits`, `events`, `external_ids`, `metadata`, `links`.
//!
//! - Auth: HTTP Basic with a token of the space (read scope) as the username, empty password.
//!   A profile of another space is answered exactly like a missing one (404 `not_found`).
//! - `traits`: custom traits (`class` custom), computed traits (`computed_trait`) and audiences
//!   (`audience`: `true` while a member, `false` after an exit). Parameters `include=a,b`,
//!   `class=audience|computed_trait|custom`, `limit` 1–200 (default 10), `next` (the cursor of
//!   the previous page), `verbose=true` (each value as `{value, class, updated_at}`).
//!   Pages are in key order.
//! - `external_ids` (users: every id of the profile; accounts: `group_id`), `events` (newest
//!   first, `limit` default 10, cursor), `metadata` (`created_at`, `updated_at`), `links`
//!   (users → their accounts, accounts → their users).
//! - Errors: `{"error": {"code", "message"}}` with `authentication_error` (401, the same body for
//!   a missing header, a wrong token, a Bearer header and another space's token),
//!   `invalid_request_error`, `validation_error`, `not_found`, `rate_limit_error` (429 with
//!   `Retry-After`, over the per-space request rate).

// Handlers return early with a finished error response; boxing it would only add noise.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use datafusion::prelude::{SessionContext, col, lit};
use serde_json::{Value, json};

use super::http::{HttpState, authorize_in, error};
use crate::config::Scope;
use crate::store::Space;

/// Query parameters.
#[derive(serde::Deserialize, Default)]
pub struct Params {
    include: Option<String>,
    class: Option<String>,
    limit: Option<String>,
    next: Option<String>,
    verbose: Option<String>,
}

/// Whose profile: a user's canonical profile id or an account id.
enum Entity {
    User(String),
    Account(String),
}

fn strings(batches: &[RecordBatch], i: usize) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for b in batches {
        let c = arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8);
        let Ok(c) = c else { continue };
        let a = c.as_string::<i32>();
        out.extend(a.iter().map(|v| v.map(String::from)));
    }
    out
}

async fn rows(
    ctx: &SessionContext,
    table: &str,
    filter: datafusion::prelude::Expr,
    cols: &[&str],
) -> crate::error::Result<Vec<Vec<Option<String>>>> {
    let b = ctx
        .table(table)
        .await?
        .filter(filter)?
        .select(cols.iter().map(|c| col(*c)).collect::<Vec<_>>())?
        .collect()
        .await?;
    Ok((0..cols.len()).map(|i| strings(&b, i)).collect())
}

/// Rows of a (key, value, time) query, keys present.
fn triples(r: Vec<Vec<Option<String>>>) -> Vec<(String, Option<String>, Option<String>)> {
    let mut it = r.into_iter();
    let (k, v, t) = (
        it.next().unwrap_or_default(),
        it.next().unwrap_or_default(),
        it.next().unwrap_or_default(),
    );
    k.into_iter()
        .zip(v)
        .zip(t)
        .filter_map(|((k, v), t)| Some((k?, v, t)))
        .collect()
}

fn json_of(v: &Option<String>) -> Value {
    match v {
        Some(s) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
        None => Value::Null,
    }
}

async fn resolve(
    ctx: &SessionContext,
    collection: &str,
    id_type: &str,
    value: &str,
) -> crate::error::Result<Option<Entity>> {
    match collection {
        "users" => {
            let found = if id_type == "profile_id" {
                rows(
                    ctx,
                    "profiles",
                    col("profile_id").eq(lit(value)),
                    &["profile_id"],
                )
                .await?
            } else {
                rows(
                    ctx,
                    "identities",
                    col("id_type")
                        .eq(lit(id_type))
                        .and(col("id_value").eq(lit(value))),
                    &["profile_id"],
                )
                .await?
            };
            Ok(found[0].iter().flatten().next().cloned().map(Entity::User))
        }
        "accounts" if matches!(id_type, "group_id" | "account_id") => {
            let linked = rows(
                ctx,
                "account_links",
                col("account_id").eq(lit(value)),
                &["account_id"],
            )
            .await?;
            let traits = rows(
                ctx,
                "traits",
                col("entity")
                    .eq(lit("account"))
                    .and(col("account_id").eq(lit(value))),
                &["account_id"],
            )
            .await?;
            Ok((!linked[0].is_empty() || !traits[0].is_empty())
                .then(|| Entity::Account(value.to_string())))
        }
        _ => Ok(None),
    }
}

fn cursor(url: &str, has_more: bool, next: &str, limit: usize) -> Value {
    let next = if has_more {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(next)
    } else {
        String::new()
    };
    json!({"url": url, "has_more": has_more, "next": next, "limit": limit})
}

fn decode_next(n: &Option<String>) -> Result<Option<String>, Response> {
    match n.as_deref() {
        None | Some("") => Ok(None),
        Some(s) => base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .map(Some)
            .ok_or_else(|| {
                error(
                    StatusCode::BAD_REQUEST,
                    "validation_error",
                    "invalid `next` cursor",
                )
            }),
    }
}

fn limit_of(p: &Params, default: usize) -> Result<usize, Response> {
    match p.limit.as_deref() {
        None => Ok(default),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=200).contains(&n) => Ok(n),
            _ => Err(error(
                StatusCode::BAD_REQUEST,
                "validation_error",
                "limit must be an integer from 1 to 200",
            )),
        },
    }
}

/// `GET /v1/spaces/{space}/collections/{collection}/profiles/{id}/{endpoint}`.
pub async fn handler(
    State(state): State<Arc<HttpState>>,
    Path((space, collection, id, endpoint)): Path<(String, String, String, String)>,
    Query(p): Query<Params>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorize_in(&state, &headers, Scope::Read, Some(&space)) {
        return r;
    }
    if let Err(r) = state.limit(&space) {
        return r;
    }
    let not_found = || error(StatusCode::NOT_FOUND, "not_found", "Profile not found");
    let Ok(space) = Space::new(&space) else {
        return not_found();
    };
    let Some((id_type, value)) = id.split_once(':') else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "the profile is addressed as id_type:value, e.g. user_id:u1",
        );
    };
    let url = format!("/v1/spaces/{space}/collections/{collection}/profiles/{id}/{endpoint}");
    let run = async {
        let ctx = crate::tables::session(&state.store, &space).await?;
        let Some(entity) = resolve(&ctx, &collection, id_type, value).await? else {
            return Ok(None);
        };
        let r = match endpoint.as_str() {
            "traits" => traits(&ctx, &entity, &p, &url).await?,
            "external_ids" => external_ids(&ctx, &entity, &p, &url).await?,
            "events" => events(&ctx, &entity, &p, &url).await?,
            "metadata" => metadata(&ctx, &entity).await?,
            "links" => links(&ctx, &entity).await?,
            _ => Err(error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no endpoint '{endpoint}'"),
            )),
        };
        Ok::<_, crate::error::Error>(Some(r))
    };
    match run.await {
        Ok(None) => not_found(),
        Ok(Some(Ok(v))) => (StatusCode::OK, axum::Json(v)).into_response(),
        Ok(Some(Err(r))) => r,
        Err(e) => {
            super::http::server_error(&e, StatusCode::INTERNAL_SERVER_ERROR, "the request failed")
        }
    }
}

type Answer = Result<Value, Response>;

async fn traits(
    ctx: &SessionContext,
    e: &Entity,
    p: &Params,
    url: &str,
) -> crate::error::Result<Answer> {
    let limit = match limit_of(p, 10) {
        Ok(l) => l,
        Err(r) => return Ok(Err(r)),
    };
    let after = match decode_next(&p.next) {
        Ok(a) => a,
        Err(r) => return Ok(Err(r)),
    };
    let class_filter = p.class.as_deref();
    if let Some(c) = class_filter
        && !matches!(c, "audience" | "computed_trait" | "custom")
    {
        return Ok(Err(error(
            StatusCode::BAD_REQUEST,
            "validation_error",
            "class must be audience, computed_trait or custom",
        )));
    }
    let (who, entity) = match e {
        Entity::User(pid) => (col("profile_id").eq(lit(pid.clone())), "profile"),
        Entity::Account(a) => (col("account_id").eq(lit(a.clone())), "account"),
    };
    // key → (value, class, updated_at)
    let mut all: BTreeMap<String, (Value, &str, Value)> = BTreeMap::new();
    // (rows, class, whether the value is the audience flag true/false)
    let custom = rows(
        ctx,
        "traits",
        col("entity").eq(lit(entity)).and(who.clone()),
        &["key", "value", "updated_at"],
    )
    .await?;
    let computed = rows(
        ctx,
        "computed_traits",
        who.clone(),
        &["key", "value", "as_of"],
    )
    .await?;
    let exits = rows(
        ctx,
        "membership_changes",
        who.clone().and(col("change").eq(lit("exited"))),
        &["audience_key", "version", "as_of"],
    )
    .await?;
    let members = rows(
        ctx,
        "memberships",
        who,
        &["audience_key", "version", "entered_at"],
    )
    .await?;
    // later sources win: an audience the profile is in again is true
    for (r, class, flag) in [
        (custom, "custom", None),
        (computed, "computed_trait", None),
        (exits, "audience", Some(false)),
        (members, "audience", Some(true)),
    ] {
        for (k, v, t) in triples(r) {
            let value = flag.map_or_else(|| json_of(&v), Value::Bool);
            all.insert(k, (value, class, json!(t)));
        }
    }
    let include: Option<Vec<&str>> = p.include.as_deref().map(|s| {
        s.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    });
    let verbose = p
        .verbose
        .as_deref()
        .is_some_and(|v| v == "true" || v == "1");
    let selected: Vec<(&String, &(Value, &str, Value))> = all
        .iter()
        .filter(|(k, (_, c, _))| {
            include.as_ref().is_none_or(|i| i.contains(&k.as_str()))
                && class_filter.is_none_or(|f| f == *c)
                && after.as_ref().is_none_or(|a| k.as_str() > a.as_str())
        })
        .collect();
    let has_more = selected.len() > limit;
    let page = &selected[..selected.len().min(limit)];
    let mut out = serde_json::Map::new();
    for (k, (v, c, at)) in page {
        let v = if verbose {
            json!({"value": v, "class": c, "updated_at": at})
        } else {
            v.clone()
        };
        out.insert((*k).clone(), v);
    }
    let last = page.last().map(|(k, _)| k.as_str()).unwrap_or("");
    Ok(Ok(
        json!({"traits": out, "cursor": cursor(url, has_more, last, limit)}),
    ))
}

async fn external_ids(
    ctx: &SessionContext,
    e: &Entity,
    p: &Params,
    url: &str,
) -> crate::error::Result<Answer> {
    let limit = match limit_of(p, 25) {
        Ok(l) => l,
        Err(r) => return Ok(Err(r)),
    };
    let after = match decode_next(&p.next) {
        Ok(a) => a,
        Err(r) => return Ok(Err(r)),
    };
    let mut ids: Vec<(String, String, Value)> = match e {
        Entity::User(pid) => {
            let r = rows(
                ctx,
                "identities",
                col("profile_id").eq(lit(pid.clone())),
                &["id_type", "id_value", "first_seen"],
            )
            .await?;
            (0..r[0].len())
                .filter_map(|i| Some((r[0][i].clone()?, r[1][i].clone()?, json!(r[2][i]))))
                .collect()
        }
        Entity::Account(a) => vec![("group_id".into(), a.clone(), Value::Null)],
    };
    ids.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let collection = match e {
        Entity::User(_) => "users",
        Entity::Account(_) => "accounts",
    };
    let selected: Vec<&(String, String, Value)> = ids
        .iter()
        .filter(|(t, v, _)| {
            after
                .as_ref()
                .is_none_or(|a| format!("{t}:{v}").as_str() > a.as_str())
        })
        .collect();
    let has_more = selected.len() > limit;
    let page = &selected[..selected.len().min(limit)];
    let data: Vec<Value> = page
        .iter()
        .map(|(t, v, at)| {
            json!({"id": v, "type": t, "collection": collection, "created_at": at, "encoding": "none", "source_id": null})
        })
        .collect();
    let last = page
        .last()
        .map(|(t, v, _)| format!("{t}:{v}"))
        .unwrap_or_default();
    Ok(Ok(
        json!({"data": data, "cursor": cursor(url, has_more, &last, limit)}),
    ))
}

#[allow(clippy::needless_range_loop)] // parallel columns, indexed by row
async fn events(
    ctx: &SessionContext,
    e: &Entity,
    p: &Params,
    url: &str,
) -> crate::error::Result<Answer> {
    let limit = match limit_of(p, 10) {
        Ok(l) => l,
        Err(r) => return Ok(Err(r)),
    };
    let after = match decode_next(&p.next) {
        Ok(a) => a,
        Err(r) => return Ok(Err(r)),
    };
    let who = match e {
        Entity::User(pid) => col("profile_id").eq(lit(pid.clone())),
        Entity::Account(a) => col("group_id").eq(lit(a.clone())),
    };
    // Newest first; the cursor is the (timestamp micros, message id) of the last event shown.
    let mut df = ctx.table("events").await?.filter(who)?;
    if let Some(a) = &after
        && let Some((t, m)) = a.split_once('|')
        && let Ok(t) = t.parse::<i64>()
    {
        let ts = lit(datafusion::common::ScalarValue::TimestampMicrosecond(
            Some(t),
            Some("UTC".into()),
        ));
        df = df.filter(
            col("timestamp").lt(ts.clone()).or(col("timestamp")
                .eq(ts)
                .and(col("message_id").lt(lit(m.to_string())))),
        )?;
    }
    let b = df
        .sort(vec![
            col("timestamp").sort(false, false),
            col("message_id").sort(false, false),
        ])?
        .limit(0, Some(limit + 1))?
        .select(vec![
            col("type"),
            col("message_id"),
            col("event"),
            col("name"),
            col("timestamp"),
            datafusion::prelude::cast(col("timestamp"), arrow::datatypes::DataType::Int64)
                .alias("__t"),
            col("properties"),
            col("context"),
            col("traits"),
        ])?
        .collect()
        .await?;
    let c: Vec<Vec<Option<String>>> = (0..9).map(|i| strings(&b, i)).collect();
    let n = c[0].len();
    let has_more = n > limit;
    let mut data = Vec::new();
    let mut last = String::new();
    for i in 0..n.min(limit) {
        let mut ev = json!({
            "type": c[0][i], "message_id": c[1][i], "timestamp": c[4][i], "source_id": null,
            "properties": json_of(&c[6][i]), "context": json_of(&c[7][i]),
        });
        if let Some(name) = &c[2][i] {
            ev["event"] = json!(name);
        }
        if let Some(name) = &c[3][i] {
            ev["name"] = json!(name);
        }
        if c[8][i].is_some() {
            ev["traits"] = json_of(&c[8][i]);
        }
        data.push(ev);
        last = format!(
            "{}|{}",
            c[5][i].as_deref().unwrap_or("0"),
            c[1][i].as_deref().unwrap_or("")
        );
    }
    Ok(Ok(
        json!({"data": data, "cursor": cursor(url, has_more, &last, limit)}),
    ))
}

async fn metadata(ctx: &SessionContext, e: &Entity) -> crate::error::Result<Answer> {
    let (created, updated) = match e {
        Entity::User(pid) => {
            let c = rows(
                ctx,
                "profiles",
                col("profile_id").eq(lit(pid.clone())),
                &["created_at"],
            )
            .await?;
            let u = ctx
                .table("events")
                .await?
                .filter(col("profile_id").eq(lit(pid.clone())))?
                .aggregate(
                    vec![],
                    vec![datafusion::functions_aggregate::expr_fn::max(col(
                        "timestamp",
                    ))],
                )?
                .collect()
                .await?;
            (
                c[0].first().cloned().flatten(),
                strings(&u, 0).into_iter().next().flatten(),
            )
        }
        Entity::Account(a) => {
            let l = ctx
                .table("account_links")
                .await?
                .filter(col("account_id").eq(lit(a.clone())))?
                .aggregate(
                    vec![],
                    vec![datafusion::functions_aggregate::expr_fn::min(col(
                        "linked_at",
                    ))],
                )?
                .collect()
                .await?;
            let u = ctx
                .table("traits")
                .await?
                .filter(
                    col("entity")
                        .eq(lit("account"))
                        .and(col("account_id").eq(lit(a.clone()))),
                )?
                .aggregate(
                    vec![],
                    vec![datafusion::functions_aggregate::expr_fn::max(col(
                        "updated_at",
                    ))],
                )?
                .collect()
                .await?;
            (
                strings(&l, 0).into_iter().next().flatten(),
                strings(&u, 0).into_iter().next().flatten(),
            )
        }
    };
    Ok(Ok(
        json!({"metadata": {"created_at": created, "updated_at": updated, "expires_at": null}}),
    ))
}

async fn links(ctx: &SessionContext, e: &Entity) -> crate::error::Result<Answer> {
    // users link to their accounts, accounts to their users
    let (key, who, other, to, id_type) = match e {
        Entity::User(p) => ("profile_id", p, "account_id", "accounts", "group_id"),
        Entity::Account(a) => ("account_id", a, "profile_id", "users", "profile_id"),
    };
    let r = rows(
        ctx,
        "account_links",
        col(key).eq(lit(who.clone())),
        &[other],
    )
    .await?;
    let mut ids: Vec<String> = r[0].iter().flatten().cloned().collect();
    ids.sort();
    ids.dedup();
    let data = if ids.is_empty() {
        vec![]
    } else {
        let ids: Vec<Value> = ids
            .iter()
            .map(|i| json!({"id": i, "type": id_type}))
            .collect();
        vec![json!({"to_collection": to, "external_ids": ids})]
    };
    Ok(Ok(json!({"data": data})))
}
