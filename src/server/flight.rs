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
//! - `do_put` of record batches in the event schema (bulk loads): every row validated like an
//!   HTTP message, the accepted ones committed (every 50k rows and at the end) before the
//!   `PutResult`, whose metadata counts accepted, duplicate and rejected rows (with reasons).
//! - Flight SQL on the same port: statement queries (read-only: no DDL, DML or `SET`) over the
//!   caller's space's tables, and the catalog, schema, table, table type and SQL info commands
//!   drivers call on connect; prepared statements without parameters (the handle is the SQL).
//!
//! Another space's audience is answered exactly like a missing one (NOT_FOUND).

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::{
    ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult, Any, Command,
    ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::auth::{Auth, Grant, basic};
use crate::compute::{MEMBERSHIPS, VersionRef, versions};
use crate::config::{Config, Scope};
use crate::store::{CommitLog, Space, Store};
use crate::tables::CommittedTable;

/// The Flight service of one server.
#[derive(Clone)]
pub struct Flight {
    /// The store.
    pub store: Store,
    /// Token checks.
    pub auth: Arc<Auth>,
    /// The configuration (identity rules per space).
    pub config: Arc<Config>,
    /// Memory one query may use (Flight SQL statements, streams).
    pub query_memory: Option<usize>,
    /// Id indexes and finished membership streams (shared with the HTTP exports).
    pub serving: Arc<crate::export::ServingCache>,
    /// Identity graphs kept in memory per space (shared with the refresh loops).
    pub graphs: Arc<crate::identity::persist::GraphCaches>,
}

type Stream<T> = BoxStream<'static, Result<T, Status>>;

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// Register changes files as `__version_changes`; returns the query of their rows in order.
fn register_changes(
    ctx: &datafusion::prelude::SessionContext,
    files: Vec<crate::store::log::FileAdd>,
) -> Result<&'static str, Status> {
    ctx.register_table(
        "__version_changes",
        Arc::new(CommittedTable::plain(
            crate::compute::schema("changes"),
            files,
        )),
    )
    .map_err(internal)?;
    Ok(
        "SELECT profile_id, account_id, change, version, as_of FROM __version_changes \
        ORDER BY version, change, profile_id, account_id",
    )
}

/// The rows of fixed internal SQL as a Flight batch stream.
async fn sql_stream(
    ctx: &datafusion::prelude::SessionContext,
    sql: &str,
) -> Result<BoxStream<'static, Result<arrow::array::RecordBatch, FlightError>>, Status> {
    Ok(ctx
        .sql(sql)
        .await
        .map_err(internal)?
        .execute_stream()
        .await
        .map_err(internal)?
        .map_err(|e| FlightError::ExternalError(Box::new(e)))
        .boxed())
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
            return Ok(self.auth.insecure_grant());
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

    /// The gRPC frames of a `DoGet` of a membership version (kept from an earlier pull, or
    /// encoded as the client reads), when the request may read it. `None` for anything else
    /// (another ticket, a bad token, an error before the first message): the generated
    /// service's `do_get` then answers the request.
    pub(crate) async fn membership_frames(
        &self,
        req: &Request<Ticket>,
    ) -> Option<crate::export::FrameStream> {
        let g = self.grant(req).ok()?;
        self.need(&g, Scope::Read).ok()?;
        let t: TicketBody = serde_json::from_slice(&req.get_ref().ticket).ok()?;
        let [a, key] = t.path.as_slice() else {
            return None;
        };
        if a != "audiences" {
            return None;
        }
        let v = self.version(&g.space, key, Some(t.version)).await.ok()?;
        crate::export::membership_frames(&self.store, &g.space, &v, &self.serving)
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "building a membership stream"))
            .ok()
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
        crate::export::audience_version(&self.store, space, key, pinned)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no audience '{key}'")))
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
                let ticket = TicketBody {
                    path: path.to_vec(),
                    version: v.version,
                };
                if let Some(schema) = crate::export::cached_membership_schema(
                    &self.store,
                    &g.space,
                    &v,
                    &self.serving,
                )
                .await
                .map_err(internal)?
                {
                    return Ok((schema, v.data.rows as i64, ticket));
                }
                let accounts = crate::export::is_accounts(&self.store, &v)
                    .await
                    .map_err(internal)?;
                let types = if accounts {
                    Vec::new()
                } else {
                    self.serving
                        .ids
                        .get(&self.store, &g.space)
                        .await
                        .map_err(internal)?
                        .types
                        .clone()
                };
                Ok((
                    crate::export::membership_schema(accounts, &types),
                    v.data.rows as i64,
                    ticket,
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
            [a, key, name] if a == "destinations" => {
                let (from, v) = self.flight_destination(&g.space, key, name).await?;
                let rows = if from == 0 {
                    v.data.rows as i64
                } else {
                    self.changes_files(&g.space, key, from, v.version)
                        .await?
                        .iter()
                        .map(|f| f.rows as i64)
                        .sum()
                };
                Ok((
                    Self::changes_schema(),
                    rows,
                    TicketBody {
                        path: vec![a.clone(), key.clone(), name.clone(), from.to_string()],
                        version: v.version,
                    },
                ))
            }
            [a, key, format, rest @ ..] if a == "exports" && rest.len() <= 1 => {
                let f = export_format(g, format, rest.first())?;
                let v = self.version(&g.space, key, None).await?;
                // the schema of an export is known once its stream is opened
                let (schema, _) =
                    crate::export::export_stream(&self.store, &g.space, &v, &f, &self.serving)
                        .await
                        .map_err(internal)?;
                Ok((
                    schema,
                    -1,
                    TicketBody {
                        path: path.to_vec(),
                        version: v.version,
                    },
                ))
            }
            _ => Err(Status::not_found(format!(
                "unknown descriptor path {path:?}: expected [\"audiences\", KEY], [\"audiences\", KEY, \"changes\", FROM_VERSION], [\"destinations\", KEY, NAME] or [\"exports\", KEY, FORMAT]"
            ))),
        }
    }

    /// A Flight destination's cursor and the current version (not found: no such destination).
    async fn flight_destination(
        &self,
        space: &Space,
        key: &str,
        name: &str,
    ) -> Result<(u64, VersionRef), Status> {
        crate::destinations::sync::flight_range(&self.store, space, key, name)
            .await
            .map_err(internal)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no flight destination '{name}' of an audience '{key}' with a version"
                ))
            })
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

    /// `get_flight_info` of a Flight SQL command: its schema and a ticket.
    async fn sql_info(
        &self,
        g: &Grant,
        cmd: Command,
        desc: FlightDescriptor,
    ) -> Result<FlightInfo, Status> {
        use prost::Message;
        self.need(g, Scope::Read)?;
        let (schema, ticket): (SchemaRef, Vec<u8>) = match cmd {
            Command::CommandStatementQuery(q) => {
                let ctx = crate::tables::session(&self.store, &g.space)
                    .await
                    .map_err(internal)?;
                let df = ctx
                    .sql_with_options(&q.query, read_only())
                    .await
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                let schema = Arc::new(df.schema().as_arrow().clone());
                let t = TicketStatementQuery {
                    statement_handle: q.query.into_bytes().into(),
                };
                (schema, t.as_any().encode_to_vec())
            }
            Command::CommandPreparedStatementQuery(q) => {
                let sql = String::from_utf8(q.prepared_statement_handle.to_vec())
                    .map_err(|_| Status::invalid_argument("bad prepared statement handle"))?;
                let ctx = crate::tables::session(&self.store, &g.space)
                    .await
                    .map_err(internal)?;
                let df = ctx
                    .sql_with_options(&sql, read_only())
                    .await
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                let schema = Arc::new(df.schema().as_arrow().clone());
                let t = TicketStatementQuery {
                    statement_handle: sql.into_bytes().into(),
                };
                (schema, t.as_any().encode_to_vec())
            }
            Command::CommandGetCatalogs(c) => {
                (c.into_builder().schema(), c.as_any().encode_to_vec())
            }
            Command::CommandGetDbSchemas(c) => (
                c.clone().into_builder().schema(),
                c.as_any().encode_to_vec(),
            ),
            Command::CommandGetTables(c) => (
                c.clone().into_builder().schema(),
                c.as_any().encode_to_vec(),
            ),
            Command::CommandGetTableTypes(c) => {
                (c.into_builder().schema(), c.as_any().encode_to_vec())
            }
            Command::CommandGetSqlInfo(c) => {
                let infos = sql_infos()?;
                (
                    c.clone().into_builder(&infos).schema(),
                    c.as_any().encode_to_vec(),
                )
            }
            other => {
                return Err(Status::unimplemented(format!(
                    "Flight SQL {} is not supported (queries and catalog metadata are)",
                    other.type_url()
                )));
            }
        };
        Ok(FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(internal)?
            .with_descriptor(desc)
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
            .with_total_records(-1))
    }

    /// `do_get` of a Flight SQL ticket.
    async fn sql_get(&self, g: &Grant, cmd: Command) -> Result<Stream<FlightData>, Status> {
        self.need(g, Scope::Read)?;
        let ctx = crate::tables::session_limited(&self.store, &g.space, self.query_memory)
            .await
            .map_err(internal)?;
        let batch = match cmd {
            Command::TicketStatementQuery(t) => {
                let sql = String::from_utf8(t.statement_handle.to_vec())
                    .map_err(|_| Status::invalid_argument("bad statement handle"))?;
                let df = ctx
                    .sql_with_options(&sql, read_only())
                    .await
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                let schema = Arc::new(df.schema().as_arrow().clone());
                let stream = df
                    .execute_stream()
                    .await
                    .map_err(internal)?
                    .map_err(|e| FlightError::ExternalError(Box::new(e)));
                return Ok(FlightDataEncoderBuilder::new()
                    .with_schema(schema)
                    .build(stream)
                    .map_err(|e| Status::internal(e.to_string()))
                    .boxed());
            }
            Command::CommandGetCatalogs(c) => {
                let mut b = c.into_builder();
                b.append("datafusion");
                b.build().map_err(internal)?
            }
            Command::CommandGetDbSchemas(c) => {
                let mut b = c.into_builder();
                b.append("datafusion", "public");
                b.build().map_err(internal)?
            }
            Command::CommandGetTables(c) => {
                let mut b = c.into_builder();
                for t in SQL_TABLES {
                    let schema = ctx
                        .table(t)
                        .await
                        .map_err(internal)?
                        .schema()
                        .as_arrow()
                        .clone();
                    b.append("datafusion", "public", t, "TABLE", &schema)
                        .map_err(internal)?;
                }
                b.build().map_err(internal)?
            }
            Command::CommandGetTableTypes(c) => {
                let mut b = c.into_builder();
                b.append("TABLE");
                b.append("VIEW");
                b.build().map_err(internal)?
            }
            Command::CommandGetSqlInfo(c) => {
                let infos = sql_infos()?;
                c.into_builder(&infos).build().map_err(internal)?
            }
            other => {
                return Err(Status::unimplemented(format!(
                    "Flight SQL {} is not supported",
                    other.type_url()
                )));
            }
        };
        Ok(FlightDataEncoderBuilder::new()
            .with_schema(batch.schema())
            .build(futures::stream::iter([Ok(batch)]))
            .map_err(|e| Status::internal(e.to_string()))
            .boxed())
    }

    fn info(
        schema: &SchemaRef,
        rows: i64,
        t: &TicketBody,
        desc: FlightDescriptor,
    ) -> Result<FlightInfo, Status> {
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

/// A Flight SQL command (protobuf `Any` with a Flight SQL type) in a descriptor or ticket.
fn sql_command(bytes: &[u8]) -> Option<Command> {
    use prost::Message;
    if bytes.is_empty() || bytes.first() == Some(&b'{') {
        return None;
    }
    let any = Any::decode(bytes).ok()?;
    if !any
        .type_url
        .starts_with("type.googleapis.com/arrow.flight.protocol.sql.")
    {
        return None;
    }
    Command::try_from(any).ok()
}

/// SQL the Flight SQL endpoint runs: queries only (no DDL, no DML such as `COPY TO`, no `SET`).
fn read_only() -> datafusion::execution::context::SQLOptions {
    datafusion::execution::context::SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// The tables Flight SQL lists (all readable by queries of the caller's space).
pub const SQL_TABLES: [&str; 11] = [
    "events",
    "profiles",
    "identities",
    "traits",
    "memberships",
    "membership_changes",
    "computed_traits",
    "account_links",
    "profile_merges",
    "identity_keys",
    "dead_letters",
];

fn sql_infos() -> Result<SqlInfoData, Status> {
    let mut b = SqlInfoDataBuilder::new();
    b.append(SqlInfo::FlightSqlServerName, "audiences");
    b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    b.append(SqlInfo::FlightSqlServerArrowVersion, "59");
    b.append(SqlInfo::FlightSqlServerReadOnly, true);
    b.append(SqlInfo::FlightSqlServerSql, true);
    b.append(SqlInfo::FlightSqlServerSubstrait, false);
    b.append(SqlInfo::FlightSqlServerTransaction, 0i32);
    b.append(SqlInfo::FlightSqlServerCancel, false);
    b.build().map_err(internal)
}

fn flight_errors(
    b: crate::export::Batches,
) -> BoxStream<'static, Result<RecordBatch, FlightError>> {
    b.map_err(|e| FlightError::ExternalError(Box::new(e)))
        .boxed()
}

/// An export format from a descriptor: `single` takes an optional id type (default email) and
/// is hashed unless the grant has the `pii` scope and the id type is suffixed `:raw`.
fn export_format(
    g: &Grant,
    format: &str,
    id_type: Option<&String>,
) -> Result<crate::export::Format, Status> {
    let (id_type, raw) = match id_type.map(|s| s.as_str()) {
        Some(t) => match t.strip_suffix(":raw") {
            Some(t) => (Some(t), true),
            None => (Some(t), false),
        },
        None => (None, false),
    };
    if raw && !g.allows(Scope::Pii) {
        return Err(Status::permission_denied(
            "raw (unhashed) exports need the pii scope",
        ));
    }
    crate::export::Format::parse(format, id_type, raw)
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

fn descriptor_path(d: &FlightDescriptor) -> Vec<String> {
    if !d.path.is_empty() {
        return d.path.clone();
    }
    // a command holding a JSON array works too
    serde_json::from_slice(&d.cmd).unwrap_or_default()
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
            self.auth.insecure_grant()
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
        if let Some(cmd) = sql_command(&desc.cmd) {
            return Ok(Response::new(self.sql_info(&g, cmd, desc).await?));
        }
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
        if let Some(cmd) = sql_command(&req.get_ref().ticket) {
            return Ok(Response::new(self.sql_get(&g, cmd).await?));
        }
        let t: TicketBody = serde_json::from_slice(&req.get_ref().ticket)
            .map_err(|_| Status::invalid_argument("not a ticket of this server"))?;
        // a session only for the paths that query (the change and destination streams)
        let session = || async {
            crate::tables::session(&self.store, &g.space)
                .await
                .map_err(internal)
        };
        let (schema, batches): (SchemaRef, _) = match t.path.as_slice() {
            [a, key] if a == "audiences" => {
                // (answered by `frames::FlightWithFrames` before this, but for a compressed
                // request or an error before the stream starts, which this path reports)
                let v = self.version(&g.space, key, Some(t.version)).await?;
                let (schema, batches) =
                    crate::export::membership_stream(&self.store, &g.space, &v, &self.serving)
                        .await
                        .map_err(internal)?;
                (schema, flight_errors(batches))
            }
            [a, key, format, rest @ ..] if a == "exports" && rest.len() <= 1 => {
                let f = export_format(&g, format, rest.first())?;
                let v = self.version(&g.space, key, Some(t.version)).await?;
                let (schema, batches) =
                    crate::export::export_stream(&self.store, &g.space, &v, &f, &self.serving)
                        .await
                        .map_err(internal)?;
                (schema, flight_errors(batches))
            }
            [a, key, _name, from] if a == "destinations" => {
                let from: u64 = from
                    .parse()
                    .map_err(|_| Status::invalid_argument("not a ticket of this server"))?;
                let ctx = session().await?;
                let sql = if from == 0 {
                    // a backfill: the whole membership of the pinned version, as entries
                    let v = self.version(&g.space, key, Some(t.version)).await?;
                    ctx.register_table(
                        "__version_members",
                        Arc::new(CommittedTable::plain(
                            crate::compute::schema("members"),
                            vec![v.data],
                        )),
                    )
                    .map_err(internal)?;
                    "SELECT profile_id, account_id, 'entered' AS change, version, as_of FROM __version_members ORDER BY profile_id, account_id"
                } else {
                    let files = self.changes_files(&g.space, key, from, t.version).await?;
                    register_changes(&ctx, files)?
                };
                (Self::changes_schema(), sql_stream(&ctx, sql).await?)
            }
            [a, key, c, from] if a == "audiences" && c == "changes" => {
                let from: u64 = from
                    .parse()
                    .map_err(|_| Status::invalid_argument("FROM_VERSION must be a number"))?;
                let files = self.changes_files(&g.space, key, from, t.version).await?;
                let ctx = session().await?;
                let sql = register_changes(&ctx, files)?;
                (Self::changes_schema(), sql_stream(&ctx, sql).await?)
            }
            _ => return Err(Status::not_found("unknown ticket path")),
        };
        let batches = batches.map(|b| b.and_then(|b| Ok(crate::export::for_flight(b)?)));
        let data = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(|e| Status::internal(e.to_string()));
        Ok(Response::new(data.boxed()))
    }

    async fn do_put(
        &self,
        req: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        let g = self.grant(&req)?;
        self.need(&g, Scope::Write)?;
        let stream = req.into_inner().map_err(FlightError::from);
        let mut batches =
            arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(stream);
        let now = chrono::Utc::now().timestamp_micros();
        let (mut accepted, mut duplicates, mut rejected_count) = (0u64, 0u64, 0u64);
        let mut rejected = Vec::new();
        let mut pending = Vec::new();
        let mut batch_no = 0usize;
        let commit = |events: Vec<crate::events::Event>| {
            let (store, space) = (self.store.clone(), g.space.clone());
            async move { crate::events::ingest::commit_events(&store, &space, events).await }
        };
        while let Some(b) = batches.next().await {
            let b = b.map_err(|e| Status::invalid_argument(e.to_string()))?;
            let messages = crate::events::read::messages_from_batch(&b)
                .map_err(|e| Status::invalid_argument(format!("batch {batch_no}: {e}")))?;
            for (row, m) in messages.into_iter().enumerate() {
                let raw = serde_json::to_vec(&m).map_err(internal)?;
                match crate::events::message::validate(m, &raw, now) {
                    Ok(e) => pending.push(e),
                    Err(r) => {
                        rejected_count += 1;
                        if rejected.len() < 100 {
                            rejected.push(serde_json::json!({
                                "batch": batch_no, "row": row, "code": r.code, "message": r.message
                            }));
                        }
                    }
                }
            }
            batch_no += 1;
            if pending.len() >= 50_000 {
                let r = commit(std::mem::take(&mut pending))
                    .await
                    .map_err(internal)?;
                accepted += r.accepted;
                duplicates += r.duplicates;
            }
        }
        if !pending.is_empty() {
            let r = commit(pending).await.map_err(internal)?;
            accepted += r.accepted;
            duplicates += r.duplicates;
        }
        let meta = serde_json::json!({
            "accepted": accepted, "duplicates": duplicates,
            "rejected": rejected_count, "rejections": rejected,
        });
        let r = PutResult {
            app_metadata: serde_json::to_vec(&meta).map_err(internal)?.into(),
        };
        Ok(Response::new(futures::stream::iter([Ok(r)]).boxed()))
    }

    async fn do_action(
        &self,
        req: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        let g = self.grant(&req)?;
        let action = req.into_inner();
        // Flight SQL prepared statements (the ADBC driver prepares every query): the handle is
        // the SQL text itself, so nothing is kept per statement.
        match action.r#type.as_str() {
            "CreatePreparedStatement" => {
                use prost::Message;
                self.need(&g, Scope::Read)?;
                let req: ActionCreatePreparedStatementRequest = Any::decode(&action.body[..])
                    .ok()
                    .and_then(|a| a.unpack().ok().flatten())
                    .ok_or_else(|| {
                        Status::invalid_argument("not a CreatePreparedStatement request")
                    })?;
                let ctx = crate::tables::session(&self.store, &g.space)
                    .await
                    .map_err(internal)?;
                let df = ctx
                    .sql_with_options(&req.query, read_only())
                    .await
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                let schema = df.schema().as_arrow().clone();
                let opts = arrow::ipc::writer::IpcWriteOptions::default();
                let arrow_flight::IpcMessage(ipc) = arrow_flight::SchemaAsIpc::new(&schema, &opts)
                    .try_into()
                    .map_err(internal)?;
                let result = ActionCreatePreparedStatementResult {
                    prepared_statement_handle: req.query.into_bytes().into(),
                    dataset_schema: ipc,
                    parameter_schema: Default::default(),
                };
                let r = arrow_flight::Result {
                    body: result.as_any().encode_to_vec().into(),
                };
                return Ok(Response::new(futures::stream::iter([Ok(r)]).boxed()));
            }
            "ClosePreparedStatement" => {
                return Ok(Response::new(futures::stream::empty().boxed()));
            }
            _ => {}
        }
        let body: serde_json::Value = if action.body.is_empty() {
            serde_json::json!({})
        } else {
            serde_json::from_slice(&action.body).map_err(|e| {
                Status::invalid_argument(format!("the action body is not JSON: {e}"))
            })?
        };
        let as_of = match body.get("as_of").and_then(|v| v.as_str()) {
            Some(s) => crate::events::message::parse_timestamp(s)
                .ok_or_else(|| Status::invalid_argument(format!("as_of '{s}' is not RFC 3339")))?,
            None => chrono::Utc::now().timestamp_micros(),
        };
        let rules = match self.config.spaces.get(g.space.as_str()) {
            Some(s) => {
                crate::identity::IdentityRules::from_config(&s.identity).map_err(internal)?
            }
            None => crate::identity::IdentityRules::default(),
        };
        let usage = |e: crate::error::Error| match e {
            crate::error::Error::Usage(m) => Status::invalid_argument(m),
            e @ crate::error::Error::Compute { .. } if e.exit_code() == 2 => {
                Status::invalid_argument(e.to_string())
            }
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
                    &crate::compute::refresh::RefreshOptions {
                        identity_cache: Some(self.graphs.of(&g.space)),
                        ..crate::compute::refresh::RefreshOptions::at(as_of)
                    },
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
            "ack" => {
                self.need(&g, Scope::Write)?;
                let field = |f: &str| {
                    body.get(f).cloned().ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "ack: expected {{\"audience\", \"destination\", \"version\"}}; '{f}' is missing"
                        ))
                    })
                };
                let (aud, name, version) =
                    (field("audience")?, field("destination")?, field("version")?);
                let (Some(aud), Some(name), Some(version)) =
                    (aud.as_str(), name.as_str(), version.as_u64())
                else {
                    return Err(Status::invalid_argument(
                        "ack: audience and destination are strings, version a number",
                    ));
                };
                let c = crate::destinations::sync::acknowledge(
                    &self.store,
                    &g.space,
                    aud,
                    name,
                    version,
                )
                .await
                .map_err(usage)?;
                serde_json::to_vec(&serde_json::json!({"audience": aud, "destination": name, "cursor_version": c.version}))
                    .map_err(internal)?
            }
            "sync" => {
                self.need(&g, Scope::Admin)?;
                let r = crate::destinations::sync(&self.store, &g.space, &Default::default())
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
            (
                "refresh",
                "One micro-batch refresh of the space. Body: {\"as_of\": RFC3339?}. Admin scope. Returns the refresh report (JSON).",
            ),
            (
                "compute",
                "Full recompute. Body: {\"keys\": [KEY...]?, \"as_of\": RFC3339?}. Admin scope. Returns the per-key reports (JSON).",
            ),
            (
                "ack",
                "A Flight destination's client acknowledges what it pulled from [\"destinations\", KEY, NAME]. Body: {\"audience\": KEY, \"destination\": NAME, \"version\": V}. Write scope.",
            ),
            (
                "sync",
                "One destination sync pass of the space. Admin scope. Returns the per-destination reports (JSON).",
            ),
            (
                "preview",
                "Evaluate a definition without saving it. Body: a definition file (JSON), or {\"definition\": ..., \"as_of\": ...}. Returns size, sample, would enter/exit (JSON).",
            ),
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
        Err(Status::unimplemented(
            "do_exchange is not part of this service",
        ))
    }
}
