//! `audiences serve` through clients we did not write: Segment's `segment-analytics-python`
//! library against the tracking API, raw HTTP for validation answers and auth, and
//! `pyarrow.flight` for the handshake, flights, memberships with external ids, changes, actions,
//! scopes and space isolation. Results are checked against the CLI's view of the same store.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

use crate::common::*;

pub(crate) struct Server {
    child: Child,
    pub(crate) flight: String,
    http: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(store: &str, config: &std::path::Path) -> Server {
    start_with(
        store,
        &["--config", config.to_str().unwrap()],
        &[],
        &mut Vec::new(),
    )
}

/// Start `serve` with extra global and serve flags; the stderr lines up to the listening ones
/// go to `early`.
pub(crate) fn start_with(
    store: &str,
    global: &[&str],
    extra: &[&str],
    early: &mut Vec<String>,
) -> Server {
    // a refresh loop every 300 ms unless the caller chose otherwise
    let interval: &[&str] = if extra.contains(&"--refresh-interval") {
        &[]
    } else {
        &["--refresh-interval", "300ms"]
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_audiences"))
        .args(["--store", store, "--json"])
        .args(global)
        .args(["serve", "--flight", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(interval)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut flight, mut http) = (None, None);
    while flight.is_none() || http.is_none() {
        let l = lines
            .next()
            .expect("serve exited before listening")
            .unwrap();
        early.push(l.clone());
        if let Some(a) = l.strip_prefix("audiences serve: flight listening on ") {
            flight = Some(a.trim().to_string());
        }
        if let Some(a) = l.strip_prefix("audiences serve: http listening on ") {
            http = Some(a.trim().to_string());
        }
    }
    // keep draining stderr so the server never blocks on a full pipe
    std::thread::spawn(move || for _ in lines {});
    Server {
        child,
        flight: flight.unwrap(),
        http: http.unwrap(),
    }
}

const CONFIG: &str = r#"
[spaces.default]
tokens = [
  { token = "write-key-1", scopes = ["write"] },
  { token = "read-token-1", scopes = ["read"] },
  { token = "admin-token-1", scopes = ["read", "write", "admin", "pii"] },
]
[spaces.other]
tokens = [ { token = "other-token", scopes = ["read", "write", "admin"] } ]
"#;

/// Segment's Python library and raw HTTP against the tracking API.
const TRACK: &str = r#"
import json, sys, urllib.request, urllib.error, base64
import segment.analytics as analytics
host = sys.argv[1]
errors = []
analytics.write_key = 'write-key-1'
analytics.host = host
analytics.sync_mode = True
analytics.on_error = lambda e, batch: errors.append(str(e))
analytics.identify('u-1', {'email': 'one@example.com', 'plan': 'pro'})
analytics.identify('u-2', {'email': ' Two@Example.COM '})
analytics.group('u-1', 'acct-1', {'plan': 'business', 'employees': 12})
analytics.identify('u-3', {'email': 'a@x.com'})
analytics.identify('u-3', {'email': ' B@x.com'})
analytics.track('u-1', 'Order Completed', {'price': 30, 'product_id': 'p-1'})
analytics.track('u-2', 'Order Completed', {'price': 12})
analytics.track(anonymous_id='anon-9', event='Product Viewed', properties={'price': 5})
analytics.page('u-2', 'Docs', 'Pricing')
analytics.flush()
assert not errors, errors

def post(path, body, key='write-key-1'):
    req = urllib.request.Request(host + path, data=json.dumps(body).encode(), method='POST',
        headers={'Content-Type': 'application/json',
                 'Authorization': 'Basic ' + base64.b64encode((key + ':').encode()).decode()})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)

out = {}
# one good message, one without an event name, one duplicate of the good one
good = {'type': 'track', 'userId': 'u-3', 'event': 'Order Completed', 'messageId': 'm-fixed-1'}
out['mixed'] = post('/v1/batch', {'batch': [good, {'type': 'track', 'userId': 'u-4'}, good]})
out['single'] = post('/v1/track', {'userId': 'u-5', 'event': 'Order Completed', 'messageId': 'm-fixed-2'})
out['again'] = post('/v1/track', {'userId': 'u-5', 'event': 'Order Completed', 'messageId': 'm-fixed-2'})
out['bad_key'] = post('/v1/track', {'userId': 'u-6', 'event': 'X'}, key='nope')
out['read_key'] = post('/v1/track', {'userId': 'u-6', 'event': 'X'}, key='read-token-1')
out['other_space'] = post('/v1/track', {'userId': 'o-1', 'event': 'Order Completed'}, key='other-token')
print(json.dumps(out))
"#;

/// pyarrow.flight: handshake, flights, do_get, changes, actions, errors.
const FLIGHT: &str = r#"
import json, sys
import pyarrow.flight as fl
loc, key = sys.argv[1], sys.argv[2]
def client(token):
    c = fl.FlightClient('grpc://' + loc)
    h = c.authenticate_basic_token('', token)
    return c, fl.FlightCallOptions(headers=[h])
out = {}
c, opts = client('read-token-1')
flights = list(c.list_flights(options=opts))
out['flights'] = {'/'.join(f.descriptor.path[i].decode() for i in range(len(f.descriptor.path))): f.total_records for f in flights}
info = c.get_flight_info(fl.FlightDescriptor.for_path('audiences', key), opts)
t = c.do_get(info.endpoints[0].ticket, opts).read_all()
out['schema'] = [f.name + ':' + str(f.type) for f in t.schema]
out['rows'] = t.to_pylist()
# the same version again: the server now writes its kept, pre-encoded messages
kept = info.endpoints[0].ticket
again = [c.do_get(kept, opts).read_all() for _ in range(2)]
out['rows_again'] = [a.to_pylist() for a in again]
out['schema_again'] = [str(a.schema) == str(t.schema) for a in again]
info = c.get_flight_info(fl.FlightDescriptor.for_path('audiences', key, 'changes', '0'), opts)
out['changes'] = c.do_get(info.endpoints[0].ticket, opts).read_all().to_pylist()
out['actions'] = sorted(a.type for a in c.list_actions(opts))
info = c.get_flight_info(fl.FlightDescriptor.for_path('destinations', key, 'pull'), opts)
out['dest_first'] = c.do_get(info.endpoints[0].ticket, opts).read_all().to_pylist()
w, wopts = client('admin-token-1')
v = max(r['version'] for r in out['dest_first'])
ack = {'audience': key, 'destination': 'pull', 'version': v}
out['ack'] = json.loads(list(w.do_action(fl.Action('ack', json.dumps(ack).encode()), wopts))[0].body.to_pybytes())
info = c.get_flight_info(fl.FlightDescriptor.for_path('destinations', key, 'pull'), opts)
out['dest_after_ack'] = c.do_get(info.endpoints[0].ticket, opts).read_all().to_pylist()
def code(f):
    try:
        f()
        return 'ok'
    except fl.FlightUnauthenticatedError:
        return 'unauthenticated'
    except fl.FlightUnauthorizedError:
        return 'unauthorized'
    except fl.FlightError as e:
        return type(e).__name__ + ':' + str(e).split('.')[0]
    except Exception as e:
        return type(e).__name__ + ':' + str(e).split('\n')[0]
out['refresh_as_reader'] = code(lambda: list(c.do_action(fl.Action('refresh', b'{}'), opts)))
a, aopts = client('admin-token-1')
r = list(a.do_action(fl.Action('refresh', b'{}'), aopts))
out['refresh_as_admin'] = json.loads(r[0].body.to_pybytes())
pv = {'key': 'preview_me', 'kind': 'audience', 'definition': "event('Order Completed').count() >= 2"}
r = list(a.do_action(fl.Action('preview', json.dumps(pv).encode()), aopts))
out['preview'] = json.loads(r[0].body.to_pybytes())
plain = fl.FlightClient('grpc://' + loc)
out['no_token'] = code(lambda: list(plain.list_flights()))
out['bad_bearer'] = code(lambda: list(plain.list_flights(options=fl.FlightCallOptions(headers=[(b'authorization', b'Bearer nope')]))))
out['bad_password'] = code(lambda: plain.authenticate_basic_token('', 'wrong'))
o, oopts = client('other-token')
out['other_space'] = code(lambda: o.get_flight_info(fl.FlightDescriptor.for_path('audiences', key), oopts))
out['missing'] = code(lambda: c.get_flight_info(fl.FlightDescriptor.for_path('audiences', 'no_such'), opts))
out['other_space_flights'] = len(list(o.list_flights(options=oopts)))
out['kept_no_token'] = code(lambda: plain.do_get(kept).read_all())
out['kept_bad_bearer'] = code(lambda: plain.do_get(kept, fl.FlightCallOptions(headers=[(b'authorization', b'Bearer nope')])).read_all())
out['kept_other_space'] = code(lambda: o.do_get(kept, oopts).read_all())
print(json.dumps(out, default=str))
"#;

#[test]
fn tracking_api_and_flight_with_real_clients() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let store = store.to_str().unwrap();
    let cfg = dir.path().join("cfg.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let def = dir.path().join("buyers.json");
    // A webhook receiver the serve loop syncs to after its refreshes.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let rx = rt
        .block_on(audiences::destinations::receiver::Receiver::start(
            ([127, 0, 0, 1], 0).into(),
            true,
            false,
        ))
        .unwrap();
    std::fs::write(
        &def,
        serde_json::json!({"key": "buyers", "kind": "audience",
            "definition": "event('Order Completed').count() >= 1",
            "destinations": [{"name": "pull", "kind": "flight"},
                             {"name": "hook", "kind": "webhook", "url": rx.url(), "mode": "track"}]})
        .to_string(),
    )
    .unwrap();
    run_ok(store, &["audience", "create", def.to_str().unwrap()]);
    let server = start(store, &cfg);
    let host = format!("http://{}", server.http);
    let out: serde_json::Value = serde_json::from_str(&python(TRACK, &[&host])).unwrap();
    // Validation answers: the bad message rejected with its reason, the others committed.
    let (status, body) = (&out["mixed"][0], &out["mixed"][1]);
    assert_eq!(status, 400, "{out}");
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["duplicates"], 1);
    assert_eq!(body["rejected"][0]["index"], 1);
    assert_eq!(body["rejected"][0]["code"], "missing_event");
    assert!(
        out["mixed"][2]["request-id"].is_string() || out["mixed"][2]["Request-Id"].is_string(),
        "{out}"
    );
    assert_eq!(out["single"][0], 200);
    assert_eq!(
        (
            out["again"][0].as_i64(),
            out["again"][1]["duplicates"].as_i64()
        ),
        (Some(200), Some(1))
    );
    assert_eq!(out["bad_key"][0], 401);
    assert_eq!(out["bad_key"][1]["error"]["code"], "authentication_error");
    assert_eq!(out["read_key"][0], 403);
    assert_eq!(out["other_space"][0], 200);
    // What the CLI sees: the library's events and the raw ones, each once, in their spaces.
    let rows = |space: &str, q: &str| -> Vec<serde_json::Value> {
        serde_json::from_str(&run_ok(store, &["--space", space, "--json", "sql", q]))
            .unwrap_or_default()
    };
    let ev = rows(
        "default",
        "SELECT type, coalesce(user_id, anonymous_id) AS who, event FROM events ORDER BY who, type, event",
    );
    let got: Vec<String> = ev
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r["type"].as_str().unwrap(),
                r["who"].as_str().unwrap(),
                r["event"].as_str().unwrap_or("-")
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            "track anon-9 Product Viewed",
            "group u-1 -",
            "identify u-1 -",
            "track u-1 Order Completed",
            "identify u-2 -",
            "page u-2 -",
            "track u-2 Order Completed",
            "identify u-3 -",
            "identify u-3 -",
            "track u-3 Order Completed",
            "track u-5 Order Completed",
        ]
    );
    assert_eq!(rows("other", "SELECT count(*) AS n FROM events")[0]["n"], 1);
    // Wait for the refresh loop to commit the audience.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let members = loop {
        let m = rows(
            "default",
            "SELECT profile_id FROM memberships WHERE audience_key = 'buyers' ORDER BY profile_id",
        );
        if m.len() == 4 {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the refresh loop never committed buyers: {m:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let members: Vec<&str> = members
        .iter()
        .map(|r| r["profile_id"].as_str().unwrap())
        .collect();
    // serve synced the webhook after the refresh: one Audience Entered per user id of a member
    let want: std::collections::BTreeSet<String> = rows(
        "default",
        "SELECT i.id_value AS u FROM memberships m JOIN identities i ON i.profile_id = m.profile_id \
         AND i.id_type = 'user_id' WHERE m.audience_key = 'buyers'",
    )
    .iter()
    .map(|r| r["u"].as_str().unwrap().to_string())
    .collect();
    assert!(!want.is_empty());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let got: std::collections::BTreeSet<String> = rx
            .calls()
            .iter()
            .filter(|c| c.body["event"] == "Audience Entered")
            .map(|c| c.body["userId"].as_str().unwrap_or("").to_string())
            .collect();
        if got == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "serve never synced the webhook: {got:?} vs {want:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let out: serde_json::Value =
        serde_json::from_str(&python(FLIGHT, &[&server.flight, "buyers"])).unwrap();
    assert_eq!(out["flights"]["audiences/buyers"], 4, "{out}");
    // The Flight destination: a backfill of the membership, then nothing once acknowledged.
    let first: Vec<&str> = out["dest_first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["change"], "entered", "{r}");
            r["profile_id"].as_str().unwrap()
        })
        .collect();
    assert_eq!(first, members, "{out}");
    assert_eq!(
        out["ack"]["cursor_version"],
        out["dest_first"][0]["version"]
    );
    assert_eq!(out["dest_after_ack"], serde_json::json!([]), "{out}");
    let rows_of = out["rows"].as_array().unwrap();
    let ids: Vec<&str> = rows_of
        .iter()
        .map(|r| r["profile_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, members);
    let schema: Vec<&str> = out["schema"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(
        schema[..2],
        ["profile_id:string", "entered_at:timestamp[us, tz=UTC]"]
    );
    assert!(schema.contains(&"user_id:list<item: string>"), "{schema:?}");
    assert!(schema.contains(&"email:list<item: string>"), "{schema:?}");
    // u-1's profile carries its user id and the email from identify
    let u1 = rows_of
        .iter()
        .find(|r| r["user_id"] == serde_json::json!(["u-1"]))
        .expect("u-1 is a buyer");
    assert_eq!(u1["email"], serde_json::json!(["one@example.com"]));
    let changes = out["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 4);
    assert!(changes.iter().all(|c| c["change"] == "entered"));
    assert_eq!(
        out["actions"],
        serde_json::json!(["ack", "compute", "preview", "refresh", "sync"])
    );
    assert_eq!(out["refresh_as_reader"], "unauthorized", "{out}");
    assert!(out["refresh_as_admin"]["keys"].is_array(), "{out}");
    assert_eq!(out["preview"]["size"], 0, "nobody bought twice: {out}");
    assert_eq!(out["no_token"], "unauthenticated");
    assert_eq!(out["bad_bearer"], "unauthenticated");
    assert_eq!(out["bad_password"], "unauthenticated");
    // another space's audience looks exactly like a missing one
    let other = out["other_space"].as_str().unwrap();
    let missing = out["missing"].as_str().unwrap();
    assert!(
        other.starts_with("FlightServerError")
            || other.contains("NotFound")
            || other.contains("no audience"),
        "{other}"
    );
    assert_eq!(
        other.replace("buyers", "KEY"),
        missing.replace("no_such", "KEY")
    );
    assert_eq!(out["other_space_flights"], 0);
    // Pulls of a kept version (pre-encoded frames) give the first pull's table, and are
    // refused as any other call is.
    assert_eq!(out["rows_again"], serde_json::json!([rows_of, rows_of]));
    assert_eq!(out["schema_again"], serde_json::json!([true, true]));
    assert_eq!(out["kept_no_token"], "unauthenticated", "{out}");
    assert_eq!(out["kept_bad_bearer"], "unauthenticated", "{out}");
    // (a do_get's error also carries the client's note that no data came)
    let kept_other = out["kept_other_space"].as_str().unwrap();
    assert!(
        kept_other
            .replace("buyers", "KEY")
            .starts_with(&missing.replace("no_such", "KEY")),
        "{kept_other} vs {missing}"
    );

    // Exports: the CLI, HTTP and Flight give the same rows, and those equal an independent
    // rendering of the memberships and identities (Python's csv, json and hashlib).
    // The first CLI export builds the external id index and keeps it, the others read it.
    let kept = std::path::Path::new(store).join("spaces/default/_derived/id_index");
    let _ = std::fs::remove_dir_all(&kept);
    let mut cli = serde_json::Map::new();
    for (name, args) in [
        ("unformatted", vec!["--format", "unformatted"]),
        ("formatted", vec!["--format", "formatted"]),
        ("single", vec!["--format", "single", "--id-type", "email"]),
        (
            "single_raw",
            vec!["--format", "single", "--id-type", "email", "--raw"],
        ),
    ] {
        let mut a = vec!["export", "buyers"];
        a.extend(args);
        cli.insert(name.into(), serde_json::Value::String(run_ok(store, &a)));
        let files = std::fs::read_dir(&kept).map_or(0, |d| d.count());
        assert_eq!(files, 1, "one kept index after the {name} export");
    }
    let ids = run_ok(
        store,
        &[
            "--json",
            "sql",
            "SELECT profile_id, id_type, id_value FROM identities",
        ],
    );
    let members_json = serde_json::to_string(&members).unwrap();
    let out: serde_json::Value = serde_json::from_str(&python(
        EXPORTS,
        &[
            &host,
            &server.flight,
            &serde_json::Value::Object(cli).to_string(),
            &ids,
            &members_json,
        ],
    ))
    .unwrap();
    for f in ["unformatted", "formatted", "single", "single_raw"] {
        assert_eq!(out["cli"][f], out["expected"][f], "{f}: CLI vs reference");
    }
    for f in ["unformatted", "formatted", "single"] {
        assert_eq!(out["http"][f], out["expected"][f], "{f}: HTTP vs reference");
        assert_eq!(
            out["flight"][f], out["expected"][f],
            "{f}: Flight vs reference"
        );
    }
    assert_eq!(
        out["http"]["single_raw_as_admin"],
        out["expected"]["single_raw"]
    );
    assert_eq!(out["http_raw_as_reader"], 403);
    assert_eq!(out["http_other_space"], 401);
    assert_eq!(
        out["duckdb_formatted"], out["cli"]["formatted"],
        "DuckDB reads our CSV"
    );
    // u-3 has two emails: indexed columns
    assert!(
        out["expected"]["formatted"][0]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "email_1"),
        "{out}"
    );
    assert!(
        out["version"]
            .as_str()
            .is_some_and(|v| v.parse::<u64>().unwrap() >= 1),
        "{out}"
    );
    // u-2's email is exported normalized: trimmed and lower-cased
    assert!(
        out["expected"]["single_raw"]
            .to_string()
            .contains("two@example.com"),
        "{out}"
    );

    // Profile API, against the CLI's view of the same profile.
    let cli: serde_json::Value =
        serde_json::from_str(&run_ok(store, &["--json", "profile", "user_id:u-1"])).unwrap();
    let out: serde_json::Value = serde_json::from_str(&python(PROFILE, &[&host])).unwrap();
    let traits = &out["traits"]["traits"];
    assert_eq!(traits["plan"], "pro", "{out}");
    assert_eq!(traits["email"], cli["traits"]["email"]);
    assert_eq!(traits["buyers"], true);
    assert_eq!(
        out["audiences_only"]["traits"],
        serde_json::json!({"buyers": true})
    );
    assert_eq!(out["include"]["traits"], serde_json::json!({"plan": "pro"}));
    assert_eq!(out["verbose"]["traits"]["plan"]["class"], "custom");
    assert_eq!(out["verbose"]["traits"]["plan"]["value"], "pro");
    // pages of one trait, followed by cursor, give every trait once, in key order
    let all_keys: Vec<&String> = traits.as_object().unwrap().keys().collect();
    assert!(all_keys.len() >= 3, "{out}");
    assert_eq!(out["paged"], serde_json::json!(all_keys));
    assert_eq!(out["first_page"]["cursor"]["has_more"], true);
    assert_eq!(out["bad_limit"][0], 400);
    assert_eq!(out["bad_limit"][1]["error"]["code"], "validation_error");
    let ids: Vec<String> = out["external_ids"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            format!(
                "{}:{}",
                d["type"].as_str().unwrap(),
                d["id"].as_str().unwrap()
            )
        })
        .collect();
    let mut want: Vec<String> = Vec::new();
    for (t, vs) in cli["external_ids"].as_object().unwrap() {
        for v in vs.as_array().unwrap() {
            want.push(format!("{t}:{}", v.as_str().unwrap()));
        }
    }
    want.sort();
    assert_eq!(ids, want);
    assert_eq!(
        out["events_pages"],
        serde_json::json!(["track", "group", "identify"]),
        "{out}"
    );
    assert!(
        out["metadata"]["metadata"]["created_at"].is_string(),
        "{out}"
    );
    assert_eq!(out["links"]["data"][0]["external_ids"][0]["id"], "acct-1");
    assert_eq!(out["account_traits"]["traits"]["plan"], "business");
    assert_eq!(
        out["account_links"]["data"][0]["external_ids"][0]["id"],
        cli["profile_id"]
    );
    assert_eq!(out["missing"][0], 404);
    assert_eq!(out["missing"][1]["error"]["code"], "not_found");
    // the auth matrix: one 401 body for a missing header, a wrong token, a Bearer header, and
    // a token of another space (on its path or on ours)
    assert_eq!(out["no_auth"][0], 401);
    for k in ["wrong_token", "bearer", "other_token", "other_space"] {
        assert_eq!(out[k], out["no_auth"], "{k}: {out}");
    }
    assert_eq!(out["malformed_id"][0], 400);
    assert_eq!(
        out["malformed_id"][1]["error"]["code"],
        "invalid_request_error"
    );
    assert!(out["request_id"].as_bool().unwrap());

    // Management API: create, list, show, preview, edit (also while locked), delete, reuse.
    let step = |name: &str| -> serde_json::Value {
        serde_json::from_str(&python(MANAGE, &[host.as_str(), name])).unwrap()
    };
    let r = step("create");
    assert_eq!(r["status"], 201, "{r}");
    assert_eq!(r["body"]["version"], 1);
    assert_eq!(step("create_as_reader")["status"], 403);
    let r = step("list");
    let keys: Vec<&str> = r["body"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["file"]["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["big_buyers", "buyers"]);
    assert_eq!(
        step("show")["body"]["file"]["definition"],
        "event('Order Completed').count() >= 1 AND trait('plan') = 'pro'"
    );
    let p = step("preview");
    assert_eq!(p["status"], 200, "{p}");
    // held lock: the edit is refused and nothing changes
    let lock = std::path::Path::new(store).join("spaces/default/_locks/big_buyers.json");
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    let since = chrono::Utc::now().timestamp_micros();
    std::fs::write(
        &lock,
        format!(r#"{{"key":"big_buyers","definition_version":2,"since":{since},"owner":"another-edit"}}"#),
    )
    .unwrap();
    let r = step("edit");
    assert_eq!(
        (r["status"].as_i64(), r["body"]["error"]["code"].as_str()),
        (Some(409), Some("locked")),
        "{r}"
    );
    assert!(
        r["body"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("locked")
    );
    assert_eq!(step("show")["body"]["version"], 1);
    std::fs::remove_file(&lock).unwrap();
    let r = step("edit");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["body"]["version"], 2);
    let computed = r["body"]["computed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["key"] == "big_buyers")
        .unwrap()
        .clone();
    // the preview of the edited definition predicted what the edit committed
    assert_eq!(computed["size"], p["body"]["size"], "{r} {p}");
    assert!(computed["size"].as_u64().unwrap() > 0);
    assert_eq!(step("delete")["status"], 200);
    assert_eq!(step("show")["status"], 404);
    let r = step("create");
    assert_eq!(r["status"], 400);
    assert!(
        r["body"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("never reused"),
        "{r}"
    );
    assert_eq!(step("show_other_space")["status"], 401);

    // Flight SQL through the ADBC driver: queries see the caller's space only, metadata calls
    // work, writes are refused.
    let out: serde_json::Value =
        serde_json::from_str(&python(FLIGHT_SQL, &[&server.flight])).unwrap();
    let cli = rows(
        "default",
        "SELECT audience_key AS k, count(*) AS n FROM memberships GROUP BY audience_key ORDER BY audience_key",
    );
    let cli: Vec<(String, i64)> = cli
        .iter()
        .map(|r| {
            (
                r["k"].as_str().unwrap().to_string(),
                r["n"].as_i64().unwrap(),
            )
        })
        .collect();
    let adbc: Vec<(String, i64)> = serde_json::from_value(out["counts"].clone()).unwrap();
    assert_eq!(adbc, cli);
    // a ticket of ~140 KB goes through the DoGet path as a short one does
    let all: i64 = cli.iter().map(|(_, n)| n).sum();
    assert_eq!(out["long_statement"], all, "{out}");
    let n = rows("default", "SELECT count(*) AS n FROM events")[0]["n"].clone();
    assert_eq!(out["events"], n, "{out}");
    assert_eq!(
        out["other_events"], 1,
        "another space's token queries its own space"
    );
    for t in [
        "events",
        "profiles",
        "identities",
        "traits",
        "memberships",
        "membership_changes",
    ] {
        assert!(
            out["tables"].as_array().unwrap().iter().any(|x| x == t),
            "{t}: {out}"
        );
    }
    assert_eq!(out["table_types"], serde_json::json!(["TABLE", "VIEW"]));
    assert!(out["ddl"].as_str().unwrap().starts_with("refused"), "{out}");
    assert!(
        out["copy"].as_str().unwrap().starts_with("refused"),
        "{out}"
    );
    assert!(!std::path::Path::new("/tmp/audiences-flight-sql-copy.csv").exists());

    // do_put: one new row committed, the duplicate dropped, two rejected with their reasons
    let out: serde_json::Value = serde_json::from_str(&python(PUT, &[&server.flight])).unwrap();
    assert_eq!(out["put"]["accepted"], 1, "{out}");
    assert_eq!(out["put"]["duplicates"], 1, "{out}");
    assert_eq!(out["put"]["rejected"], 2, "{out}");
    let codes: Vec<&str> = out["put"]["rejections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["missing_event", "missing_identity"]);
    assert_eq!(out["put_as_reader"], "unauthorized", "{out}");
    assert_eq!(
        rows(
            "default",
            "SELECT count(*) AS n FROM events WHERE message_id = 'put-1' AND \"properties.price:num\" = 3"
        )[0]["n"],
        1
    );
}

/// The Profile API through plain HTTP.
const PROFILE: &str = r#"
import json, sys, base64, urllib.request, urllib.error
host = sys.argv[1]
def get(path, key='read-token-1'):
    headers = {} if key is None else {'Authorization': 'Basic ' + base64.b64encode((key + ':').encode()).decode()}
    req = urllib.request.Request(host + path, headers=headers)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)
u = '/v1/spaces/default/collections/users/profiles/user_id:u-1'
out = {}
st, out['traits'], h = get(u + '/traits?limit=200')
out['request_id'] = any(k.lower() == 'request-id' for k in h)
out['audiences_only'] = get(u + '/traits?class=audience')[1]
out['include'] = get(u + '/traits?include=plan')[1]
out['verbose'] = get(u + '/traits?include=plan&verbose=true')[1]
keys, nxt = [], ''
while True:
    st, page, _ = get(u + '/traits?limit=1' + ('&next=' + nxt if nxt else ''))
    assert st == 200, page
    if not keys:
        out['first_page'] = page
    keys += list(page['traits'])
    nxt = page['cursor']['next']
    if not page['cursor']['has_more']:
        break
out['paged'] = keys
out['bad_limit'] = get(u + '/traits?limit=0')[:2]
out['external_ids'] = get(u + '/external_ids')[1]
types, nxt = [], ''
while True:
    st, page, _ = get(u + '/events?limit=1' + ('&next=' + nxt if nxt else ''))
    assert st == 200, page
    types += [e['type'] for e in page['data']]
    nxt = page['cursor']['next']
    if not page['cursor']['has_more']:
        break
out['events_pages'] = types
out['metadata'] = get(u + '/metadata')[1]
out['links'] = get(u + '/links')[1]
a = '/v1/spaces/default/collections/accounts/profiles/group_id:acct-1'
out['account_traits'] = get(a + '/traits')[1]
out['account_links'] = get(a + '/links')[1]
out['missing'] = get('/v1/spaces/default/collections/users/profiles/user_id:nobody/traits')[:2]
out['other_space'] = get('/v1/spaces/other/collections/users/profiles/user_id:u-1/traits')[:2]
out['other_token'] = get(u + '/traits', key='other-token')[:2]
out['no_auth'] = get(u + '/traits', key=None)[:2]
out['wrong_token'] = get(u + '/traits', key='wrong')[:2]
req = urllib.request.Request(host + u + '/traits', headers={'Authorization': 'Bearer read-token-1'})
try:
    urllib.request.urlopen(req)
    out['bearer'] = 'ok'
except urllib.error.HTTPError as e:
    out['bearer'] = [e.code, json.loads(e.read())]
out['malformed_id'] = get('/v1/spaces/default/collections/users/profiles/nocolon/traits')[:2]
print(json.dumps(out))
"#;

/// One management API call.
const MANAGE: &str = r#"
import json, sys, base64, urllib.request, urllib.error
host, step = sys.argv[1], sys.argv[2]
def call(method, path, body=None, key='admin-token-1'):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(host + path, data=data, method=method,
        headers={'Content-Type': 'application/json', 'Authorization': 'Basic ' + base64.b64encode((key + ':').encode()).decode()})
    try:
        with urllib.request.urlopen(req) as r:
            return {'status': r.status, 'body': json.loads(r.read())}
    except urllib.error.HTTPError as e:
        return {'status': e.code, 'body': json.loads(e.read())}
base = '/v1/spaces/default/audiences'
v1 = {'key': 'big_buyers', 'kind': 'audience', 'definition': "event('Order Completed').count() >= 1 AND trait('plan') = 'pro'"}
v2 = {'key': 'big_buyers', 'kind': 'audience', 'definition': "event('Order Completed').count() >= 1"}
out = {
    'create': lambda: call('POST', base, v1),
    'create_as_reader': lambda: call('POST', base, v1, key='read-token-1'),
    'list': lambda: call('GET', base, key='read-token-1'),
    'show': lambda: call('GET', base + '/big_buyers', key='read-token-1'),
    'preview': lambda: call('POST', base + '/preview', v2, key='read-token-1'),
    'edit': lambda: call('PUT', base + '/big_buyers', v2),
    'delete': lambda: call('DELETE', base + '/big_buyers'),
    'show_other_space': lambda: call('GET', '/v1/spaces/other/audiences/buyers', key='read-token-1'),
}[step]()
print(json.dumps(out))
"#;

/// The ADBC Flight SQL driver (username: the space; password: the token).
const FLIGHT_SQL: &str = r#"
import json, sys
import adbc_driver_flightsql.dbapi as fs
loc = sys.argv[1]
def connect(space, token):
    return fs.connect('grpc://' + loc, db_kwargs={'username': space, 'password': token})
out = {}
with connect('default', 'read-token-1') as conn:
    with conn.cursor() as cur:
        cur.execute('SELECT audience_key, count(*) AS n FROM memberships GROUP BY audience_key ORDER BY audience_key')
        out['counts'] = [list(r) for r in cur.fetchall()]
        cur.execute('SELECT count(*) FROM events')
        out['events'] = cur.fetchone()[0]
        # a statement (and so its ticket) far over 64 KiB
        others = ', '.join(f"'not-an-audience-{i:05}'" for i in range(4000))
        cur.execute(f'SELECT count(*) FROM memberships WHERE audience_key NOT IN ({others})')
        out['long_statement'] = cur.fetchone()[0]
        for name, sql in [('ddl', 'CREATE TABLE x AS SELECT 1'), ('copy', "COPY (SELECT 1) TO '/tmp/audiences-flight-sql-copy.csv'")]:
            try:
                cur.execute(sql)
                cur.fetchall()
                out[name] = 'ran'
            except Exception as e:
                out[name] = 'refused: ' + str(e).split('\n')[0]
    objs = conn.adbc_get_objects(depth='tables').read_all().to_pylist()
    out['tables'] = sorted(t['table_name'] for c in objs for s in (c['catalog_db_schemas'] or []) for t in (s['db_schema_tables'] or []))
    out['table_types'] = conn.adbc_get_table_types()
with connect('other', 'other-token') as conn:
    with conn.cursor() as cur:
        cur.execute('SELECT count(*) FROM events')
        out['other_events'] = cur.fetchone()[0]
print(json.dumps(out))
"#;

/// Flight do_put of event rows.
const PUT: &str = r#"
import json, sys
import pyarrow as pa
import pyarrow.flight as fl
loc = sys.argv[1]
def client(token):
    c = fl.FlightClient('grpc://' + loc)
    h = c.authenticate_basic_token('', token)
    return c, fl.FlightCallOptions(headers=[h])
out = {}
w, wopts = client('write-key-1')
table = pa.table({
    'message_id': ['put-1', 'put-2', 'put-3', 'put-1'],
    'type': ['track', 'track', 'identify', 'track'],
    'event': ['Order Completed', None, None, 'Order Completed'],
    'user_id': ['p-1', 'p-2', None, 'p-1'],
    'timestamp': pa.array([1767225600000000] * 4, pa.timestamp('us', tz='UTC')),
    'properties': ['{"price": 3}', None, None, '{"price": 3}'],
})
writer, reader = w.do_put(fl.FlightDescriptor.for_path('events'), table.schema, wopts)
writer.write_table(table)
writer.done_writing()
out['put'] = json.loads(reader.read().to_pybytes())
writer.close()
r, ropts = client('read-token-1')
try:
    wr, rd = r.do_put(fl.FlightDescriptor.for_path('events'), table.schema, ropts)
    wr.write_table(table)
    wr.done_writing()
    rd.read()
    wr.close()
    out['put_as_reader'] = 'ok'
except fl.FlightUnauthorizedError:
    out['put_as_reader'] = 'unauthorized'
except Exception as e:
    out['put_as_reader'] = type(e).__name__ + ': ' + str(e)
print(json.dumps(out))
"#;

/// Exports three ways, and the reference rendering.
const EXPORTS: &str = r#"
import csv, io, json, sys, hashlib, base64, urllib.request, urllib.error
import pyarrow.flight as fl
host, loc, cli, ids, members = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), json.loads(sys.argv[5])
rows = lambda text: [r for r in csv.reader(io.StringIO(text))]
per = {p: {} for p in members}
for r in ids:
    if r['profile_id'] in per:
        per[r['profile_id']].setdefault(r['id_type'], set()).add(r['id_value'])
types = sorted({t for p in per.values() for t in p})
def ext(p):
    return json.dumps({t: sorted(per[p][t]) for t in types if t in per[p]}, separators=(',', ':'), ensure_ascii=False)
exp = {}
exp['unformatted'] = [['key', 'external_ids']] + [[p, ext(p)] for p in sorted(per)]
width = {t: max(len(per[p].get(t, ())) for p in per) for t in types}
head = ['key', 'external_ids'] + [t if i == 0 else f'{t}_{i}' for t in types for i in range(width[t])]
body = []
for p in sorted(per):
    row = [p, ext(p)]
    for t in types:
        vals = sorted(per[p].get(t, ()))
        row += [vals[i] if i < len(vals) else '' for i in range(width[t])]
    body.append(row)
exp['formatted'] = [head] + body
def single(raw):
    out = [['email']]
    for p in sorted(per):
        seen = []
        for v in sorted(per[p].get('email', ())):
            n = v.strip().lower()
            if n and n not in seen:
                seen.append(n)
                out.append([n if raw else hashlib.sha256(n.encode()).hexdigest()])
    return out
exp['single'], exp['single_raw'] = single(False), single(True)
res = {'expected': exp, 'cli': {k: rows(v) for k, v in cli.items()}, 'http': {}, 'flight': {}}
import duckdb, tempfile, os
with tempfile.NamedTemporaryFile('w', suffix='.csv', delete=False) as f:
    f.write(cli['formatted'])
t = duckdb.read_csv(f.name, header=True, all_varchar=True)
res['duckdb_formatted'] = [t.columns] + [['' if v is None else v for v in r] for r in t.fetchall()]
os.remove(f.name)
def get(path, key):
    req = urllib.request.Request(host + path, headers={'Authorization': 'Basic ' + base64.b64encode((key + ':').encode()).decode()})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)
base = '/v1/spaces/default/audiences/buyers/export.csv'
for f, q in [('unformatted', 'format=unformatted'), ('formatted', 'format=formatted'), ('single', 'format=single&id_type=email')]:
    st, text, h = get(base + '?' + q, 'read-token-1')
    assert st == 200, (st, text)
    res['http'][f] = rows(text)
    res['version'] = h.get('x-audience-version') or h.get('X-Audience-Version')
st, text, _ = get(base + '?format=single&id_type=email&hash=none', 'admin-token-1')
res['http']['single_raw_as_admin'] = rows(text)
res['http_raw_as_reader'] = get(base + '?format=single&id_type=email&hash=none', 'read-token-1')[0]
res['http_other_space'] = get('/v1/spaces/other/audiences/buyers/export.csv', 'read-token-1')[0]
c = fl.FlightClient('grpc://' + loc)
opts = fl.FlightCallOptions(headers=[c.authenticate_basic_token('', 'read-token-1')])
for f, path in [('unformatted', ['exports', 'buyers', 'unformatted']), ('formatted', ['exports', 'buyers', 'formatted']), ('single', ['exports', 'buyers', 'single', 'email'])]:
    info = c.get_flight_info(fl.FlightDescriptor.for_path(*path), opts)
    t = c.do_get(info.endpoints[0].ticket, opts).read_all()
    res['flight'][f] = [t.schema.names] + [['' if v is None else v for v in r.values()] for r in t.to_pylist()]
print(json.dumps(res))
"#;

/// Without a config: an admin token is made on the first start, printed once, and kept only as
/// a digest (it still works after a restart, and is not printed again). Queries over the memory
/// limit fail cleanly. SIGTERM shuts down gracefully. `--insecure-no-auth` says so and needs no
/// token.
#[test]
fn first_start_token_memory_limit_shutdown_and_insecure_mode() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let store = store.to_str().unwrap();
    let mut early = Vec::new();
    let mut server = start_with(
        store,
        &[],
        &["--query-memory", "4MB", "--profile-api-rate", "1"],
        &mut early,
    );
    let token = early
        .iter()
        .find_map(|l| l.split("(shown this once; keep it): ").nth(1))
        .unwrap_or_else(|| panic!("no token printed: {early:?}"))
        .trim()
        .to_string();
    let digest = std::fs::read_to_string(
        dir.path()
            .join("store/spaces/default/_auth/admin_token.json"),
    )
    .unwrap();
    assert!(!digest.contains(&token), "only the digest is stored");
    let out: serde_json::Value =
        serde_json::from_str(&python(TOKEN_AND_MEMORY, &[&server.flight, &token])).unwrap();
    assert_eq!(out["flights"], 0, "{out}");
    assert_eq!(out["small"], 55);
    let big = out["big"].as_str().unwrap();
    assert!(big.to_lowercase().contains("resources exhausted"), "{big}");
    // over the Profile API rate: 429 rate_limit_error with Retry-After
    let out: serde_json::Value =
        serde_json::from_str(&python(RATE, &[&format!("http://{}", server.http), &token])).unwrap();
    assert_eq!(out[0][0], 404, "{out}");
    assert_eq!(out[1][0], 429, "{out}");
    assert_eq!(out[1][1]["error"]["code"], "rate_limit_error");
    assert!(
        out[1][2]
            .as_str()
            .is_some_and(|s| s.parse::<u64>().unwrap() >= 1),
        "{out}"
    );
    // graceful shutdown on SIGTERM
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // restart: the token is not printed again and still works
    let mut early = Vec::new();
    let server = start_with(store, &[], &[], &mut early);
    assert!(
        !early.iter().any(|l| l.contains("admin token")),
        "{early:?}"
    );
    let out: serde_json::Value =
        serde_json::from_str(&python(TOKEN_AND_MEMORY, &[&server.flight, &token])).unwrap();
    assert_eq!(out["flights"], 0);
    drop(server);
    // insecure mode: loud, and no handshake needed
    let mut early = Vec::new();
    let server = start_with(store, &[], &["--insecure-no-auth"], &mut early);
    assert!(
        early
            .iter()
            .any(|l| l.contains("WARNING: --insecure-no-auth")),
        "{early:?}"
    );
    let out = python(
        "import sys, pyarrow.flight as fl\nc = fl.FlightClient('grpc://' + sys.argv[1])\nprint(len(list(c.list_flights())))",
        &[&server.flight],
    );
    assert_eq!(out.trim(), "0");
}

/// Handshake with a token; a small query and one over the memory limit through Flight SQL.
const TOKEN_AND_MEMORY: &str = r#"
import json, sys
import pyarrow.flight as fl
import adbc_driver_flightsql.dbapi as fs
loc, token = sys.argv[1], sys.argv[2]
c = fl.FlightClient('grpc://' + loc)
opts = fl.FlightCallOptions(headers=[c.authenticate_basic_token('', token)])
out = {'flights': len(list(c.list_flights(options=opts)))}
with fs.connect('grpc://' + loc, db_kwargs={'username': 'default', 'password': token}) as conn:
    with conn.cursor() as cur:
        cur.execute('SELECT sum(value) FROM generate_series(1, 10)')
        out['small'] = cur.fetchone()[0]
        try:
            cur.execute('SELECT array_agg(value) FROM generate_series(1, 3000000)')
            cur.fetchall()
            out['big'] = 'ran'
        except Exception as e:
            out['big'] = str(e)
print(json.dumps(out))
"#;

/// Two Profile API calls in a row against a rate of 1/s.
const RATE: &str = r#"
import json, sys, base64, urllib.request, urllib.error
host, token = sys.argv[1], sys.argv[2]
out = []
for _ in range(2):
    req = urllib.request.Request(host + '/v1/spaces/default/collections/users/profiles/user_id:x/traits',
        headers={'Authorization': 'Basic ' + base64.b64encode((token + ':').encode()).decode()})
    try:
        urllib.request.urlopen(req)
        out.append([200])
    except urllib.error.HTTPError as e:
        out.append([e.code, json.loads(e.read()), e.headers.get('Retry-After')])
print(json.dumps(out))
"#;

/// 32 Flight clients pull an audience while new events arrive and refreshes commit new
/// versions: no errors, and every stream equals exactly the membership of the version its
/// ticket pinned.
#[test]
fn concurrent_pulls_while_refreshes_commit_read_one_version_each() {
    let (dir, store) = ingested_dir(3000, 17);
    let store = store.as_str();
    let cfg = dir.path().join("cfg.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let def = dir.path().join("buyers.json");
    std::fs::write(
        &def,
        r#"{"key": "buyers", "kind": "audience", "definition": "event('Order Completed').count() >= 1"}"#,
    )
    .unwrap();
    run_ok(store, &["audience", "create", def.to_str().unwrap()]);
    let server = start(store, &cfg);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while run_ok(
        store,
        &["--json", "sql", "SELECT count(*) AS n FROM memberships"],
    )
    .contains("\"n\":0")
    {
        assert!(std::time::Instant::now() < deadline, "no first version");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let out: serde_json::Value = serde_json::from_str(&python(
        CONCURRENT,
        &[&server.flight, &format!("http://{}", server.http)],
    ))
    .unwrap();
    assert_eq!(out["errors"], serde_json::json!([]), "{out}");
    let pulls = out["pulls"].as_array().unwrap();
    assert!(pulls.len() >= 32 * 4, "{}", pulls.len());
    let mut by_version: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
    for p in pulls {
        let v = p[0].as_u64().unwrap();
        let ids: Vec<String> = serde_json::from_value(p[1].clone()).unwrap();
        let want = by_version
            .entry(v)
            .or_insert_with(|| sorted_members(store, "buyers", v));
        assert_eq!(
            &ids, want,
            "a stream of version {v} differs from that version"
        );
    }
    assert!(
        by_version.len() >= 2,
        "refreshes committed during the pulls: {:?}",
        by_version.keys()
    );
    drop(server);
    // Streams the server does not keep (no cache; a cache smaller than the stream) are built
    // and encoded for each pull: three pulls of one version each equal that version.
    for cache in ["0", "1KiB"] {
        let server = start_with(
            store,
            &["--config", cfg.to_str().unwrap()],
            &["--serving-cache", cache],
            &mut Vec::new(),
        );
        let out: serde_json::Value =
            serde_json::from_str(&python(PULL_THRICE, &[&server.flight])).unwrap();
        let v = out["version"].as_u64().unwrap();
        let want = by_version
            .get(&v)
            .cloned()
            .unwrap_or_else(|| sorted_members(store, "buyers", v));
        assert!(want.len() > 10, "{}", want.len()); // (and its frames over 1 KiB)
        let pulls: Vec<Vec<String>> = serde_json::from_value(out["pulls"].clone()).unwrap();
        assert_eq!(pulls, vec![want; 3], "--serving-cache {cache}");
    }
}

/// Three pulls of one pinned version.
const PULL_THRICE: &str = r#"
import json, sys
import pyarrow.flight as fl
c = fl.FlightClient('grpc://' + sys.argv[1])
opts = fl.FlightCallOptions(headers=[c.authenticate_basic_token('', 'read-token-1')])
t = c.get_flight_info(fl.FlightDescriptor.for_path('audiences', 'buyers'), opts).endpoints[0].ticket
pulls = [sorted(c.do_get(t, opts).read_all().column('profile_id').to_pylist()) for _ in range(3)]
print(json.dumps({'version': json.loads(t.ticket)['version'], 'pulls': pulls}))
"#;

/// The profile ids of version `v` of audience `key`, sorted, as `audiences members` lists them.
fn sorted_members(store: &str, key: &str, v: u64) -> Vec<String> {
    let m: Vec<serde_json::Value> = serde_json::from_str(&run_ok(
        store,
        &[
            "members",
            key,
            "--version",
            &v.to_string(),
            "--format",
            "json",
        ],
    ))
    .unwrap();
    let mut ids: Vec<String> = m
        .iter()
        .map(|r| r["profile_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// 32 pulling threads and one writer posting new buyers.
const CONCURRENT: &str = r#"
import json, sys, threading, time, base64, urllib.request
import pyarrow.flight as fl
loc, host = sys.argv[1], sys.argv[2]
pulls, errors = [], []
lock = threading.Lock()
stop = threading.Event()
def writer():
    for i in range(25):
        body = json.dumps({'batch': [{'type': 'track', 'userId': f'new-{i}', 'event': 'Order Completed'}]}).encode()
        req = urllib.request.Request(host + '/v1/batch', data=body, method='POST', headers={'Content-Type': 'application/json', 'Authorization': 'Basic ' + base64.b64encode(b'write-key-1:').decode()})
        try:
            urllib.request.urlopen(req).read()
        except Exception as e:
            with lock: errors.append('write: ' + str(e))
        time.sleep(0.12)
def puller():
    try:
        c = fl.FlightClient('grpc://' + loc)
        opts = fl.FlightCallOptions(headers=[c.authenticate_basic_token('', 'read-token-1')])
        n, deadline = 0, time.time() + 60
        # at least 4 pulls each, and on until pulls have seen two versions (a refresh committed)
        while n < 4 or (len({p[0] for p in pulls}) < 2 and time.time() < deadline):
            n += 1
            info = c.get_flight_info(fl.FlightDescriptor.for_path('audiences', 'buyers'), opts)
            t = info.endpoints[0].ticket
            version = json.loads(t.ticket)['version']
            ids = sorted(c.do_get(t, opts).read_all().column('profile_id').to_pylist())
            with lock: pulls.append([version, ids])
            time.sleep(0.3)
    except Exception as e:
        with lock: errors.append('pull: ' + str(e))
w = threading.Thread(target=writer)
w.start()
ts = [threading.Thread(target=puller) for _ in range(32)]
for t in ts: t.start()
for t in ts: t.join()
w.join()
print(json.dumps({'pulls': pulls, 'errors': errors}))
"#;
