//! Ingest: round trip of every message type, validation and conservation, input formats,
//! dedup, shredded property columns and type conflicts, partitioning and sort order.

use std::io::Write;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Int64Type, TimestampMicrosecondType};
use audiences::events::message::parse_message;
use audiences::events::read::events_from_batch;
use audiences::store::{CommitLog, Space, Store, TableName};
use serde_json::json;

use crate::common::*;

fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn all_types() -> Vec<serde_json::Value> {
    vec![
        json!({"type":"track","messageId":"m-track","userId":"u1","anonymousId":"a1","event":"Order Completed",
               "properties":{"price":120.5,"product":{"id":"p-9","tags":["a","b"]},"coupon":null,"gift":false},
               "context":{"os":{"name":"iOS"},"ip":"10.0.0.1","traits":{"email":"U1@Example.com"},
                          "externalIds":[{"id":"ga-1","type":"ga_client_id","collection":"users","encoding":"none"}]},
               "integrations":{"All":true,"Mixpanel":false},
               "timestamp":"2025-12-30T10:00:00.123456+02:00","originalTimestamp":"2025-12-30T08:00:00Z",
               "sentAt":"2025-12-30T08:00:01Z","receivedAt":"2025-12-30T08:00:02Z","version":2,"channel":"server"}),
        json!({"type":"page","messageId":"m-page","anonymousId":"a2","name":"Pricing","properties":{"path":"/pricing","url":"https://x/pricing"},
               "timestamp":"2025-12-29T23:59:59.999999Z"}),
        json!({"type":"screen","messageId":"m-screen","userId":"u2","name":"Home","properties":{"build":7}}),
        json!({"type":"identify","messageId":"m-identify","userId":"u1","traits":{"email":"u1@example.com","plan":"pro","address":{"city":"Berlin"}},
               "timestamp":"2025-12-01T00:00:00Z"}),
        json!({"type":"group","messageId":"m-group","userId":"u1","groupId":"acct-1","traits":{"plan":"business","employees":40},
               "timestamp":"2025-12-02T00:00:00Z"}),
        json!({"type":"alias","messageId":"m-alias","userId":"u1","previousId":"a9","timestamp":"2025-12-03T00:00:00Z"}),
    ]
}

async fn read_all(store: &Store, space: &str) -> Vec<audiences::events::Event> {
    let batches: Vec<RecordBatch> =
        audiences::tables::query(store, &Space::new(space).unwrap(), "SELECT * FROM events")
            .await
            .unwrap();
    let mut out = Vec::new();
    for b in &batches {
        out.extend(events_from_batch(b).unwrap());
    }
    out.sort_by(|a, b| a.message_id.cmp(&b.message_id));
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn every_field_of_every_type_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = all_types().iter().map(|v| v.to_string()).collect();
    let path = write(dir.path(), "all.ndjson", lines.join("\n").as_bytes());
    let store = Store::memory();
    let r = ingest_files(&store, "default", &[path], &dir.path().join("dead.ndjson")).await;
    assert_eq!((r.accepted, r.rejected, r.duplicates), (6, 0, 0));
    let got = read_all(&store, "default").await;
    let mut want: Vec<_> = lines
        .iter()
        .map(|l| parse_message(l.as_bytes(), END).unwrap())
        .collect();
    want.sort_by(|a, b| a.message_id.cmp(&b.message_id));
    assert_eq!(got, want);
    // Hand-checked values: the offset timestamp normalized to UTC, receive-time defaults.
    let track = got.iter().find(|e| e.message_id == "m-track").unwrap();
    assert_eq!(track.timestamp, 1_767_081_600_123_456); // 2025-12-30T08:00:00.123456Z
    assert_eq!(track.extra.get("version"), Some(&json!(2)));
    assert_eq!(
        track.to_json()["context"]["externalIds"][0]["type"],
        json!("ga_client_id")
    );
    let screen = got.iter().find(|e| e.message_id == "m-screen").unwrap();
    assert_eq!((screen.timestamp, screen.received_at), (END, END));
    // Shredded columns carry the same values, typed.
    let rows = sql_rows(
        &store,
        "default",
        r#"SELECT "properties.price:num" AS p, "properties.product.id:str" AS pid, "properties.product.tags:json" AS tags,
                  "properties.gift:bool" AS gift, "context.os.name:str" AS os, date
           FROM events WHERE message_id = 'm-track'"#,
    )
    .await;
    assert_eq!(rows[0]["p"], json!(120.5));
    assert_eq!(rows[0]["pid"], json!("p-9"));
    assert_eq!(rows[0]["tags"], json!("[\"a\",\"b\"]"));
    assert_eq!(rows[0]["gift"], json!(false));
    assert_eq!(rows[0]["os"], json!("iOS"));
    assert_eq!(rows[0]["date"], json!("2025-12-30"));
}

#[tokio::test(flavor = "multi_thread")]
async fn type_conflicts_and_new_properties_never_fail_a_scan() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::memory();
    let first = [
        json!({"type":"track","userId":"u1","event":"E","messageId":"1","properties":{"x":5}}),
        json!({"type":"track","userId":"u2","event":"E","messageId":"2","properties":{"x":"5"}}),
    ];
    let second = [
        json!({"type":"track","userId":"u3","event":"E","messageId":"3","properties":{"x":true,"fresh":"new"}}),
        json!({"type":"track","userId":"u4","event":"E","messageId":"4","properties":{"x":{"deep":1}}}),
        json!({"type":"track","userId":"u5","event":"E","messageId":"5","properties":{"x":"abc"}}),
    ];
    for (i, batch) in [&first[..], &second[..]].iter().enumerate() {
        let text: Vec<String> = batch.iter().map(|v| v.to_string()).collect();
        let p = write(
            dir.path(),
            &format!("b{i}.ndjson"),
            text.join("\n").as_bytes(),
        );
        let r = ingest_files(&store, "default", &[p], &dir.path().join("dead.ndjson")).await;
        assert_eq!(r.accepted, batch.len() as u64);
    }
    let q = |s: &'static str| count(&store, "default", s);
    // A numeric literal matches the numeric event only; a string literal the string event only.
    assert_eq!(
        q(r#"SELECT count(*) FROM events WHERE "properties.x:num" = 5"#).await,
        1
    );
    assert_eq!(
        q(r#"SELECT count(*) FROM events WHERE "properties.x:str" = '5'"#).await,
        1
    );
    assert_eq!(
        q(r#"SELECT count(*) FROM events WHERE "properties.x:bool""#).await,
        1
    );
    assert_eq!(
        q(r#"SELECT count(*) FROM events WHERE "properties.x.deep:num" = 1"#).await,
        1
    );
    assert_eq!(
        q(r#"SELECT count(*) FROM events WHERE "properties.fresh:str" IS NULL"#).await,
        4
    );
    assert_eq!(
        q(r#"SELECT count(*) FROM events WHERE "properties.x:str" > '4'"#).await,
        2
    );
    assert_eq!(q("SELECT count(*) FROM events").await, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn conservation_holds_with_injected_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let good = generated(3000, 11);
    let good_lines: Vec<&[u8]> = good
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let big = format!(
        r#"{{"type":"track","userId":"u","event":"e","properties":{{"blob":"{}"}}}}"#,
        "z".repeat(40_000)
    );
    let deep = format!(
        r#"{{"type":"track","userId":"u","event":"e","properties":{{"d":{}1{}}}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"type\":\"track\",".to_vec(), "malformed_json"),
        (
            b"{\"type\":\"track\",\"event\":\"X\"}".to_vec(),
            "missing_identity",
        ),
        (big.into_bytes(), "message_too_large"),
        (
            b"{\"type\":\"page\",\"userId\":\"u\",\"timestamp\":\"2025-13-45\"}".to_vec(),
            "invalid_timestamp",
        ),
        (deep.into_bytes(), "nesting_too_deep"),
        (
            b"{\"type\":\"page\",\"userId\":\"\xc3\x28\"}".to_vec(),
            "invalid_utf8",
        ),
        (b"\"just a string\"".to_vec(), "not_an_object"),
        (
            b"{\"type\":\"track\",\"userId\":\"u\"}".to_vec(),
            "missing_event",
        ),
    ];
    // Interleave: a bad line after every 300 good ones, and one duplicated good line.
    let mut file = Vec::new();
    let mut expected_bad = Vec::new();
    let mut line = 0u64;
    let mut bad_iter = bad.iter();
    for (i, l) in good_lines.iter().enumerate() {
        file.extend_from_slice(l);
        file.push(b'\n');
        line += 1;
        if i % 300 == 299
            && let Some((b, code)) = bad_iter.next()
        {
            file.extend_from_slice(b);
            file.push(b'\n');
            line += 1;
            expected_bad.push((line, *code));
        }
    }
    file.extend_from_slice(good_lines[17]);
    file.push(b'\n');
    let path = write(dir.path(), "mixed.ndjson", &file);
    let dead = dir.path().join("dead.ndjson");
    let store = Store::memory();
    let r = ingest_files(&store, "default", &[path], &dead).await;
    assert_eq!(r.submitted, 3000 + bad.len() as u64 + 1);
    assert_eq!(r.rejected, bad.len() as u64);
    assert_eq!(r.duplicates, 1);
    assert_eq!(r.accepted, 3000);
    assert_eq!(r.accepted + r.rejected + r.duplicates, r.submitted);
    assert_eq!(
        count(&store, "default", "SELECT count(*) FROM events").await,
        3000
    );
    let text = std::fs::read_to_string(&dead).unwrap();
    let got: Vec<(u64, String)> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["line"].as_u64().unwrap(),
                v["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(u64, String)> = expected_bad
        .iter()
        .map(|(l, c)| (*l, c.to_string()))
        .collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_input_format_gives_the_same_events() {
    let dir = tempfile::tempdir().unwrap();
    let msgs: Vec<serde_json::Value> = all_types();
    let ndjson: String = msgs.iter().map(|m| m.to_string() + "\n").collect();
    let array = serde_json::to_string_pretty(&msgs).unwrap();
    let envelope = json!({"batch": msgs, "sentAt": "2025-12-30T00:00:00Z"}).to_string();
    let pretty_envelope = serde_json::to_string_pretty(&json!({"batch": msgs})).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(ndjson.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    let inputs: Vec<(&str, Vec<u8>)> = vec![
        ("n.ndjson", ndjson.into_bytes()),
        ("a.json", array.into_bytes()),
        ("e.json", envelope.into_bytes()),
        ("p.json", pretty_envelope.into_bytes()),
        ("g.ndjson.gz", gz),
    ];
    let mut reference = None;
    for (i, (name, bytes)) in inputs.iter().enumerate() {
        let p = write(dir.path(), name, bytes);
        let store = Store::memory();
        let r = ingest_files(&store, "default", &[p], &dir.path().join(format!("d{i}"))).await;
        assert_eq!((r.accepted, r.rejected), (6, 0), "{name}");
        let got = read_all(&store, "default").await;
        match &reference {
            None => reference = Some(got),
            Some(want) => assert_eq!(&got, want, "{name}"),
        }
    }
    // A truncated array: the items before the damage are kept, the rest is one rejection.
    let p = write(
        dir.path(),
        "broken.json",
        br#"[{"type":"page","userId":"u","messageId":"ok"}, {"type": "#,
    );
    let store = Store::memory();
    let r = ingest_files(&store, "default", &[p], &dir.path().join("db")).await;
    assert_eq!((r.accepted, r.rejected, r.submitted), (1, 1, 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn dedup_within_and_across_files_but_not_across_spaces() {
    let dir = tempfile::tempdir().unwrap();
    let data = generated(2000, 3);
    let p1 = write(dir.path(), "one.ndjson", &data);
    let mut doubled = data.clone();
    doubled.extend_from_slice(&data);
    let p2 = write(dir.path(), "two.ndjson", &doubled);
    let store = Store::memory();
    let dead = dir.path().join("dead");
    let r = ingest_files(&store, "a", std::slice::from_ref(&p2), &dead).await;
    assert_eq!((r.accepted, r.duplicates), (2000, 2000));
    let r = ingest_files(&store, "a", std::slice::from_ref(&p1), &dead).await;
    assert_eq!((r.accepted, r.duplicates), (0, 2000));
    let r = ingest_files(&store, "b", &[p1], &dead).await;
    assert_eq!((r.accepted, r.duplicates), (2000, 0));
    assert_eq!(
        count(&store, "a", "SELECT count(*) FROM events").await,
        2000
    );
    assert_eq!(
        count(&store, "b", "SELECT count(*) FROM events").await,
        2000
    );
    assert_eq!(
        count(&store, "a", "SELECT count(DISTINCT message_id) FROM events").await,
        2000
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn small_chunks_commit_separately_and_dedup_across_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = generated(1000, 5);
    let mut doubled = data.clone();
    doubled.extend_from_slice(&data);
    let p = write(dir.path(), "x.ndjson", &doubled);
    let store = Store::memory();
    let r = audiences::events::ingest(
        &store,
        &Space::default(),
        vec![audiences::events::Input::File(p)],
        audiences::events::IngestOptions {
            chunk_rows: 128,
            received_now: Some(END),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!((r.accepted, r.duplicates), (1000, 1000));
    assert!(r.versions.len() >= 7, "{:?}", r.versions);
    assert_eq!(
        r.versions,
        (1..=r.versions.len() as u64).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn files_are_partitioned_by_utc_date_and_sorted_by_event_identity_then_time() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "x.ndjson", &generated(5000, 9));
    let store = Store::memory();
    ingest_files(&store, "default", &[p], &dir.path().join("d")).await;
    let snap = CommitLog::new(&store, &Space::default(), TableName::Events)
        .snapshot()
        .await
        .unwrap();
    assert!(snap.files.len() > 100);
    let mut rows = 0;
    for f in &snap.files {
        let date = f.date.clone().unwrap();
        assert!(f.path.contains(&format!("/date={date}/")));
        let bytes = store
            .get(&audiences::store::keys::Key::from_committed(&f.path))
            .await
            .unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap();
        // (type, event with nulls last, identity_key, timestamp)
        type SortKey = (String, (bool, String), i64, i64);
        let mut prev: Option<SortKey> = None;
        for b in reader {
            let b = b.unwrap();
            let ty = b.column_by_name("type").unwrap().as_string::<i32>();
            let ev = b.column_by_name("event").unwrap().as_string::<i32>();
            let k = b
                .column_by_name("identity_key")
                .unwrap()
                .as_primitive::<Int64Type>();
            let t = b
                .column_by_name("timestamp")
                .unwrap()
                .as_primitive::<TimestampMicrosecondType>();
            for i in 0..b.num_rows() {
                let cur: SortKey = (
                    ty.value(i).to_string(),
                    (
                        ev.is_null(i),
                        if ev.is_valid(i) {
                            ev.value(i).to_string()
                        } else {
                            String::new()
                        },
                    ),
                    k.value(i),
                    t.value(i),
                );
                assert!(
                    prev.as_ref().is_none_or(|p| *p <= cur),
                    "rows out of order in {}",
                    f.path
                );
                let d = chrono::DateTime::from_timestamp_micros(cur.3)
                    .unwrap()
                    .format("%Y-%m-%d")
                    .to_string();
                assert_eq!(d, date);
                prev = Some(cur);
                rows += 1;
            }
        }
    }
    assert_eq!(rows, 5000);
    // Pruning by committed time ranges: a one-day window opens only that day's files.
    let table = audiences::tables::EventsTable::new(&snap);
    use datafusion::prelude::{col, lit};
    let lo = datafusion::common::ScalarValue::TimestampMicrosecond(
        Some(END - 86_400_000_000),
        Some("UTC".into()),
    );
    let kept = table.prune(&[col("timestamp").gt_eq(lit(lo))]);
    assert!(!kept.is_empty() && kept.len() <= 2 * 2, "{}", kept.len());
}

/// Small ingest chunks leave many files per date; compaction merges what identity resolution
/// has read into one sorted file per date, deletes the replaced files (DuckDB over the
/// partition directory counts every event once), and neither the events nor the identity graph
/// change, even with resolutions between chunks.
#[tokio::test(flavor = "multi_thread")]
async fn compaction_merges_small_files_without_changing_events_or_identities() {
    use audiences::events::{IngestOptions, Input};
    let dir = tempfile::tempdir().unwrap();
    let data = generated(24_000, 21);
    let text = String::from_utf8(data).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Reference: one chunk, one file per date.
    let one = Store::memory();
    let p = write(dir.path(), "all.ndjson", text.as_bytes());
    ingest_files(&one, "default", &[p], &dir.path().join("d0")).await;
    audiences::identity::resolve(&one, &Space::default(), &Default::default(), false)
        .await
        .unwrap();
    // Compacted: three parts in chunks of 2,000 rows, identity resolved after the first two.
    let root = dir.path().join("store");
    let many = Store::open(root.to_str().unwrap(), &Default::default()).unwrap();
    let space = Space::default();
    let parts = [&lines[..9_000], &lines[9_000..15_000], &lines[15_000..]];
    for (i, part) in parts.iter().enumerate() {
        let p = write(
            dir.path(),
            &format!("p{i}.ndjson"),
            part.join("\n").as_bytes(),
        );
        let r = audiences::events::ingest(
            &many,
            &space,
            vec![Input::File(p)],
            IngestOptions {
                chunk_rows: 2_000,
                dead_letter: Some(dir.path().join(format!("d{i}"))),
                received_now: Some(END),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(r.rejected, 0);
        if i < 2 {
            audiences::identity::resolve(&many, &space, &Default::default(), false)
                .await
                .unwrap();
        }
    }
    let before = CommitLog::new(&many, &space, TableName::Events)
        .snapshot()
        .await
        .unwrap();
    audiences::identity::resolve(&many, &space, &Default::default(), false)
        .await
        .unwrap();
    let after = CommitLog::new(&many, &space, TableName::Events)
        .snapshot()
        .await
        .unwrap();
    assert!(
        after.files.len() * 3 < before.files.len(),
        "{} files before, {} after",
        before.files.len(),
        after.files.len()
    );
    let mut per_date = std::collections::BTreeMap::new();
    for f in &after.files {
        *per_date.entry(f.date.clone().unwrap()).or_insert(0) += 1;
    }
    assert!(
        per_date
            .values()
            .all(|n| *n < audiences::events::compact::MIN_FILES)
    );
    assert!(after.entries.iter().any(|e| e.operation == "compact"));
    // Replaced files are gone from the directory.
    let on_disk = walk(&root.join("spaces/default/events"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .count();
    assert_eq!(on_disk, after.files.len());
    // Same events, same attribution, same identity graph.
    for q in [
        "SELECT message_id, type, event, CAST(timestamp AS BIGINT) AS ts, profile_id, properties FROM events ORDER BY message_id",
        "SELECT id_type, id_value, profile_id, CAST(first_seen AS BIGINT) AS fs FROM identities ORDER BY id_type, id_value",
        "SELECT entity, profile_id, account_id, key, value FROM traits ORDER BY entity, profile_id, account_id, key",
    ] {
        let a = sql_rows(&one, "default", q).await;
        let b = sql_rows(&many, "default", q).await;
        assert_eq!(a.len(), b.len(), "{q}");
        assert!(a == b, "{q}: results differ");
    }
    let duck = python(
        "import duckdb, sys; print(duckdb.connect().execute(f\"SELECT count(*), count(DISTINCT message_id) FROM read_parquet('{sys.argv[1]}/spaces/default/events/*/*.parquet', union_by_name = true)\").fetchone())",
        &[root.to_str().unwrap()],
    );
    assert_eq!(duck.trim(), "(24000, 24000)");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
