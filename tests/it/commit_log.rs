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

/// A file a commit removed is vacuumed only once the grace period has passed since that commit,
/// however old the file itself is (a reader of the earlier snapshot may still read it); a file
/// no commit named goes by its own age.
#[tokio::test(flavor = "multi_thread")]
async fn vacuum_counts_a_removed_file_from_its_removal() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap(), &S3Options::default()).unwrap();
    let space = Space::default();
    let log = CommitLog::new(&store, &space, TableName::Named("t"));
    let put = |name: &str| {
        let key = format!("spaces/default/t/{name}");
        let file = dir.path().join(&key);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, b"x").unwrap();
        (key, file)
    };
    let age = |file: &std::path::Path| {
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(file)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
    };
    let (old_key, old_file) = put("old.parquet");
    let (new_key, new_file) = put("new.parquet");
    let (orphan_key, orphan_file) = put("orphan.parquet");
    let commit = |adds: &[&str], removes: &[&str]| {
        let adds: Vec<FileAdd> = adds
            .iter()
            .map(|p| FileAdd {
                path: p.to_string(),
                size: 1,
                rows: 1,
                ..Default::default()
            })
            .collect();
        let removes: Vec<String> = removes.iter().map(|r| r.to_string()).collect();
        log.commit(move |_| {
            Ok(CommitDraft {
                operation: "test".into(),
                adds: adds.clone(),
                removes: removes.clone(),
                info: json!({}),
            })
        })
    };
    commit(&[&old_key], &[]).await.unwrap();
    // A compaction-like commit replaces the old file, which was written two hours ago.
    commit(&[&new_key], &[&old_key]).await.unwrap();
    for f in [&old_file, &new_file, &orphan_file] {
        age(f);
    }
    let deleted = log
        .vacuum(std::time::Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(deleted, vec![orphan_key.clone()]);
    assert!(old_file.exists() && new_file.exists() && !orphan_file.exists());
    let deleted = log.vacuum(std::time::Duration::ZERO).await.unwrap();
    assert_eq!(deleted, vec![old_key.clone()]);
    assert!(!old_file.exists() && new_file.exists());
}

/// Every 64th commit writes a checkpoint of all entries so far; a fresh reader replays it plus
/// the later entries and sees exactly the log the entries themselves give; a broken
/// checkpoint falls back to the entries.
#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_replay_like_the_entries_and_a_broken_one_is_ignored() {
    use audiences::store::log::CHECKPOINT_INTERVAL;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap().to_string();
    let open = || Store::open(&path, &S3Options::default()).unwrap();
    let space = Space::default();
    let writer = CommitLog::new(&open(), &space, TableName::Named("t"));
    let n = 2 * CHECKPOINT_INTERVAL + 9;
    for i in 0..n {
        writer
            .commit(|_| {
                Ok(CommitDraft {
                    operation: "test".into(),
                    adds: vec![FileAdd {
                        path: format!("f{i}"),
                        size: 1,
                        rows: i,
                        ..Default::default()
                    }],
                    // every third commit removes the file of the commit before it
                    removes: if i % 3 == 2 {
                        vec![format!("f{}", i - 1)]
                    } else {
                        vec![]
                    },
                    info: json!({ "i": i }),
                })
            })
            .await
            .unwrap();
    }
    let log_dir = dir.path().join("spaces/default/t/_log");
    let name = |v: u64| format!("{v:020}.checkpoint.json");
    let mut checkpoints: Vec<String> = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.ends_with(".checkpoint.json"))
        .collect();
    checkpoints.sort();
    assert_eq!(
        checkpoints,
        vec![name(CHECKPOINT_INTERVAL), name(2 * CHECKPOINT_INTERVAL)]
    );

    // The reference: the files and infos the commits above imply, computed here.
    let mut live: Vec<String> = Vec::new();
    for i in 0..n {
        live.push(format!("f{i}"));
        if i % 3 == 2 {
            live.retain(|f| *f != format!("f{}", i - 1));
        }
    }
    let check = |snap: audiences::store::log::Snapshot| {
        assert_eq!(snap.version, n);
        let files: Vec<String> = snap.files.iter().map(|f| f.path.clone()).collect();
        assert_eq!(files, live);
        let infos: Vec<u64> = snap
            .entries
            .iter()
            .map(|e| e.info["i"].as_u64().unwrap())
            .collect();
        assert_eq!(infos, (0..n).collect::<Vec<_>>());
    };
    let fresh = || CommitLog::new(&open(), &space, TableName::Named("t"));
    check(fresh().snapshot().await.unwrap());

    // The checkpoint is what a fresh reader uses: an entry it covers, gone, is still there.
    let gone = log_dir.join(format!("{:020}.json", CHECKPOINT_INTERVAL + 5));
    let kept = std::fs::read(&gone).unwrap();
    std::fs::remove_file(&gone).unwrap();
    check(fresh().snapshot().await.unwrap());
    std::fs::write(&gone, kept).unwrap();

    // A broken checkpoint (garbage, or not the entries 1..=version) is ignored.
    let latest = log_dir.join(name(2 * CHECKPOINT_INTERVAL));
    std::fs::write(&latest, b"{ not json").unwrap();
    check(fresh().snapshot().await.unwrap());
    std::fs::write(
        &latest,
        std::fs::read(log_dir.join(name(CHECKPOINT_INTERVAL))).unwrap(),
    )
    .unwrap();
    check(fresh().snapshot().await.unwrap());
    // a second read in the same process takes the entries the checkpoint put in its cache
    let reader = fresh();
    check(reader.snapshot().await.unwrap());
    check(reader.snapshot().await.unwrap());
}
