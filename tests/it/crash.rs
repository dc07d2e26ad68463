//! kill -9 at the fault points of ingest, through the real binary: the last committed state
//! stays readable, nothing reported as accepted is lost, and the next run continues.

use crate::common::*;

fn count_events(store: &str) -> i64 {
    let out = run_ok(
        store,
        &["sql", "--json", "SELECT count(*) AS n FROM events"],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["n"].as_i64().unwrap()
}

#[test]
fn kill_at_each_fault_point_loses_nothing_committed() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let store = store.to_str().unwrap();
    let base = dir.path().join("base.ndjson");
    std::fs::write(&base, generated(2000, 21)).unwrap();
    let out = run(store, &["--json", "ingest", base.to_str().unwrap()], &[]);
    assert!(out.status.success());
    assert_eq!(json_out(&out)["accepted"], 2000);
    let next = dir.path().join("next.ndjson");
    std::fs::write(&next, generated(1500, 22)).unwrap();
    for point in ["after_data_files", "before_commit"] {
        let out = run(
            store,
            &["--json", "ingest", next.to_str().unwrap()],
            &[("AUDIENCES_FAULT", point)],
        );
        assert!(!out.status.success(), "{point}: the process must have died");
        assert!(
            out.stdout.is_empty(),
            "{point}: nothing may be reported before the commit"
        );
        assert_eq!(
            count_events(store),
            2000,
            "{point}: previous state readable, nothing half-visible"
        );
    }
    // Killed right after the commit: the events are durable although never reported.
    let out = run(
        store,
        &["--json", "ingest", next.to_str().unwrap()],
        &[("AUDIENCES_FAULT", "after_commit")],
    );
    assert!(!out.status.success());
    assert_eq!(count_events(store), 3500);
    // The retry finds them all as duplicates: nothing twice.
    let out = run(store, &["--json", "ingest", next.to_str().unwrap()], &[]);
    let v = json_out(&out);
    assert_eq!(
        (v["accepted"].as_u64(), v["duplicates"].as_u64()),
        (Some(0), Some(1500))
    );
    assert_eq!(count_events(store), 3500);
    // Orphans of the killed runs are removed by vacuum, and reads are unchanged.
    let out = run(store, &["--json", "vacuum", "--grace-secs", "0"], &[]);
    let deleted = json_out(&out)["deleted"].as_array().unwrap().len();
    assert!(deleted > 0);
    assert_eq!(count_events(store), 3500);
}

#[test]
fn a_lost_put_reply_is_recognised_and_not_committed_twice() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let store = store.to_str().unwrap();
    let p = dir.path().join("x.ndjson");
    std::fs::write(&p, generated(300, 4)).unwrap();
    let out = run(
        store,
        &["--json", "ingest", p.to_str().unwrap()],
        &[("AUDIENCES_FAULT", "lose_put_reply")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_out(&out);
    assert_eq!(v["accepted"], 300);
    assert_eq!(v["versions"], serde_json::json!([1]));
    let logs = std::fs::read_dir(dir.path().join("store/spaces/default/events/_log"))
        .unwrap()
        .count();
    assert_eq!(logs, 1);
}

#[test]
fn cli_exit_codes_and_json_report() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let store = store.to_str().unwrap();
    let p = dir.path().join("bad.ndjson");
    std::fs::write(
        &p,
        b"{\"type\":\"track\",\"userId\":\"u\",\"event\":\"E\"}\nnot json\n",
    )
    .unwrap();
    let dead = dir.path().join("dead.ndjson");
    let out = run(
        store,
        &[
            "--json",
            "ingest",
            p.to_str().unwrap(),
            "--dead-letter",
            dead.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    let v = json_out(&out);
    assert_eq!(
        (
            v["accepted"].as_u64(),
            v["rejected"].as_u64(),
            v["duplicates"].as_u64()
        ),
        (Some(1), Some(1), Some(0))
    );
    assert_eq!(v["dead_letter"], serde_json::json!(dead.to_str().unwrap()));
    let out = run(
        store,
        &[
            "ingest",
            "--strict",
            p.to_str().unwrap(),
            "--dead-letter",
            dead.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let out = run(store, &["ingest", "/no/such/file"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(store, &["sql", "SELECT nope FROM events"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("error:"));
    let out = run(store, &["--space", "Bad Space", "sql", "SELECT 1"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(store, &["frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(2));
    // stdin, and flags from the environment.
    let mut c = bin();
    c.args(["ingest", "-", "--json"])
        .env("AUDIENCES_STORE", store)
        .env("AUDIENCES_SPACE", "other");
    c.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"type\":\"page\",\"anonymousId\":\"a\"}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(json_out(&out)["accepted"], 1);
    let out = run_ok(
        store,
        &[
            "--space",
            "other",
            "sql",
            "--json",
            "SELECT count(*) AS n FROM events",
        ],
    );
    assert!(out.contains("\"n\":1"));
}

#[test]
fn check_prints_the_ast_or_a_positioned_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    for f in ["funnels/cart_abandoners", "repeat_buyers", "revenue_180d"] {
        let p = format!("{root}/data/definitions/{f}.json");
        let out = run("memory://", &["check", &p], &[]);
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["key"], f.trim_start_matches("funnels/"));
        assert!(v["ast"].is_object());
    }
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "event('A').within(30 dayz).count() > 1").unwrap();
    let out = run("memory://", &["check", bad.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1, column 22: expected a unit"), "{err}");
    assert!(err.contains("found 'dayz'"), "{err}");
}
