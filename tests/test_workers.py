"""
Unit tests of L{claudemesh.broker.workers} (issue 15): the command line and
environment of each worker, the supervisor restarting a worker that dies
and waiting for every worker at stop — on a fake process reactor and a
clock, no real process.
"""

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from claudemesh.broker import tap, workers

SECRET_URL = "postgresql://claudemesh:s3cret@db.example/mesh"


class FakeProcess:
    def __init__(self, reactor, protocol, args, env):
        self.reactor, self.protocol, self.args, self.env = reactor, protocol, args, env
        self.signals = []
        self.pid = 1000 + len(reactor.spawned)

    def signalProcess(self, name):
        self.signals.append(name)

    def end(self, code=0, signal=None):
        reason = error.ProcessDone(None) if code == 0 and signal is None else (
            error.ProcessTerminated(code, signal))
        self.protocol.processEnded(Failure(reason))


class ProcessReactor(MemoryReactorClock):
    """
    A memory reactor that records the processes spawned.
    """

    def __init__(self):
        MemoryReactorClock.__init__(self)
        self.spawned = []

    def spawnProcess(self, protocol, executable, args=(), env=None, path=None, uid=None,
                     gid=None, usePTY=False, childFDs=None):
        process = FakeProcess(self, protocol, list(args), env)
        self.spawned.append(process)
        protocol.makeConnection(process)
        return process


class WorkerCommandTests(SynchronousTestCase):
    """
    What each worker is started with.
    """

    def parsed(self, *args):
        options = tap.Options(environ={"DATABASE_URL": SECRET_URL})
        options.parseOptions(list(args))
        options["node-name"] = options["node-name"] or "box"
        return options

    def test_arguments(self):
        """
        A worker runs the same configuration as one process, with --reuse-port
        and its own node name; the database URL is never on its command line.
        """
        options = self.parsed("--workers", "3", "--port", "tcp:7911:interface=127.0.0.1",
                              "--max-message-bytes", "4096", "--trusted-proxy", "10.0.0.1")
        args = workers.worker_arguments(options, 2)
        line = " ".join(args)
        for fragment in ("claudemesh-broker", "--workers 1", "--reuse-port",
                         "--node-name box/w2", "--port tcp:7911:interface=127.0.0.1",
                         "--max-message-bytes 4096", "--trusted-proxy 10.0.0.1/32"):
            self.assertIn(fragment, line)
        self.assertNotIn("s3cret", line)
        env = workers.worker_environment(options, "tok", {"CLAUDEMESH_WORKERS": "3"})
        self.assertEqual((env["DATABASE_URL"], env["CLAUDEMESH_ADMIN_TOKEN"]),
                         (SECRET_URL, "tok"))
        self.assertNotIn("CLAUDEMESH_WORKERS", env)

    def test_make_service_supervises(self):
        """With --workers 2 the tree holds the supervisor of two workers, and no store."""
        options = self.parsed("--workers", "2", "--port", "tcp:7912:interface=127.0.0.1",
                              "--data-dir", self.mktemp())
        reactor = ProcessReactor()
        top = tap.makeService(options, reactor=reactor)
        monitor = top.getServiceNamed("workers")
        self.assertEqual(sorted(monitor.processes), ["worker-1", "worker-2"])
        self.assertRaises(KeyError, top.getServiceNamed, "store")


class SupervisionTests(SynchronousTestCase):
    """
    L{workers.WorkerMonitor}.
    """

    def setUp(self):
        self.reactor = ProcessReactor()
        self.monitor = workers.WorkerMonitor(self.reactor)
        for i in (1, 2):
            self.monitor.addProcess("worker-%d" % (i,), ["python", "w%d" % (i,)], env={})
        self.monitor.startService()

    def test_dead_worker_started_again(self):
        """A worker that dies after a while is logged and started again at once."""
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(10)
        self.reactor.spawned[0].end(code=None, signal=9)
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual(self.reactor.spawned[2].args, ["python", "w1"])
        self.assertEqual(self.monitor.starts["worker-1"], 2)

    def test_worker_dying_at_start_backs_off(self):
        """A worker that dies at once is started again after a growing delay."""
        self.reactor.spawned[0].end(code=1)
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(self.monitor.minRestartDelay)
        self.assertEqual(len(self.reactor.spawned), 3)

    def test_stop_waits_for_every_worker(self):
        """Stopping sends SIGTERM to each worker and fires once all ended; none restarts."""
        d = self.monitor.stopService()
        self.assertEqual([p.signals for p in self.reactor.spawned], [["TERM"], ["TERM"]])
        self.assertNoResult(d)
        self.reactor.spawned[0].end()
        self.assertNoResult(d)
        self.reactor.spawned[1].end()
        self.successResultOf(d)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_stop_kills_a_stuck_worker(self):
        """A worker still running after the stop timeout is killed."""
        d = self.monitor.stopService()
        self.reactor.spawned[0].end()
        self.reactor.advance(workers.WORKER_STOP_SECONDS)
        self.assertEqual(self.reactor.spawned[1].signals, ["TERM", "KILL"])
        self.reactor.spawned[1].end(code=None, signal=9)
        self.successResultOf(d)
