//! Shared fixtures.

use std::process::{Command, Output};

use audiences::events::{IngestOptions, IngestReport, Input};
use audiences::store::{Space, Store};

/// The `audiences` binary.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_audiences"))
}

/// Run the binary with arguments against a store; returns the output (asserting nothing).
pub fn run(store: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = bin();
    c.arg("--store").arg(store).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.env_remove("AUDIENCES_FAULT");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run audiences")
}

/// Run and require exit code 0; returns stdout.
pub fn run_ok(store: &str, args: &[&str]) -> String {
    let out = run(store, args, &[]);
    assert!(
        out.status.success(),
        "audiences {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a Python script (python3 must have the test dependencies: .ci/run installs them).
pub fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 must be installed (.ci/run installs the test dependencies)");
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// 2026-01-01T00:00:00Z in microseconds.
pub const END: i64 = 1_767_225_600_000_000;

/// Generated NDJSON.
pub fn generated(events: u64, seed: u64) -> Vec<u8> {
    let mut out = Vec::new();
    audiences::generate::generate(
        &audiences::generate::GenConfig {
            events,
            seed,
            end: END,
            delta: None,
            delta_round: 0,
        },
        &mut out,
    )
    .expect("generate");
    out
}

/// Ingest files into a store with default options (dead letters into `dir`).
pub async fn ingest_files(
    store: &Store,
    space: &str,
    files: &[std::path::PathBuf],
    dead: &std::path::Path,
) -> IngestReport {
    audiences::events::ingest(
        store,
        &Space::new(space).unwrap(),
        files.iter().cloned().map(Input::File).collect(),
        IngestOptions {
            dead_letter: Some(dead.to_path_buf()),
            received_now: Some(END),
            ..Default::default()
        },
    )
    .await
    .expect("ingest")
}

/// Run SQL and return rows as JSON objects.
pub async fn sql_rows(
    store: &Store,
    space: &str,
    sql: &str,
) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let batches = audiences::tables::query(store, &Space::new(space).unwrap(), sql)
        .await
        .expect("sql");
    let mut w = arrow::json::ArrayWriter::new(Vec::new());
    for b in &batches {
        w.write(b).unwrap();
    }
    w.finish().unwrap();
    let bytes = w.into_inner();
    if bytes.is_empty() {
        return vec![];
    }
    serde_json::from_slice(&bytes).unwrap()
}

/// A single count from SQL.
pub async fn count(store: &Store, space: &str, sql: &str) -> i64 {
    let rows = sql_rows(store, space, sql).await;
    rows[0]
        .values()
        .next()
        .and_then(|v| v.as_i64())
        .expect("a count")
}

/// A local store directory (`DIR/store`, returned as a path string) with `events` generated
/// events (seed `seed`) ingested into space `default` by the binary.
pub fn ingested_dir(events: u64, seed: u64) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store").to_str().unwrap().to_string();
    let base = dir.path().join("base.ndjson");
    std::fs::write(&base, generated(events, seed)).unwrap();
    run_ok(&store, &["ingest", base.to_str().unwrap()]);
    (dir, store)
}

/// A memory store with `events` generated events (seed `seed`) ingested into space `default`.
pub async fn generated_store(events: u64, seed: u64) -> Store {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.ndjson");
    std::fs::write(&p, generated(events, seed)).unwrap();
    let store = Store::memory();
    let r = ingest_files(&store, "default", &[p], &dir.path().join("d")).await;
    assert_eq!(r.accepted, events);
    store
}

/// The JSON a command printed on stdout (panics with both streams when it is not JSON).
pub fn json_out(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bad JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
