//! A local webhook receiver: accepts every POST, keeps the calls it received, answers 200.
//! The demo connects it to an audience; `audiences destinations receive` runs one to try a
//! destination (and benchmarks sync throughput against it).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};

use crate::error::{Error, Result};

/// One received request.
#[derive(Debug, Clone)]
pub struct Call {
    /// Request path.
    pub path: String,
    /// `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// JSON body (`null` when it was not JSON).
    pub body: serde_json::Value,
}

#[derive(Default)]
struct Shared {
    calls: Mutex<Vec<Call>>,
    count: std::sync::atomic::AtomicU64,
    keep: bool,
    print: bool,
}

/// A running receiver.
pub struct Receiver {
    /// Bound address.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    /// Listen on `addr` (port 0: any free port). `keep`: remember calls; `print`: print each
    /// body as a JSON line on stdout.
    pub async fn start(addr: SocketAddr, keep: bool, print: bool) -> Result<Receiver> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Usage(format!("receiver {addr}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("receiver", e))?;
        let shared = Arc::new(Shared {
            keep,
            print,
            ..Default::default()
        });
        let app = axum::Router::new()
            .fallback(axum::routing::post(receive))
            .layer(DefaultBodyLimit::max(64 << 20))
            .with_state(Arc::clone(&shared));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(Receiver {
            addr,
            shared,
            stop: Some(tx),
            task: Some(task),
        })
    }

    /// The URL to configure as a webhook.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Calls received so far.
    pub fn calls(&self) -> Vec<Call> {
        self.shared
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Requests received so far (kept or not).
    pub fn count(&self) -> u64 {
        self.shared.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stop listening.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

async fn receive(
    State(s): State<Arc<Shared>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> StatusCode {
    s.count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    if s.print {
        println!("{json}");
    }
    if s.keep {
        let call = Call {
            path: uri.path().to_string(),
            idempotency_key: headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .map(String::from),
            body: json,
        };
        s.calls.lock().unwrap_or_else(|p| p.into_inner()).push(call);
    }
    StatusCode::OK
}
