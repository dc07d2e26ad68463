//! Destinations: a scripted webhook server on loopback (200, 429 with Retry-After, 500/503,
//! hangs past the timeout, resets after reading the body, permanent 400) with a fast clock so
//! hours of retries run in seconds; the rate limit measured per second; backfill on connect,
//! fan-out per email, account group/identify modes, file sinks read back (DuckDB for Parquet),
//! the Flight sink's cursor; crash and restart of the real binary at every sync fault point.
//!
//! References are independent of the sync engine: expected calls come from SQL over
//! `memberships` and `identities`, and the destination's final state is rebuilt by applying the
//! calls it acknowledged, in arrival order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use audiences::destinations::deliver::{Clock, ScaledClock, SystemClock};
use audiences::destinations::{SyncOptions, receiver::Receiver, sync};
use audiences::events::{IngestOptions, Input};
use audiences::identity::IdentityRules;
use audiences::store::{Space, Store};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::common::*;

const DAY: i64 = 86_400_000_000;

/// What the scripted server does with one request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Act {
    Ok,
    Status(u16, Option<u64>),
    Hang,
    Reset,
}

/// One request the scripted server saw.
#[derive(Debug, Clone)]
struct Seen {
    at: f64,
    key: String,
    body: Value,
    act: Act,
    /// Clock time when the answer was sent (429s).
    answered: f64,
}

type Script = Arc<dyn Fn(usize, u32) -> Act + Send + Sync>;

/// A webhook server speaking just enough HTTP/1.1: `script(n, attempt)` decides per request,
/// `n` being the index of the request's idempotency key among distinct keys in arrival order.
struct Scripted {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

async fn scripted(clock: Arc<dyn Clock>, script: Script) -> Scripted {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen: Arc<Mutex<Vec<Seen>>> = Default::default();
    let keys: Arc<Mutex<HashMap<String, (usize, u32)>>> = Default::default();
    let s2 = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let (seen, keys, clock, script) = (
                Arc::clone(&s2),
                Arc::clone(&keys),
                Arc::clone(&clock),
                Arc::clone(&script),
            );
            tokio::spawn(async move {
                let mut r = BufReader::new(sock);
                loop {
                    let mut len = 0usize;
                    let mut key = String::new();
                    let mut line = String::new();
                    let mut first = true;
                    loop {
                        line.clear();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if first && line.trim().is_empty() {
                            continue;
                        }
                        first = false;
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some((h, v)) = l.split_once(':') {
                            match h.to_ascii_lowercase().as_str() {
                                "content-length" => len = v.trim().parse().unwrap_or(0),
                                "idempotency-key" => key = v.trim().to_string(),
                                _ => {}
                            }
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let at = clock.now();
                    let act = {
                        let mut k = keys.lock().unwrap();
                        let n = k.len();
                        let e = k.entry(key.clone()).or_insert((n, 0));
                        e.1 += 1;
                        script(e.0, e.1)
                    };
                    let idx = {
                        let mut s = seen.lock().unwrap();
                        s.push(Seen {
                            at,
                            key: key.clone(),
                            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                            act,
                            answered: at,
                        });
                        s.len() - 1
                    };
                    let (code, ra) = match act {
                        Act::Ok => (200, None),
                        Act::Status(c, ra) => (c, ra),
                        Act::Hang => {
                            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
                            return;
                        }
                        Act::Reset => return, // read the body, close without an answer
                    };
                    let text = format!("scripted {code}");
                    let extra = ra
                        .map(|s| format!("retry-after: {s}\r\n"))
                        .unwrap_or_default();
                    let resp = format!(
                        "HTTP/1.1 {code} X\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n{extra}\r\n{text}",
                        text.len()
                    );
                    seen.lock().unwrap()[idx].answered = clock.now();
                    if r.get_mut().write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Scripted { url, seen }
}

/// A store with generated events, resolved identities and `defs` computed at END.
async fn store_with(events: u64, defs: &[Value]) -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path().join("store").to_str().unwrap(),
        &Default::default(),
    )
    .unwrap();
    let p = dir.path().join("e.ndjson");
    std::fs::write(&p, generated(events, 7)).unwrap();
    ingest_files(&store, "default", &[p], &dir.path().join("dead")).await;
    for d in defs {
        let f = serde_json::from_value(d.clone()).unwrap();
        audiences::definitions::create(&store, &Space::default(), &f)
            .await
            .unwrap();
    }
    audiences::compute::compute(
        &store,
        &Space::default(),
        &IdentityRules::default(),
        END,
        &[],
    )
    .await
    .unwrap();
    (store, dir)
}

/// Ingest the generated delta of round `round` and refresh at END + (round + 1) days.
async fn delta_and_refresh(store: &Store, dir: &std::path::Path, events: u64, round: u64) {
    let mut out = Vec::new();
    audiences::generate::generate(
        &audiences::generate::GenConfig {
            events,
            seed: 7,
            end: END,
            delta: Some(0.05),
            delta_round: round,
        },
        &mut out,
    )
    .unwrap();
    let p = dir.join(format!("delta{round}.ndjson"));
    std::fs::write(&p, out).unwrap();
    audiences::events::ingest(
        store,
        &Space::default(),
        vec![Input::File(p)],
        IngestOptions {
            dead_letter: Some(dir.join("dead")),
            received_now: Some(END + (round as i64 + 1) * DAY),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let r = audiences::compute::refresh::refresh(
        store,
        &Space::default(),
        &IdentityRules::default(),
        &audiences::compute::refresh::RefreshOptions::at(END + (round as i64 + 1) * DAY),
    )
    .await
    .unwrap();
    assert!(r.committed.is_some(), "the delta changes something");
}

/// Set the destinations of audience `key`.
async fn connect(store: &Store, key: &str, dests: Value) {
    let defs = audiences::definitions::live(store, &Space::default())
        .await
        .unwrap();
    let before = defs[key].version;
    let file = audiences::lang::definition::DefinitionFile {
        destinations: Some(serde_json::from_value(dests).unwrap()),
        ..defs[key].file.clone()
    };
    audiences::definitions::edit(store, &Space::default(), &file)
        .await
        .unwrap();
    let after = audiences::definitions::live(store, &Space::default())
        .await
        .unwrap()[key]
        .version;
    assert_eq!(
        before, after,
        "a destinations edit keeps the definition version"
    );
}

/// Expected (member, email) pairs of audience `key` now, from SQL (the independent reference).
async fn member_emails(store: &Store, key: &str) -> BTreeSet<(String, String)> {
    sql_rows(
        store,
        "default",
        &format!(
            "SELECT m.profile_id AS p, i.id_value AS e FROM memberships m JOIN identities i \
             ON i.profile_id = m.profile_id AND i.id_type = 'email' WHERE m.audience_key = '{key}'"
        ),
    )
    .await
    .into_iter()
    .map(|r| {
        (
            r["p"].as_str().unwrap().to_string(),
            r["e"].as_str().unwrap().to_string(),
        )
    })
    .collect()
}

/// Apply identify calls in order: email → in the audience.
fn apply_identifies<'a>(
    bodies: impl Iterator<Item = &'a Value>,
    key: &str,
) -> BTreeMap<String, bool> {
    let mut state = BTreeMap::new();
    for b in bodies {
        let msgs: Vec<&Value> = match b.get("batch") {
            Some(v) => v.as_array().unwrap().iter().collect(),
            None => vec![b],
        };
        for m in msgs {
            assert_eq!(m["type"], "identify");
            state.insert(
                m["traits"]["email"].as_str().unwrap().to_string(),
                m["traits"][key].as_bool().unwrap(),
            );
        }
    }
    state
}

fn members_in(state: &BTreeMap<String, bool>) -> BTreeSet<String> {
    state
        .iter()
        .filter(|(_, v)| **v)
        .map(|(k, _)| k.clone())
        .collect()
}

const REPEAT: &str = "buyers";

fn buyers() -> Value {
    json!({"key": REPEAT, "kind": "audience",
           "definition": "event('Order Completed').within(30 days).count() >= 1"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_backoff_retry_after_and_dead_letters_over_hours_of_clock_time() {
    let (store, dir) = store_with(20_000, &[buyers()]).await;
    // 1 real second = 1 clock hour: the 4 h retry period of an always-503 takes ~4 s.
    let clock: Arc<dyn Clock> = Arc::new(ScaledClock::new(3600.0));
    let script: Script = Arc::new(|n, attempt| match (n, attempt) {
        (3, _) => Act::Status(503, None), // never recovers: retries exhausted
        (5, _) | (11, _) => Act::Status(400, None), // permanent
        (n, 1) if n % 7 == 1 => Act::Status(429, Some(600)),
        (n, 1) if n % 4 == 2 => Act::Status(500, None),
        (n, 2) if n % 4 == 2 => Act::Status(503, None),
        (n, 1) if n % 13 == 0 => Act::Hang,
        (n, 1) if n % 9 == 4 => Act::Reset,
        (n, 1) if n % 10 == 8 => Act::Status(429, None),
        _ => Act::Ok,
    });
    let server = scripted(Arc::clone(&clock), script).await;
    connect(
        &store,
        REPEAT,
        json!([{"name": "crm", "kind": "webhook", "url": server.url, "id_type": "email",
                "concurrency": 1, "timeout": "300ms", "rate_limit": {"per_second": 1000, "burst": 5},
                "headers": {"Authorization": "Bearer top-secret"}}]),
    )
    .await;
    let opts = SyncOptions {
        clock: Arc::clone(&clock),
        audiences: None,
    };
    let r = sync(&store, &Space::default(), &opts).await.unwrap();
    assert_eq!(r.len(), 1);
    assert!(r[0].error.is_none(), "{:?}", r[0]);
    let expected = member_emails(&store, REPEAT).await;
    assert!(
        expected.len() > 20,
        "a meaningful audience: {}",
        expected.len()
    );

    // A second step: the refresh's changes.
    delta_and_refresh(&store, dir.path(), 20_000, 0).await;
    let r2 = sync(&store, &Space::default(), &opts).await.unwrap();
    assert!(r2[0].error.is_none(), "{:?}", r2[0]);
    let seen = server.seen.lock().unwrap().clone();

    // Dead letters: exactly the scripted ones, with their reasons.
    let dead = sql_rows(
        &store,
        "default",
        "SELECT idempotency_key AS k, reason, id_value FROM dead_letters",
    )
    .await;
    let mut order: Vec<String> = Vec::new();
    for s in &seen {
        if !order.contains(&s.key) {
            order.push(s.key.clone());
        }
    }
    let dead_keys: BTreeMap<String, String> = dead
        .iter()
        .map(|d| {
            (
                d["k"].as_str().unwrap().to_string(),
                d["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        dead_keys.keys().cloned().collect::<BTreeSet<_>>(),
        [3usize, 5, 11]
            .iter()
            .map(|&i| order[i].clone())
            .collect::<BTreeSet<_>>()
    );
    assert!(
        dead_keys[&order[3]].contains("retries exhausted") && dead_keys[&order[3]].contains("503"),
        "{}",
        dead_keys[&order[3]]
    );
    assert!(
        dead_keys[&order[5]].contains("HTTP 400"),
        "{}",
        dead_keys[&order[5]]
    );
    // The always-503 key was tried for the whole retry period and no longer.
    let tries: Vec<f64> = seen
        .iter()
        .filter(|s| s.key == order[3])
        .map(|s| s.at)
        .collect();
    let span = tries.last().unwrap() - tries[0];
    assert!(
        span > 3.0 * 3600.0 && span <= 4.0 * 3600.0 + 60.0, // (clock read at both ends)
        "retried over {span} s"
    );
    assert!(tries.len() >= 10, "{} attempts", tries.len());

    // No request before Retry-After (concurrency 1: the next request is the one that waited).
    for (i, s) in seen.iter().enumerate() {
        if let Act::Status(429, Some(ra)) = s.act
            && let Some(next) = seen.get(i + 1)
        {
            assert!(
                next.at >= s.answered + ra as f64 - 1.0,
                "request {} s after a 429 asking for {ra} s",
                next.at - s.answered
            );
        }
    }
    // Every hang, reset and 5xx was retried with the same key and body.
    for s in &seen {
        if s.act != Act::Ok && !dead_keys.contains_key(&s.key) {
            let ok = seen
                .iter()
                .find(|o| o.key == s.key && o.act == Act::Ok)
                .expect("acknowledged later");
            assert_eq!(ok.body, s.body);
        }
    }

    // Final destination state = final membership, but for the dead-lettered emails.
    let dead_emails: BTreeSet<String> = dead
        .iter()
        .map(|d| d["id_value"].as_str().unwrap().to_string())
        .collect();
    let state = apply_identifies(
        seen.iter().filter(|s| s.act == Act::Ok).map(|s| &s.body),
        REPEAT,
    );
    let want: BTreeSet<String> = member_emails(&store, REPEAT)
        .await
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| !dead_emails.contains(e))
        .collect();
    let got: BTreeSet<String> = members_in(&state)
        .into_iter()
        .filter(|e| !dead_emails.contains(e))
        .collect();
    assert_eq!(got, want);
    // order per email under retries: acknowledged versions never go back
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for s in seen.iter().filter(|s| s.act == Act::Ok) {
        let e = s.body["traits"]["email"].as_str().unwrap().to_string();
        let v = s.body["context"]["personas"]["version"].as_u64().unwrap();
        assert!(
            last.get(&e).is_none_or(|p| *p <= v),
            "{e}: version {v} after a later one"
        );
        last.insert(e, v);
    }
    assert!(
        last.values().any(|v| *v == 2),
        "the second step sent changes"
    );
    // and every expected message ended acknowledged or dead-lettered
    let acked: BTreeSet<String> = seen
        .iter()
        .filter(|s| s.act == Act::Ok)
        .map(|s| s.key.clone())
        .collect();
    let all: BTreeSet<String> = seen.iter().map(|s| s.key.clone()).collect();
    for k in &all {
        assert!(
            acked.contains(k) || dead_keys.contains_key(k),
            "key {k} neither acked nor dead"
        );
    }

    // Status: cursor at the current version, counters, no secret anywhere.
    let st = audiences::destinations::status(&store, &Space::default())
        .await
        .unwrap();
    assert_eq!(st[0].cursor_version, st[0].current_version);
    assert_eq!(st[0].lag_versions, 0);
    assert_eq!(st[0].dead_lettered, 3);
    assert!(st[0].retried >= 10);
    let cursor = std::fs::read_to_string(
        dir.path()
            .join("store/spaces/default/_destinations/buyers/crm.json"),
    )
    .unwrap();
    assert!(!cursor.contains("top-secret"));
    let shown = run_ok(
        dir.path().join("store").to_str().unwrap(),
        &["audience", "show", REPEAT],
    );
    assert!(
        !shown.contains("top-secret") && shown.contains("<redacted>"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_in_every_second_and_retry_after_pauses_everyone() {
    let (store, _dir) = store_with(20_000, &[buyers()]).await;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let script: Script = Arc::new(|n, attempt| match (n, attempt) {
        (30, 1) => Act::Status(429, Some(1)),
        _ => Act::Ok,
    });
    let server = scripted(Arc::clone(&clock), script).await;
    connect(
        &store,
        REPEAT,
        json!([{"name": "limited", "kind": "webhook", "url": server.url, "id_type": "email",
                "concurrency": 4, "rate_limit": {"per_second": 40, "burst": 1}}]),
    )
    .await;
    let r = sync(&store, &Space::default(), &SyncOptions::default())
        .await
        .unwrap();
    assert!(r[0].error.is_none() && r[0].sent > 100, "{:?}", r[0]);
    let seen = server.seen.lock().unwrap().clone();
    let times: Vec<f64> = seen.iter().map(|s| s.at).collect();
    // any one-second window
    let mut worst = 0;
    for (i, t) in times.iter().enumerate() {
        let n = times[i..].iter().take_while(|u| **u < t + 1.0).count();
        worst = worst.max(n);
    }
    assert!(
        worst as f64 <= 40.0 * 1.1,
        "{worst} requests in one second (limit 40/s)"
    );
    let throttled = seen
        .iter()
        .find(|s| s.act == Act::Status(429, Some(1)))
        .unwrap();
    let early: Vec<f64> = times
        .iter()
        .filter(|t| **t > throttled.answered + 0.05 && **t < throttled.answered + 1.0)
        .map(|t| t - throttled.answered)
        .collect();
    assert!(
        early.is_empty(),
        "requests {early:?} s after a 429 with Retry-After: 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_on_connect_changes_after_and_every_sink_kind() {
    let accounts = json!({"key": "biz_quiet", "kind": "audience", "level": "accounts",
        "definition": "trait('plan') = 'business' AND ALL NOT (event('Logged In').within(30 days).count() >= 1)"});
    let (store, dir) = store_with(20_000, &[buyers(), accounts]).await;
    let rx = Receiver::start(([127, 0, 0, 1], 0).into(), true, false)
        .await
        .unwrap();
    let url = |p: &str| format!("{}/{p}", rx.url());
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    connect(
        &store,
        REPEAT,
        json!([
            {"name": "crm", "kind": "webhook", "url": url("crm"), "id_type": "email", "batch_size": 7},
            {"name": "events", "kind": "webhook", "url": url("events"), "mode": "track", "id_type": "user_id"},
            {"name": "ads", "kind": "webhook", "url": url("ads"), "mode": "list", "id_type": "email", "batch_size": 50},
            {"name": "lake", "kind": "file", "url": format!("file://{}", files.display()), "format": "parquet", "id_type": "email"},
            {"name": "nd", "kind": "file", "id_type": "email"},
            {"name": "pull", "kind": "flight"}
        ]),
    )
    .await;
    connect(
        &store,
        "biz_quiet",
        json!([{"name": "sales", "kind": "webhook", "url": url("sales"), "mode": ["group", "identify"], "id_type": "user_id"}]),
    )
    .await;
    let space = Space::default();
    let r = sync(&store, &space, &SyncOptions::default()).await.unwrap();
    assert!(r.iter().all(|r| r.error.is_none()), "{r:?}");
    let calls = rx.calls();
    let on = |p: &str| {
        calls
            .iter()
            .filter(|c| c.path == format!("/hook/{p}"))
            .map(|c| c.body.clone())
            .collect::<Vec<_>>()
    };

    // Backfill: one identify per (member, email), batched by 7; fan-out per email.
    let expected = member_emails(&store, REPEAT).await;
    let crm = on("crm");
    assert_eq!(crm.len(), expected.len().div_ceil(7));
    let state = apply_identifies(crm.iter(), REPEAT);
    assert_eq!(
        members_in(&state),
        expected.iter().map(|(_, e)| e.clone()).collect()
    );
    let multi = expected
        .iter()
        .fold(BTreeMap::<&str, usize>::new(), |mut m, (p, _)| {
            *m.entry(p).or_default() += 1;
            m
        });
    assert!(
        multi.values().any(|n| *n > 1),
        "some member has several emails (fan-out)"
    );
    // track: Audience Entered per user id
    let users: BTreeSet<String> = sql_rows(&store, "default", &format!(
        "SELECT i.id_value AS u FROM memberships m JOIN identities i ON i.profile_id = m.profile_id AND i.id_type = 'user_id' WHERE m.audience_key = '{REPEAT}'")).await
        .into_iter().map(|r| r["u"].as_str().unwrap().to_string()).collect();
    let tracked: BTreeSet<String> = on("events")
        .iter()
        .map(|b| {
            assert_eq!(
                (
                    b["event"].as_str(),
                    b["properties"]["audience_key"].as_str(),
                    b["properties"][REPEAT].as_bool()
                ),
                (Some("Audience Entered"), Some(REPEAT), Some(true))
            );
            b["userId"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(tracked, users);
    // list: adds only, in batches of 50
    let adds: BTreeSet<String> = on("ads")
        .iter()
        .flat_map(|b| {
            b["add"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(adds, expected.iter().map(|(_, e)| e.clone()).collect());
    // accounts: a group call per member account, identify per user of its profiles
    let accts: BTreeSet<String> = sql_rows(
        &store,
        "default",
        "SELECT account_id AS a FROM memberships WHERE audience_key = 'biz_quiet'",
    )
    .await
    .into_iter()
    .map(|r| r["a"].as_str().unwrap().to_string())
    .collect();
    assert!(!accts.is_empty());
    let sales = on("sales");
    let groups: BTreeSet<String> = sales
        .iter()
        .filter(|b| b["type"] == "group")
        .map(|b| b["groupId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(groups, accts);
    let linked_users: BTreeSet<String> = sql_rows(&store, "default", "SELECT DISTINCT i.id_value AS u FROM memberships m JOIN account_links l ON l.account_id = m.account_id JOIN identities i ON i.profile_id = l.profile_id AND i.id_type = 'user_id' WHERE m.audience_key = 'biz_quiet'").await
        .into_iter().map(|r| r["u"].as_str().unwrap().to_string()).collect();
    let identified: BTreeSet<String> = sales
        .iter()
        .filter(|b| b["type"] == "identify")
        .map(|b| b["userId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(identified, linked_users);

    // Changes after a refresh: only the changes, and the destination state follows membership.
    delta_and_refresh(&store, dir.path(), 20_000, 0).await;
    let before = rx.calls().len();
    let r = sync(&store, &space, &SyncOptions::default()).await.unwrap();
    assert!(
        r.iter().all(|r| r.error.is_none() && r.backfills == 0),
        "{r:?}"
    );
    let calls = rx.calls();
    let crm_all: Vec<Value> = calls
        .iter()
        .filter(|c| c.path == "/hook/crm")
        .map(|c| c.body.clone())
        .collect();
    let now_expected = member_emails(&store, REPEAT).await;
    assert_eq!(
        members_in(&apply_identifies(crm_all.iter(), REPEAT)),
        now_expected.iter().map(|(_, e)| e.clone()).collect()
    );
    let new_calls = calls.len() - before;
    assert!(
        new_calls > 0 && new_calls < before,
        "{new_calls} calls for the changes"
    );

    // A destination connected later gets the whole current membership; the others nothing new.
    let mut dests: Vec<Value> = serde_json::from_value(
        serde_json::to_value(
            &audiences::definitions::live(&store, &space).await.unwrap()[REPEAT]
                .file
                .destinations,
        )
        .unwrap(),
    )
    .unwrap();
    dests.push(json!({"name": "late", "kind": "webhook", "url": url("late"), "id_type": "email"}));
    connect(&store, REPEAT, Value::Array(dests)).await;
    let before = rx.calls().len();
    sync(&store, &space, &SyncOptions::default()).await.unwrap();
    let calls = rx.calls();
    assert!(calls[before..].iter().all(|c| c.path == "/hook/late"));
    assert_eq!(calls[before..].len(), now_expected.len());
    assert_eq!(
        members_in(&apply_identifies(
            calls[before..].iter().map(|c| &c.body),
            REPEAT
        )),
        now_expected.iter().map(|(_, e)| e.clone()).collect()
    );

    // File sinks: NDJSON in the store, Parquet elsewhere, read back (DuckDB for Parquet).
    let nd_dir = dir
        .path()
        .join("store/spaces/default/destinations/buyers/nd");
    let mut nd_state = BTreeMap::new();
    let mut names: Vec<_> = std::fs::read_dir(&nd_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "a backfill file and a changes file");
    for p in &names {
        for line in std::fs::read_to_string(p).unwrap().lines() {
            let m: Value = serde_json::from_str(line).unwrap();
            nd_state.insert(
                m["traits"]["email"].as_str().unwrap().to_string(),
                m["traits"][REPEAT].as_bool().unwrap(),
            );
        }
    }
    assert_eq!(
        members_in(&nd_state),
        now_expected.iter().map(|(_, e)| e.clone()).collect()
    );
    let out = python(
        "import duckdb,sys,json\n\
         r = duckdb.sql(f\"SELECT id_value, arg_max(change, version) AS last FROM read_parquet('{sys.argv[1]}/**/*.parquet') GROUP BY id_value\").fetchall()\n\
         print(json.dumps(sorted(v for v, c in r if c == 'entered')))",
        &[files.to_str().unwrap()],
    );
    let via_duckdb: BTreeSet<String> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        via_duckdb,
        now_expected.iter().map(|(_, e)| e.clone()).collect()
    );

    // Flight sink: nothing pushed; the range starts at 0 (backfill) until acknowledged.
    let (from, latest) =
        audiences::destinations::sync::flight_range(&store, &space, REPEAT, "pull")
            .await
            .unwrap()
            .unwrap();
    assert_eq!((from, latest.version), (0, 2));
    audiences::destinations::sync::acknowledge(&store, &space, REPEAT, "pull", 2)
        .await
        .unwrap();
    let (from, _) = audiences::destinations::sync::flight_range(&store, &space, REPEAT, "pull")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(from, 2);
    assert!(
        audiences::destinations::sync::acknowledge(&store, &space, REPEAT, "pull", 9)
            .await
            .is_err()
    );
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_killed_at_any_point_delivers_everything_at_least_once_on_restart() {
    let (store, dir) = store_with(20_000, &[buyers()]).await;
    let root = dir.path().join("store");
    let root = root.to_str().unwrap();
    let rx = Receiver::start(([127, 0, 0, 1], 0).into(), true, false)
        .await
        .unwrap();
    let expected = member_emails(&store, REPEAT).await;
    let points = [
        "sync_mid_step",
        "sync_after_checkpoint",
        "sync_before_cursor",
        "sync_after_cursor",
    ];
    let mut dests: Vec<Value> = Vec::new();
    for p in points {
        // connected one at a time, so each fault run has exactly one destination to sync
        dests.push(json!({"name": p.replace('_', "-"), "kind": "webhook", "url": format!("{}/{p}", rx.url()),
                         "id_type": "email", "concurrency": 2,
                         "rate_limit": {"per_second": (expected.len() as f64 / 3.0).max(10.0), "burst": 1}}));
        connect(&store, REPEAT, Value::Array(dests.clone())).await;
        let out = run(root, &["sync", REPEAT], &[("AUDIENCES_FAULT", p)]);
        assert!(!out.status.success(), "{p}: the fault point was reached");
        let out = run(root, &["--json", "sync", REPEAT], &[]);
        assert!(
            out.status.success(),
            "{p}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let st = audiences::destinations::status(&store, &Space::default())
        .await
        .unwrap();
    for p in points {
        let calls: Vec<_> = rx
            .calls()
            .into_iter()
            .filter(|c| c.path == format!("/hook/{p}"))
            .collect();
        // duplicates are effective: same key, same body
        let mut by_key: HashMap<String, Value> = HashMap::new();
        for c in &calls {
            let k = c.idempotency_key.clone().unwrap();
            if let Some(b) = by_key.get(&k) {
                assert_eq!(b, &c.body, "{p}: a repeat with another body");
            }
            by_key.insert(k, c.body.clone());
        }
        let emails: BTreeSet<String> = by_key
            .values()
            .map(|b| b["traits"]["email"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            emails,
            expected.iter().map(|(_, e)| e.clone()).collect(),
            "{p}: everything delivered"
        );
        assert_eq!(by_key.len(), expected.len(), "{p}: one key per message");
        let s = st
            .iter()
            .find(|s| s.destination == p.replace('_', "-"))
            .unwrap();
        assert_eq!(
            (s.cursor_version, s.lag_versions, s.pending.is_none()),
            (1, 0, true),
            "{p}"
        );
    }
    rx.stop().await;
}
