//! Micro-batch refresh: after every refresh, every audience and computed trait equals a full
//! compute of a second store fed the same batches at the same as-of (random definitions of
//! every construct, profile and account level, late events, identity merges across batches,
//! time-only steps, backfill off, edits and deletes); crash points through the real binary;
//! two racing refreshers; the edit lock; preview; the serve loop.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use audiences::compute::refresh::{RefreshOptions, RefreshReport, refresh};
use audiences::events::{IngestOptions, Input};
use audiences::identity::IdentityRules;
use audiences::store::{Space, Store};
use serde_json::json;

use crate::audiences::{
    Rng, random_account_condition, random_condition, random_nested, random_trait,
};
use crate::common::*;

const DAY: i64 = 86_400_000_000;

async fn define(stores: &[&Store], v: serde_json::Value) {
    let f: audiences::lang::definition::DefinitionFile = serde_json::from_value(v).unwrap();
    for s in stores {
        audiences::definitions::create(s, &Space::default(), &f)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", f.definition));
    }
}

async fn ingest_lines(store: &Store, lines: &[&str], received: i64, dir: &std::path::Path) {
    let p = dir.join(format!("b{}.ndjson", uuid::Uuid::new_v4()));
    std::fs::write(&p, lines.join("\n")).unwrap();
    audiences::events::ingest(
        store,
        &Space::default(),
        vec![Input::File(p)],
        IngestOptions {
            dead_letter: Some(dir.join("dead")),
            received_now: Some(received),
            ..Default::default()
        },
    )
    .await
    .expect("ingest");
}

/// Every live key's current result: members, or `id=value` with numbers to 9 digits (sums
/// are added in a different order by a restricted evaluation).
async fn results(store: &Store) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in sql_rows(
        store,
        "default",
        "SELECT audience_key AS k, coalesce(profile_id, account_id) AS who FROM memberships",
    )
    .await
    {
        out.entry(r["k"].as_str().unwrap().into())
            .or_default()
            .insert(r["who"].as_str().unwrap().into());
    }
    for r in sql_rows(
        store,
        "default",
        "SELECT key AS k, coalesce(profile_id, account_id) AS who, value FROM computed_traits",
    )
    .await
    {
        // exact: sums and averages do not depend on the order rows are read in
        let v = r["value"].as_str().unwrap().to_string();
        out.entry(r["k"].as_str().unwrap().into())
            .or_default()
            .insert(format!("{}={v}", r["who"].as_str().unwrap()));
    }
    out
}

fn assert_same(
    got: &BTreeMap<String, BTreeSet<String>>,
    want: &BTreeMap<String, BTreeSet<String>>,
    step: &str,
    texts: &BTreeMap<String, String>,
) {
    let keys: BTreeSet<&String> = got.keys().chain(want.keys()).collect();
    for k in keys {
        let (g, w) = (got.get(k), want.get(k));
        let empty = BTreeSet::new();
        let (g, w) = (g.unwrap_or(&empty), w.unwrap_or(&empty));
        if g != w {
            let extra: Vec<_> = g.difference(w).take(5).collect();
            let missing: Vec<_> = w.difference(g).take(5).collect();
            panic!(
                "{step}: '{k}' ({}) differs from a full compute: extra {extra:?}, missing {missing:?}",
                texts.get(k).map_or("", |s| s.as_str())
            );
        }
    }
}

async fn refresh_at(store: &Store, as_of: i64) -> RefreshReport {
    refresh(
        store,
        &Space::default(),
        &IdentityRules::default(),
        &RefreshOptions::at(as_of),
    )
    .await
    .expect("refresh")
}

#[tokio::test(flavor = "multi_thread")]
async fn refreshes_equal_a_full_compute_after_every_batch_and_time_step() {
    // identity runs write deltas over their checkpoint (not a new checkpoint) at any size
    audiences::identity::persist::set_checkpoint_every(1);
    let dir = tempfile::tempdir().unwrap();
    let text = String::from_utf8(generated(5_000, 29)).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    let mut r = Rng(0x2545F4914F6CDD1D);
    // Random order (events arrive late, identities merge across batches), random batch sizes.
    for i in (1..lines.len()).rev() {
        let j = r.next(i as u64 + 1) as usize;
        lines.swap(i, j);
    }
    let mut cuts: Vec<usize> = (0..3)
        .map(|_| r.next(lines.len() as u64) as usize)
        .collect();
    cuts.extend([0, lines.len() / 2, lines.len()]);
    cuts.sort_unstable();
    cuts.dedup();
    let (a, b) = (Store::memory(), Store::memory());
    let mut texts = BTreeMap::new();
    for i in 0..12 {
        let t = random_condition(&mut r, 2);
        let anon = r.next(4) == 0;
        define(&[&a, &b], json!({"key": format!("a{i}"), "kind": "audience", "definition": t, "include_anonymous": anon})).await;
        texts.insert(format!("a{i}"), t);
    }
    for i in 0..4 {
        let t = random_nested(&mut r);
        define(
            &[&a, &b],
            json!({"key": format!("n{i}"), "kind": "audience", "definition": t}),
        )
        .await;
        texts.insert(format!("n{i}"), t);
    }
    for i in 0..5 {
        let t = random_trait(&mut r);
        define(
            &[&a, &b],
            json!({"key": format!("t{i}"), "kind": "computed_trait", "definition": t}),
        )
        .await;
        texts.insert(format!("t{i}"), t);
    }
    for i in 0..2 {
        let t = random_account_condition(&mut r, 1);
        define(&[&a, &b], json!({"key": format!("acc{i}"), "kind": "audience", "definition": t, "level": "accounts"})).await;
        texts.insert(format!("acc{i}"), t);
    }
    // an account-level computed trait (the events of every linked profile)
    let t = random_trait(&mut r);
    define(
        &[&a, &b],
        json!({"key": "acct", "kind": "computed_trait", "level": "accounts", "definition": t}),
    )
    .await;
    texts.insert("acct".into(), t);
    for (k, t, extra) in [
        ("ref_a", "audience('a0') OR NOT (audience('a1'))", json!({})),
        (
            "ref_t",
            "trait('t0').is_set() AND audience('n0') = false",
            json!({}),
        ),
        (
            "rel",
            "trait('plan').within_last(3 days) OR event('Logged In').within(2 days).count() >= 1",
            json!({}),
        ),
        (
            "fresh_buyers",
            "event('Order Completed').count() >= 1",
            json!({"historical_backfill": false}),
        ),
        (
            "weekly",
            "event('Product Viewed').within(7 days).count() >= 2",
            json!({"schedule": "every 1d"}),
        ),
    ] {
        let mut v = json!({"key": k, "kind": "audience", "definition": t});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        define(&[&a, &b], v).await;
        texts.insert(k.to_string(), t.to_string());
    }
    let profiles = |s: &Store| {
        let s = s.clone();
        async move { count(&s, "default", "SELECT count(*) FROM profiles").await }
    };
    let now = chrono::Utc::now().timestamp_micros();
    let mut as_of = END - 40 * DAY;
    let mut incremental_with_work = 0;
    let mut restricted = 0;
    let mut time_only_changes = 0;
    let mut accounts_incremental = 0;
    for (i, w) in cuts.windows(2).enumerate() {
        let batch = &lines[w[0]..w[1]];
        // the first batches were received before the definitions existed, the later after
        let received = if i < 2 {
            END
        } else {
            now + i as i64 * 3_600_000_000
        };
        ingest_lines(&a, batch, received, dir.path()).await;
        ingest_lines(&b, batch, received, dir.path()).await;
        if i == 2 {
            // an edit and a delete between refreshes
            for s in [&a, &b] {
                let f: audiences::lang::definition::DefinitionFile = serde_json::from_value(
                    json!({"key": "a2", "kind": "audience", "definition": "event('Order Completed').within(20 days).count() >= 1"}),
                )
                .unwrap();
                audiences::definitions::edit(s, &Space::default(), &f)
                    .await
                    .unwrap();
                audiences::definitions::delete(s, &Space::default(), "a3")
                    .await
                    .unwrap();
            }
            texts.insert("a2".into(), "edited".into());
        }
        as_of += (r.next(72) as i64) * 3_600_000_000;
        let rep = refresh_at(&a, as_of).await;
        compute_all_at(&b, as_of).await;
        let n = profiles(&a).await as u64;
        for k in &rep.keys {
            if k.mode == "incremental" && k.affected > 0 {
                incremental_with_work += 1;
                restricted += usize::from(k.affected < n);
                accounts_incremental += usize::from(k.key.starts_with("acc"));
            }
        }
        assert_same(
            &results(&a).await,
            &results(&b).await,
            &format!("batch {i}"),
            &texts,
        );
    }
    // Time alone: windows slide past events.
    for step in [3 * DAY, 20 * DAY, 0] {
        as_of += step;
        let rep = refresh_at(&a, as_of).await;
        assert_eq!(rep.new_event_rows, 0);
        if step == 0 {
            assert_eq!(rep.committed, None, "a repeated refresh changes nothing");
        }
        time_only_changes += rep.keys.iter().filter(|k| k.entered + k.exited > 0).count();
        compute_all_at(&b, as_of).await;
        assert_same(
            &results(&a).await,
            &results(&b).await,
            &format!("time step {step}"),
            &texts,
        );
    }
    assert!(incremental_with_work >= 20, "{incremental_with_work}");
    assert!(restricted >= 10, "{restricted}");
    assert!(time_only_changes >= 3, "{time_only_changes}");
    // account-level keys continue from their basis too (affected counts accounts)
    assert!(accounts_incremental >= 3, "{accounts_incremental}");
}

async fn compute_all_at(store: &Store, as_of: i64) {
    audiences::compute::compute(
        store,
        &Space::default(),
        &IdentityRules::default(),
        as_of,
        &[],
    )
    .await
    .unwrap();
}

/// Of two refreshers racing for the same batch, exactly one commits. With the commit made
/// without put-if-absent (the broken variant), both report success and one's changes vanish:
/// the same check catches it.
#[tokio::test(flavor = "multi_thread")]
async fn two_refreshers_never_both_commit_the_same_batch() {
    async fn race(broken: bool) -> std::result::Result<(), String> {
        let store = generated_store(3_000, 8).await;
        define(&[&store], json!({"key": "buyers", "kind": "audience", "definition": "event('Order Completed').within(30 days).count() >= 1"})).await;
        compute_all_at(&store, END - 10 * DAY).await;
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let run = |store: Store| {
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                let opts = RefreshOptions {
                    as_of: END,
                    before_commit: Some(barrier),
                    unsafe_overwrite_commit: broken,
                    ..Default::default()
                };
                refresh(&store, &Space::default(), &IdentityRules::default(), &opts).await
            })
        };
        let (x, y) = (run(store.clone()), run(store.clone()));
        let results = [x.await.unwrap(), y.await.unwrap()];
        let winners = results.iter().filter(|r| r.is_ok()).count();
        let changes = count(
            &store,
            "default",
            "SELECT count(*) FROM membership_changes WHERE version = 2",
        )
        .await;
        let reported: u64 = results
            .iter()
            .flatten()
            .map(|r| r.keys.iter().map(|k| k.entered + k.exited).sum::<u64>())
            .sum();
        if winners != 1 {
            return Err(format!(
                "{winners} refreshers committed the same batch ({reported} changes reported, {changes} kept)"
            ));
        }
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            if !r.to_string().contains("nothing of it was committed") {
                return Err(format!("unexpected loser error: {r}"));
            }
        }
        if reported != changes as u64 || changes == 0 {
            return Err(format!("{reported} changes reported, {changes} kept"));
        }
        Ok(())
    }
    race(false).await.expect("put-if-absent commit");
    let err = race(true)
        .await
        .expect_err("the broken commit must be caught");
    assert!(err.contains("2 refreshers committed"), "{err}");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}

/// `SELECT` rows through the binary, as JSON objects.
fn sql_json(store: &str, q: &str) -> Vec<serde_json::Value> {
    let out = run_ok(store, &["sql", "--json", q]);
    serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap_or_default()
}

fn members_by_key(store: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in sql_json(
        store,
        "SELECT audience_key AS k, profile_id AS p FROM memberships",
    ) {
        out.entry(r["k"].as_str().unwrap().into())
            .or_default()
            .insert(r["p"].as_str().unwrap().into());
    }
    out
}

/// A store with generated events and the suite's definitions computed at 2025-12-20
/// (`work` holds the generated file).
fn suite_store(work: &std::path::Path, store: &str) {
    let base = work.join("base.ndjson");
    std::fs::write(&base, generated(3000, 31)).unwrap();
    run_ok(store, &["ingest", base.to_str().unwrap()]);
    let root = env!("CARGO_MANIFEST_DIR");
    for f in [
        "revenue_180d",
        "repeat_buyers",
        "q4_lapsed",
        "q7_high_value",
        "funnels/cart_abandoners",
    ] {
        let p = format!("{root}/data/definitions/{f}.json");
        let kind = if f == "revenue_180d" {
            "trait"
        } else {
            "audience"
        };
        run_ok(store, &[kind, "create", &p]);
    }
    run_ok(store, &["compute", "--as-of", "2025-12-20T00:00:00Z"]);
}

/// Delta round `round` of [`suite_store`]'s events (5%, on day `round` + 1 after its end).
fn suite_delta(store: &str, work: &std::path::Path, round: u64) -> std::path::PathBuf {
    let p = work.join(format!("delta{round}.ndjson"));
    let r = round.to_string();
    let args = [
        "generate",
        "--events",
        "3000",
        "--seed",
        "31",
        "--delta",
        "0.05",
        "--delta-round",
        &r,
        "-o",
        p.to_str().unwrap(),
    ];
    let out = run(store, &args, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p
}

/// The Flight `refresh` action of a server started with `--refresh-interval off` keeps the
/// identity graph in memory between refreshes, and the server refreshes nothing by itself: two
/// refreshes through it (new events ingested by another process before each) leave exactly what
/// two one-shot `refresh` processes leave in a copy of the store.
#[test]
fn refreshes_through_the_server_equal_one_shot_refreshes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let (sa, sb) = (a.to_str().unwrap(), b.to_str().unwrap());
    suite_store(dir.path(), sa);
    copy_dir(&a, &b);
    let deltas = [
        suite_delta(sa, dir.path(), 0),
        suite_delta(sa, dir.path(), 1),
    ];
    let as_of = ["2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"];
    let identity_log = || {
        std::fs::read_dir(a.join("spaces/default/identity/_log"))
            .unwrap()
            .count()
    };
    let server = crate::server::start_with(
        sa,
        &[],
        &["--insecure-no-auth", "--refresh-interval", "off"],
        &mut Vec::new(),
    );
    for (d, t) in deltas.iter().zip(as_of) {
        let before = identity_log();
        run_ok(sa, &["ingest", d.to_str().unwrap()]);
        std::thread::sleep(std::time::Duration::from_millis(800));
        assert_eq!(identity_log(), before, "no refresh ran without being asked");
        let out = python(
            r#"
import json, sys
import pyarrow.flight as fl
c = fl.FlightClient('grpc://' + sys.argv[1])
r = list(c.do_action(fl.Action('refresh', json.dumps({'as_of': sys.argv[2]}).encode())))
print(json.dumps(json.loads(r[0].body.to_pybytes())))
"#,
            &[&server.flight, t],
        );
        let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert!(report["new_event_rows"].as_u64().unwrap() > 0, "{report}");
        assert!(
            identity_log() > before,
            "the action resolved the new events"
        );
        run_ok(sb, &["ingest", d.to_str().unwrap()]);
        run_ok(sb, &["refresh", "--as-of", t]);
    }
    drop(server);
    assert_eq!(members_by_key(sa), members_by_key(sb));
    for q in [
        "SELECT id_type, id_value, profile_id, first_message_id FROM identities ORDER BY 1, 2",
        "SELECT profile_id, known FROM profiles ORDER BY 1",
        "SELECT entity, profile_id, account_id, key, value FROM traits ORDER BY 1, 2, 3, 4",
        "SELECT from_profile_id, into_profile_id, message_id FROM profile_merges ORDER BY 1, 2",
        "SELECT audience_key, version, profile_id, change FROM membership_changes ORDER BY 1, 2, 3",
    ] {
        let (x, y) = (sql_json(sa, q), sql_json(sb, q));
        assert!(!x.is_empty(), "{q}");
        assert_eq!(x, y, "{q}");
    }
    // Sums of floats are the same to the bit whatever the order rows were added in.
    let q = "SELECT key, profile_id, value FROM computed_traits ORDER BY 1, 2";
    let (x, y) = (sql_json(sa, q), sql_json(sb, q));
    assert!(!x.is_empty());
    assert_eq!(x, y);
}

/// kill -9 at each point of a refresh: the last committed versions stay intact, and the next
/// refresh produces exactly one new version per changed audience, whose entered/exited
/// changes are exactly the difference to the version before (none lost, none twice), and
/// whose members equal a full compute.
#[test]
fn a_refresh_killed_anywhere_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store");
    let store = store_path.to_str().unwrap();
    suite_store(dir.path(), store);
    let delta = suite_delta(store, dir.path(), 0);
    run_ok(store, &["ingest", delta.to_str().unwrap()]);
    // identity first, so the fault points below are reached in the refresh's own commit
    run_ok(store, &["identity"]);
    let reference = dir.path().join("reference");
    copy_dir(&store_path, &reference);
    let as_of = "2026-01-03T00:00:00Z";
    let before = members_by_key(store);
    let log_len = || {
        std::fs::read_dir(store_path.join("spaces/default/memberships/_log"))
            .unwrap()
            .count()
    };
    let v0 = log_len();
    for point in [
        "refresh_after_state",
        "during_changes",
        "refresh_after_data",
        "refresh_before_commit",
    ] {
        let out = run(
            store,
            &["refresh", "--as-of", as_of],
            &[("AUDIENCES_FAULT", point)],
        );
        assert!(!out.status.success(), "{point}: the process must have died");
        assert_eq!(log_len(), v0, "{point}: nothing committed");
        assert_eq!(
            members_by_key(store),
            before,
            "{point}: last versions intact"
        );
    }
    let out = run(
        store,
        &["refresh", "--as-of", as_of],
        &[("AUDIENCES_FAULT", "refresh_after_commit")],
    );
    assert!(!out.status.success());
    assert_eq!(log_len(), v0 + 1, "killed after the commit: committed once");
    // The next refresh finds nothing left to do: no second version, no repeated changes.
    let out = run(store, &["--json", "refresh", "--as-of", as_of], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json_out(&out)["committed"], serde_json::Value::Null);
    assert_eq!(log_len(), v0 + 1);
    let after = members_by_key(store);
    // Changes of the new versions = the difference of the memberships.
    let mut changed_keys = 0;
    for (k, now) in &after {
        let was = before.get(k).cloned().unwrap_or_default();
        let rows = sql_json(
            store,
            &format!(
                "SELECT profile_id AS p, change AS c, version AS v FROM membership_changes WHERE audience_key = '{k}' AND version > 1"
            ),
        );
        let versions: BTreeSet<i64> = rows.iter().map(|r| r["v"].as_i64().unwrap()).collect();
        assert!(
            versions.len() <= 1,
            "{k}: one new version at most, got {versions:?}"
        );
        let set = |c: &str| -> BTreeSet<String> {
            rows.iter()
                .filter(|r| r["c"] == c)
                .map(|r| r["p"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(
            set("entered"),
            now.difference(&was).cloned().collect(),
            "{k}: entered"
        );
        assert_eq!(
            set("exited"),
            was.difference(now).cloned().collect(),
            "{k}: exited"
        );
        changed_keys += usize::from(!versions.is_empty());
    }
    assert!(changed_keys >= 2, "{changed_keys}");
    // And the members equal a full compute of the same batch.
    let reference = reference.to_str().unwrap();
    run_ok(reference, &["compute", "--as-of", as_of]);
    assert_eq!(members_by_key(reference), after);
}

/// An edit recomputes its audience under a lock: a second edit meanwhile is refused with a
/// clear "locked" error. A preview predicts the size and the entered/exited counts the edit
/// then commits.
#[tokio::test(flavor = "multi_thread")]
async fn edit_is_locked_while_it_recomputes_and_preview_predicts_it() {
    let store = generated_store(4_000, 12).await;
    let space = Space::default();
    let rules = IdentityRules::default();
    define(&[&store], json!({"key": "buyers", "kind": "audience", "definition": "event('Order Completed').within(30 days).count() >= 1"})).await;
    compute_all_at(&store, END).await;
    let edited: audiences::lang::definition::DefinitionFile = serde_json::from_value(
        json!({"key": "buyers", "kind": "audience", "definition": "event('Order Completed').within(60 days).count() >= 2"}),
    )
    .unwrap();
    let p = audiences::compute::lifecycle::preview(&store, &space, &edited, END)
        .await
        .unwrap();
    assert!(p.existing);
    // another edit holds the lock
    let held = audiences::compute::lifecycle::lock(&store, &space, "buyers", 2)
        .await
        .unwrap();
    let err = audiences::compute::lifecycle::edit(&store, &space, &rules, &edited, END)
        .await
        .expect_err("locked");
    assert!(err.to_string().contains("'buyers' is locked"), "{err}");
    assert_eq!(err.exit_code(), 1);
    // the refused edit changed nothing
    let defs = audiences::definitions::live(&store, &space).await.unwrap();
    assert_eq!(defs["buyers"].version, 1);
    audiences::compute::lifecycle::unlock(&store, &space, &held)
        .await
        .unwrap();
    let (v, reports) = audiences::compute::lifecycle::edit(&store, &space, &rules, &edited, END)
        .await
        .unwrap();
    assert_eq!(v, 2);
    let r = reports.iter().find(|r| r.key == "buyers").unwrap();
    assert_eq!(
        (r.size, r.entered, r.exited),
        (p.size, p.would_enter, p.would_exit)
    );
    assert!(p.would_enter + p.would_exit > 0);
    // the lock is released: a further edit goes through
    assert!(
        audiences::compute::lifecycle::current_lock(&store, &space, "buyers")
            .await
            .unwrap()
            .is_none()
    );
    // and the sample is real members
    let members = sql_rows(
        &store,
        "default",
        "SELECT profile_id FROM memberships WHERE audience_key = 'buyers'",
    )
    .await;
    let ids: BTreeSet<&str> = members
        .iter()
        .map(|r| r["profile_id"].as_str().unwrap())
        .collect();
    assert!(p.sample.iter().all(|s| ids.contains(s.as_str())));
    assert_eq!(p.sample.len(), 10.min(ids.len()));
}

/// `serve` refreshes on its interval: realtime definitions each time, a batch definition only
/// when its schedule is due.
#[test]
fn serve_refreshes_realtime_definitions_and_batch_ones_on_schedule() {
    let (dir, store) = ingested_dir(1500, 3);
    let store = store.as_str();
    let rt = dir.path().join("rt.json");
    std::fs::write(&rt, r#"{"key": "viewers", "kind": "audience", "definition": "event('Product Viewed').count() >= 1"}"#).unwrap();
    let batch = dir.path().join("batch.json");
    std::fs::write(&batch, r#"{"key": "daily", "kind": "audience", "definition": "event('Order Completed').count() >= 1", "schedule": "every 1d"}"#).unwrap();
    run_ok(store, &["audience", "create", rt.to_str().unwrap()]);
    run_ok(store, &["audience", "create", batch.to_str().unwrap()]);
    let out = run(
        store,
        &[
            "--json",
            "serve",
            "--refresh-interval",
            "200ms",
            "--refreshes",
            "3",
            "--flight",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), 3);
    let keys = |r: &serde_json::Value| -> Vec<String> {
        r["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["key"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(keys(&reports[0]), ["daily", "viewers"]);
    assert!(reports[0]["committed"].is_u64());
    for r in &reports[1..] {
        assert_eq!(keys(r), ["viewers"], "the daily audience is not due again");
    }
    let n = sql_json(
        store,
        "SELECT count(*) AS n FROM memberships WHERE audience_key = 'daily'",
    );
    assert!(n[0]["n"].as_i64().unwrap() > 0);
}
