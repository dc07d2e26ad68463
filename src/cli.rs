//! The command line (clap derive). Every flag also reads an `AUDIENCES_*` environment variable.

use std::path::PathBuf;

use std::io::Write;

use clap::{Args, Parser, Subcommand};

use crate::error::{Error, Result};
use crate::events::{IngestOptions, Input};
use crate::store::{S3Options, Space, Store};

/// Segment-style audiences over Parquet, on Apache DataFusion.
#[derive(Debug, Parser)]
#[command(name = "audiences", version, about)]
pub struct Cli {
    /// Global options.
    #[command(flatten)]
    pub global: Global,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Options accepted before or after the subcommand.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Store URL: a path, file://, memory:// or s3://bucket/prefix.
    #[arg(
        long,
        global = true,
        env = "AUDIENCES_STORE",
        default_value = "data/store"
    )]
    pub store: String,
    /// Space (tenant).
    #[arg(
        long,
        global = true,
        env = "AUDIENCES_SPACE",
        default_value = "default"
    )]
    pub space: String,
    /// Configuration file (TOML).
    #[arg(long, global = true, env = "AUDIENCES_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true, env = "AUDIENCES_JSON")]
    pub json: bool,
    /// Endpoint of an S3-compatible server (also AWS_ENDPOINT_URL).
    #[arg(long, global = true, env = "AUDIENCES_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Allow plain HTTP to the S3 endpoint (also AWS_ALLOW_HTTP=true).
    #[arg(long, global = true, env = "AUDIENCES_S3_ALLOW_HTTP")]
    pub s3_allow_http: bool,
    /// Memory every query of the command may use, e.g. 4GiB: beyond it sorts, aggregations and
    /// joins spill to disk, and what cannot spill fails with a resources-exhausted error.
    #[arg(long, global = true, env = "AUDIENCES_MEMORY_LIMIT")]
    pub memory_limit: Option<String>,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the whole product on generated data in the embedded store.
    Demo(DemoArgs),
    /// Write synthetic Segment-spec events (seeded, deterministic).
    Generate(GenerateArgs),
    /// Load events: NDJSON, a JSON array or {"batch": [...]}, optionally gzipped; '-' for stdin.
    Ingest(IngestArgs),
    /// Run DataFusion SQL over the store's committed tables.
    Sql(SqlArgs),
    /// Delete data files that the current versions do not name (after a grace period): files of
    /// crashed writers and the data of superseded versions.
    Vacuum(VacuumArgs),
    /// Resolve identities of the events committed since the last run (profiles, traits, accounts).
    Identity(IdentityArgs),
    /// Show one profile: its ids, traits and accounts. ID is ID_TYPE:VALUE (e.g. email:a@b.c).
    Profile(ProfileArgs),
    /// Validate a definition (a definition JSON file, or bare definition text); print its AST.
    Check(CheckArgs),
    /// Full recompute of identities, computed traits and audiences (all, or KEYs and their
    /// dependencies), each committed as a new version.
    Compute(ComputeArgs),
    /// One micro-batch: continue every audience and computed trait from its last version,
    /// reading only what arrived since (plus the time slices the as-of moved over).
    Refresh(RefreshArgs),
    /// Run refreshes continuously (realtime definitions every --refresh-interval, batch ones on
    /// their schedule).
    Serve(ServeArgs),
    /// Members of an audience (current version, or --version N).
    Members(MembersArgs),
    /// CSV export of an audience version: unformatted, formatted, or single (hashed ids).
    Export(ExportArgs),
    /// One destination sync pass: every destination of every audience (or of AUDIENCE...) gets
    /// what it has not acknowledged yet (a backfill on first connection).
    Sync(SyncArgs),
    /// Destinations: status | receive (a local webhook receiver).
    #[command(subcommand)]
    Destinations(DestinationsCommand),
    /// Manage audiences: create FILE | edit FILE | delete KEY | list | show KEY.
    #[command(subcommand)]
    Audience(DefinitionCommand),
    /// Manage computed traits: create FILE | edit FILE | delete KEY | list | show KEY.
    #[command(subcommand)]
    Trait(DefinitionCommand),
}

/// `compute` options.
#[derive(Debug, Args)]
pub struct ComputeArgs {
    /// Evaluation time (RFC 3339; default now).
    #[arg(long, env = "AUDIENCES_AS_OF")]
    pub as_of: Option<String>,
    /// Keys to compute (default: all).
    pub keys: Vec<String>,
}

/// `export` options.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Audience key.
    pub key: String,
    /// unformatted | formatted | single.
    #[arg(long, env = "AUDIENCES_EXPORT_FORMAT", default_value = "unformatted")]
    pub format: String,
    /// Id type of `single` exports.
    #[arg(long, env = "AUDIENCES_ID_TYPE", default_value = "email")]
    pub id_type: String,
    /// `single`: normalized values unhashed (default: SHA-256 hex).
    #[arg(long, env = "AUDIENCES_RAW")]
    pub raw: bool,
    /// Version (default: the current one).
    #[arg(long, env = "AUDIENCES_VERSION")]
    pub version: Option<u64>,
    /// Output file (default stdout).
    #[arg(short = 'o', long, env = "AUDIENCES_OUTPUT")]
    pub output: Option<PathBuf>,
}

/// `refresh` options.
#[derive(Debug, Args)]
pub struct RefreshArgs {
    /// Evaluation time (RFC 3339; default now).
    #[arg(long, env = "AUDIENCES_AS_OF")]
    pub as_of: Option<String>,
}

/// `serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Time between refreshes of realtime definitions (e.g. 5s, 500ms, 1m; `off`: no refresh
    /// loop, refreshes only through the Flight `refresh` action).
    #[arg(long, env = "AUDIENCES_REFRESH_INTERVAL", default_value = "5s")]
    pub refresh_interval: String,
    /// Stop after this many refreshes (default: run until interrupted).
    #[arg(long, env = "AUDIENCES_SERVE_REFRESHES")]
    pub refreshes: Option<u64>,
    /// Arrow Flight (gRPC) address (port 0: any free port; the bound address is printed).
    #[arg(long, env = "AUDIENCES_FLIGHT", default_value = "127.0.0.1:50051")]
    pub flight: String,
    /// HTTP address (tracking API).
    #[arg(long, env = "AUDIENCES_HTTP", default_value = "127.0.0.1:8080")]
    pub http: String,
    /// Turn authentication off (local experiments only; said loudly at start).
    #[arg(long, env = "AUDIENCES_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// Memory one Flight SQL query may use (beyond it: spill, or a resources-exhausted error).
    #[arg(long, env = "AUDIENCES_QUERY_MEMORY", default_value = "2GiB")]
    pub query_memory: String,
    /// Memory for finished membership streams (Flight `do_get` of an audience), kept per
    /// version so later pulls of the same version are served from memory; 0 turns it off.
    #[arg(long, env = "AUDIENCES_SERVING_CACHE", default_value = "1GiB")]
    pub serving_cache: String,
    /// Profile API requests per second per space (also the burst), as Segment's 100/s.
    #[arg(long, env = "AUDIENCES_PROFILE_API_RATE", default_value_t = 100.0)]
    pub profile_api_rate: f64,
}

/// `sync` options.
#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Audience keys (default: all with destinations).
    pub audiences: Vec<String>,
}

/// `destinations` subcommands.
#[derive(Debug, Subcommand)]
pub enum DestinationsCommand {
    /// Per destination: cursor version, lag, sent, retried, dead-lettered, last error.
    Status,
    /// Run a local webhook receiver that answers 200 to every POST and prints each body as a
    /// JSON line (point a webhook destination at the printed URL to try it).
    Receive {
        /// Address to listen on (port 0: any free port; the URL is printed on stderr).
        #[arg(
            long,
            env = "AUDIENCES_RECEIVER_LISTEN",
            default_value = "127.0.0.1:8090"
        )]
        listen: String,
        /// Count calls instead of printing them (the count is printed on exit).
        #[arg(long, env = "AUDIENCES_RECEIVER_QUIET")]
        quiet: bool,
    },
}

/// `members` options.
#[derive(Debug, Args)]
pub struct MembersArgs {
    /// Audience key.
    pub key: String,
    /// Version (default: the current one).
    #[arg(long, env = "AUDIENCES_VERSION")]
    pub version: Option<u64>,
    /// Output format.
    #[arg(long, env = "AUDIENCES_FORMAT", default_value = "table", value_parser = ["table", "csv", "json", "parquet"])]
    pub format: String,
    /// Output file (parquet needs one; others default to stdout).
    #[arg(short = 'o', long, env = "AUDIENCES_OUTPUT")]
    pub output: Option<PathBuf>,
}

/// Definition management.
#[derive(Debug, Subcommand)]
pub enum DefinitionCommand {
    /// Create from a definition file.
    Create {
        /// Definition JSON file.
        file: PathBuf,
    },
    /// New version of an existing key from a definition file, recomputed at once (the key is
    /// locked against further edits until that recompute has committed).
    Edit {
        /// Definition JSON file.
        file: PathBuf,
        /// Evaluation time of the recompute (RFC 3339; default now).
        #[arg(long, env = "AUDIENCES_AS_OF")]
        as_of: Option<String>,
    },
    /// Delete (the key is never reused).
    Delete {
        /// Key.
        key: String,
    },
    /// List live definitions.
    List,
    /// Evaluate a definition file without saving it: size, sample, and for an existing key
    /// how many would enter and exit.
    Preview {
        /// Definition JSON file.
        file: PathBuf,
        /// Evaluation time (RFC 3339; default now).
        #[arg(long, env = "AUDIENCES_AS_OF")]
        as_of: Option<String>,
    },
    /// Show one definition.
    Show {
        /// Key.
        key: String,
    },
}

/// `check` options.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Definition file, or '-' for stdin.
    pub file: PathBuf,
}

/// `identity` options.
#[derive(Debug, Args)]
pub struct IdentityArgs {
    /// Recompute from all events in timestamp order instead of continuing incrementally.
    #[arg(long, env = "AUDIENCES_IDENTITY_FULL")]
    pub full: bool,
}

/// `profile` options.
#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// ID_TYPE:VALUE, for example user_id:u1 or email:jane@example.com (or profile_id:p-...).
    pub id: String,
}

/// `demo` options.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Events to generate.
    #[arg(long, env = "AUDIENCES_DEMO_EVENTS", default_value_t = 200_000)]
    pub events: u64,
    /// Keep existing data in the store instead of starting from an empty demo space.
    #[arg(long, env = "AUDIENCES_DEMO_KEEP")]
    pub keep: bool,
}

/// `generate` options.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Number of events.
    #[arg(long, env = "AUDIENCES_EVENTS", default_value_t = 1_000_000)]
    pub events: u64,
    /// Seed.
    #[arg(long, env = "AUDIENCES_SEED", default_value_t = 42)]
    pub seed: u64,
    /// End of the 180-day range (RFC 3339).
    #[arg(long, env = "AUDIENCES_END", default_value = "2026-01-01T00:00:00Z")]
    pub end: String,
    /// Write only a further batch of FRACTION × events after the end (refresh benchmarks).
    #[arg(long, env = "AUDIENCES_DELTA")]
    pub delta: Option<f64>,
    /// Which delta batch (round R falls in day R+1 after the end, with its own message ids).
    #[arg(long, env = "AUDIENCES_DELTA_ROUND", default_value_t = 0)]
    pub delta_round: u64,
    /// Output file ('-' or absent: stdout).
    #[arg(short = 'o', long, env = "AUDIENCES_OUTPUT")]
    pub output: Option<PathBuf>,
    /// Ingest the generated events straight into the store instead of printing them.
    #[arg(long, env = "AUDIENCES_INGEST")]
    pub ingest: bool,
}

/// `ingest` options.
#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Input files ('-' or none: stdin).
    pub files: Vec<PathBuf>,
    /// Dead-letter file for rejected messages.
    #[arg(long, env = "AUDIENCES_DEAD_LETTER")]
    pub dead_letter: Option<PathBuf>,
    /// Exit 1 when any message is rejected.
    #[arg(long, env = "AUDIENCES_STRICT")]
    pub strict: bool,
    /// Accepted events per commit.
    #[arg(long, env = "AUDIENCES_CHUNK_ROWS", default_value_t = 1_000_000)]
    pub chunk_rows: usize,
    /// Do not compact date partitions that reach 4 files after the ingest.
    #[arg(long, env = "AUDIENCES_NO_COMPACT")]
    pub no_compact: bool,
}

/// `sql` options.
#[derive(Debug, Args)]
pub struct SqlArgs {
    /// The query.
    pub query: String,
}

/// `vacuum` options.
#[derive(Debug, Args)]
pub struct VacuumArgs {
    /// Only files older than this many seconds are deleted (protects writers in flight).
    #[arg(long, env = "AUDIENCES_VACUUM_GRACE_SECS", default_value_t = 3600)]
    pub grace_secs: u64,
}

impl Global {
    /// Open the store named by the flags.
    pub fn open_store(&self) -> Result<Store> {
        let endpoint = self
            .s3_endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        let allow_http = self.s3_allow_http
            || std::env::var("AWS_ALLOW_HTTP")
                .is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        Store::open(
            &self.store,
            &S3Options {
                endpoint,
                allow_http,
                ..Default::default()
            },
        )
    }

    /// The selected space.
    pub fn space(&self) -> Result<Space> {
        Space::new(&self.space)
    }

    /// The identity rules of the selected space (config file, else defaults).
    pub fn identity_rules(&self) -> Result<crate::identity::IdentityRules> {
        let cfg = match &self.config {
            Some(p) => crate::config::Config::load(p)?,
            None => crate::config::Config::default(),
        };
        match cfg.spaces.get(&self.space) {
            Some(s) => crate::identity::IdentityRules::from_config(&s.identity),
            None => Ok(crate::identity::IdentityRules::default()),
        }
    }
}

/// Run a parsed command line; returns the exit code.
pub fn run(cli: Cli) -> Result<i32> {
    if let Some(path) = &cli.global.config {
        crate::config::Config::load(path)?;
    }
    if let Some(m) = &cli.global.memory_limit {
        crate::tables::set_memory_limit(Some(
            crate::serve::parse_bytes(m)
                .map_err(|e| Error::Usage(format!("--memory-limit: {e}")))?,
        ));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("tokio runtime", e))?;
    rt.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> Result<i32> {
    let g = cli.global;
    match cli.command {
        Command::Demo(a) => crate::demo::run(&g, &a).await.map(|_| 0),
        Command::Generate(a) => generate(&g, &a).await.map(|_| 0),
        Command::Ingest(a) => ingest(&g, &a).await,
        Command::Sql(a) => sql(&g, &a).await.map(|_| 0),
        Command::Vacuum(a) => vacuum(&g, &a).await.map(|_| 0),
        Command::Identity(a) => identity(&g, &a).await.map(|_| 0),
        Command::Profile(a) => profile(&g, &a).await,
        Command::Check(a) => check(&a),
        Command::Compute(a) => compute(&g, &a).await.map(|_| 0),
        Command::Members(a) => members(&g, &a).await,
        Command::Refresh(a) => refresh(&g, &a).await.map(|_| 0),
        Command::Export(a) => export(&g, &a).await,
        Command::Serve(a) => serve(&g, &a).await.map(|_| 0),
        Command::Sync(a) => sync(&g, &a).await,
        Command::Destinations(c) => destinations(&g, c).await,
        Command::Audience(c) => definition(&g, crate::lang::definition::Kind::Audience, c).await,
        Command::Trait(c) => definition(&g, crate::lang::definition::Kind::ComputedTrait, c).await,
    }
}

/// Parse an RFC 3339 time argument.
pub fn parse_time_arg(s: &str, flag: &str) -> Result<i64> {
    crate::events::message::parse_timestamp(s).ok_or_else(|| {
        Error::Usage(format!(
            "{flag}: '{s}' is not an RFC 3339 timestamp (e.g. 2026-01-01T00:00:00Z)"
        ))
    })
}

async fn generate(g: &Global, a: &GenerateArgs) -> Result<()> {
    let cfg = crate::generate::GenConfig {
        events: a.events,
        seed: a.seed,
        end: parse_time_arg(&a.end, "--end")?,
        delta: a.delta,
        delta_round: a.delta_round,
    };
    if let Some(d) = a.delta
        && !(d > 0.0 && d <= 1.0)
    {
        return Err(Error::Usage(format!(
            "--delta {d}: expected a fraction in (0, 1]"
        )));
    }
    if a.ingest {
        let dir = tempfile_dir()?;
        let path = dir.join("generated.ndjson");
        write_generated(&cfg, Some(&path))?;
        let store = g.open_store()?;
        let report = crate::events::ingest(
            &store,
            &g.space()?,
            vec![Input::File(path.clone())],
            IngestOptions {
                progress: true,
                ..Default::default()
            },
        )
        .await?;
        let _ = std::fs::remove_dir_all(&dir);
        print_ingest(g, &report)?;
        return Ok(());
    }
    let stats = write_generated(&cfg, a.output.as_deref().filter(|p| p.as_os_str() != "-"))?;
    if a.output.as_deref().is_some_and(|p| p.as_os_str() != "-") {
        if g.json {
            println!("{}", serde_json::to_string(&stats)?);
        } else {
            eprintln!(
                "generated {} events for {} profiles",
                stats.events, stats.profiles
            );
        }
    }
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("audiences-gen-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

/// Write generated events to a file (or stdout).
pub fn write_generated(
    cfg: &crate::generate::GenConfig,
    path: Option<&std::path::Path>,
) -> Result<crate::generate::GenStats> {
    match path {
        Some(p) => {
            let mut f = std::fs::File::create(p).map_err(|e| Error::io(p, e))?;
            crate::generate::generate(cfg, &mut f)
        }
        None => {
            let stdout = std::io::stdout();
            let mut lock = stdout.lock();
            crate::generate::generate(cfg, &mut lock)
        }
    }
}

async fn ingest(g: &Global, a: &IngestArgs) -> Result<i32> {
    let store = g.open_store()?;
    let inputs: Vec<Input> = if a.files.is_empty() {
        vec![Input::Stdin]
    } else {
        a.files
            .iter()
            .map(|p| {
                if p.as_os_str() == "-" {
                    Input::Stdin
                } else {
                    Input::File(p.clone())
                }
            })
            .collect()
    };
    for i in &inputs {
        if let Input::File(p) = i
            && !p.exists()
        {
            return Err(Error::Usage(format!("{}: no such file", p.display())));
        }
    }
    if a.chunk_rows == 0 {
        return Err(Error::Usage("--chunk-rows must be at least 1".into()));
    }
    let opts = IngestOptions {
        chunk_rows: a.chunk_rows,
        dead_letter: a.dead_letter.clone(),
        received_now: None,
        progress: true,
        compact: !a.no_compact,
    };
    let report = crate::events::ingest(&store, &g.space()?, inputs, opts).await?;
    print_ingest(g, &report)?;
    if a.strict && report.rejected > 0 {
        return Err(Error::StrictRejections(report.rejected));
    }
    Ok(0)
}

fn print_ingest(g: &Global, r: &crate::events::IngestReport) -> Result<()> {
    if g.json {
        println!(
            "{}",
            serde_json::json!({
                "accepted": r.accepted, "rejected": r.rejected, "duplicates": r.duplicates,
                "dead_letter": r.dead_letter, "submitted": r.submitted, "versions": r.versions,
                "compaction": r.compaction,
            })
        );
    } else {
        println!(
            "submitted {}  accepted {}  rejected {}  duplicates {}",
            r.submitted, r.accepted, r.rejected, r.duplicates
        );
        if let Some(p) = &r.dead_letter {
            println!("rejected messages and their reasons: {}", p.display());
        }
        if r.compaction.dates > 0 {
            println!(
                "compacted {} date partitions: {} files -> {}",
                r.compaction.dates, r.compaction.files_removed, r.compaction.files_added
            );
        }
    }
    Ok(())
}

async fn sql(g: &Global, a: &SqlArgs) -> Result<()> {
    let store = g.open_store()?;
    let batches = crate::tables::query(&store, &g.space()?, &a.query).await?;
    print_batches(g.json, &batches)
}

/// Print batches as a table, or as a JSON array of row objects.
pub fn print_batches(json: bool, batches: &[arrow::array::RecordBatch]) -> Result<()> {
    if json {
        let mut w = arrow::json::ArrayWriter::new(Vec::new());
        for b in batches {
            w.write(b)?;
        }
        w.finish()?;
        let out = w.into_inner();
        if out.is_empty() {
            println!("[]");
        } else {
            println!("{}", String::from_utf8_lossy(&out));
        }
    } else {
        println!("{}", arrow::util::pretty::pretty_format_batches(batches)?);
    }
    Ok(())
}

async fn vacuum(g: &Global, a: &VacuumArgs) -> Result<()> {
    let store = g.open_store()?;
    let space = g.space()?;
    // Every table with data files; old audience versions become unreadable once vacuumed.
    let mut deleted = Vec::new();
    for table in [
        crate::store::TableName::Events,
        crate::identity::persist::IDENTITY,
        crate::compute::MEMBERSHIPS,
    ] {
        let log = crate::store::CommitLog::new(&store, &space, table);
        deleted.extend(
            log.vacuum(std::time::Duration::from_secs(a.grace_secs))
                .await?,
        );
    }
    if g.json {
        println!("{}", serde_json::json!({ "deleted": deleted }));
    } else {
        println!("deleted {} unreferenced file(s)", deleted.len());
    }
    Ok(())
}

async fn identity(g: &Global, a: &IdentityArgs) -> Result<()> {
    let store = g.open_store()?;
    let t = std::time::Instant::now();
    let r = crate::identity::resolve(&store, &g.space()?, &g.identity_rules()?, a.full).await?;
    if g.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "resolved {} new events in {:.2?}: {} profiles ({} known), {} ids, {} merges, {} accounts (identity version {})",
            r.events_read,
            t.elapsed(),
            r.profiles,
            r.known,
            r.ids,
            r.merges,
            r.accounts,
            r.version
        );
    }
    Ok(())
}

async fn profile(g: &Global, a: &ProfileArgs) -> Result<i32> {
    let store = g.open_store()?;
    let Some((id_type, value)) = a.id.split_once(':') else {
        return Err(Error::Usage(format!(
            "'{}': expected ID_TYPE:VALUE, e.g. user_id:u1",
            a.id
        )));
    };
    match crate::identity::lookup::profile(&store, &g.space()?, id_type, value).await? {
        None => {
            if g.json {
                println!("null");
            } else {
                eprintln!("no profile has {id_type} '{value}'");
            }
            Ok(1)
        }
        Some(p) => {
            if g.json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                println!(
                    "profile {} ({})",
                    p.profile_id,
                    if p.known { "known" } else { "anonymous" }
                );
                for (t, vs) in &p.external_ids {
                    println!("  {t}: {}", vs.join(", "));
                }
                if !p.traits.is_empty() {
                    println!("traits:");
                    for (k, v) in &p.traits {
                        println!("  {k} = {v}");
                    }
                }
                if !p.accounts.is_empty() {
                    println!("accounts: {}", p.accounts.join(", "));
                }
                if !p.audiences.is_empty() {
                    println!("audiences: {}", p.audiences.join(", "));
                }
            }
            Ok(0)
        }
    }
}

fn check(a: &CheckArgs) -> Result<i32> {
    use crate::lang::definition::{Body, DefinitionFile};
    let text = if a.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| Error::io("stdin", e))?;
        s
    } else {
        std::fs::read_to_string(&a.file).map_err(|e| Error::io(&a.file, e))?
    };
    let source = a.file.display().to_string();
    let out = if text.trim_start().starts_with('{') {
        let (def, body) =
            DefinitionFile::parse(&text).map_err(|e| Error::Usage(format!("{source}: {e}")))?;
        serde_json::json!({ "key": def.key, "kind": def.kind, "level": def.level, "ast": body,
                            "canonical": canonical(&body) })
    } else {
        let c =
            crate::lang::parse(text.trim()).map_err(|e| Error::Usage(format!("{source}: {e}")))?;
        let body = Body::Audience(c);
        serde_json::json!({ "ast": body, "canonical": canonical(&body) })
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(0)
}

fn canonical(b: &crate::lang::definition::Body) -> String {
    match b {
        crate::lang::definition::Body::Audience(c) => crate::lang::printer::condition(c),
        crate::lang::definition::Body::Trait(v) => crate::lang::printer::value(v),
    }
}

fn read_definition(
    path: &std::path::Path,
    kind: crate::lang::definition::Kind,
) -> Result<crate::lang::definition::DefinitionFile> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let (def, _) = crate::lang::definition::DefinitionFile::parse(&text)
        .map_err(|e| Error::Usage(format!("{}: {e}", path.display())))?;
    if def.kind != kind {
        return Err(Error::Usage(format!(
            "{}: kind is {:?}; use `audiences {}` for it",
            path.display(),
            def.kind,
            if def.kind == crate::lang::definition::Kind::Audience {
                "audience"
            } else {
                "trait"
            }
        )));
    }
    Ok(def)
}

async fn definition(
    g: &Global,
    kind: crate::lang::definition::Kind,
    c: DefinitionCommand,
) -> Result<i32> {
    let store = g.open_store()?;
    let space = g.space()?;
    let noun = if kind == crate::lang::definition::Kind::Audience {
        "audience"
    } else {
        "computed trait"
    };
    match c {
        DefinitionCommand::Create { file } => {
            let def = read_definition(&file, kind)?;
            crate::definitions::create(&store, &space, &def).await?;
            println!("created {noun} '{}' (version 1)", def.key);
        }
        DefinitionCommand::Edit { file, as_of } => {
            let def = read_definition(&file, kind)?;
            let as_of = as_of_or_now(as_of.as_deref())?;
            let (v, reports) =
                crate::compute::lifecycle::edit(&store, &space, &g.identity_rules()?, &def, as_of)
                    .await?;
            if g.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"key": def.key, "version": v, "computed": reports})
                    )?
                );
            } else {
                println!("edited {noun} '{}' (version {v}), recomputed:", def.key);
                print_reports(&reports);
            }
        }
        DefinitionCommand::Preview { file, as_of } => {
            let def = read_definition(&file, kind)?;
            let as_of = as_of_or_now(as_of.as_deref())?;
            let p = crate::compute::lifecycle::preview(&store, &space, &def, as_of).await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                println!(
                    "preview of {noun} '{}': size {} ({} ms)",
                    p.key, p.size, p.millis
                );
                if p.existing {
                    println!(
                        "against the current version: {} would enter, {} would exit",
                        p.would_enter, p.would_exit
                    );
                }
                for m in &p.sample {
                    println!("  {m}");
                }
            }
        }
        DefinitionCommand::Delete { key } => {
            let defs = crate::definitions::live(&store, &space).await?;
            if defs.get(&key).is_some_and(|s| s.file.kind != kind) {
                return Err(Error::Usage(format!("'{key}' is not a {noun}")));
            }
            crate::definitions::delete(&store, &space, &key).await?;
            println!("deleted {noun} '{key}' (the key stays reserved)");
        }
        DefinitionCommand::List => {
            let defs = crate::definitions::live(&store, &space).await?;
            let rows: Vec<crate::definitions::Stored> = defs
                .values()
                .filter(|s| s.file.kind == kind)
                .map(|s| s.redacted())
                .collect();
            if g.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for s in rows {
                    println!(
                        "{:<32} v{:<3} {:?} {}",
                        s.file.key, s.version, s.file.level, s.file.definition
                    );
                }
            }
        }
        DefinitionCommand::Show { key } => {
            let defs = crate::definitions::live(&store, &space).await?;
            match defs.get(&key).filter(|s| s.file.kind == kind) {
                Some(s) => println!("{}", serde_json::to_string_pretty(&s.redacted())?),
                None => {
                    eprintln!("no {noun} '{key}'");
                    return Ok(1);
                }
            }
        }
    }
    Ok(0)
}

fn as_of_or_now(t: Option<&str>) -> Result<i64> {
    match t {
        Some(t) => parse_time_arg(t, "--as-of"),
        None => Ok(chrono::Utc::now().timestamp_micros()),
    }
}

fn print_reports(reports: &[crate::compute::KeyReport]) {
    for r in reports {
        println!(
            "{:<32} {:<15} v{:<4} size {:<9} +{:<7} -{:<7} {} ms",
            r.key, r.kind, r.version, r.size, r.entered, r.exited, r.millis
        );
    }
}

fn print_refresh(json: bool, r: &crate::compute::refresh::RefreshReport) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    let at = chrono::DateTime::from_timestamp_micros(r.as_of)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default();
    println!(
        "refresh at {at}: read {} new event rows in {} files; {} in {} ms",
        r.new_event_rows,
        r.new_event_files,
        match r.committed {
            Some(v) => format!("committed memberships version {v}"),
            None => "nothing changed".into(),
        },
        r.millis
    );
    for k in &r.keys {
        println!(
            "  {:<30} {:<11} {:<11} affected {:<8} size {:<8} +{:<6} -{:<6} ~{:<6} {:>5} ms {}",
            k.key,
            k.kind,
            k.mode,
            k.affected,
            k.size,
            k.entered,
            k.exited,
            k.changed,
            k.millis,
            k.reason.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

async fn export(g: &Global, a: &ExportArgs) -> Result<i32> {
    let store = g.open_store()?;
    let space = g.space()?;
    let format = crate::export::Format::parse(&a.format, Some(&a.id_type), a.raw)?;
    let Some(v) = crate::export::audience_version(&store, &space, &a.key, a.version).await? else {
        eprintln!(
            "no version {} of audience '{}'",
            a.version.map_or("yet".to_string(), |n| n.to_string()),
            a.key
        );
        return Ok(1);
    };
    let chunks =
        crate::export::export_csv(&store, &space, &v, &format, &Default::default()).await?;
    let rows = match &a.output {
        Some(p) => {
            let mut f =
                std::io::BufWriter::new(std::fs::File::create(p).map_err(|e| Error::io(p, e))?);
            let n = crate::export::write_chunks(chunks, &mut f).await?;
            std::io::Write::flush(&mut f).map_err(|e| Error::io(p, e))?;
            n
        }
        None => {
            let mut out = std::io::BufWriter::new(std::io::stdout());
            let n = crate::export::write_chunks(chunks, &mut out).await?;
            std::io::Write::flush(&mut out).map_err(|e| Error::io("stdout", e))?;
            n
        }
    };
    eprintln!("exported {rows} rows of '{}' version {}", a.key, v.version);
    Ok(0)
}

async fn refresh(g: &Global, a: &RefreshArgs) -> Result<()> {
    let store = g.open_store()?;
    let opts = crate::compute::refresh::RefreshOptions::at(as_of_or_now(a.as_of.as_deref())?);
    let r =
        crate::compute::refresh::refresh(&store, &g.space()?, &g.identity_rules()?, &opts).await?;
    print_refresh(g.json, &r)
}

async fn serve(g: &Global, a: &ServeArgs) -> Result<()> {
    let store = g.open_store()?;
    let config = match &g.config {
        Some(p) => crate::config::Config::load(p)?,
        None => crate::config::Config::default(),
    };
    let mut spaces = vec![g.space()?];
    for name in config.spaces.keys() {
        let s = crate::store::Space::new(name)?;
        if !spaces.contains(&s) {
            spaces.push(s);
        }
    }
    let addr = |s: &str, flag: &str| -> Result<std::net::SocketAddr> {
        s.parse()
            .map_err(|_| Error::Usage(format!("{flag}: '{s}' is not HOST:PORT")))
    };
    let opts = crate::server::ServeOptions {
        flight: addr(&a.flight, "--flight")?,
        http: addr(&a.http, "--http")?,
        interval: match a.refresh_interval.as_str() {
            "off" => None,
            d => Some(crate::serve::parse_duration(d)?),
        },
        refreshes: a.refreshes,
        insecure: a.insecure_no_auth,
        spaces,
        json: g.json,
        query_memory: Some(crate::serve::parse_bytes(&a.query_memory)?),
        serving_cache: if a.serving_cache == "0" {
            0
        } else {
            crate::serve::parse_bytes(&a.serving_cache)?
        },
        profile_api_rate: if a.profile_api_rate > 0.0 {
            a.profile_api_rate
        } else {
            return Err(Error::Usage("--profile-api-rate must be positive".into()));
        },
    };
    eprintln!(
        "audiences serve: store {}, refreshing {} every {:?}",
        store.url(),
        opts.spaces
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        opts.interval
    );
    crate::server::run(&store, config, opts).await
}

async fn sync(g: &Global, a: &SyncArgs) -> Result<i32> {
    let store = g.open_store()?;
    let opts = crate::destinations::SyncOptions {
        audiences: (!a.audiences.is_empty()).then(|| a.audiences.iter().cloned().collect()),
        ..Default::default()
    };
    let reports = crate::destinations::sync(&store, &g.space()?, &opts).await?;
    if g.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        if reports.is_empty() {
            println!("no destinations configured");
        }
        for r in &reports {
            println!("{}", sync_line(r));
        }
    }
    Ok(if reports.iter().any(|r| r.error.is_some()) {
        1
    } else {
        0
    })
}

/// One line about a sync report.
pub fn sync_line(r: &crate::destinations::SyncReport) -> String {
    let mut line = format!(
        "{}/{} ({}): version {} -> {}, {} messages in {} requests{}: {} sent, {} retried, {} dead-lettered, {} without an id, {} ms",
        r.audience,
        r.destination,
        r.kind,
        r.from_version,
        r.to_version,
        r.messages,
        r.requests,
        if r.backfills > 0 { " (backfill)" } else { "" },
        r.sent,
        r.retried,
        r.dead_lettered,
        r.skipped_no_id,
        r.millis
    );
    if let Some(e) = &r.error {
        line.push_str(&format!("; error: {e}"));
    }
    line
}

async fn destinations(g: &Global, c: DestinationsCommand) -> Result<i32> {
    match c {
        DestinationsCommand::Status => {
            let store = g.open_store()?;
            let st = crate::destinations::status(&store, &g.space()?).await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&st)?);
                return Ok(0);
            }
            if st.is_empty() {
                println!("no destinations configured");
            }
            for d in &st {
                println!(
                    "{}/{} ({} {} by {}): cursor v{} of v{} (lag {} versions{}), {} sent, {} retried, {} dead-lettered, {} without an id{}{}",
                    d.audience,
                    d.destination,
                    d.kind,
                    d.mode,
                    d.id_type,
                    d.cursor_version,
                    d.current_version,
                    d.lag_versions,
                    d.lag_seconds
                        .map(|s| format!(", {s:.0} s"))
                        .unwrap_or_default(),
                    d.sent,
                    d.retried,
                    d.dead_lettered,
                    d.skipped_no_id,
                    d.pending
                        .as_ref()
                        .map(|p| format!(
                            ", step {}->{} in progress ({} done)",
                            p.from, p.to, p.done
                        ))
                        .unwrap_or_default(),
                    d.last_error
                        .as_ref()
                        .map(|e| format!(", last error: {e}"))
                        .unwrap_or_default(),
                );
            }
            Ok(0)
        }
        DestinationsCommand::Receive { listen, quiet } => {
            let addr: std::net::SocketAddr = listen
                .parse()
                .map_err(|_| Error::Usage(format!("--listen: '{listen}' is not HOST:PORT")))?;
            let r = crate::destinations::receiver::Receiver::start(addr, false, !quiet).await?;
            eprintln!("audiences destinations receive: listening on {}", r.url());
            crate::server::shutdown_signal().await;
            if quiet {
                eprintln!("received {} calls", r.count());
            }
            r.stop().await;
            Ok(0)
        }
    }
}

async fn compute(g: &Global, a: &ComputeArgs) -> Result<()> {
    let store = g.open_store()?;
    let as_of = as_of_or_now(a.as_of.as_deref())?;
    let reports = crate::compute::compute_with_progress(
        &store,
        &g.space()?,
        &g.identity_rules()?,
        as_of,
        &a.keys,
        true,
    )
    .await?;
    if g.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print_reports(&reports);
    }
    Ok(())
}

async fn members(g: &Global, a: &MembersArgs) -> Result<i32> {
    let store = g.open_store()?;
    let Some((v, batches)) =
        crate::compute::members(&store, &g.space()?, &a.key, a.version).await?
    else {
        eprintln!(
            "no version {} of audience '{}'",
            a.version.map_or("yet".to_string(), |n| n.to_string()),
            a.key
        );
        return Ok(1);
    };
    // Profile audiences list (profile_id, profile_idx, ...), account audiences (account_id, ...).
    let batches: Vec<arrow::array::RecordBatch> = batches
        .iter()
        .map(|b| crate::compute::conform(b, "members"))
        .collect::<Result<_>>()?;
    let accounts = batches
        .iter()
        .any(|b| b.column(6).null_count() < b.num_rows());
    let cols: &[usize] = if accounts {
        &[6, 3, 4, 5]
    } else {
        &[1, 2, 3, 4, 5]
    };
    let batches: Vec<arrow::array::RecordBatch> = batches
        .iter()
        .map(|b| b.project(cols))
        .collect::<std::result::Result<_, _>>()?;
    let fmt = if g.json && a.format == "table" {
        "json"
    } else {
        a.format.as_str()
    };
    let mut out: Box<dyn std::io::Write> = match &a.output {
        Some(p) => Box::new(std::fs::File::create(p).map_err(|e| Error::io(p, e))?),
        None if fmt == "parquet" => {
            return Err(Error::Usage("--format parquet needs -o FILE".into()));
        }
        None => Box::new(std::io::stdout()),
    };
    let io = |e| Error::io("members output", e);
    match fmt {
        "csv" => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            for b in &batches {
                w.write(b)?;
            }
        }
        "json" => {
            let mut w = arrow::json::ArrayWriter::new(&mut out);
            for b in &batches {
                w.write(b)?;
            }
            w.finish()?;
            writeln!(out).map_err(io)?;
        }
        "parquet" => {
            let schema = batches.first().map(|b| b.schema()).unwrap_or_else(|| {
                std::sync::Arc::new(
                    crate::compute::schema("members")
                        .project(cols)
                        .unwrap_or_else(|_| arrow::datatypes::Schema::empty()),
                )
            });
            let batch = arrow::compute::concat_batches(&schema, &batches)?;
            let bytes = crate::events::writer::encode_parquet(
                &batch,
                crate::events::writer::writer_properties(None),
            )?;
            out.write_all(&bytes).map_err(io)?;
        }
        _ => {
            writeln!(
                out,
                "audience {} version {} ({} members)",
                a.key,
                v.version,
                batches.iter().map(|b| b.num_rows()).sum::<usize>()
            )
            .map_err(io)?;
            writeln!(
                out,
                "{}",
                arrow::util::pretty::pretty_format_batches(&batches)?
            )
            .map_err(io)?;
        }
    }
    Ok(0)
}
