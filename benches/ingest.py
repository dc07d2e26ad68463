#!/usr/bin/env python3
"""Ingest benchmark: NDJSON -> committed Parquet, ours vs DuckDB read_json -> COPY TO parquet.

Same file, same thread count (2), hot page cache, 1 warm-up then the median of N runs, each run
into a fresh output directory. Peak RSS from /usr/bin/time. A timing counts only when both sides
wrote every event (checked by counting rows of what each wrote, with DuckDB).

Usage: python3 benches/ingest.py [--events 1000000 10000000] [--runs 5] [--bin PATH]
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time

def timed(cmd, env=None):
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    rss_kb = int(p.stderr.strip().splitlines()[-1])
    return dt, rss_kb, p.stdout

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bin", default=os.path.expanduser("~/.cache/audiences-target/release/audiences"))
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="audiences-bench-")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, RAYON_NUM_THREADS="2", TOKIO_WORKER_THREADS="2")
    duck_script = (
        "import duckdb, sys; con = duckdb.connect(); con.execute('SET threads TO 2');"
        "con.execute(\"COPY (SELECT * FROM read_json(?, format='newline_delimited')) TO '\" + sys.argv[2] + \"' (FORMAT parquet, COMPRESSION zstd)\", [sys.argv[1]])"
    )
    rows = []
    for n in a.events:
        src = os.path.join(work, f"events-{n}.ndjson")
        if not os.path.exists(src):
            t = time.perf_counter()
            subprocess.run([a.bin, "generate", "--events", str(n), "--seed", "42", "-o", src], check=True)
            gen_s = time.perf_counter() - t
        else:
            gen_s = float("nan")
        size_mb = os.path.getsize(src) / 1e6
        results = {}
        for name in ["audiences", "duckdb"]:
            times, rss = [], []
            for i in range(a.runs + 1):
                out = os.path.join(work, f"out-{name}")
                shutil.rmtree(out, ignore_errors=True)
                if name == "audiences":
                    cmd = [a.bin, "--store", out, "--json", "ingest", src, "--dead-letter", os.path.join(work, "dead.ndjson")]
                else:
                    os.makedirs(out, exist_ok=True)
                    cmd = [sys.executable, "-c", duck_script, src, os.path.join(out, "events.parquet")]
                dt, kb, stdout = timed(cmd, env)
                if name == "audiences":
                    rep = json.loads(stdout)
                    assert rep["accepted"] == n, rep
                if i > 0:
                    times.append(dt); rss.append(kb)
            # Both sides wrote every event: count with DuckDB.
            import duckdb
            glob = os.path.join(out, "spaces/default/events/*/*.parquet") if name == "audiences" else os.path.join(out, "events.parquet")
            cnt = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{glob}', union_by_name = true)").fetchone()[0]
            assert cnt == n, (name, cnt, n)
            results[name] = (statistics.median(times), max(rss))
            if name == "audiences":
                # Identity resolution over the committed events, from scratch each run.
                its = []
                for i in range(max(1, a.runs // 2) + 1):
                    dt, kb, _ = timed([a.bin, "--store", out, "--json", "identity", "--full"], env)
                    if i > 0:
                        its.append(dt)
                results["identity"] = (statistics.median(its), kb)
        ours, duck = results["audiences"], results["duckdb"]
        rows.append((n, size_mb, gen_s, ours, duck, results["identity"]))
        print(f"{n:>11,} events {size_mb:8.0f} MB  generate {gen_s:6.2f}s | audiences {ours[0]:7.2f}s "
              f"({n/ours[0]:>10,.0f} ev/s, {ours[1]/1024:6.0f} MiB) | duckdb {duck[0]:7.2f}s "
              f"({n/duck[0]:>10,.0f} ev/s, {duck[1]/1024:6.0f} MiB) | ratio {duck[0]/ours[0]:.2f}x | identity {results['identity'][0]:.2f}s", flush=True)
    print("\n| events | NDJSON MB | generate s | audiences ingest s (ev/s) | DuckDB s (ev/s) | speed-up vs DuckDB | peak RSS ours / DuckDB | identity --full s (share of ingest) | identity peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, mb, g, o, d, idn in rows:
        print(f"| {n:,} | {mb:.0f} | {g:.2f} | {o[0]:.2f} ({n/o[0]:,.0f}) | {d[0]:.2f} ({n/d[0]:,.0f}) | {d[0]/o[0]:.2f}x | {o[1]/1024:.0f} / {d[1]/1024:.0f} MiB | {idn[0]:.2f} ({idn[0]/o[0]:.0%}) | {idn[1]/1024:.0f} MiB |")

if __name__ == "__main__":
    main()
