#!/usr/bin/env python3
"""The whole BENCH.md measurement in one command (issue 9): ingest, the audience suite (queries
1-8 and suite mode q9), refresh after 1% deltas, serving (CSV, SHA-256, Flight), each against
its peers in the same run, 2 threads everywhere, memberships checked equal before any timing
counts. Each part is one of the harnesses beside this file; this runs them in order at one
scale and writes their tables into one Markdown report.

Scales: S = 1M events, M = 10M, L = 100M (BENCH.md). `--reduced` is the quick mode (S, one
timed run per measure, 2 deltas, no datafusion-python): a few minutes on the 2-core machine.
`--check` runs only the correctness gates (every engine's membership equal to ours, refreshes
equal to a full compute), no timings; CI runs it with a debug build at a small scale.

Usage: python3 benches/run.py [--scale S|M|L] [--reduced] [--check] [--events N]
                              [--runs N] [--deltas N] [--ingest-runs N]
                              [--bin PATH] [--out REPORT.md] [--only ingest,audiences,refresh,serving]
"""
import argparse, datetime, os, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
SCALES = {"S": 1_000_000, "M": 10_000_000, "L": 100_000_000}
PARTS = ["ingest", "audiences", "refresh", "serving"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", choices=SCALES, default="M")
    ap.add_argument("--events", type=int, help="override the scale's event count")
    ap.add_argument("--reduced", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bin", default=os.path.expanduser("~/.cache/audiences-target/release/audiences"))
    ap.add_argument("--out", default=None, help="Markdown report (default: bench-report-SCALE.md)")
    ap.add_argument("--only", default=",".join(PARTS))
    ap.add_argument("--runs", type=int, help="timed runs per measure (default 5, reduced 1)")
    ap.add_argument("--deltas", type=int, help="refresh deltas (default 20, reduced 2)")
    ap.add_argument("--ingest-runs", type=int, help="timed ingest runs (default: --runs at S, 1 at M and L, where one takes minutes)")
    a = ap.parse_args()
    if not os.path.exists(a.bin):
        sys.exit(f"{a.bin} not found: cargo build --release first (or --bin PATH)")
    n = a.events or SCALES["S" if a.reduced and not a.events else a.scale]
    runs = a.runs or (1 if a.reduced else 5)
    deltas = a.deltas or (2 if a.reduced else 20)
    ingest_runs = a.ingest_runs or (runs if n <= SCALES["S"] else 1)
    parts = [p.strip() for p in a.only.split(",") if p.strip()]
    if set(parts) - set(PARTS):
        sys.exit(f"--only takes {', '.join(PARTS)}")
    b = ["--bin", a.bin]
    if a.check:
        # correctness gates only: no timed runs, no timing peers
        plan = {
            "audiences": ["audiences.py", "--events", str(n), "--suite", "--check"] + b,
            "refresh": ["refresh.py", "--events", str(n), "--deltas", "2"] + b,
        }
    else:
        plan = {
            "ingest": ["ingest.py", "--events", str(n), "--runs", str(ingest_runs)] + b,
            "audiences": ["audiences.py", "--events", str(n), "--runs", str(runs), "--suite"]
            + ([] if a.reduced else ["--datafusion-python"]) + b,
            "refresh": ["refresh.py", "--events", str(n), "--deltas", str(deltas)] + b,
            "serving": ["serving.py", "--events", str(n), "--runs", str(max(runs, 3))] + b,
        }
    out = a.out or f"bench-report-{'check' if a.check else a.scale if not a.reduced else 'reduced'}.md"
    report = [f"# audiences benchmark, {n:,} events{' (reduced)' if a.reduced else ''}{' (check only)' if a.check else ''}",
              f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, binary {a.bin}\n"]
    started = time.perf_counter()
    for part in parts:
        if part not in plan:
            continue
        cmd = [sys.executable, os.path.join(HERE, plan[part][0])] + plan[part][1:]
        print(f"== {part}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        sys.stdout.write(p.stdout)
        if p.returncode != 0:
            sys.exit(f"{part} failed (exit {p.returncode})")
        tables = "\n".join(l for l in p.stdout.splitlines() if l.startswith("|") or l.startswith("check passed") or "rows/s" in l)
        report.append(f"## {part} ({time.perf_counter() - t:.0f} s)\n\n`python3 benches/{' '.join(plan[part])}`\n\n{tables}\n")
    report.append(f"Total {time.perf_counter() - started:.0f} s.")
    with open(out, "w") as f:
        f.write("\n".join(report) + "\n")
    print(f"report: {out}")


if __name__ == "__main__":
    main()
