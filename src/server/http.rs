//! The HTTP side of `audiences serve`: the Segment-compatible tracking API (SPEC §2).
//!
//! `POST /v1/{track,page,screen,identify,group,alias}` take one message, `POST /v1/batch` a
//! `{"batch": [...]}` envelope; the write key (a token with the `write` scope) is the HTTP Basic
//! username, the password empty, as Segment's libraries send it. Every message is validated on
//! its own; the accepted ones are committed (durable) before the answer: 200 when none was
//! rejected, else 400 with a reason per rejected message (the accepted ones of the same request
//! are committed all the same). Duplicates (by messageId) are acknowledged and dropped. Bodies
//! over 500 KB are refused (413), gzip bodies are accepted. Every response has a `Request-Id`.

// Handlers return early with a finished error response; boxing it would only add noise.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use super::auth::{Auth, Grant, basic};
use crate::config::Scope;
use crate::events::message::{Rejection, validate};
use crate::store::Store;

/// Largest request body (a batch), as Segment's API.
pub const MAX_BODY_BYTES: usize = 500 * 1024;

/// What the HTTP handlers share.
pub struct HttpState {
    /// The store.
    pub store: Store,
    /// Token checks.
    pub auth: Arc<Auth>,
    /// The configuration (identity rules per space).
    pub config: Arc<crate::config::Config>,
    /// Profile API requests per second per space (also the burst).
    pub rate: f64,
    /// Id indexes and finished membership streams (shared with Flight).
    pub serving: Arc<crate::export::ServingCache>,
    /// Token buckets per space: (tokens, last refill).
    pub buckets: std::sync::Mutex<std::collections::HashMap<String, (f64, std::time::Instant)>>,
}

impl HttpState {
    /// Take one request from the space's token bucket, or answer 429.
    pub fn limit(&self, space: &str) -> Result<(), Response> {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let (tokens, last) = b.entry(space.to_string()).or_insert((self.rate, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.rate);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            return Ok(());
        }
        let wait = ((1.0 - *tokens) / self.rate).ceil().max(1.0) as u64;
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            &format!("over {} requests per second for this space", self.rate),
        );
        if let Ok(v) = HeaderValue::from_str(&wait.to_string()) {
            r.headers_mut().insert("retry-after", v);
        }
        Err(r)
    }

    /// The identity rules of a space.
    pub fn rules(
        &self,
        space: &crate::store::Space,
    ) -> crate::error::Result<crate::identity::IdentityRules> {
        match self.config.spaces.get(space.as_str()) {
            Some(s) => crate::identity::IdentityRules::from_config(&s.identity),
            None => Ok(crate::identity::IdentityRules::default()),
        }
    }
}

/// The router of the HTTP port.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/v1/batch", post(batch))
        .route("/v1/import", post(batch))
        .route("/v1/{kind}", post(single))
        .route(
            "/v1/spaces/{space}/audiences/{key}/export.csv",
            axum::routing::get(export),
        )
        .route(
            "/v1/spaces/{space}/collections/{collection}/profiles/{id}/{endpoint}",
            axum::routing::get(super::profile_api::handler),
        )
        .route(
            "/v1/spaces/{space}/{collection}",
            axum::routing::get(super::manage::list).post(super::manage::create),
        )
        .route(
            "/v1/spaces/{space}/{collection}/preview",
            post(super::manage::preview),
        )
        .route(
            "/v1/spaces/{space}/{collection}/{key}/destinations",
            axum::routing::put(super::manage::set_destinations),
        )
        .route(
            "/v1/spaces/{space}/{collection}/{key}",
            axum::routing::get(super::manage::show)
                .put(super::manage::edit)
                .delete(super::manage::delete),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(request_id))
        .with_state(state)
}

async fn request_id(mut r: Response) -> Response {
    let id = uuid::Uuid::new_v4().to_string();
    if let Ok(v) = HeaderValue::from_str(&id) {
        r.headers_mut().insert("request-id", v);
    }
    r
}

/// A 5xx answer for `e` (logged; the client sees only `message`).
pub(crate) fn server_error(
    e: &dyn std::fmt::Display,
    status: StatusCode,
    message: &str,
) -> Response {
    tracing::error!(error = %e, "{message}");
    error(status, "server_error", message)
}

/// A Segment-shaped error body.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// The grant of the Basic credentials (token as username, or as password), if it has `scope`.
pub(crate) fn authorize(
    state: &HttpState,
    headers: &HeaderMap,
    scope: Scope,
) -> Result<Grant, Response> {
    authorize_in(state, headers, scope, None)
}

/// The one answer to missing, malformed, wrong and other-space credentials.
fn unauthorized() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "a valid token of this space is required as the HTTP Basic username",
    )
}

/// [`authorize`] for a route naming a space: a token of another space is answered exactly like
/// a wrong token.
pub(crate) fn authorize_in(
    state: &HttpState,
    headers: &HeaderMap,
    scope: Scope,
    space: Option<&str>,
) -> Result<Grant, Response> {
    if state.auth.insecure {
        let mut g = state.auth.insecure_grant();
        if let Some(s) = space.and_then(|s| crate::store::Space::new(s).ok()) {
            g.space = s;
        }
        return Ok(g);
    }
    let header = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(unauthorized)?;
    let (user, pass) = basic(header).ok_or_else(unauthorized)?;
    let token = if user.is_empty() { pass } else { user };
    match state.auth.check_token(&token) {
        Some(g) if space.is_some_and(|s| s != g.space.as_str()) => Err(unauthorized()),
        Some(g) if g.allows(scope) => Ok(g),
        Some(_) => Err(error(
            StatusCode::FORBIDDEN,
            "authentication_error",
            "this token lacks the scope the request needs",
        )),
        None => Err(unauthorized()),
    }
}

fn body_json(headers: &HeaderMap, body: &[u8]) -> Result<Value, Response> {
    let gz = headers
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    let raw = if gz {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(body)
            .take(MAX_BODY_BYTES as u64 * 20 + 1)
            .read_to_end(&mut out)
            .map_err(|e| {
                error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    &format!("bad gzip body: {e}"),
                )
            })?;
        out
    } else {
        body.to_vec()
    };
    serde_json::from_slice(&raw).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!("the body is not JSON: {e}"),
        )
    })
}

async fn single(
    State(state): State<Arc<HttpState>>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !matches!(
        kind.as_str(),
        "track" | "page" | "screen" | "identify" | "group" | "alias"
    ) {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no endpoint /v1/{kind}"),
        );
    }
    let grant = match authorize(&state, &headers, Scope::Write) {
        Ok(g) => g,
        Err(r) => return r,
    };
    let mut v = match body_json(&headers, &body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Some(o) = v.as_object_mut() {
        o.insert("type".into(), Value::String(kind));
    }
    accept(&state, &grant, vec![v]).await
}

async fn batch(State(state): State<Arc<HttpState>>, headers: HeaderMap, body: Bytes) -> Response {
    let grant = match authorize(&state, &headers, Scope::Write) {
        Ok(g) => g,
        Err(r) => return r,
    };
    let v = match body_json(&headers, &body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(items) = v.get("batch").and_then(|b| b.as_array()).cloned() else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "expected {\"batch\": [messages]}",
        );
    };
    // Batch-level context is merged into each message's (theirs wins), as Segment does.
    let ctx = v.get("context").and_then(|c| c.as_object()).cloned();
    let items = items
        .into_iter()
        .map(|mut m| {
            if let (Some(c), Some(o)) = (&ctx, m.as_object_mut()) {
                let mc = o
                    .entry("context")
                    .or_insert_with(|| Value::Object(Default::default()));
                if let Some(mc) = mc.as_object_mut() {
                    for (k, x) in c {
                        mc.entry(k.clone()).or_insert_with(|| x.clone());
                    }
                }
            }
            m
        })
        .collect();
    accept(&state, &grant, items).await
}

/// Query of the export endpoint.
#[derive(serde::Deserialize)]
struct ExportQuery {
    format: Option<String>,
    id_type: Option<String>,
    hash: Option<String>,
}

/// `GET /v1/spaces/{space}/audiences/{key}/export.csv`: the CSV of the current version,
/// streamed, with the version in `X-Audience-Version`. Another space's audience is answered
/// like a missing one.
async fn export(
    State(state): State<Arc<HttpState>>,
    Path((space, key)): Path<(String, String)>,
    axum::extract::Query(q): axum::extract::Query<ExportQuery>,
    headers: HeaderMap,
) -> Response {
    let grant = match authorize_in(&state, &headers, Scope::Read, Some(&space)) {
        Ok(g) => g,
        Err(r) => return r,
    };
    let not_found = || {
        error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no audience '{key}' in space '{space}'"),
        )
    };
    let Ok(space) = crate::store::Space::new(&space) else {
        return not_found();
    };
    let raw = match q.hash.as_deref() {
        None | Some("sha256") => false,
        Some("none") => true,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                "validation_error",
                &format!("hash must be sha256 or none, not '{other}'"),
            );
        }
    };
    if raw && !grant.allows(Scope::Pii) {
        return error(
            StatusCode::FORBIDDEN,
            "authentication_error",
            "unhashed exports (hash=none) need a token with the pii scope",
        );
    }
    let format = match crate::export::Format::parse(
        q.format.as_deref().unwrap_or("unformatted"),
        q.id_type.as_deref(),
        raw,
    ) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, "validation_error", &e.to_string()),
    };
    let v = match crate::export::audience_version(&state.store, &space, &key, None).await {
        Ok(Some(v)) => v,
        Ok(None) => return not_found(),
        Err(e) => return server_error(&e, StatusCode::INTERNAL_SERVER_ERROR, "export failed"),
    };
    let chunks =
        match crate::export::export_csv(&state.store, &space, &v, &format, &state.serving).await {
            Ok(x) => x,
            Err(e) => return server_error(&e, StatusCode::INTERNAL_SERVER_ERROR, "export failed"),
        };
    // CSV chunks per batch: the header with the first, then rows only.
    let body = futures::StreamExt::map(chunks, |c| {
        c.map(|(bytes, _)| bytes)
            .map_err(|e| std::io::Error::other(e.to_string()))
    });
    let mut resp = axum::body::Body::from_stream(body).into_response();
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&v.version.to_string()) {
        h.insert("x-audience-version", v);
    }
    resp
}

/// Validate each message, commit the accepted ones, answer.
async fn accept(state: &HttpState, grant: &Grant, items: Vec<Value>) -> Response {
    let now = chrono::Utc::now().timestamp_micros();
    let mut events = Vec::new();
    let mut rejected: Vec<Value> = Vec::new();
    for (i, m) in items.into_iter().enumerate() {
        let raw = serde_json::to_vec(&m).unwrap_or_default();
        let checked = if raw.len() > crate::events::message::MAX_MESSAGE_BYTES {
            Err(Rejection::new(
                "message_too_large",
                format!(
                    "message is {} bytes; the limit is {}",
                    raw.len(),
                    crate::events::message::MAX_MESSAGE_BYTES
                ),
            ))
        } else {
            validate(m, &raw, now)
        };
        match checked {
            Ok(e) => events.push(e),
            Err(r) => rejected.push(json!({"index": i, "code": r.code, "message": r.message})),
        }
    }
    let n = events.len();
    let report = if n > 0 {
        match crate::events::ingest::commit_events(&state.store, &grant.space, events).await {
            Ok(r) => r,
            Err(e) => {
                return server_error(
                    &e,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the events could not be committed; retry",
                );
            }
        }
    } else {
        Default::default()
    };
    let body = json!({
        "success": rejected.is_empty(),
        "accepted": report.accepted,
        "duplicates": report.duplicates,
        "rejected": rejected,
    });
    let status = if rejected.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    (status, axum::Json(body)).into_response()
}
