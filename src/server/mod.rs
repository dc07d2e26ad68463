//! `audiences serve`: the Arrow Flight port, the HTTP port and the refresh loop of every
//! configured space, in one process, stopped gracefully by Ctrl-C or SIGTERM (in-flight requests
//! finish; a refresh in progress either commits or leaves nothing).

pub mod auth;
pub mod flight;
pub(crate) mod frames;
pub mod http;
pub mod manage;
pub mod profile_api;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arrow_flight::flight_service_server::FlightServiceServer;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::{Space, Store};

/// Largest gRPC message a client may send (Flight requests are small; bulk data streams).
pub const MAX_GRPC_MESSAGE: usize = 16 << 20;

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Flight (gRPC) address; port 0 picks a free port.
    pub flight: SocketAddr,
    /// HTTP address; port 0 picks a free port.
    pub http: SocketAddr,
    /// Refresh interval of realtime definitions (None: no refresh loop; refreshes run only when
    /// asked for, through the Flight `refresh` action).
    pub interval: Option<Duration>,
    /// Stop after this many refresh passes (tests, one-off runs).
    pub refreshes: Option<u64>,
    /// No authentication at all (local experiments).
    pub insecure: bool,
    /// The spaces whose definitions are refreshed.
    pub spaces: Vec<Space>,
    /// Print refresh reports as JSON lines.
    pub json: bool,
    /// Memory one Flight SQL query may use (bytes).
    pub query_memory: Option<usize>,
    /// Memory for finished membership streams served again from memory (0: none).
    pub serving_cache: usize,
    /// Profile API requests per second per space (and burst).
    pub profile_api_rate: f64,
}

/// Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Serve until interrupted (or until the refresh loops have run `refreshes` passes).
pub async fn run(store: &Store, config: Config, opts: ServeOptions) -> Result<()> {
    let (mut auth, created) = auth::Auth::load(store, &config, opts.insecure).await?;
    if let Some(s) = opts.spaces.first() {
        auth.insecure_space = s.clone();
    }
    if let Some(t) = created {
        // Shown once: only its SHA-256 digest is kept (in the store).
        eprintln!(
            "audiences serve: admin token of space 'default' (shown this once; keep it): {t}"
        );
    }
    if opts.insecure {
        eprintln!(
            "audiences serve: WARNING: --insecure-no-auth: every caller is an admin (Flight: of \
             space '{}'); never expose these ports",
            auth.insecure_space
        );
    }
    let auth = Arc::new(auth);
    let config = Arc::new(config);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let flight_listener = tokio::net::TcpListener::bind(opts.flight)
        .await
        .map_err(|e| Error::Usage(format!("--flight {}: {e}", opts.flight)))?;
    let http_listener = tokio::net::TcpListener::bind(opts.http)
        .await
        .map_err(|e| Error::Usage(format!("--http {}: {e}", opts.http)))?;
    let (fa, ha) = (
        flight_listener
            .local_addr()
            .map_err(|e| Error::io("flight", e))?,
        http_listener
            .local_addr()
            .map_err(|e| Error::io("http", e))?,
    );
    eprintln!("audiences serve: flight listening on {fa}");
    eprintln!("audiences serve: http listening on {ha}");

    let serving = Arc::new(crate::export::ServingCache::new(opts.serving_cache));
    let graphs = Arc::new(crate::identity::persist::GraphCaches::default());
    let flight = flight::Flight {
        graphs: Arc::clone(&graphs),
        store: store.clone(),
        serving: Arc::clone(&serving),
        auth: Arc::clone(&auth),
        config: Arc::clone(&config),
        query_memory: opts.query_memory,
    };
    let flight = Arc::new(flight);
    let svc = FlightServiceServer::from_arc(Arc::clone(&flight))
        .max_decoding_message_size(MAX_GRPC_MESSAGE)
        .max_encoding_message_size(usize::MAX);
    let svc = frames::FlightWithFrames::new(flight, svc);
    let mut stop = stop_rx.clone();
    let flight_task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                // small replies (handshake, get_flight_info) must not wait for delayed ACKs
                tonic::transport::server::TcpIncoming::from(flight_listener)
                    .with_nodelay(Some(true)),
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            )
            .await
    });
    let router = http::router(Arc::new(http::HttpState {
        store: store.clone(),
        serving,
        auth: Arc::clone(&auth),
        config: Arc::clone(&config),
        rate: opts.profile_api_rate,
        buckets: Default::default(),
    }));
    let mut stop = stop_rx.clone();
    let http_task = tokio::spawn(async move {
        use axum::serve::ListenerExt;
        let http_listener = http_listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
        });
        axum::serve(http_listener, router)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    });
    let mut loops = Vec::new();
    let mut syncs = Vec::new();
    for space in &opts.spaces {
        // Destinations sync after every refresh (and once at start), in their own task so a
        // slow destination never holds refreshes back.
        let kick = Arc::new(tokio::sync::Notify::new());
        kick.notify_one();
        {
            let (store, space, kick, json) =
                (store.clone(), space.clone(), Arc::clone(&kick), opts.json);
            let mut stop = stop_rx.clone();
            syncs.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        biased;
                        _ = kick.notified() => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    match crate::destinations::sync(&store, &space, &Default::default()).await {
                        Ok(reports) => {
                            for r in reports
                                .iter()
                                .filter(|r| r.messages > 0 || r.error.is_some())
                            {
                                if json {
                                    println!("{}", serde_json::to_string(r).unwrap_or_default());
                                } else {
                                    println!("sync of space {space}: {}", crate::cli::sync_line(r));
                                }
                            }
                        }
                        Err(e) => eprintln!("sync of space {space} failed: {e}"),
                    }
                }
            }));
        }
        let rules = match config.spaces.get(space.as_str()) {
            Some(s) => crate::identity::IdentityRules::from_config(&s.identity)?,
            None => crate::identity::IdentityRules::default(),
        };
        let (store, space, stop, json) = (store.clone(), space.clone(), stop_rx.clone(), opts.json);
        let Some(interval) = opts.interval else {
            continue;
        };
        let how = crate::serve::Loop {
            interval,
            passes: opts.refreshes,
            cache: graphs.of(&space),
        };
        loops.push(tokio::spawn(async move {
            crate::serve::run(&store, &space, &rules, how, stop, |r| {
                if r.is_ok() {
                    kick.notify_one();
                }
                match r {
                    Ok(r) if json => println!("{}", serde_json::to_string(r).unwrap_or_default()),
                    Ok(r) => println!(
                        "refresh of space {space}: {} new event rows, {} in {} ms",
                        r.new_event_rows,
                        match r.committed {
                            Some(v) => format!("committed memberships version {v}"),
                            None => "nothing changed".into(),
                        },
                        r.millis
                    ),
                    Err(e) => eprintln!("refresh of space {space} failed: {e}"),
                }
            })
            .await
        }));
    }
    // Stop on a signal, or once every refresh loop has run its passes.
    let all_loops = futures::future::join_all(loops);
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = all_loops, if opts.refreshes.is_some() => {}
    }
    eprintln!("audiences serve: shutting down");
    let _ = stop_tx.send(true);
    for t in syncs {
        if opts.refreshes.is_some() {
            // a bounded run finishes the sync its last refresh asked for
            let _ = t.await;
        } else {
            // a sync cut short resumes from its checkpoint at the next start
            t.abort();
        }
    }
    if let Ok(Err(e)) = flight_task.await {
        return Err(Error::Usage(format!("flight server: {e}")));
    }
    if let Ok(Err(e)) = http_task.await {
        return Err(Error::io("http server", e));
    }
    Ok(())
}
