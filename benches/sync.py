#!/usr/bin/env python3
"""Destination sync throughput (issue 8): a backfill to a local webhook receiver, calls per second
with batching off (one identify per request) and on (Segment `{"batch": [...]}` of 100).

Builds its own store: `generate --events N --ingest`, an audience of every buyer (fan-out per
email, so some members get several calls), `compute`; then for each setting connects a fresh
destination (a destinations-only edit: nothing recomputed) and times `audiences sync` (the whole
process) against `audiences destinations receive --quiet` on loopback. The rate limit is set out
of the way; the receiver counts what it received, which must equal the messages sync reports.

Usage: python3 benches/sync.py [--events 1000000] [--runs 3]
"""
import argparse, json, os, statistics, subprocess, tempfile, time

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--bin", default=os.path.expanduser("~/.cache/audiences-target/release/audiences"))
    a = ap.parse_args()
    env = dict(os.environ, TOKIO_WORKER_THREADS="2", RAYON_NUM_THREADS="2")
    work = tempfile.mkdtemp(prefix="audiences-sync-bench-")
    store = os.path.join(work, "store")
    run = lambda *args: subprocess.run([a.bin, "--store", store, *args], check=True, env=env,
                                       capture_output=True, text=True).stdout
    run("generate", "--events", str(a.events), "--ingest")
    d = {"key": "buyers", "kind": "audience", "definition": "event('Order Completed').count() >= 1"}
    path = os.path.join(work, "d.json")
    json.dump(d, open(path, "w"))
    run("audience", "create", path)
    run("compute", "--as-of", "2026-01-01T00:00:00Z")
    rx = subprocess.Popen([a.bin, "destinations", "receive", "--listen", "127.0.0.1:0", "--quiet"],
                          env=env, stderr=subprocess.PIPE, text=True)
    url = rx.stderr.readline().strip().rsplit(" ", 1)[-1]
    results = []
    for label, batch in [("batching off (1 message per request)", 1), ("batching on (100 per request)", 100)]:
        times, msgs, reqs = [], 0, 0
        for i in range(a.runs):
            d["destinations"] = [{"name": f"b{batch}-{i}", "kind": "webhook", "url": url, "mode": "identify",
                                  "id_type": "email", "batch_size": batch, "concurrency": a.concurrency,
                                  "rate_limit": {"per_second": 1e7, "burst": 10000}}]
            json.dump(d, open(path, "w"))
            run("audience", "edit", path, "--as-of", "2026-01-01T00:00:00Z")
            t = time.perf_counter()
            out = json.loads(run("--json", "sync"))
            times.append(time.perf_counter() - t)
            r = [x for x in out if x["destination"] == f"b{batch}-{i}"][0]
            assert r["error"] is None and r["sent"] == r["messages"], r
            msgs, reqs = r["messages"], r["requests"]
        med = statistics.median(times)
        results.append((label, msgs, reqs, med))
    rx.terminate()
    tail = rx.communicate(timeout=30)[1]
    received = int(tail.strip().split()[1]) if "received" in tail else None
    expected = sum(r[2] for r in results) * a.runs
    print(f"| setting | messages | requests | sync (median of {a.runs}) | messages/s | requests/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, msgs, reqs, med in results:
        print(f"| {label} | {msgs} | {reqs} | {med:.2f} s | {msgs / med:,.0f} | {reqs / med:,.0f} |")
    print(f"\nreceiver counted {received} requests (expected {expected})")
    assert received == expected, (received, expected)

if __name__ == "__main__":
    main()
