//! The S3 path against a real S3-protocol server on loopback (`moto_server`, installed by
//! .ci/run): ingest and read back through the binary, and concurrent commit conflicts.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use audiences::store::{S3Options, Store};

use crate::common::*;

/// moto's WSGI application behind a lock (see [`Moto::start`]); argv: host, port.
const MOTO_SERIALIZED: &str = r#"
import sys, threading
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
app = DomainDispatcherApplication(create_backend_app)
lock = threading.Lock()
def serialized(environ, start_response):
    with lock:
        return list(app(environ, start_response))
run_simple(sys.argv[1], int(sys.argv[2]), serialized, threaded=True)
"#;

/// A moto_server on a free loopback port, killed on drop.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Start the server and wait until it answers.
    pub fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // moto's server, started the way `moto_server` starts it (no PATH shims), except that
        // requests are served one at a time: moto checks `If-None-Match: *` and then stores the
        // object without a lock, so two concurrent put-if-absent of one key could both succeed
        // on its threaded server (seen as a lost commit in the concurrent-commit test). S3 makes
        // that check atomically; serializing requests gives moto the same guarantee.
        let child = Command::new("python3")
            .args(["-c", MOTO_SERIALIZED, "127.0.0.1", &port.to_string()])
            .env("MOTO_PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "moto_server must be installed (.ci/run installs it: pip install 'moto[server]')",
            );
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not start (.ci/run installs it: pip install 'moto[server]')"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    /// Create a bucket (moto accepts unsigned requests).
    pub fn create_bucket(&self, bucket: &str) {
        let addr = self.endpoint.trim_start_matches("http://");
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "PUT /{bucket} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(
            resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200"),
            "create bucket: {resp}"
        );
    }

    /// Options for a store on this server.
    pub fn options(&self) -> S3Options {
        S3Options {
            endpoint: Some(self.endpoint.clone()),
            allow_http: true,
            credentials: Some(("test".into(), "test".into())),
            region: Some("us-east-1".into()),
        }
    }

    /// Environment for the binary.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }
}

#[test]
fn ingest_read_back_and_conflicts_on_s3() {
    let moto = Moto::start();
    moto.create_bucket("audiences");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.ndjson");
    std::fs::write(&p, generated(3000, 31)).unwrap();
    let env = moto.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let url = "s3://audiences/prod/store";
    let out = run(url, &["--json", "ingest", p.to_str().unwrap()], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["accepted"], 3000);
    // Dedup works against committed files on S3 as well.
    let out = run(url, &["--json", "ingest", p.to_str().unwrap()], &env);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["duplicates"], 3000);
    let out = run(
        url,
        &[
            "--json",
            "sql",
            "SELECT type, count(*) AS n FROM events GROUP BY type ORDER BY type",
        ],
        &env,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let total: i64 = rows.iter().map(|r| r["n"].as_i64().unwrap()).sum();
    assert_eq!(total, 3000);
    // The same counts straight from the generated file (independent of the store).
    let mut by_type = std::collections::BTreeMap::<String, i64>::new();
    for line in std::fs::read_to_string(&p).unwrap().lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        *by_type
            .entry(m["type"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    for r in &rows {
        assert_eq!(
            by_type[r["type"].as_str().unwrap()],
            r["n"].as_i64().unwrap()
        );
    }
    // Commit conflicts: concurrent writers through put-if-absent on S3.
    let opts = moto.options();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(crate::commit_log::concurrent_commits(
        || Store::open("s3://audiences/conflicts", &opts).unwrap(),
        4,
        6,
    ));
}
