"""
The bench runner: starts the server under test (the broker through
``twistd``, or the relay), runs the load generator against it in a separate
process, stops both, prints a table and writes ``bench/results/<sha>.json``.

Each scenario gets a fresh server process (and a fresh SQLite directory or
Postgres schema), so its CPU time and peak RSS are its own.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from bench import profile as profiling
from bench import seed as seeding
from bench.report import print_table

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

SCENARIO_ORDER = ("burst", "steady", "fanout", "connections", "growth")
# The scenarios --window applies to (steady's window is only a cap).
WINDOWED = ("burst", "fanout", "growth")
# What the generator runs for a scenario of the runner (growth is a burst on
# an empty and on a seeded database).
GENERATOR_SCENARIO = {"growth": "burst"}

# Full and --quick sizes of every scenario.
SIZES = {
    "burst": {
        "full": {"peers": 100, "messages": 1000, "window": 10, "timeout": 300},
        "quick": {"peers": 10, "messages": 100, "window": 10, "timeout": 60},
    },
    "steady": {
        "full": {"peers": 100, "rate": 2000, "duration": 20, "window": 200, "timeout": 60},
        "quick": {"peers": 10, "rate": 200, "duration": 3, "window": 200, "timeout": 30},
    },
    "fanout": {
        "full": {"peers": 100, "messages": 5, "window": 1, "timeout": 300},
        "quick": {"peers": 10, "messages": 10, "window": 1, "timeout": 60},
    },
    "connections": {
        "full": {"meshes": 1000, "peers": 10, "concurrency": 200, "idle": 3.0, "timeout": 300},
        "quick": {"meshes": 20, "peers": 10, "concurrency": 50, "idle": 1.0, "timeout": 60},
    },
    # The burst's shape on two databases: empty, then holding `delivered`
    # confirmed messages and `queued` ones for an offline member (bench.seed).
    "growth": {
        "full": {"peers": 100, "messages": 300, "window": 32, "delivered": 1000000,
                 "queued": 100000, "timeout": 300},
        "quick": {"peers": 10, "messages": 100, "window": 10, "delivered": 20000,
                  "queued": 2000, "timeout": 60},
    },
}


def raise_nofile(wanted=65536):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for value in (wanted, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(value, soft), max(value, hard)))
            return
        except (ValueError, OSError):
            continue


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_sha():
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=ROOT, capture_output=True, text=True).stdout.strip())
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None


# -- the servers under test -------------------------------------------------------


class Server:
    """
    A broker (``twistd claudemesh-broker``) or the relay, in its own process
    group, with RLIMIT_NOFILE raised.
    """

    def __init__(self, kind, workdir, database_url=None):
        self.kind = kind
        self.workdir = workdir
        self.database_url = database_url
        self.schema = "bench_" + secrets.token_hex(6) if database_url else None
        self.port = free_port()
        self.log_path = os.path.join(workdir, "%s.log" % (kind,))
        self.proc = None

    def command(self):
        endpoint = "tcp:%d:interface=127.0.0.1:backlog=1024" % (self.port,)
        bindir = os.path.dirname(sys.executable)
        if self.kind == "relay":
            return [sys.executable, "-m", "bench.relay", "--port", endpoint]
        twistd = os.path.join(bindir, "twistd")
        command = [
            twistd, "-n", "--pidfile=", "--logfile", self.log_path, "claudemesh-broker",
            "--port", endpoint,
            "--data-dir", os.path.join(self.workdir, "data"),
            # The bench settings (issue 7): send rate limits off, the
            # per-mesh connection cap raised; the per-address limits are off
            # too, every peer comes from 127.0.0.1.
            "--send-rate-limit-per-min", "0",
            "--send-rate-limit-burst", "0",
            "--max-connections-per-mesh", "100000",
            "--max-connections-per-ip", "0",
            "--hello-rate-per-ip", "0",
            # The setup's join connections never say hello; with 1,000
            # meshes to join they outlive the 10 s hello deadline.
            "--hello-timeout-seconds", "0",
        ]
        if self.schema:
            command += ["--database-schema", self.schema]
        return command

    def start(self, timeout=60.0):
        env = dict(os.environ)
        env.pop("DATABASE_URL", None)
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        log = open(self.log_path + ".out", "wb")
        self.proc = subprocess.Popen(self.command(), cwd=self.workdir, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, preexec_fn=_child_setup)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with %s at start; see %s" % (
                    self.kind, self.proc.returncode, self.log_path))
            if self._ready():
                return
            time.sleep(0.1)
        raise RuntimeError("%s not ready after %.0f s" % (self.kind, timeout))

    def _ready(self):
        if self.kind == "relay":
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return True
            except OSError:
                return False
        try:
            with urllib.request.urlopen(
                    "http://127.0.0.1:%d/health/ready" % (self.port,), timeout=1) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, drop=True):
        """
        Stop the server; drop its Postgres schema unless C{drop} is false
        (the growth scenario restarts it on the same database).
        """
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.schema and drop:
            drop_schema(self.database_url, self.schema)

    def seed(self, delivered, queued):
        """
        Create the broker's schema (start it once, stop it) and seed its
        database (L{bench.seed}); returns the seconds seeding took.
        """
        self.start()
        self.stop(drop=False)
        self.proc = None
        if self.schema:
            return seeding.seed_postgres(self.database_url, self.schema, delivered, queued)
        from claudemesh.store import sqlite_path

        return seeding.seed_sqlite(sqlite_path(os.path.join(self.workdir, "data")),
                                   delivered, queued)


def _child_setup():
    os.setsid()
    raise_nofile()


def drop_schema(database_url, schema):
    import psycopg2

    connection = psycopg2.connect(database_url)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute('DROP SCHEMA IF EXISTS "%s" CASCADE' % (schema,))
    finally:
        connection.close()


def check_postgres(database_url):
    import psycopg2

    psycopg2.connect(database_url).close()


# -- one scenario -------------------------------------------------------------------


def run_generator(spec, timeout):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "bench.generator"],
                          input=json.dumps(spec), capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT, preexec_fn=raise_nofile)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError("generator failed (%s):\n%s" % (proc.returncode, proc.stderr[-4000:]))
    return json.loads(lines[-1])


def run_scenario(name, target, size, args, workroot, seeded=False):
    """
    One scenario against one fresh server: C{target} is C{"broker"} or
    C{"relay"}; C{seeded} seeds the broker's database first (growth).
    """
    workdir = tempfile.mkdtemp(prefix="%s-%s-" % (name, target), dir=workroot)
    server = Server(target, workdir, args.database_url if target == "broker" else None)
    spec = dict(size)
    spec.update({"scenario": GENERATOR_SCENARIO.get(name, name), "target": target,
                 "host": "127.0.0.1",
                 # On Postgres the database's CPU is measured too.
                 "database_cpu": bool(server.database_url)})
    seed_s = None
    profile_path = None
    if args.profile and target != "relay" and name in args.profile:
        profile_path = os.path.join(RESULTS, "profile-%s%s-%s.txt" % (
            name, "-seeded" if seeded else "", args.store))
        spec["profile"] = profile_path
    started = time.monotonic()
    try:
        if seeded:
            seed_s = server.seed(size["delivered"], size["queued"])
            started = time.monotonic()
        server.start()
        spec.update({"port": server.port, "pid": server.proc.pid,
                     "url": "ws://127.0.0.1:%d/ws" % (server.port,)})
        result = run_generator(spec, timeout=spec["timeout"] + 900)
    finally:
        server.stop()
    result["wall_s"] = time.monotonic() - started
    result["target"] = target
    if seeded:
        result.update({"seed_s": seed_s, "seeded_delivered": size["delivered"],
                       "seeded_queued": size["queued"]})
    if profile_path and os.path.exists(profile_path):
        result["profile"] = profiling.summarise(profile_path)
        result["profile_file"] = os.path.relpath(profile_path, ROOT)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        result["workdir"] = workdir
    return result


def _ratio(a, b):
    return a / b if a is not None and b else None


def figures(name, result):
    """
    The figures of one result that are compared: rate, CPU per message,
    send->push p99 (hello p99 for connections), peak RSS, RSS per connection.
    """
    latency = result.get("connect_to_hello_ack_ms" if name == "connections"
                         else "send_to_push_ms") or {}
    per = result.get("broker_cpu_s_per_1000")
    if name == "fanout" and result.get("pushes"):
        per = 1000.0 * result["broker_cpu_s"] / result["pushes"]
    return {"rate": result.get("throughput_per_s"), "cpu_per_msg": per,
            "p99": latency.get("p99"), "peak_rss": result.get("broker_peak_rss_kb"),
            "rss_per_conn": result.get("rss_per_connection_kb")}


def ratios(name, entry):
    """
    Every figure of the broker (and, for growth, of the seeded broker) as a
    ratio of the relay's in the same run; for growth also seeded / empty.
    """
    out = {}
    relay = entry.get("relay")
    for target in ("broker", "seeded"):
        if target in entry and relay:
            b, r = figures(name, entry[target]), figures(name, relay)
            out[target] = {k: _ratio(b[k], r[k]) for k in b}
    if "broker" in entry and "seeded" in entry:
        b, s = figures(name, entry["broker"]), figures(name, entry["seeded"])
        out["seeded_vs_empty"] = {k: _ratio(s[k], b[k]) for k in b}
    return out


def per_1000(result):
    messages = result.get("messages") or 0
    if not messages:
        return None
    return 1000.0 * result["broker_cpu_s"] / messages


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="claudemesh broker benchmark (issues 7, 16). Scenarios: burst, steady, "
                    "fanout, connections, growth, relay (run each chosen scenario against "
                    "the minimal Autobahn relay too, and report the broker as ratios of it)."
                    " Default: all. Issue 16's shape: burst relay --window 32.")
    parser.add_argument("scenarios", nargs="*", metavar="scenario",
                        help="burst | steady | fanout | connections | growth | relay")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: a smoke test in a minute or two")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or None,
                        help="Postgres URL (default: $DATABASE_URL; unset means SQLite); a "
                             "fresh schema per scenario, dropped afterwards")
    parser.add_argument("--profile", action="append", default=[], metavar="SCENARIO",
                        help="py-spy record the broker during this scenario's measured phase")
    parser.add_argument("--window", type=int,
                        help="the in-flight window per peer of burst, fanout and growth "
                             "(default 10, 1, 32)")
    parser.add_argument("--nodes", type=int, default=1,
                        help="also run each scenario against N broker processes on one "
                             "Postgres database, the peers spread over them (issue 15)")
    parser.add_argument("--workers", type=int, default=1,
                        help="also run each scenario against one broker with --workers N "
                             "(one port, N processes; issue 15)")
    parser.add_argument("--output", help="results file (default bench/results/<sha>.json)")
    parser.add_argument("--keep", action="store_true", help="keep data dirs and logs")
    args = parser.parse_args(argv)

    chosen = args.scenarios or list(SCENARIO_ORDER) + ["relay"]
    unknown = [s for s in chosen if s not in SCENARIO_ORDER + ("relay",)]
    if unknown:
        parser.error("unknown scenario(s): %s" % (", ".join(unknown),))
    with_relay = "relay" in chosen
    scenarios = [s for s in SCENARIO_ORDER if s in chosen] or (
        list(SCENARIO_ORDER) if with_relay else [])
    args.store = "postgres" if args.database_url else "sqlite"
    if (args.nodes > 1 or args.workers > 1) and not args.database_url:
        parser.error("--nodes and --workers need --database-url (several broker processes "
                     "share a Postgres database)")
    if args.database_url:
        check_postgres(args.database_url)
    raise_nofile()
    os.makedirs(RESULTS, exist_ok=True)
    sha, dirty = git_sha()
    workroot = tempfile.mkdtemp(prefix="claudemesh-bench-")
    results = {}
    failures = {}
    for name in scenarios:
        size = dict(SIZES[name]["quick" if args.quick else "full"])
        if args.window and name in WINDOWED:
            size["window"] = args.window
        entry = results[name] = {"size": size}
        # growth: the broker on an empty database, then on a seeded one.
        targets = ["broker"] + (["seeded"] if name == "growth" else []) + (
            ["nodes"] if args.nodes > 1 else []) + (["workers"] if args.workers > 1 else []) + (
            ["relay"] if with_relay else [])
        for target in targets:
            print("[bench] %s against the %s%s ..." % (
                name, target, " (%s)" % args.store if target != "relay" else ""),
                file=sys.stderr, flush=True)
            try:
                if target in ("nodes", "workers"):
                    from bench import cluster

                    result = cluster.run_scenario(name, target, size, args, workroot)
                else:
                    result = run_scenario(name, "relay" if target == "relay" else "broker",
                                          size, args, workroot, seeded=target == "seeded")
            except Exception as e:
                failures["%s/%s" % (name, target)] = str(e)
                print("[bench] %s/%s failed: %s" % (name, target, e), file=sys.stderr)
                continue
            result["broker_cpu_s_per_1000"] = per_1000(result)
            entry[target] = result
        entry["ratios"] = ratios(name, entry)
        if args.nodes > 1 or args.workers > 1:
            from bench import cluster

            entry["ratios"].update(cluster.cluster_ratios(name, entry, figures))
        entry["ratio_to_relay"] = entry["ratios"].get("broker", {}).get("rate")
    if not args.keep:
        shutil.rmtree(workroot, ignore_errors=True)
    document = {
        "sha": sha,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "store": args.store,
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_at_end": os.getloadavg(), "kernel": platform.release()},
        "scenarios": results,
        "failures": failures,
    }
    output = args.output or os.path.join(
        RESULTS, "%s%s%s.json" % (sha, "-quick" if args.quick else "",
                                  "-postgres" if args.store == "postgres" else ""))
    with open(output, "w") as f:
        json.dump(document, f, indent=2, sort_keys=True)
        f.write("\n")
    print_table(document)
    print("\nresults: %s" % (os.path.relpath(output, os.getcwd()),))
    return 1 if failures else 0
