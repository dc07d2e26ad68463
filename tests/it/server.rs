//! `audiences serve` through clients we did not write: Segment's `segment-analytics-python`
//! library against the tracking API, raw HTTP for validation answers and auth, and
//! `pyarrow.flight` for the handshake, flights, memberships with external ids, changes, actions,
//! scopes and space isolation. Results are checked against the CLI's view of the same store.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

use crate::common::*;

struct Server {
    child: Child,
    flight: String,
    http: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(store: &str, config: &std::path::Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_audiences"))
        .args([
            "--store",
            store,
            "--config",
            config.to_str().unwrap(),
            "--json",
        ])
        .args(["serve", "--flight", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--refresh-interval", "300ms"])
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
info = c.get_flight_info(fl.FlightDescriptor.for_path('audiences', key, 'changes', '0'), opts)
out['changes'] = c.do_get(info.endpoints[0].ticket, opts).read_all().to_pylist()
out['actions'] = sorted(a.type for a in c.list_actions(opts))
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
    std::fs::write(
        &def,
        r#"{"key": "buyers", "kind": "audience", "definition": "event('Order Completed').count() >= 1"}"#,
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
    let out: serde_json::Value =
        serde_json::from_str(&python(FLIGHT, &[&server.flight, "buyers"])).unwrap();
    assert_eq!(out["flights"]["audiences/buyers"], 4, "{out}");
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
        serde_json::json!(["compute", "preview", "refresh"])
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

    // Exports: the CLI, HTTP and Flight give the same rows, and those equal an independent
    // rendering of the memberships and identities (Python's csv, json and hashlib).
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
    assert_eq!(out["http_other_space"], 404);
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
}

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
