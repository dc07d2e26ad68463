#!/usr/bin/env python3
"""Refresh benchmark (BENCH.md): micro-batch refreshes after 1% deltas against our own full
compute and DuckDB's full recompute of the suite, on the same store.

Setup: generate N events, ingest, resolve identities, create the suite's definitions (BENCH.md
queries 1-8 and the revenue_180d trait high_value reads), compute everything at
2026-01-01T00:00:00Z. Then D times: generate delta round r (FRACTION x N events on day r+1
after the end, existing and new profiles), ingest it (timed apart), and time
`audiences refresh --as-of <end of day r+1>` (process start to commit, 2 threads). Finally:

  - our full compute of the whole suite at the last as-of (`audiences compute`), which must
    leave every membership exactly as the refreshes left it (checked);
  - DuckDB's recompute of the suite at the last as-of, query by query, over the same Parquet
    and the same resolved ids; its memberships must equal ours (checked).

Prints p50/p95 of the refreshes, their modes and affected profiles, and the ratios.

With --serve, the refreshes run in one `audiences serve --refresh-interval off` process, asked
for by the Flight `refresh` action (pyarrow.flight) and timed from the client: the server keeps
the identity graph in memory between refreshes, as a deployment's refresh loop does. The
ingests stay separate processes.

Usage: python3 benches/refresh.py [--events 10000000] [--deltas 20] [--fraction 0.01]
                                  [--bin PATH] [--keep DIR] [--serve]
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import audiences as suite  # noqa: E402  (the query suite and DuckDB runner)

DAY = 86_400


def iso(epoch):
    import datetime
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--deltas", type=int, default=20)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--bin", default=os.path.expanduser("~/.cache/audiences-target/release/audiences"))
    ap.add_argument("--keep", help="keep (or reuse, if it exists) the base store in this directory")
    ap.add_argument("--serve", action="store_true", help="refresh through a running server's Flight action")
    a = ap.parse_args()
    env = dict(os.environ, TOKIO_WORKER_THREADS="2", RAYON_NUM_THREADS="2")
    work = tempfile.mkdtemp(prefix="audiences-refresh-bench-")
    store = os.path.join(work, "store")
    queries = [q for q in suite.QUERIES if q[0] != "q7t"]
    end = 1767225600  # 2026-01-01T00:00:00Z
    base = a.keep
    if base and os.path.exists(base):
        shutil.copytree(base, store)
    else:
        src = os.path.join(work, "events.ndjson")
        subprocess.run([a.bin, "generate", "--events", str(a.events), "--seed", "42", "-o", src], check=True)
        subprocess.run([a.bin, "--store", store, "ingest", src, "--dead-letter", os.path.join(work, "dead")], check=True, env=env, stdout=subprocess.DEVNULL)
        os.remove(src)
        defs = os.path.join(suite.ROOT, "data", "definitions")
        files = ["revenue_180d.json"] + list(dict.fromkeys(q[3] for q in queries))
        for f in files:
            kind = "trait" if "revenue" in f else "audience"
            subprocess.run([a.bin, "--store", store, kind, "create", os.path.join(defs, f)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([a.bin, "--store", store, "compute", "--as-of", iso(end)], check=True, env=env, stdout=subprocess.DEVNULL)
        if base:
            shutil.copytree(store, base)
    times, ingests, reports = [], [], []
    server = client = None
    if a.serve:
        import time
        import pyarrow.flight as fl
        server, loc = suite.serve(a.bin, store, env, "off")
        client = fl.FlightClient("grpc://" + loc)

        def peak_kb():
            with open(f"/proc/{server.pid}/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    for r in range(a.deltas):
        delta = os.path.join(work, f"delta{r}.ndjson")
        subprocess.run([a.bin, "generate", "--events", str(a.events), "--seed", "42", "--delta", str(a.fraction),
                        "--delta-round", str(r), "-o", delta], check=True)
        dt, _, _ = suite.run([a.bin, "--store", store, "ingest", delta, "--dead-letter", os.path.join(work, "dead")], env)
        ingests.append(dt)
        os.remove(delta)
        as_of = iso(end + (r + 1) * DAY)
        if server:
            t = time.perf_counter()
            res = list(client.do_action(fl.Action("refresh", json.dumps({"as_of": as_of}).encode())))
            dt, kb = time.perf_counter() - t, peak_kb()
            rep = json.loads(res[0].body.to_pybytes())
        else:
            dt, kb, out = suite.run([a.bin, "--store", store, "--json", "refresh", "--as-of", as_of], env)
            rep = json.loads(out)
        times.append((dt, kb))
        reports.append(rep)
        modes = {}
        for k in rep["keys"]:
            modes[k["mode"]] = modes.get(k["mode"], 0) + 1
        affected = max((k["affected"] for k in rep["keys"]), default=0)
        print(f"delta {r:>2}: ingest {ingests[-1]:6.2f}s  refresh {dt:6.2f}s  rows read {rep['new_event_rows']:>8}  "
              f"modes {modes}  max affected {affected}  peak {kb/1024:.0f} MiB", flush=True)
    if server:
        server.terminate()
        server.wait()
    last = iso(end + a.deltas * DAY)
    keys = [q[1] for q in queries]

    def memberships():
        out = {}
        for lab, key, level, *_ in queries:
            id_col = "account_id" if level == "accounts" else "profile_id"
            got = json.loads(subprocess.run([a.bin, "--store", store, "members", key, "--format", "json"], check=True, capture_output=True, text=True).stdout)
            out[key] = sorted(r[id_col] for r in got)
        return out

    after_refresh = memberships()
    full, full_kb, _ = suite.run([a.bin, "--store", store, "--json", "compute", "--as-of", last], env)
    if memberships() != after_refresh:
        sys.exit("a full compute at the last as-of changed memberships the refreshes produced")
    # DuckDB: the whole suite at the last as-of, query by query.
    import pyarrow as pa
    tables = {"keys": os.path.join(work, "keys.parquet"), "links": os.path.join(work, "links.parquet"), "atraits": os.path.join(work, "atraits.parquet")}
    suite.export(a.bin, store, env, "SELECT i.identity_key, i.profile_id, p.known FROM identities i JOIN profiles p USING (profile_id) WHERE i.id_type IN ('user_id', 'anonymous_id')",
                 tables["keys"], pa.schema([("identity_key", pa.int64()), ("profile_id", pa.string()), ("known", pa.bool_())]))
    suite.export(a.bin, store, env, "SELECT l.account_id, p.profile_id, p.known FROM account_links l JOIN profiles p USING (profile_idx)",
                 tables["links"], pa.schema([("account_id", pa.string()), ("profile_id", pa.string()), ("known", pa.bool_())]))
    suite.export(a.bin, store, env, "SELECT account_id, key, value_str FROM traits WHERE entity = 'account'",
                 tables["atraits"], pa.schema([("account_id", pa.string()), ("key", pa.string()), ("value_str", pa.string())]))
    duck_script = suite.DUCK.replace("2026-01-01 00:00:00+00", last.replace("T", " ").replace("Z", "+00"))
    duck_total, duck_kb = 0.0, 0
    for lab, key, level, _, sql, *_ in queries:
        dt, kb, out = suite.run([sys.executable, "-c", duck_script, store, sql, json.dumps(tables)], env)
        if json.loads(out) != after_refresh[key]:
            sys.exit(f"{lab} {key}: DuckDB's membership differs from ours after the refreshes")
        duck_total += dt
        duck_kb = max(duck_kb, kb)
    ts = sorted(t for t, _ in times)
    p50 = statistics.median(ts)
    p95 = ts[min(len(ts) - 1, int(round(0.95 * (len(ts) - 1))))]
    print(f"\n{a.deltas} deltas of {a.fraction:.0%} x {a.events:,} events; memberships after the refreshes = full compute = DuckDB (checked)")
    print("| measure | seconds | ratio |")
    print("|---|---:|---:|")
    how = "through `serve` (graph kept)" if a.serve else "(one process each)"
    print(f"| refresh p50 {how} | {p50:.2f} | |")
    print(f"| refresh p95 | {p95:.2f} | |")
    print(f"| our full compute of the suite | {full:.2f} | {full / p50:.2f}x the p50 refresh |")
    print(f"| DuckDB recompute of the suite (query by query) | {duck_total:.2f} | {duck_total / p50:.2f}x the p50 refresh |")
    print(f"| ingest of one delta (p50) | {statistics.median(ingests):.2f} | |")
    print(f"peak RSS: refresh {max(k for _, k in times) / 1024:.0f} MiB, full compute {full_kb / 1024:.0f} MiB, DuckDB {duck_kb / 1024:.0f} MiB")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
