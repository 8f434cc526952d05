"""
C{--workers N}: N broker processes on this machine sharing one port (issue
15), so that the broker uses every core.

The process started as C{twistd claudemesh-broker --workers N} does not
serve: it supervises. It starts N workers (C{twistd -n claudemesh-broker}
with the same configuration, C{--workers 1 --reuse-port} and the node name
C{<name>/w<i>}) with Twisted's L{ProcessMonitor}: a worker that dies is
logged and started again (at once if it had run for a while, after a
growing delay if it keeps dying at start). Each worker listens on the same
TCP port with C{SO_REUSEPORT}, so the kernel spreads connections over them;
they are nodes of one cluster on the Postgres database like any other.

SIGTERM to the supervisor stops every worker with SIGTERM (each closes its
sessions with 1001 and flushes its writes) and waits for them before it
exits; a worker that does not stop within L{WORKER_STOP_SECONDS} is killed.
"""

import os
import socket
import sys

from twisted.internet import defer
from twisted.internet.endpoints import _parseServer
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.runner.procmon import ProcessMonitor
from zope.interface import implementer

from claudemesh.broker.options import _INTEGER_OPTIONS

# How long a stopping worker may take before it is killed.
WORKER_STOP_SECONDS = 15


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """
    A TCP server endpoint whose socket has C{SO_REUSEPORT} set, so several
    processes can listen on one port (Twisted's own TCP endpoints cannot
    set it): the socket is made here and adopted by the reactor.
    """

    def __init__(self, reactor, description):
        kind, args, kwargs = _parseServer(description, None)
        if kind not in ("TCP", "TCP6"):
            raise ValueError("--reuse-port needs a tcp: port, not %r" % (description,))
        self._reactor = reactor
        self.port = int(args[0])
        self.interface = kwargs.get("interface", "" if kind == "TCP" else "::")
        self.backlog = int(kwargs.get("backlog", 50))
        self.family = socket.AF_INET6 if kind == "TCP6" or ":" in self.interface else (
            socket.AF_INET)

    def listen(self, factory):
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            # The reactor takes its own copy of the descriptor.
            port = self._reactor.adoptStreamPort(sock.fileno(), self.family, factory)
        except Exception:
            return defer.fail()
        finally:
            sock.close()
        return defer.succeed(port)


def worker_arguments(config, index):
    """
    The command line of worker C{index} (from 1): this configuration, one
    process, the shared port, its own node name. The database URL and the
    admin token go in the environment (L{worker_environment}), never on a
    command line others can read.
    """
    args = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "claudemesh-broker",
            "--port", config["port"], "--data-dir", config["data-dir"],
            "--database-schema", config["database-schema"],
            "--workers", "1", "--reuse-port",
            "--node-name", "%s/w%d" % (config["node-name"], index)]
    for option in _INTEGER_OPTIONS:
        args += ["--%s" % (option.flag,), str(config[option.flag])]
    for network in config["trusted-proxy"]:
        args += ["--trusted-proxy", str(network)]
    return args


def worker_environment(config, admin_token, environ=None):
    environ = dict(os.environ if environ is None else environ)
    environ.pop("CLAUDEMESH_WORKERS", None)
    environ["DATABASE_URL"] = config["database-url"]
    if admin_token is not None:
        environ["CLAUDEMESH_ADMIN_TOKEN"] = admin_token
    return environ


class WorkerMonitor(ProcessMonitor):
    """
    A L{ProcessMonitor} of broker workers that says when one ends and is
    started again, and whose stop waits for every worker to end.
    """

    _log = Logger()
    killTime = WORKER_STOP_SECONDS

    def __init__(self, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        ProcessMonitor.__init__(self, reactor)
        self._ended = []
        self.starts = {}

    def startProcess(self, name):
        if name not in self.protocols:
            self.starts[name] = self.starts.get(name, 0) + 1
            if self.starts[name] > 1:
                self._log.warn("starting broker {worker} again (start {count})",
                               worker=name, count=self.starts[name])
        ProcessMonitor.startProcess(self, name)

    def _monitoredProcessExited(self, name, reason=None):
        status = getattr(reason.value, "exitCode", None) if reason is not None else None
        signal = getattr(reason.value, "signal", None) if reason is not None else None
        if self.running:
            self._log.error(
                "broker {worker} ended (exit status {status}, signal {signal}); it is "
                "started again", worker=name, status=status, signal=signal)
        ProcessMonitor._monitoredProcessExited(self, name, reason)
        if not self.protocols:
            ended, self._ended = self._ended, []
            for d in ended:
                d.callback(None)

    def stopService(self):
        ProcessMonitor.stopService(self)
        if not self.protocols:
            return defer.succeed(None)
        d = defer.Deferred()
        self._ended.append(d)
        return d


def make_supervisor(config, admin_token, reactor):
    """
    The service of C{--workers N}: a L{WorkerMonitor} of N workers.
    """
    monitor = WorkerMonitor(reactor)
    environment = worker_environment(config, admin_token)
    for index in range(1, config["workers"] + 1):
        monitor.addProcess("worker-%d" % (index,), worker_arguments(config, index),
                           env=environment)
    monitor.setName("workers")
    return monitor
