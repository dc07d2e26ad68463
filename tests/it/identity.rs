//! Identity resolution through the real pipeline (ingest → commit → resolve → tables):
//! hand-written scenarios with expected profiles, batch-split invariance, and agreement with a
//! row-at-a-time reference implementation written here.

use std::collections::{BTreeMap, BTreeSet};

use audiences::identity::{IdentityRules, lookup};
use audiences::store::{Space, Store};
use serde_json::{Value, json};

use crate::common::*;

/// Ingest messages (as one commit) into a memory store.
async fn ingest_msgs(store: &Store, msgs: &[Value]) {
    let dir = tempfile::tempdir().unwrap();
    let text: String = msgs.iter().map(|m| m.to_string() + "\n").collect();
    let p = dir.path().join("m.ndjson");
    std::fs::write(&p, text).unwrap();
    let r = ingest_files(store, "default", &[p], &dir.path().join("d")).await;
    assert_eq!(r.rejected, 0);
}

async fn resolve(store: &Store) {
    audiences::identity::resolve(store, &Space::default(), &IdentityRules::default(), false)
        .await
        .unwrap();
}

async fn profile_of(store: &Store, t: &str, v: &str) -> Option<lookup::ProfileView> {
    lookup::profile(store, &Space::default(), t, v)
        .await
        .unwrap()
}

fn t(day: u32) -> String {
    format!("2025-12-{day:02}T00:00:00Z")
}

fn msg(id: &str, day: u32, kind: &str, fields: Value) -> Value {
    let mut m = json!({"type": kind, "messageId": id, "timestamp": t(day)});
    if kind == "track" {
        m["event"] = json!("E");
    }
    for (k, v) in fields.as_object().unwrap() {
        m[k] = v.clone();
    }
    m
}

#[tokio::test(flavor = "multi_thread")]
async fn hand_written_scenarios() {
    let store = Store::memory();
    ingest_msgs(
        &store,
        &[
            // anonymous, then identified: one profile
            msg("s1", 1, "page", json!({"anonymousId": "a1"})),
            msg("s2", 2, "identify", json!({"anonymousId": "a1", "userId": "u1", "traits": {"email": "one@x.com", "plan": "free"}})),
            // two devices, then login on both: merged into the older profile
            msg("d1", 1, "track", json!({"anonymousId": "d-a"})),
            msg("d2", 2, "track", json!({"anonymousId": "d-b"})),
            msg("d3", 3, "track", json!({"anonymousId": "d-a", "userId": "u2"})),
            msg("d4", 4, "track", json!({"anonymousId": "d-b", "userId": "u2"})),
            // shared device, user_id limit 1: no merge, the anonymous id stays with the first user
            msg("h1", 1, "track", json!({"anonymousId": "shared", "userId": "u3"})),
            msg("h2", 2, "track", json!({"anonymousId": "shared", "userId": "u4"})),
            // blocked values link nothing
            msg("b1", 1, "identify", json!({"userId": "u5", "traits": {"email": "null"}})),
            msg("b2", 2, "identify", json!({"userId": "u6", "traits": {"email": "null"}})),
            msg("b3", 3, "track", json!({"userId": "0000", "anonymousId": "b-anon"})),
            msg("b4", 3, "track", json!({"userId": "anonymous", "anonymousId": "b-anon2"})),
            // email in traits vs in context.traits
            msg("e1", 1, "identify", json!({"userId": "u7", "traits": {"email": "seven@x.com"}})),
            msg("e2", 2, "track", json!({"anonymousId": "e-anon", "context": {"traits": {"email": "seven@x.com"}}})),
            // context.externalIds
            msg("x1", 1, "track", json!({"anonymousId": "x-anon", "context": {"externalIds": [{"id": "ga-9", "type": "ga_client_id", "collection": "users", "encoding": "none"}]}})),
            msg("x2", 2, "track", json!({"userId": "u8", "context": {"externalIds": [{"id": "ga-9", "type": "ga_client_id", "collection": "users", "encoding": "none"}]}})),
            // alias
            msg("l1", 1, "page", json!({"anonymousId": "old-id"})),
            msg("l2", 2, "alias", json!({"userId": "u9", "previousId": "old-id"})),
            // accounts: u1 in two accounts; account traits latest wins
            msg("g1", 5, "group", json!({"userId": "u1", "groupId": "acct-1", "traits": {"plan": "pro"}})),
            msg("g2", 6, "group", json!({"userId": "u1", "groupId": "acct-2", "traits": {"plan": "free"}})),
            msg("g3", 7, "group", json!({"userId": "u2", "groupId": "acct-1", "traits": {"plan": "business"}})),
        ],
    )
    .await;
    // Out-of-order identify calls in a later batch: the latest timestamp still wins.
    ingest_msgs(
        &store,
        &[
            msg(
                "o1",
                20,
                "identify",
                json!({"userId": "u1", "traits": {"plan": "enterprise"}}),
            ),
            msg(
                "o2",
                10,
                "identify",
                json!({"userId": "u1", "traits": {"plan": "pro", "age": 40}}),
            ),
        ],
    )
    .await;
    resolve(&store).await;
    // Pieces of the second batch arriving after resolution was already run once.
    ingest_msgs(
        &store,
        &[msg(
            "o3",
            15,
            "identify",
            json!({"userId": "u1", "traits": {"plan": "business"}}),
        )],
    )
    .await;
    resolve(&store).await;

    let p1 = profile_of(&store, "anonymous_id", "a1").await.unwrap();
    assert_eq!(p1.external_ids["user_id"], vec!["u1"]);
    assert_eq!(p1.external_ids["email"], vec!["one@x.com"]);
    assert!(p1.known);
    assert_eq!(p1.traits["plan"], json!("enterprise"));
    assert_eq!(p1.traits["age"], json!(40));
    assert_eq!(p1.traits["email"], json!("one@x.com"));
    assert_eq!(p1.accounts, vec!["acct-1", "acct-2"]);

    let p2 = profile_of(&store, "user_id", "u2").await.unwrap();
    assert_eq!(p2.external_ids["anonymous_id"], vec!["d-a", "d-b"]);
    let older = profile_of(&store, "anonymous_id", "d-a").await.unwrap();
    assert_eq!(p2.profile_id, older.profile_id);
    let merges = count(
        &store,
        "default",
        &format!(
            "SELECT count(*) FROM profile_merges WHERE into_profile_id = '{}'",
            p2.profile_id
        ),
    )
    .await;
    assert_eq!(merges, 1);

    let p3 = profile_of(&store, "user_id", "u3").await.unwrap();
    let p4 = profile_of(&store, "user_id", "u4").await.unwrap();
    assert_ne!(p3.profile_id, p4.profile_id);
    assert_eq!(p3.external_ids["anonymous_id"], vec!["shared"]);
    assert!(!p4.external_ids.contains_key("anonymous_id"));

    let p5 = profile_of(&store, "user_id", "u5").await.unwrap();
    let p6 = profile_of(&store, "user_id", "u6").await.unwrap();
    assert_ne!(p5.profile_id, p6.profile_id);
    assert!(profile_of(&store, "email", "null").await.is_none());
    assert!(profile_of(&store, "user_id", "0000").await.is_none());
    let b = profile_of(&store, "anonymous_id", "b-anon").await.unwrap();
    assert!(!b.known);

    let p7 = profile_of(&store, "email", "seven@x.com").await.unwrap();
    assert_eq!(p7.external_ids["anonymous_id"], vec!["e-anon"]);
    assert_eq!(p7.external_ids["user_id"], vec!["u7"]);

    let p8 = profile_of(&store, "ga_client_id", "ga-9").await.unwrap();
    assert_eq!(p8.external_ids["user_id"], vec!["u8"]);
    assert_eq!(p8.external_ids["anonymous_id"], vec!["x-anon"]);

    let p9 = profile_of(&store, "user_id", "u9").await.unwrap();
    assert_eq!(p9.external_ids["anonymous_id"], vec!["old-id"]);

    // Account traits, latest wins.
    let plan = sql_rows(&store, "default", "SELECT account_id, value FROM traits WHERE entity = 'account' AND key = 'plan' ORDER BY account_id").await;
    assert_eq!(plan[0]["value"], json!("\"business\""));
    assert_eq!(plan[1]["value"], json!("\"free\""));

    // Events are attributed to their current canonical profile: both devices' history moved to u2.
    let n = count(
        &store,
        "default",
        &format!(
            "SELECT count(*) FROM events WHERE profile_id = '{}'",
            p2.profile_id
        ),
    )
    .await;
    assert_eq!(n, 5); // d1..d4 and g3
    let anon_events = count(
        &store,
        "default",
        "SELECT count(*) FROM events WHERE profile_id IS NULL",
    )
    .await;
    assert_eq!(anon_events, 0, "every event resolves to a profile");
    let known = count(
        &store,
        "default",
        "SELECT count(*) FROM profiles WHERE known",
    )
    .await;
    let all = count(&store, "default", "SELECT count(*) FROM profiles").await;
    assert_eq!(all - known, 2); // b-anon and b-anon2: their user ids were blocked
}

#[tokio::test(flavor = "multi_thread")]
async fn a_profile_hits_the_limit_of_five_anonymous_ids() {
    let store = Store::memory();
    let msgs: Vec<Value> = (1..=7)
        .map(|i| {
            msg(
                &format!("m{i}"),
                i,
                "track",
                json!({"userId": "u1", "anonymousId": format!("a{i}")}),
            )
        })
        .collect();
    ingest_msgs(&store, &msgs).await;
    resolve(&store).await;
    let p = profile_of(&store, "user_id", "u1").await.unwrap();
    assert_eq!(
        p.external_ids["anonymous_id"],
        vec!["a1", "a2", "a3", "a4", "a5"]
    );
    assert!(profile_of(&store, "anonymous_id", "a6").await.is_none());
}

// ---------------------------------------------------------------------------------------------
// The reference implementation: row at a time, linear scans, no shared code with the engine.

#[derive(Default)]
struct Reference {
    /// (type, value, profile) for every linked id
    owner: Vec<(String, String, usize)>,
    parent: Vec<usize>,
    first_id: Vec<(String, String)>,
}

fn blocked(v: &str) -> bool {
    v.is_empty()
        || v.chars().all(|c| c == '0' || c == '-')
        || v == "-1"
        || v == "null"
        || v == "anonymous"
}

fn priority(t: &str) -> (u8, String) {
    match t {
        "user_id" => (0, String::new()),
        "email" => (1, String::new()),
        other => (2, other.to_string()),
    }
}

impl Reference {
    fn root(&self, mut p: usize) -> usize {
        while self.parent[p] != p {
            p = self.parent[p];
        }
        p
    }
    fn find(&self, t: &str, v: &str) -> Option<usize> {
        self.owner
            .iter()
            .find(|(a, b, _)| a == t && b == v)
            .map(|(_, _, p)| self.root(*p))
    }
    fn process(&mut self, ids: &[(String, String)]) {
        let mut ids: Vec<(String, String)> =
            ids.iter().filter(|(_, v)| !blocked(v)).cloned().collect();
        ids.sort_by(|a, b| priority(&a.0).cmp(&priority(&b.0)).then(a.1.cmp(&b.1)));
        ids.dedup();
        while !ids.is_empty() {
            let mut matched: Vec<usize> = ids.iter().filter_map(|(t, v)| self.find(t, v)).collect();
            matched.sort();
            matched.dedup();
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for (t, _, p) in &self.owner {
                if matched.contains(&self.root(*p)) {
                    *counts.entry(t.clone()).or_default() += 1;
                }
            }
            for (t, v) in &ids {
                if self.find(t, v).is_none() {
                    *counts.entry(t.clone()).or_default() += 1;
                }
            }
            let ok = counts
                .iter()
                .all(|(t, n)| *n <= if t == "user_id" { 1 } else { 5 });
            if !ok {
                ids.pop();
                continue;
            }
            let target = match matched.first() {
                Some(p) => *p,
                None => {
                    self.parent.push(self.parent.len());
                    self.first_id.push(ids[0].clone());
                    self.parent.len() - 1
                }
            };
            for m in matched.iter().skip(1) {
                self.parent[*m] = target;
            }
            for (t, v) in &ids {
                if self.find(t, v).is_none() {
                    self.owner.push((t.clone(), v.clone(), target));
                }
            }
            return;
        }
    }
    /// The partition: for each profile (named by its creating id), its ids.
    fn partition(&self) -> BTreeMap<(String, String), BTreeSet<(String, String)>> {
        let mut out: BTreeMap<(String, String), BTreeSet<(String, String)>> = BTreeMap::new();
        for (t, v, p) in &self.owner {
            out.entry(self.first_id[self.root(*p)].clone())
                .or_default()
                .insert((t.clone(), v.clone()));
        }
        out
    }
}

fn ids_of(m: &Value) -> Vec<(String, String)> {
    let mut ids = Vec::new();
    for (field, t) in [("userId", "user_id"), ("anonymousId", "anonymous_id")] {
        if let Some(v) = m[field].as_str() {
            ids.push((t.to_string(), v.to_string()));
        }
    }
    if m["type"] == "identify"
        && let Some(e) = m["traits"]["email"].as_str()
    {
        ids.push(("email".into(), e.trim().to_string()));
    }
    ids
}

/// The engine's partition, read back from the committed tables, keyed the same way.
async fn engine_partition(store: &Store) -> BTreeMap<String, BTreeSet<(String, String)>> {
    let rows = sql_rows(
        store,
        "default",
        "SELECT id_type, id_value, profile_id FROM identities",
    )
    .await;
    let mut out: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for r in rows {
        out.entry(r["profile_id"].as_str().unwrap().to_string())
            .or_default()
            .insert((
                r["id_type"].as_str().unwrap().into(),
                r["id_value"].as_str().unwrap().into(),
            ));
    }
    out
}

fn profile_id_of(t: &str, v: &str) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(t.as_bytes());
    h.update(&[0]);
    h.update(v.as_bytes());
    format!("p-{:016x}", h.digest())
}

#[tokio::test(flavor = "multi_thread")]
async fn agrees_with_the_reference_on_generated_data() {
    let data = generated(6000, 99);
    let mut msgs: Vec<Value> = data
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    // Shared devices, to exercise the user_id limit.
    for i in 0..40 {
        let a = msgs[i * 7]["anonymousId"].clone();
        msgs.push(json!({"type": "track", "event": "Shared", "messageId": format!("shared-{i}"), "userId": format!("intruder-{i}"),
                         "anonymousId": a, "timestamp": "2025-12-31T12:00:00Z"}));
    }
    let store = Store::memory();
    ingest_msgs(&store, &msgs).await;
    resolve(&store).await;
    msgs.sort_by(|a, b| {
        let ka = (
            audiences::events::message::parse_timestamp(a["timestamp"].as_str().unwrap()),
            a["messageId"].as_str(),
        );
        let kb = (
            audiences::events::message::parse_timestamp(b["timestamp"].as_str().unwrap()),
            b["messageId"].as_str(),
        );
        ka.cmp(&kb)
    });
    let mut reference = Reference::default();
    for m in &msgs {
        reference.process(&ids_of(m));
    }
    let want: BTreeMap<String, BTreeSet<(String, String)>> = reference
        .partition()
        .into_iter()
        .map(|((t, v), ids)| (profile_id_of(&t, &v), ids))
        .collect();
    let got = engine_partition(&store).await;
    assert!(want.len() > 200, "{}", want.len());
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);
}

/// A small deterministic PRNG for the property test (no shared code with the generator).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Every id of the space by profile, as the external-id index of the serving path reads them.
async fn index_partition(store: &Store) -> BTreeMap<i64, BTreeSet<(String, String)>> {
    let ix = audiences::export::IdIndex::load(store, &Space::default())
        .await
        .unwrap();
    let profiles = sql_rows(store, "default", "SELECT profile_idx FROM profiles").await;
    let mut out = BTreeMap::new();
    for r in profiles {
        let p = r["profile_idx"].as_i64().unwrap();
        let ids: BTreeSet<(String, String)> = ix
            .groups(Some(p))
            .flat_map(|(t, vals)| {
                let t = ix.types[t].clone();
                vals.into_iter()
                    .map(move |v| (t.clone(), v.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect();
        out.insert(p, ids);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn random_batch_splits_give_the_same_graph_as_one_batch() {
    for seed in 0..8u64 {
        // Seeds 0-5: incremental runs write deltas over the first checkpoint whatever their
        // size (the default writes a new checkpoint once 1/8 of the profiles are dirty, which
        // small data always is); 6-7: a new checkpoint once a third of them are.
        audiences::identity::persist::set_checkpoint_every(if seed < 6 { 1 } else { 3 });
        let mut rng = Lcg(seed + 1);
        let n = 300;
        let msgs: Vec<Value> = (0..n)
            .map(|i| {
                let mut m = json!({"type": "track", "event": "E", "messageId": format!("r{seed}-{i}"),
                                   "timestamp": format!("2025-12-01T00:{:02}:{:02}Z", i / 60, i % 60)});
                match rng.next(4) {
                    0 => m["userId"] = json!(format!("u{}", rng.next(15))),
                    1 => m["anonymousId"] = json!(format!("a{}", rng.next(40))),
                    _ => {
                        m["userId"] = json!(format!("u{}", rng.next(15)));
                        m["anonymousId"] = json!(format!("a{}", rng.next(40)));
                    }
                }
                match rng.next(10) {
                    0 => {
                        m["type"] = json!("identify");
                        m["traits"] = json!({"email": format!("e{}@x.com", rng.next(20)), "score": rng.next(100)});
                    }
                    1 => {
                        m["type"] = json!("group");
                        m["groupId"] = json!(format!("g{}", rng.next(6)));
                        m["traits"] = json!({"plan": format!("p{}", rng.next(3)), "seats": rng.next(50)});
                    }
                    _ => {}
                }
                m
            })
            .collect();
        let one = Store::memory();
        ingest_msgs(&one, &msgs).await;
        let rules = IdentityRules::default();
        let space = Space::default();
        let one_report = audiences::identity::resolve(&one, &space, &rules, false)
            .await
            .unwrap();
        let split = Store::memory();
        // Each incremental run loads the committed graph one of three ways: only what its
        // events reach (a one-shot process), whole (a server's first run), or not at all (the
        // graph a server kept from its previous run).
        let kept = audiences::identity::persist::GraphCache::default();
        let mut split_report = None;
        let mut start = 0;
        while start < n {
            let len = 1 + rng.next(80) as usize;
            let end = (start + len).min(n);
            ingest_msgs(&split, &msgs[start..end]).await;
            if rng.next(2) == 0 || end == n {
                let fresh = audiences::identity::persist::GraphCache::default();
                let cache = match rng.next(3) {
                    0 => None,
                    1 => Some(&fresh),
                    _ => Some(&kept),
                };
                split_report = Some(
                    audiences::identity::persist::resolve_cached(
                        &split, &space, &rules, false, cache,
                    )
                    .await
                    .unwrap(),
                );
            }
            start = end;
        }
        let split_report = split_report.unwrap();
        let counts = |r: &audiences::identity::persist::IdentityReport| {
            (r.profiles, r.known, r.ids, r.merges, r.accounts)
        };
        assert_eq!(counts(&one_report), counts(&split_report), "seed {seed}");
        assert_eq!(
            engine_partition(&one).await,
            engine_partition(&split).await,
            "seed {seed}"
        );
        // every table, through the views that merge a checkpoint with its delta
        for q in [
            "SELECT from_profile_id, into_profile_id, at FROM profile_merges \
             ORDER BY from_profile_id",
            "SELECT entity, profile_id, profile_idx, account_id, key, value, updated_at \
             FROM traits ORDER BY entity, profile_idx, account_id, key",
            "SELECT id_type, id_value, profile_id, profile_idx, identity_key, first_seen \
             FROM identities ORDER BY id_type, id_value",
            "SELECT identity_key, profile_idx FROM identity_keys ORDER BY identity_key",
            "SELECT profile_idx, profile_id, merged_into, canonical_idx, known, created_at \
             FROM profile_index ORDER BY profile_idx",
            "SELECT profile_id, profile_idx, account_id, linked_at FROM account_links \
             ORDER BY profile_idx, account_id",
        ] {
            let (a, b) = (
                sql_rows(&one, "default", q).await,
                sql_rows(&split, "default", q).await,
            );
            if a != b {
                type Rows = Vec<serde_json::Map<String, Value>>;
                let only = |x: &Rows, y: &Rows| -> Vec<String> {
                    x.iter()
                        .filter(|r| !y.contains(r))
                        .map(|r| format!("{r:?}"))
                        .collect()
                };
                panic!(
                    "seed {seed}: {q}\nonly in one batch: {:?}\nonly in the split: {:?}",
                    only(&a, &b),
                    only(&b, &a)
                );
            }
        }
        assert_eq!(
            index_partition(&one).await,
            index_partition(&split).await,
            "seed {seed}"
        );
        // the split store's last runs wrote deltas (so the views above merged something)
        let snap = audiences::store::CommitLog::new(
            &split,
            &Space::default(),
            audiences::identity::persist::IDENTITY,
        )
        .snapshot()
        .await
        .unwrap();
        assert!(
            seed >= 6
                || snap
                    .files
                    .iter()
                    .any(|f| f.kind.as_deref() == Some("identities.delta")),
            "seed {seed}: no delta written"
        );
    }
    audiences::identity::persist::set_checkpoint_every(1);
}
