//! The commit log: concurrent writers, crash between data write and commit, vacuum.

use std::collections::BTreeSet;

use audiences::store::log::{CommitDraft, FileAdd};
use audiences::store::{CommitLog, S3Options, Space, Store, TableName};
use serde_json::json;

/// `writers` tasks each commit `per_writer` entries, each through its own store handle.
pub async fn concurrent_commits(open: impl Fn() -> Store, writers: u64, per_writer: u64) {
    let space = Space::new("race").unwrap();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let log = CommitLog::new(&open(), &space, TableName::Named("t"));
        tasks.push(tokio::spawn(async move {
            for n in 0..per_writer {
                log.commit(|_| {
                    Ok(CommitDraft {
                        operation: "test".into(),
                        adds: vec![FileAdd {
                            path: format!("w{w}-n{n}"),
                            size: 1,
                            rows: 1,
                            ..Default::default()
                        }],
                        removes: vec![],
                        info: json!({"writer": w, "n": n}),
                    })
                })
                .await
                .expect("commit");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let entries = CommitLog::new(&open(), &space, TableName::Named("t"))
        .entries()
        .await
        .unwrap();
    let versions: Vec<u64> = entries.iter().map(|e| e.version).collect();
    assert_eq!(versions, (1..=writers * per_writer).collect::<Vec<_>>());
    let payloads: BTreeSet<(u64, u64)> = entries
        .iter()
        .map(|e| {
            (
                e.info["writer"].as_u64().unwrap(),
                e.info["n"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        payloads.len() as u64,
        writers * per_writer,
        "a payload was committed twice or lost"
    );
    let snap = CommitLog::new(&open(), &space, TableName::Named("t"))
        .snapshot()
        .await
        .unwrap();
    assert_eq!(snap.files.len() as u64, writers * per_writer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_writers_twenty_commits_on_the_local_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap().to_string();
    concurrent_commits(|| Store::open(&path, &S3Options::default()).unwrap(), 5, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_writers_twenty_commits_in_memory() {
    let store = Store::memory();
    concurrent_commits(|| store.clone(), 5, 20).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn uncommitted_files_are_invisible_and_vacuumed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap(), &S3Options::default()).unwrap();
    let space = Space::default();
    let data = crate::common::generated(500, 1);
    let p = dir.path().join("in.ndjson");
    std::fs::write(&p, &data).unwrap();
    let r = crate::common::ingest_files(
        &store,
        "default",
        std::slice::from_ref(&p),
        &dir.path().join("d"),
    )
    .await;
    assert_eq!(r.accepted, 500);
    // A "crashed" writer: data files written, never committed.
    let mut b = audiences::events::schema::EventBatchBuilder::new();
    for line in crate::common::generated(50, 2)
        .split(|c| *c == b'\n')
        .filter(|l| !l.is_empty())
    {
        b.append(&audiences::events::message::parse_message(line, 0).unwrap());
    }
    let (batch, cols) = b.finish().unwrap();
    let orphan =
        audiences::events::writer::write_events_file(&store, &space, "2025-12-31", &batch, &cols)
            .await
            .unwrap();
    assert!(dir.path().join(&orphan.path).exists());
    assert_eq!(
        crate::common::count(&store, "default", "SELECT count(*) FROM events").await,
        500
    );
    // The next writer commits normally.
    let more = crate::common::generated(800, 3);
    let p2 = dir.path().join("in2.ndjson");
    std::fs::write(&p2, &more).unwrap();
    let r = crate::common::ingest_files(&store, "default", &[p2], &dir.path().join("d")).await;
    assert_eq!(r.accepted, 800);
    assert_eq!(
        crate::common::count(&store, "default", "SELECT count(*) FROM events").await,
        1300
    );
    // Vacuum with a grace period keeps the young orphan; without, it removes exactly it.
    let log = CommitLog::new(&store, &space, TableName::Events);
    assert!(
        log.vacuum(std::time::Duration::from_secs(3600))
            .await
            .unwrap()
            .is_empty()
    );
    let deleted = log.vacuum(std::time::Duration::ZERO).await.unwrap();
    assert_eq!(deleted, vec![orphan.path.clone()]);
    assert!(!dir.path().join(&orphan.path).exists());
    assert_eq!(
        crate::common::count(&store, "default", "SELECT count(*) FROM events").await,
        1300
    );
}
