//! Audience and computed-trait management over HTTP, with the rules of the CLI:
//!
//! - `GET /v1/spaces/{space}/{audiences|computed_traits}`: the live definitions (read scope);
//! - `POST` the same path with a definition file: create (admin; 201). Keys are immutable and
//!   never reused, even after a delete (400 `validation_error` naming why);
//! - `GET .../{key}`: one definition (read); `PUT .../{key}`: a new version recomputed at once
//!   under the key's edit lock (admin; 409 `locked` while another edit's recompute runs);
//!   `DELETE .../{key}` (admin; refused while another definition refers to it);
//! - `POST .../preview`: evaluate a definition file without saving it (read).

// Handlers return early with a finished error response; boxing it would only add noise.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::http::{HttpState, authorize_in, error};
use crate::config::Scope;
use crate::error::Error;
use crate::lang::definition::{DefinitionFile, Kind};
use crate::store::Space;

fn kind_of(collection: &str) -> Option<Kind> {
    match collection {
        "audiences" => Some(Kind::Audience),
        "computed_traits" => Some(Kind::ComputedTrait),
        _ => None,
    }
}

fn failure(e: Error) -> Response {
    match e {
        Error::Usage(m) => error(StatusCode::BAD_REQUEST, "validation_error", &m),
        // a definition that does not compile
        e @ Error::Compute { .. } if e.exit_code() == 2 => {
            error(StatusCode::BAD_REQUEST, "validation_error", &e.to_string())
        }
        Error::Locked(m) => error(StatusCode::CONFLICT, "locked", &m),
        Error::Conflict(m) => error(StatusCode::CONFLICT, "conflict", &m),
        other => super::http::server_error(
            &other,
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request failed",
        ),
    }
}

/// The space of the path if the grant may act on it with `scope` (another space is a 404).
fn space_of(
    state: &HttpState,
    headers: &HeaderMap,
    space: &str,
    collection: &str,
    scope: Scope,
) -> Result<(Space, Kind), Response> {
    authorize_in(state, headers, scope, Some(space))?;
    let not_found = || error(StatusCode::NOT_FOUND, "not_found", "no such collection");
    let kind = kind_of(collection).ok_or_else(not_found)?;
    Ok((Space::new(space).map_err(|_| not_found())?, kind))
}

fn parse_file(body: &[u8], kind: Kind) -> Result<DefinitionFile, Response> {
    let file: DefinitionFile = serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "validation_error",
            &format!("not a definition file: {e}"),
        )
    })?;
    if file.kind != kind {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "validation_error",
            &format!(
                "'{}' is a {:?}; post it to its own collection",
                file.key, file.kind
            ),
        ));
    }
    Ok(file)
}

/// [`space_of`] and the definition file of the body.
fn space_and_file(
    state: &HttpState,
    headers: &HeaderMap,
    space: &str,
    collection: &str,
    scope: Scope,
    body: &[u8],
) -> Result<(Space, Kind, DefinitionFile), Response> {
    let (space, kind) = space_of(state, headers, space, collection, scope)?;
    Ok((space, kind, parse_file(body, kind)?))
}

/// `GET /v1/spaces/{space}/{collection}`.
pub async fn list(
    State(state): State<Arc<HttpState>>,
    Path((space, collection)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if collection == "destinations" {
        return destinations_status(&state, &headers, &space).await;
    }
    let (space, kind) = match space_of(&state, &headers, &space, &collection, Scope::Read) {
        Ok(x) => x,
        Err(r) => return r,
    };
    match crate::definitions::live(&state.store, &space).await {
        Ok(defs) => {
            let items: Vec<_> = defs
                .values()
                .filter(|s| s.file.kind == kind)
                .map(|s| s.redacted())
                .collect();
            (StatusCode::OK, axum::Json(json!({ "data": items }))).into_response()
        }
        Err(e) => failure(e),
    }
}

/// `POST /v1/spaces/{space}/{collection}`: create.
pub async fn create(
    State(state): State<Arc<HttpState>>,
    Path((space, collection)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (space, kind, file) =
        match space_and_file(&state, &headers, &space, &collection, Scope::Admin, &body) {
            Ok(x) => x,
            Err(r) => return r,
        };
    match crate::definitions::create(&state.store, &space, &file).await {
        Ok(_) => show_status(&state, &space, &file.key, kind, StatusCode::CREATED).await,
        Err(e) => failure(e),
    }
}

async fn show_status(
    state: &HttpState,
    space: &Space,
    key: &str,
    kind: Kind,
    status: StatusCode,
) -> Response {
    match crate::definitions::live(&state.store, space).await {
        Ok(defs) => match defs.get(key).filter(|s| s.file.kind == kind) {
            Some(s) => (status, axum::Json(json!(s.redacted()))).into_response(),
            None => error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no definition '{key}'"),
            ),
        },
        Err(e) => failure(e),
    }
}

/// `GET /v1/spaces/{space}/{collection}/{key}`.
pub async fn show(
    State(state): State<Arc<HttpState>>,
    Path((space, collection, key)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let (space, kind) = match space_of(&state, &headers, &space, &collection, Scope::Read) {
        Ok(x) => x,
        Err(r) => return r,
    };
    show_status(&state, &space, &key, kind, StatusCode::OK).await
}

/// `PUT /v1/spaces/{space}/{collection}/{key}`: edit and recompute under the lock.
pub async fn edit(
    State(state): State<Arc<HttpState>>,
    Path((space, collection, key)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (space, _, file) =
        match space_and_file(&state, &headers, &space, &collection, Scope::Admin, &body) {
            Ok(x) => x,
            Err(r) => return r,
        };
    if file.key != key {
        return error(
            StatusCode::BAD_REQUEST,
            "validation_error",
            &format!(
                "the body's key '{}' is not '{key}' (keys are immutable)",
                file.key
            ),
        );
    }
    let rules = state.rules(&space);
    let rules = match rules {
        Ok(r) => r,
        Err(e) => return failure(e),
    };
    let now = chrono::Utc::now().timestamp_micros();
    match crate::compute::lifecycle::edit(&state.store, &space, &rules, &file, now).await {
        Ok((version, reports)) => (
            StatusCode::OK,
            axum::Json(json!({"key": key, "version": version, "computed": reports})),
        )
            .into_response(),
        Err(e) => failure(e),
    }
}

/// `DELETE /v1/spaces/{space}/{collection}/{key}`.
pub async fn delete(
    State(state): State<Arc<HttpState>>,
    Path((space, collection, key)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let (space, kind) = match space_of(&state, &headers, &space, &collection, Scope::Admin) {
        Ok(x) => x,
        Err(r) => return r,
    };
    match crate::definitions::live(&state.store, &space).await {
        Ok(defs) if defs.get(&key).is_some_and(|s| s.file.kind == kind) => {}
        Ok(_) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no definition '{key}'"),
            );
        }
        Err(e) => return failure(e),
    }
    match crate::definitions::delete(&state.store, &space, &key).await {
        Ok(_) => (
            StatusCode::OK,
            axum::Json(json!({"key": key, "deleted": true})),
        )
            .into_response(),
        Err(e) => failure(e),
    }
}

/// `POST /v1/spaces/{space}/{collection}/preview`.
pub async fn preview(
    State(state): State<Arc<HttpState>>,
    Path((space, collection)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (space, _, file) =
        match space_and_file(&state, &headers, &space, &collection, Scope::Read, &body) {
            Ok(x) => x,
            Err(r) => return r,
        };
    let now = chrono::Utc::now().timestamp_micros();
    match crate::compute::lifecycle::preview(&state.store, &space, &file, now).await {
        Ok(p) => (StatusCode::OK, axum::Json(json!(p))).into_response(),
        Err(e) => failure(e),
    }
}

/// `GET /v1/spaces/{space}/destinations`: the status of every destination.
async fn destinations_status(state: &HttpState, headers: &HeaderMap, space: &str) -> Response {
    if let Err(r) = authorize_in(state, headers, Scope::Read, Some(space)) {
        return r;
    }
    let Ok(space) = Space::new(space) else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such collection");
    };
    match crate::destinations::status(&state.store, &space).await {
        Ok(s) => (StatusCode::OK, axum::Json(json!({ "data": s }))).into_response(),
        Err(e) => failure(e),
    }
}

/// `PUT /v1/spaces/{space}/audiences/{key}/destinations`: replace an audience's destinations
/// (a JSON array as under `"destinations"`); nothing is recomputed, the next sync backfills
/// new destinations.
pub async fn set_destinations(
    State(state): State<Arc<HttpState>>,
    Path((space, collection, key)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (space, kind) = match space_of(&state, &headers, &space, &collection, Scope::Admin) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let dests: Vec<serde_json::Value> = match serde_json::from_slice(&body) {
        Ok(d) => d,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "validation_error",
                &format!("expected a JSON array of destinations: {e}"),
            );
        }
    };
    let defs = match crate::definitions::live(&state.store, &space).await {
        Ok(d) => d,
        Err(e) => return failure(e),
    };
    let Some(stored) = defs.get(&key).filter(|s| s.file.kind == kind) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no definition '{key}'"),
        );
    };
    let file = DefinitionFile {
        destinations: Some(dests),
        ..stored.file.clone()
    };
    match crate::definitions::edit(&state.store, &space, &file).await {
        Ok(_) => show_status(&state, &space, &key, kind, StatusCode::OK).await,
        Err(e) => failure(e),
    }
}
