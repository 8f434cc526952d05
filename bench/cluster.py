"""
The bench of several broker processes on one Postgres database (issue 15):
``python -m bench --nodes N`` (N brokers on their own ports, the peers
spread over them round-robin) and ``--workers N`` (one broker with
``--workers N``, one port). Each runs the chosen scenarios against the
cluster right after the same scenario against one node, in the same run,
and reports the cluster's figures and their ratios to one node; with
``--nodes`` also the send→push latency of DMs whose sender and recipient
are on the same node and on different nodes.

The broker CPU is the sum over every broker process (the workers, not
their supervisor); peak RSS is the largest.
"""

import os
import secrets
import shutil
import tempfile
import time

from bench.run import GENERATOR_SCENARIO, Server, drop_schema, run_generator


class WorkerServer(Server):
    """
    One broker started with ``--workers N``: its pids are the workers'.
    """

    def __init__(self, workdir, database_url, workers):
        Server.__init__(self, "broker", workdir, database_url)
        self.workers = workers

    def command(self):
        return Server.command(self) + ["--workers", str(self.workers)]

    def pids(self):
        path = "/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid)
        with open(path) as f:
            return [int(p) for p in f.read().split()]


class ClusterServers:
    """
    C{count} broker nodes on one schema (C{workers}: one process with that
    many workers instead), started and stopped together.
    """

    def __init__(self, workdir, database_url, count=1, workers=None):
        self.database_url = database_url
        self.schema = "bench_" + secrets.token_hex(6)
        self.expected = workers or count
        if workers:
            self.servers = [WorkerServer(workdir, database_url, workers)]
        else:
            self.servers = []
            for i in range(count):
                path = os.path.join(workdir, "node%d" % (i,))
                os.makedirs(path, exist_ok=True)
                self.servers.append(Server("broker", path, database_url))
        for server in self.servers:
            server.schema = self.schema

    def start(self, timeout=90.0):
        for server in self.servers:
            server.start(timeout)
        deadline = time.monotonic() + timeout
        while self._running() < self.expected:
            if time.monotonic() > deadline:
                raise RuntimeError("%d of %d nodes running after %.0f s" % (
                    self._running(), self.expected, timeout))
            time.sleep(0.2)

    def _running(self):
        import psycopg2

        connection = psycopg2.connect(self.database_url)
        try:
            with connection.cursor() as cursor:
                cursor.execute('SELECT count(*) FROM "%s".nodes WHERE stopped_at IS NULL'
                               % (self.schema,))
                return cursor.fetchone()[0]
        except psycopg2.Error:
            return 0
        finally:
            connection.close()

    def urls(self):
        return ["ws://127.0.0.1:%d/ws" % (server.port,) for server in self.servers]

    def pids(self):
        if isinstance(self.servers[0], WorkerServer):
            return self.servers[0].pids()
        return [server.proc.pid for server in self.servers]

    def stop(self):
        for server in self.servers:
            server.stop(drop=False)
        drop_schema(self.database_url, self.schema)

    @property
    def port(self):
        return self.servers[0].port


def spec_for(servers):
    """
    What the generator needs to know of the cluster.
    """
    pids = servers.pids()
    return {"port": servers.port, "pid": pids[0], "pids": pids, "urls": servers.urls(),
            "url": servers.urls()[0]}


def cluster_ratios(name, entry, figures):
    """
    The cluster's figures as ratios of one node's in the same run.
    """
    out = {}
    one = entry.get("broker")
    for target in ("nodes", "workers"):
        if target in entry and one:
            c, b = figures(name, entry[target]), figures(name, one)
            out[target + "_vs_one"] = {
                k: (c[k] / b[k] if c[k] is not None and b[k] else None) for k in c}
    return out


def run_scenario(name, target, size, args, workroot):
    """
    One scenario against a fresh cluster: C{target} is C{"nodes"}
    (C{args.nodes} brokers) or C{"workers"} (one broker, C{args.workers}).
    """
    workdir = tempfile.mkdtemp(prefix="%s-%s-" % (name, target), dir=workroot)
    if target == "nodes":
        servers = ClusterServers(workdir, args.database_url, count=args.nodes)
    else:
        servers = ClusterServers(workdir, args.database_url, workers=args.workers)
    spec = dict(size)
    spec.update({"scenario": GENERATOR_SCENARIO.get(name, name), "target": "broker",
                 "host": "127.0.0.1", "database_cpu": True})
    started = time.monotonic()
    try:
        servers.start()
        spec.update(spec_for(servers))
        result = run_generator(spec, timeout=spec["timeout"] + 900)
    finally:
        servers.stop()
    result["wall_s"] = time.monotonic() - started
    result["target"] = target
    result["processes"] = servers.expected
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return result
