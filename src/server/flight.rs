//! The Arrow Flight side of `audiences serve` (SPEC §7).
//!
//! - `handshake`: HTTP Basic credentials in the `authorization` header (the space token as the
//!   password, or as the username with an empty password) → a bearer token, in the response
//!   payload and its `authorization` header. Every other call needs `authorization: Bearer ..`.
//! - `list_flights`: one entry per live audience of the caller's space, descriptor path
//!   `["audiences", KEY]`, with its schema and row count.
//! - `get_flight_info` / `get_schema` / `do_get` for `["audiences", KEY]` (the current membership:
//!   `profile_id`, `entered_at`, and one list column per external id type of the space; account
//!   audiences: `account_id`, `entered_at`) and `["audiences", KEY, "changes", FROM_VERSION]`
//!   (entered/exited rows of the versions after FROM_VERSION). The ticket pins the committed
//!   version the info described, so a stream never mixes versions while a refresh commits.
//! - `do_action`: `refresh`, `compute`, `preview` (JSON bodies); `list_actions` describes them.
//!
//! Another space's audience is answered exactly like a missing one (NOT_FOUND).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, ListBuilder, RecordBatch, StringBuilder, TimestampMicrosecondArray,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt, TryStreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::auth::{Auth, Grant, basic};
use crate::compute::{MEMBERSHIPS, VersionRef, versions};
use crate::config::{Config, Scope};
use crate::store::{CommitLog, Space, Store};
use crate::tables::CommittedTable;

/// Rows per streamed batch.
const BATCH_ROWS: usize = 8192;

/// The Flight service of one server.
#[derive(Clone)]
pub struct Flight {
    /// The store.
    pub store: Store,
    /// Token checks.
    pub auth: Arc<Auth>,
    /// The configuration (identity rules per space).
    pub config: Arc<Config>,
}

type Stream<T> = BoxStream<'static, Result<T, Status>>;

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// What a ticket names: a descriptor path and the committed version it pins.
#[derive(serde::Serialize, serde::Deserialize)]
struct TicketBody {
    path: Vec<String>,
    version: u64,
}

impl Flight {
    fn grant<T>(&self, req: &Request<T>) -> Result<Grant, Status> {
        if self.auth.insecure {
            return Ok(Grant {
                space: Space::default(),
                scopes: vec![Scope::Read, Scope::Write, Scope::Admin, Scope::Pii],
            });
        }
        let h = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::unauthenticated("no bearer token: call handshake first"))?;
        let token = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
            .ok_or_else(|| Status::unauthenticated("expected `authorization: Bearer <token>`"))?;
        self.auth
            .check_bearer(token.trim())
            .ok_or_else(|| Status::unauthenticated("invalid or expired bearer token"))
    }

    fn need(&self, g: &Grant, scope: Scope) -> Result<(), Status> {
        if g.allows(scope) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "this token lacks the {scope:?} scope"
            )))
        }
    }

    /// The current (or pinned) version of a live audience of the space.
    async fn version(
        &self,
        space: &Space,
        key: &str,
        pinned: Option<u64>,
    ) -> Result<VersionRef, Status> {
        let missing = || Status::not_found(format!("no audience '{key}'"));
        let live = crate::definitions::live(&self.store, space)
            .await
            .map_err(internal)?;
        if !live
            .get(key)
            .is_some_and(|s| s.file.kind == crate::lang::definition::Kind::Audience)
        {
            return Err(missing());
        }
        let snap = CommitLog::new(&self.store, space, MEMBERSHIPS)
            .snapshot()
            .await
            .map_err(internal)?;
        versions(&snap)
            .into_iter()
            .filter(|v| v.key == key)
            .rfind(|v| pinned.is_none_or(|p| v.version == p))
            .ok_or_else(missing)
    }

    async fn id_types(&self, space: &Space) -> Result<Vec<String>, Status> {
        let rows = crate::tables::query(
            &self.store,
            space,
            "SELECT DISTINCT id_type FROM identities ORDER BY id_type",
        )
        .await
        .map_err(internal)?;
        Ok(rows
            .iter()
            .flat_map(|b| {
                b.column(0)
                    .as_string::<i32>()
                    .iter()
                    .flatten()
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .collect())
    }

    fn membership_schema(accounts: bool, id_types: &[String]) -> SchemaRef {
        let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let mut fields = vec![
            Field::new(
                if accounts { "account_id" } else { "profile_id" },
                DataType::Utf8,
                false,
            ),
            Field::new("entered_at", ts, false),
        ];
        if !accounts {
            for t in id_types {
                fields.push(Field::new(
                    t,
                    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
                    false,
                ));
            }
        }
        Arc::new(Schema::new(fields))
    }

    fn changes_schema() -> SchemaRef {
        let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        Arc::new(Schema::new(vec![
            Field::new("profile_id", DataType::Utf8, true),
            Field::new("account_id", DataType::Utf8, true),
            Field::new("change", DataType::Utf8, false),
            Field::new("version", DataType::Int64, false),
            Field::new("as_of", ts, false),
        ]))
    }

    /// Schema, row count and ticket of a descriptor path.
    async fn describe(
        &self,
        g: &Grant,
        path: &[String],
    ) -> Result<(SchemaRef, i64, TicketBody), Status> {
        match path {
            [a, key] if a == "audiences" => {
                let v = self.version(&g.space, key, None).await?;
                let accounts = is_accounts(&self.store, &v).await?;
                let types = self.id_types(&g.space).await?;
                Ok((
                    Self::membership_schema(accounts, &types),
                    v.data.rows as i64,
                    TicketBody {
                        path: path.to_vec(),
                        version: v.version,
                    },
                ))
            }
            [a, key, c, from] if a == "audiences" && c == "changes" => {
                let from: u64 = from
                    .parse()
                    .map_err(|_| Status::invalid_argument("FROM_VERSION must be a number"))?;
                let v = self.version(&g.space, key, None).await?;
                let rows = self
                    .changes_files(&g.space, key, from, v.version)
                    .await?
                    .iter()
                    .map(|f| f.rows as i64)
                    .sum();
                Ok((
                    Self::changes_schema(),
                    rows,
                    TicketBody {
                        path: path.to_vec(),
                        version: v.version,
                    },
                ))
            }
            _ => Err(Status::not_found(format!(
                "unknown descriptor path {path:?}: expected [\"audiences\", KEY] or [\"audiences\", KEY, \"changes\", FROM_VERSION]"
            ))),
        }
    }

    async fn changes_files(
        &self,
        space: &Space,
        key: &str,
        from: u64,
        upto: u64,
    ) -> Result<Vec<crate::store::log::FileAdd>, Status> {
        let snap = CommitLog::new(&self.store, space, MEMBERSHIPS)
            .snapshot()
            .await
            .map_err(internal)?;
        // every version of the key (changes files are never replaced)
        let all = versions(&snap);
        Ok(all
            .into_iter()
            .filter(|v| v.key == key && v.version > from && v.version <= upto)
            .filter_map(|v| v.changes)
            .collect())
    }

    fn info(schema: &SchemaRef, rows: i64, t: &TicketBody, desc: FlightDescriptor) -> Result<FlightInfo, Status> {
        let ticket = serde_json::to_vec(t).map_err(internal)?;
        Ok(FlightInfo::new()
            .try_with_schema(schema)
            .map_err(internal)?
            .with_descriptor(desc)
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
            .with_total_records(rows)
            .with_ordered(true))
    }
}

async fn is_accounts(store: &Store, v: &VersionRef) -> Result<bool, Status> {
    // Account audiences' members carry account_id instead of profile_id.
    let batches = crate::compute::read_file(store, &v.data).await.map_err(internal)?;
    Ok(batches.iter().any(|b| {
        b.column_by_name("account_id")
            .is_some_and(|c| c.null_count() < c.len())
    }))
}

fn descriptor_path(d: &FlightDescriptor) -> Vec<String> {
    if !d.path.is_empty() {
        return d.path.clone();
    }
    // a command holding a JSON array works too
    serde_json::from_slice(&d.cmd).unwrap_or_default()
}

/// Group `(profile_id, entered_at, id_type, id_value)` rows, sorted by profile, into one row
/// per profile with a list column per id type; sends batches of [`BATCH_ROWS`].
async fn pivot(
    mut input: datafusion::physical_plan::SendableRecordBatchStream,
    schema: SchemaRef,
    types: Vec<String>,
    mut out: futures::channel::mpsc::Sender<Result<RecordBatch, FlightError>>,
) {
    let col_of: BTreeMap<&str, usize> = types.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut ids = StringBuilder::new();
    let mut entered = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let mut lists: Vec<ListBuilder<StringBuilder>> =
        types.iter().map(|_| ListBuilder::new(StringBuilder::new())).collect();
    let mut current: Option<(String, i64)> = None;
    let mut values: Vec<Vec<String>> = vec![Vec::new(); types.len()];
    let mut rows = 0usize;
    macro_rules! finish_row {
        () => {
            if let Some((p, t)) = current.take() {
                ids.append_value(&p);
                entered.append_value(t);
                for (i, l) in lists.iter_mut().enumerate() {
                    for v in values[i].drain(..) {
                        l.values().append_value(v);
                    }
                    l.append(true);
                }
                rows += 1;
            }
        };
    }
    let emit = |ids: &mut StringBuilder,
                    entered: &mut TimestampMicrosecondBuilder,
                    lists: &mut Vec<ListBuilder<StringBuilder>>|
     -> Result<RecordBatch, FlightError> {
        let mut cols: Vec<ArrayRef> = vec![Arc::new(ids.finish()), Arc::new(entered.finish())];
        for l in lists.iter_mut() {
            cols.push(Arc::new(l.finish()));
        }
        RecordBatch::try_new(Arc::clone(&schema), cols).map_err(FlightError::from)
    };
    while let Some(b) = input.next().await {
        let b = match b {
            Ok(b) => b,
            Err(e) => {
                let _ = out.send(Err(FlightError::ExternalError(Box::new(e)))).await;
                return;
            }
        };
        let (p, t, ty, val) = (
            b.column(0).as_string::<i32>(),
            b.column(1)
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>(),
            b.column(2).as_string::<i32>(),
            b.column(3).as_string::<i32>(),
        );
        let Some(t) = t else {
            let _ = out
                .send(Err(FlightError::ProtocolError("entered_at is not a timestamp".into())))
                .await;
            return;
        };
        for r in 0..b.num_rows() {
            if !p.is_valid(r) {
                continue;
            }
            if current.as_ref().is_none_or(|(c, _)| c != p.value(r)) {
                finish_row!();
                if rows >= BATCH_ROWS {
                    let batch = emit(&mut ids, &mut entered, &mut lists);
                    rows = 0;
                    if out.send(batch).await.is_err() {
                        return; // the client went away
                    }
                }
                current = Some((p.value(r).to_string(), t.value(r)));
            }
            if ty.is_valid(r)
                && val.is_valid(r)
                && let Some(i) = col_of.get(ty.value(r))
            {
                values[*i].push(val.value(r).to_string());
            }
        }
    }
    finish_row!();
    if rows > 0 {
        let batch = emit(&mut ids, &mut entered, &mut lists);
        let _ = out.send(batch).await;
    }
}

#[tonic::async_trait]
impl FlightService for Flight {
    type HandshakeStream = Stream<HandshakeResponse>;
    type ListFlightsStream = Stream<FlightInfo>;
    type DoGetStream = Stream<FlightData>;
    type DoPutStream = Stream<PutResult>;
    type DoActionStream = Stream<arrow_flight::Result>;
    type ListActionsStream = Stream<ActionType>;
    type DoExchangeStream = Stream<FlightData>;

    async fn handshake(
        &self,
        req: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        let grant = if self.auth.insecure {
            Grant {
                space: Space::default(),
                scopes: vec![Scope::Read, Scope::Write, Scope::Admin, Scope::Pii],
            }
        } else {
            let header = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| Status::unauthenticated("handshake needs HTTP Basic credentials"))?;
            let (user, pass) = basic(header)
                .ok_or_else(|| Status::unauthenticated("handshake needs HTTP Basic credentials"))?;
            let token = if pass.is_empty() { user } else { pass };
            self.auth
                .check_token(&token)
                .ok_or_else(|| Status::unauthenticated("invalid credentials"))?
        };
        let bearer = self.auth.new_session(grant);
        let payload = HandshakeResponse {
            protocol_version: 0,
            payload: bearer.clone().into_bytes().into(),
        };
        let mut resp = Response::new(futures::stream::iter([Ok(payload)]).boxed());
        let value = format!("Bearer {bearer}")
            .parse()
            .map_err(|_| Status::internal("bearer header"))?;
        resp.metadata_mut().insert("authorization", value);
        Ok(resp)
    }

    async fn list_flights(
        &self,
        req: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        let g = self.grant(&req)?;
        self.need(&g, Scope::Read)?;
        let live = crate::definitions::live(&self.store, &g.space)
            .await
            .map_err(internal)?;
        let mut out = Vec::new();
        for (key, s) in &live {
            if s.file.kind != crate::lang::definition::Kind::Audience {
                continue;
            }
            let path = vec!["audiences".to_string(), key.clone()];
            match self.describe(&g, &path).await {
                Ok((schema, rows, t)) => out.push(Self::info(
                    &schema,
                    rows,
                    &t,
                    FlightDescriptor::new_path(path),
                )),
                // defined but never computed: nothing to list yet
                Err(e) if e.code() == tonic::Code::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Response::new(futures::stream::iter(out).boxed()))
    }

    async fn get_flight_info(
        &self,
        req: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let g = self.grant(&req)?;
        self.need(&g, Scope::Read)?;
        let desc = req.into_inner();
        let path = descriptor_path(&desc);
        let (schema, rows, t) = self.describe(&g, &path).await?;
        Ok(Response::new(Self::info(&schema, rows, &t, desc)?))
    }

    async fn poll_flight_info(
        &self,
        _req: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented(
            "poll_flight_info: every flight is ready at once; use get_flight_info",
        ))
    }

    async fn get_schema(
        &self,
        req: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        let g = self.grant(&req)?;
        self.need(&g, Scope::Read)?;
        let path = descriptor_path(req.get_ref());
        let (schema, _, _) = self.describe(&g, &path).await?;
        let opts = arrow::ipc::writer::IpcWriteOptions::default();
        let r = SchemaResult::try_from(arrow_flight::SchemaAsIpc::new(&schema, &opts))
            .map_err(internal)?;
        Ok(Response::new(r))
    }

    async fn do_get(&self, req: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        let g = self.grant(&req)?;
        self.need(&g, Scope::Read)?;
        let t: TicketBody = serde_json::from_slice(&req.get_ref().ticket)
            .map_err(|_| Status::invalid_argument("not a ticket of this server"))?;
        let ctx = crate::tables::session(&self.store, &g.space)
            .await
            .map_err(internal)?;
        let (schema, batches): (SchemaRef, _) = match t.path.as_slice() {
            [a, key] if a == "audiences" => {
                let v = self.version(&g.space, key, Some(t.version)).await?;
                let accounts = is_accounts(&self.store, &v).await?;
                let types = if accounts {
                    Vec::new()
                } else {
                    self.id_types(&g.space).await?
                };
                let schema = Self::membership_schema(accounts, &types);
                ctx.register_table(
                    "__version_members",
                    Arc::new(CommittedTable::plain(
                        crate::compute::schema("members"),
                        vec![v.data.clone()],
                    )),
                )
                .map_err(internal)?;
                // Fixed internal SQL: the key only selected the file above.
                let sql = if accounts {
                    "SELECT account_id, entered_at, CAST(NULL AS VARCHAR) AS t, CAST(NULL AS VARCHAR) AS v \
                     FROM __version_members ORDER BY account_id"
                } else {
                    "SELECT m.profile_id, m.entered_at, i.id_type, i.id_value FROM __version_members m \
                     LEFT JOIN identities i ON i.profile_id = m.profile_id \
                     ORDER BY m.profile_id, i.id_type, i.id_value"
                };
                let input = ctx
                    .sql(sql)
                    .await
                    .map_err(internal)?
                    .execute_stream()
                    .await
                    .map_err(internal)?;
                let (tx, rx) = futures::channel::mpsc::channel(2);
                tokio::spawn(pivot(input, Arc::clone(&schema), types, tx));
                (schema, rx.boxed())
            }
            [a, key, c, from] if a == "audiences" && c == "changes" => {
                let from: u64 = from
                    .parse()
                    .map_err(|_| Status::invalid_argument("FROM_VERSION must be a number"))?;
                let files = self.changes_files(&g.space, key, from, t.version).await?;
                ctx.register_table(
                    "__version_changes",
                    Arc::new(CommittedTable::plain(crate::compute::schema("changes"), files)),
                )
                .map_err(internal)?;
                let stream = ctx
                    .sql("SELECT profile_id, account_id, change, version, as_of FROM __version_changes ORDER BY version, change, profile_id, account_id")
                    .await
                    .map_err(internal)?
                    .execute_stream()
                    .await
                    .map_err(internal)?
                    .map_err(|e| FlightError::ExternalError(Box::new(e)));
                (Self::changes_schema(), stream.boxed())
            }
            _ => return Err(Status::not_found("unknown ticket path")),
        };
        let data = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(|e| Status::internal(e.to_string()));
        Ok(Response::new(data.boxed()))
    }

    async fn do_put(
        &self,
        _req: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        Err(Status::unimplemented(
            "do_put of events is not served yet; use the HTTP tracking API or `audiences ingest`",
        ))
    }

    async fn do_action(
        &self,
        req: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        let g = self.grant(&req)?;
        let action = req.into_inner();
        let body: serde_json::Value = if action.body.is_empty() {
            serde_json::json!({})
        } else {
            serde_json::from_slice(&action.body)
                .map_err(|e| Status::invalid_argument(format!("the action body is not JSON: {e}")))?
        };
        let as_of = match body.get("as_of").and_then(|v| v.as_str()) {
            Some(s) => crate::events::message::parse_timestamp(s)
                .ok_or_else(|| Status::invalid_argument(format!("as_of '{s}' is not RFC 3339")))?,
            None => chrono::Utc::now().timestamp_micros(),
        };
        let rules = match self.config.spaces.get(g.space.as_str()) {
            Some(s) => crate::identity::IdentityRules::from_config(&s.identity).map_err(internal)?,
            None => crate::identity::IdentityRules::default(),
        };
        let usage = |e: crate::error::Error| match e {
            crate::error::Error::Usage(m) => Status::invalid_argument(m),
            crate::error::Error::Conflict(m) | crate::error::Error::Locked(m) => Status::aborted(m),
            other => internal(other),
        };
        let result = match action.r#type.as_str() {
            "refresh" => {
                self.need(&g, Scope::Admin)?;
                let r = crate::compute::refresh::refresh(
                    &self.store,
                    &g.space,
                    &rules,
                    &crate::compute::refresh::RefreshOptions::at(as_of),
                )
                .await
                .map_err(usage)?;
                serde_json::to_vec(&r).map_err(internal)?
            }
            "compute" => {
                self.need(&g, Scope::Admin)?;
                let keys: Vec<String> = body
                    .get("keys")
                    .and_then(|k| serde_json::from_value(k.clone()).ok())
                    .unwrap_or_default();
                let r = crate::compute::compute(&self.store, &g.space, &rules, as_of, &keys)
                    .await
                    .map_err(usage)?;
                serde_json::to_vec(&r).map_err(internal)?
            }
            "preview" => {
                self.need(&g, Scope::Read)?;
                // the body is a definition file, or {"definition": <file>, "as_of": ...}
                let def = match body.get("definition") {
                    Some(d) if d.is_object() => d.clone(),
                    _ => body.clone(),
                };
                let file: crate::lang::definition::DefinitionFile = serde_json::from_value(def)
                    .map_err(|e| Status::invalid_argument(format!("not a definition: {e}")))?;
                let r = crate::compute::lifecycle::preview(&self.store, &g.space, &file, as_of)
                    .await
                    .map_err(usage)?;
                serde_json::to_vec(&r).map_err(internal)?
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown action '{other}' (list_actions names them)"
                )));
            }
        };
        let r = arrow_flight::Result {
            body: result.into(),
        };
        Ok(Response::new(futures::stream::iter([Ok(r)]).boxed()))
    }

    async fn list_actions(
        &self,
        req: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        self.grant(&req)?;
        let actions = [
            ("refresh", "One micro-batch refresh of the space. Body: {\"as_of\": RFC3339?}. Admin scope. Returns the refresh report (JSON)."),
            ("compute", "Full recompute. Body: {\"keys\": [KEY...]?, \"as_of\": RFC3339?}. Admin scope. Returns the per-key reports (JSON)."),
            ("preview", "Evaluate a definition without saving it. Body: a definition file (JSON), or {\"definition\": ..., \"as_of\": ...}. Returns size, sample, would enter/exit (JSON)."),
        ];
        let out: Vec<Result<ActionType, Status>> = actions
            .iter()
            .map(|(t, d)| {
                Ok(ActionType {
                    r#type: t.to_string(),
                    description: d.to_string(),
                })
            })
            .collect();
        Ok(Response::new(futures::stream::iter(out).boxed()))
    }

    async fn do_exchange(
        &self,
        _req: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("do_exchange is not part of this service"))
    }
}
