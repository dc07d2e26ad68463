#!/usr/bin/env python3
"""Serving benchmark (issue 7): CSV exports and Flight do_get against peers, same data.

Input: a store with a computed audience (default `everyone`: every profile, anonymous ones
included, so the audience is as large as the dataset allows), plus its members and the space's
identities exported once to Parquet for the peers (`--members`, `--ids`).

  1. formatted CSV export: `audiences export KEY --format formatted -o F` (whole process) against
     DuckDB `COPY (members LEFT JOIN identities GROUP BY profile, ids aggregated) TO F (HEADER)`;
  2. SHA-256 single-column export: `audiences export KEY --format single --id-type email` against
     DuckDB `COPY (SELECT DISTINCT profile, sha256(lower(trim(email))) ...)`, as rows per second;
  3. Flight `do_get` of the audience from `audiences serve` against a pyarrow.flight server
     serving the very same record batches from memory (what a plain Flight server costs), in a
     process of its own; pulls alternate between the two servers in a random order per round
     (this machine's load drifts by tens of percent within a minute), and each server's CPU
     time per pull is read from /proc. The first pull after our server starts is reported
     apart (it builds the space's id index).

2 threads everywhere, median of --runs, rows checked equal before timing.

Usage: python3 benches/serving.py --store DIR --members m.parquet --ids ids.parquet [--key K]
       python3 benches/serving.py --events N   (sets up its own store first)
       python3 benches/serving.py --store DIR --flight-only   (step 3 only)
       python3 benches/serving.py --profiles N --flight-only
           (a store of N known profiles with one event each, all of them members: Flight at
           10M members without generating 200M events)
"""
import argparse, json, os, random, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import audiences as suite  # noqa: E402  (starting the server)

def timed(cmd, env):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t

EVERYONE = '{"key": "everyone", "kind": "audience", "include_anonymous": true, "definition": "event(type: \'page\').count() >= 0"}'
# the same audience over stores of one-event profiles (setup_profiles)
SIGNED_UP = '{"key": "everyone", "kind": "audience", "include_anonymous": true, "definition": "event(\'Signed Up\').count() >= 1"}'

def setup(a, work, env):
    """A fresh store of a.events generated events with the audience of every profile computed,
    and its members and the space's identities exported to Parquet for DuckDB."""
    run = lambda *args, **kw: subprocess.run([a.bin, "--store", a.store] + list(args), check=True, env=env, stdout=subprocess.DEVNULL, **kw)
    a.store, a.members, a.ids = os.path.join(work, "store"), os.path.join(work, "m.parquet"), os.path.join(work, "ids.parquet")
    src = os.path.join(work, "e.ndjson")
    subprocess.run([a.bin, "generate", "--events", str(a.events), "--seed", "42", "-o", src], check=True)
    run("ingest", src, "--dead-letter", os.path.join(work, "dead"))
    os.remove(src)
    with open(os.path.join(work, "everyone.json"), "w") as f:
        f.write(EVERYONE)
    run("audience", "create", os.path.join(work, "everyone.json"))
    run("compute", "--as-of", "2026-01-01T00:00:00Z", a.key)
    run("members", a.key, "--format", "parquet", "-o", a.members)
    import pyarrow as pa, pyarrow.parquet as pq
    rows = json.loads(subprocess.run([a.bin, "--store", a.store, "--json", "sql", "SELECT profile_id, id_type, id_value FROM identities"], check=True, capture_output=True, text=True, env=env).stdout)
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in ("profile_id", "id_type", "id_value")}), a.ids)

PROFILE_EVENT = ('{"type":"track","event":"Signed Up","userId":"user-%09d","messageId":"m-%09d",'
                 '"timestamp":"2025-12-%02dT10:00:00Z","properties":{"plan":"free"}}\n')

def setup_profiles(a, work, env):
    """A fresh store of a.profiles known profiles with one track call each, and the audience of
    all of them computed (a membership as long as the store has profiles)."""
    a.store = os.path.join(work, "store")
    src = os.path.join(work, "e.ndjson")
    with open(src, "w", buffering=1 << 20) as f:
        for i in range(a.profiles):
            f.write(PROFILE_EVENT % (i, i, 1 + i % 28))
    run = lambda *args: subprocess.run([a.bin, "--store", a.store] + list(args), check=True, env=env, stdout=subprocess.DEVNULL)
    run("ingest", src, "--dead-letter", os.path.join(work, "dead"))
    os.remove(src)
    with open(os.path.join(work, "everyone.json"), "w") as f:
        f.write(SIGNED_UP)
    run("audience", "create", os.path.join(work, "everyone.json"))
    run("compute", "--as-of", "2026-01-01T00:00:00Z", a.key)

def peer_main(path):
    """`--peer FILE`: a pyarrow.flight server serving the batches of an Arrow IPC file."""
    import pyarrow as pa, pyarrow.flight as fl
    with pa.memory_map(path) as src:
        table = pa.ipc.open_file(src).read_all()
    class Peer(fl.FlightServerBase):
        def get_flight_info(self, context, descriptor):
            return fl.FlightInfo(table.schema, descriptor, [fl.FlightEndpoint(b"t", [])], table.num_rows, -1)
        def do_get(self, context, ticket):
            return fl.RecordBatchStream(table)
    p = Peer("grpc://127.0.0.1:0")
    print(p.port, flush=True)
    p.serve()

def cpu_seconds(pid):
    """User plus system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def flight(a, work, env, members, out):
    """Step 3: appends its three rows (pull medians, the cold first pull, CPU per pull)."""
    import pyarrow as pa, pyarrow.flight as fl
    srv, loc = suite.serve(a.bin, a.store, env, "1h", ["--serving-cache", a.serving_cache])
    c = fl.FlightClient("grpc://" + loc)
    desc = fl.FlightDescriptor.for_path("audiences", a.key)
    def pull(client):
        info = client.get_flight_info(desc)
        return client.do_get(info.endpoints[0].ticket).read_all()
    t = time.perf_counter(); table = pull(c); cold = time.perf_counter() - t
    assert members is None or table.num_rows == members, (table.num_rows, members)
    batches = os.path.join(work, "batches.arrow")
    with pa.ipc.new_file(batches, table.schema) as w:
        for b in table.to_batches():  # the very batches our server sent
            w.write_batch(b)
    n_rows = table.num_rows
    del table
    peer = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--peer", batches], stdout=subprocess.PIPE, text=True, env=env)
    pc = fl.FlightClient(f"grpc://127.0.0.1:{peer.stdout.readline().strip()}")
    servers = [(c, srv.pid, [], [0.0]), (pc, peer.pid, [], [0.0])]
    for client, _, _, _ in servers:
        pull(client)
    order = random.Random(7)
    for _ in range(a.runs):
        for client, pid, times, cpu in order.sample(servers, len(servers)):  # neither always first
            c0 = cpu_seconds(pid)
            t = time.perf_counter(); n = pull(client).num_rows; times.append(time.perf_counter() - t)
            cpu[0] += cpu_seconds(pid) - c0
            assert n == n_rows, (n, n_rows)
    peer.kill(); peer.wait()
    srv.terminate(); srv.wait()
    (_, _, ours, ours_cpu), (_, _, theirs, theirs_cpu) = servers
    out.append(("Flight do_get (pulls alternating)", n_rows, statistics.median(ours), statistics.median(theirs)))
    out.append(("Flight do_get, first after start (id index cold)", n_rows, cold, statistics.median(theirs)))
    out.append(("Flight do_get, server CPU per pull", n_rows, ours_cpu[0] / a.runs, theirs_cpu[0] / a.runs))

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store")
    ap.add_argument("--members")
    ap.add_argument("--ids")
    ap.add_argument("--events", type=int, help="set up a fresh store of N generated events instead of --store/--members/--ids")
    ap.add_argument("--profiles", type=int, help="set up a fresh store of N one-event profiles (see the usage)")
    ap.add_argument("--flight-only", action="store_true", help="only step 3 (no --members/--ids needed)")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--serving-cache", default="1GiB", help="the server's --serving-cache (it must hold the pulled version: ~0.5 GB at 10M members)")
    ap.add_argument("--key", default="everyone")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bin", default=os.path.expanduser("~/.cache/audiences-target/release/audiences"))
    a = ap.parse_args()
    if a.peer:
        return peer_main(a.peer)
    import duckdb, csv
    env = dict(os.environ, TOKIO_WORKER_THREADS="2", RAYON_NUM_THREADS="2")
    work = tempfile.mkdtemp(prefix="audiences-serving-bench-")
    if a.profiles:
        if not a.flight_only:
            sys.exit("--profiles sets up a store for --flight-only")
        setup_profiles(a, work, env)
    elif a.events:
        setup(a, work, env)
    elif not (a.store and (a.flight_only or (a.members and a.ids))):
        sys.exit("give --events N, --profiles N --flight-only, or --store with --members and --ids (or --flight-only)")
    rows = []
    if a.flight_only:
        flight(a, work, env, a.profiles, rows)  # every one-event profile is a member
        return report(rows)
    con = duckdb.connect()
    con.execute("SET threads TO 2")
    con.execute(f"CREATE VIEW m AS SELECT * FROM read_parquet('{a.members}')")
    con.execute(f"CREATE VIEW ids AS SELECT * FROM read_parquet('{a.ids}')")
    members = con.execute("SELECT count(*) FROM m").fetchone()[0]
    out = os.path.join(work, "ours.csv")
    # 1. formatted CSV
    ours = [timed([a.bin, "--store", a.store, "export", a.key, "--format", "formatted", "-o", out], env) for _ in range(a.runs)]
    n_ours = sum(1 for _ in open(out)) - 1
    duck_sql = f"""COPY (SELECT m.profile_id AS key, string_agg(i.id_type || ':' || i.id_value, ',' ORDER BY i.id_type, i.id_value) AS ids
        FROM m LEFT JOIN ids i USING (profile_id) GROUP BY m.profile_id ORDER BY m.profile_id) TO '{work}/duck.csv' (HEADER)"""
    duck = []
    for _ in range(a.runs):
        t = time.perf_counter(); con.execute(duck_sql); duck.append(time.perf_counter() - t)
    n_duck = sum(1 for _ in open(f"{work}/duck.csv")) - 1
    assert n_ours == n_duck == members, (n_ours, n_duck, members)
    rows.append(("formatted CSV export", members, statistics.median(ours), statistics.median(duck)))
    # 2. SHA-256 single
    ours = [timed([a.bin, "--store", a.store, "export", a.key, "--format", "single", "--id-type", "email", "-o", out], env) for _ in range(a.runs)]
    hashed = sorted(r[0] for r in csv.reader(open(out)))[:-1]  # drop the header ('email' sorts last)
    duck_sql = f"""COPY (SELECT DISTINCT m.profile_id, sha256(lower(trim(i.id_value))) AS email FROM m JOIN ids i USING (profile_id)
        WHERE i.id_type = 'email' AND trim(i.id_value) <> '') TO '{work}/duck.csv' (HEADER)"""
    duck = []
    for _ in range(a.runs):
        t = time.perf_counter(); con.execute(duck_sql); duck.append(time.perf_counter() - t)
    theirs = sorted(r[1] for r in csv.reader(open(f"{work}/duck.csv")))[:-1]
    assert hashed == theirs, (len(hashed), len(theirs))
    rows.append(("SHA-256 single export (rows)", len(hashed), statistics.median(ours), statistics.median(duck)))
    # 3. Flight do_get
    flight(a, work, env, members, rows)
    report(rows)
    print(f"SHA-256 rows/s: ours {rows[1][1] / rows[1][2]:,.0f}, DuckDB {rows[1][1] / rows[1][3]:,.0f}")

def report(rows):
    print("\n| measure | rows | audiences s | peer s | ratio (peer / ours) |")
    print("|---|---:|---:|---:|---:|")
    for name, n, o, p in rows:
        ratio = f"{p / o:.2f}x" if o > 0 else "n/a"  # CPU time comes in clock ticks (10 ms)
        print(f"| {name} | {n:,} | {o:.3f} | {p:.3f} | {ratio} |")

if __name__ == "__main__":
    main()
