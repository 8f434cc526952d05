"""
Tests for L{claudemesh.broker.tap}: option parsing, environment fallbacks,
validation, the service tree and its start-up log.
"""

import ipaddress
import os
import stat

import autobahn.websocket
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from claudemesh import __version__
from claudemesh.broker import tap
from claudemesh.broker.settings import BrokerSettings
from claudemesh.broker.web import BrokerSite
from claudemesh.store import StoreService
from claudemesh.store.sqlite import SQLiteStore

# flag, environment variable, a valid non-default value, its parsed form
_INTEGER_CASES = (
    ("status-ttl-seconds", "STATUS_TTL_SECONDS", "90", 90),
    ("hook-fresh-window-seconds", "HOOK_FRESH_WINDOW_SECONDS", "0", 0),
    ("max-connections-per-mesh", "MAX_CONNECTIONS_PER_MESH", "0", 0),
    ("max-message-bytes", "MAX_MESSAGE_BYTES", "1024", 1024),
    ("hook-rate-limit-per-min", "HOOK_RATE_LIMIT_PER_MIN", "5", 5),
    ("send-rate-limit-per-min", "SEND_RATE_LIMIT_PER_MIN", "0", 0),
    ("send-rate-limit-burst", "SEND_RATE_LIMIT_BURST", "3", 3),
    ("retention-days", "CLAUDEMESH_RETENTION_DAYS", "30", 30),
    ("max-connections-per-ip", "CLAUDEMESH_MAX_CONNECTIONS_PER_IP", "1", 1),
    ("hello-rate-per-ip", "CLAUDEMESH_HELLO_RATE_PER_IP", "0", 0),
    ("header-timeout-seconds", "CLAUDEMESH_HEADER_TIMEOUT_SECONDS", "30", 30),
    ("hello-timeout-seconds", "CLAUDEMESH_HELLO_TIMEOUT_SECONDS", "0", 0),
)

# flag -> the smallest value it accepts
_MINIMUMS = {flag: 0 for flag, _, _, _ in _INTEGER_CASES}
_MINIMUMS.update({"status-ttl-seconds": 1, "max-message-bytes": 1024})

_PASSWORD = "s3cr3t-Pa55word"
_POSTGRES_URL = f"postgresql://claudemesh:{_PASSWORD}@db.example:5432/mesh"


def parse(args=(), environ=None):
    """
    Parse C{args} with C{environ} (empty by default) as the environment.
    """
    options = tap.Options(environ={} if environ is None else environ)
    options.parseOptions(list(args))
    return options


def expected_defaults():
    """
    The full parsed dictionary of C{twistd claudemesh-broker} without
    arguments or environment.
    """
    return {
        "port": "tcp:7900",
        "data-dir": os.path.abspath("claudemesh-data"),
        "database-url": None,
        "database-schema": "claudemesh",
        "admin-token-file": None,
        "admin-token": None,
        "node-name": None,
        "workers": 1,
        "reuse-port": 0,
        "status-ttl-seconds": 60,
        "hook-fresh-window-seconds": 30,
        "max-connections-per-mesh": 100,
        "max-message-bytes": 65536,
        "hook-rate-limit-per-min": 30,
        "send-rate-limit-per-min": 60,
        "send-rate-limit-burst": 10,
        "retention-days": 7,
        "max-connections-per-ip": 200,
        "hello-rate-per-ip": 20,
        "header-timeout-seconds": 10,
        "hello-timeout-seconds": 10,
        "trusted-proxy": (),
        "settings": BrokerSettings(),
    }


class OptionsDefaultsTests(SynchronousTestCase):
    """
    L{tap.Options} without flags or environment.
    """

    def test_fullDictionary(self):
        """Parsing nothing yields exactly the documented defaults, every key included."""
        self.assertEqual(dict(parse()), expected_defaults())

    def test_settingsMatchDesignDefaults(self):
        """The default BrokerSettings carry the defaults of docs/configuration.md."""
        settings = parse()["settings"]
        self.assertEqual(
            (
                settings.status_ttl_seconds,
                settings.hook_fresh_window_seconds,
                settings.max_connections_per_mesh,
                settings.max_message_bytes,
                settings.hook_rate_limit_per_min,
                settings.send_rate_limit_per_min,
                settings.send_rate_limit_burst,
                settings.retention_days,
                settings.max_connections_per_ip,
                settings.hello_rate_per_ip,
                settings.trusted_proxies,
            ),
            (60, 30, 100, 65536, 30, 60, 10, 7, 200, 20, ()),
        )

    def test_readsProcessEnvironmentByDefault(self):
        """Without an explicit environ the options read os.environ when parsed."""
        self.patch(os, "environ", {"BROKER_PORT": "tcp:7911"})
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["port"], "tcp:7911")

    def test_helpShowsEveryFlagWithDefault(self):
        """--help lists every option with its environment variable and default."""
        text = str(tap.Options())
        for flag, env, _, _ in _INTEGER_CASES:
            self.assertIn("--" + flag, text)
            self.assertIn(env, text)
        for flag in ("--port", "--data-dir", "--database-url", "--database-schema",
                     "--admin-token-file", "--trusted-proxy"):
            self.assertIn(flag, text)
        for text_bit in ("default: tcp:7900", "default: 65536", "CLAUDEMESH_ADMIN_TOKEN",
                         "CLAUDEMESH_TRUSTED_PROXY", "DATABASE_URL"):
            self.assertIn(text_bit, " ".join(text.split()))


class OptionsFlagTests(SynchronousTestCase):
    """
    Each flag of L{tap.Options}.
    """

    def test_integerFlags(self):
        """Every integer flag is parsed into the dictionary and the settings."""
        for flag, _, raw, value in _INTEGER_CASES:
            options = parse([f"--{flag}={raw}"])
            expected = expected_defaults()
            expected[flag] = value
            setting = flag.replace("-", "_")
            expected["settings"] = BrokerSettings(**{setting: value})
            self.assertEqual(dict(options), expected, flag)

    def test_port(self):
        """--port takes an endpoint string."""
        self.assertEqual(
            parse(["--port", "tcp:7901:interface=127.0.0.1"])["port"],
            "tcp:7901:interface=127.0.0.1",
        )

    def test_dataDir(self):
        """--data-dir is made absolute."""
        directory = self.mktemp()
        self.assertEqual(parse(["--data-dir", directory])["data-dir"], os.path.abspath(directory))

    def test_databaseURL(self):
        """--database-url keeps a postgresql:// or postgres:// URL."""
        self.assertEqual(parse(["--database-url", _POSTGRES_URL])["database-url"], _POSTGRES_URL)
        short = "postgres://postgres@127.0.0.1/claudemesh"
        self.assertEqual(parse(["--database-url", short])["database-url"], short)

    def test_databaseSchema(self):
        """--database-schema takes a lower-case identifier."""
        self.assertEqual(parse(["--database-schema", "mesh_2"])["database-schema"], "mesh_2")

    def test_adminTokenFile(self):
        """--admin-token-file reads the token, whitespace stripped."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("  the-token-123\n\n")
        options = parse(["--admin-token-file", path])
        self.assertEqual((options["admin-token-file"], options["admin-token"]),
                         (path, "the-token-123"))

    def test_trustedProxyRepeatedAndCommaSeparated(self):
        """--trusted-proxy may be repeated and may hold a comma-separated list."""
        options = parse([
            "--trusted-proxy", "10.0.0.1",
            "--trusted-proxy", "192.168.0.0/16, ::1,",
            "--trusted-proxy", "10.0.0.1",
        ])
        expected = (
            ipaddress.ip_network("10.0.0.1/32"),
            ipaddress.ip_network("192.168.0.0/16"),
            ipaddress.ip_network("::1/128"),
        )
        self.assertEqual(options["trusted-proxy"], expected)
        self.assertEqual(options["settings"].trusted_proxies, expected)


class OptionsEnvironmentTests(SynchronousTestCase):
    """
    Environment fallbacks of L{tap.Options}, and flags beating them.
    """

    def test_integerEnvironment(self):
        """Every integer option falls back to its environment variable."""
        for flag, env, raw, value in _INTEGER_CASES:
            options = parse(environ={env: raw})
            self.assertEqual(options[flag], value, env)
            self.assertEqual(getattr(options["settings"], flag.replace("-", "_")), value, env)

    def test_stringEnvironment(self):
        """The string options fall back to their environment variables."""
        data_dir = self.mktemp()
        options = parse(environ={
            "BROKER_PORT": "tcp:7902",
            "CLAUDEMESH_DATA_DIR": data_dir,
            "DATABASE_URL": _POSTGRES_URL,
            "CLAUDEMESH_DATABASE_SCHEMA": "other",
            "CLAUDEMESH_ADMIN_TOKEN": " env-token ",
            "CLAUDEMESH_TRUSTED_PROXY": "10.1.0.0/16,10.2.0.1",
        })
        self.assertEqual(
            (options["port"], options["data-dir"], options["database-url"],
             options["database-schema"], options["admin-token"], options["trusted-proxy"]),
            ("tcp:7902", os.path.abspath(data_dir), _POSTGRES_URL, "other", "env-token",
             (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("10.2.0.1/32"))),
        )

    def test_emptyEnvironmentIsUnset(self):
        """An empty environment variable counts as unset."""
        environ = {env: "" for _, env, _, _ in _INTEGER_CASES}
        environ.update(DATABASE_URL="", BROKER_PORT=" ", CLAUDEMESH_ADMIN_TOKEN="",
                       CLAUDEMESH_TRUSTED_PROXY="")
        self.assertEqual(dict(parse(environ=environ)), expected_defaults())

    def test_flagBeatsEnvironment(self):
        """A flag wins over its environment variable, for every option."""
        token_file = self.mktemp()
        with open(token_file, "w") as f:
            f.write("file-token")
        environ = {env: "5" for _, env, _, _ in _INTEGER_CASES}
        environ.update({
            "MAX_MESSAGE_BYTES": "2048",
            "BROKER_PORT": "tcp:1",
            "CLAUDEMESH_DATA_DIR": "/env/dir",
            "DATABASE_URL": "postgresql://env@host/env",
            "CLAUDEMESH_DATABASE_SCHEMA": "env_schema",
            "CLAUDEMESH_ADMIN_TOKEN": "env-token",
            "CLAUDEMESH_TRUSTED_PROXY": "10.9.9.9",
        })
        args = [f"--{flag}={raw}" for flag, _, raw, _ in _INTEGER_CASES]
        args += ["--port=tcp:2", "--data-dir=/flag/dir", "--database-url=postgres://flag@h/f",
                 "--database-schema=flag_schema", f"--admin-token-file={token_file}",
                 "--trusted-proxy=10.8.8.8"]
        options = parse(args, environ)
        for flag, _, _, value in _INTEGER_CASES:
            self.assertEqual(options[flag], value, flag)
        self.assertEqual(
            (options["port"], options["data-dir"], options["database-url"],
             options["database-schema"], options["admin-token"], options["trusted-proxy"]),
            ("tcp:2", "/flag/dir", "postgres://flag@h/f", "flag_schema", "file-token",
             (ipaddress.ip_network("10.8.8.8/32"),)),
        )


class OptionsValidationTests(SynchronousTestCase):
    """
    Bad values are a L{usage.UsageError} naming the option, never a
    traceback.
    """

    def assertRefused(self, args, *fragments, environ=None):
        """
        Parsing C{args} raises L{usage.UsageError} whose text holds every
        fragment.
        """
        error = self.assertRaises(usage.UsageError, parse, args, environ)
        for fragment in fragments:
            self.assertIn(fragment, str(error))
        return error

    def test_badIntegers(self):
        """Non-integers, negatives and values below the minimum are refused for every integer."""
        for flag, minimum in _MINIMUMS.items():
            for bad in ("nope", "1.5", "-1", "", str(minimum - 1)):
                self.assertRefused([f"--{flag}={bad}"], f"--{flag}")

    def test_badIntegerFromEnvironment(self):
        """A bad environment value names both the flag and the variable."""
        self.assertRefused([], "--max-message-bytes", "MAX_MESSAGE_BYTES", "'512'",
                           environ={"MAX_MESSAGE_BYTES": "512"})

    def test_zeroAllowedWhereItTurnsALimitOff(self):
        """0 is accepted for every option that has no larger minimum."""
        for flag, minimum in _MINIMUMS.items():
            if minimum == 0 and flag != "send-rate-limit-burst":
                self.assertEqual(parse([f"--{flag}=0"])[flag], 0)

    def test_burstNeededWhileRateLimited(self):
        """A zero burst with a send rate limit on would refuse every send, so it is refused."""
        self.assertRefused(["--send-rate-limit-burst=0"], "--send-rate-limit-burst")
        options = parse(["--send-rate-limit-burst=0", "--send-rate-limit-per-min=0"])
        self.assertEqual(options["send-rate-limit-burst"], 0)

    def test_badEndpoints(self):
        """Unknown endpoint types, bad ports and non-IP interfaces are refused."""
        for bad in ("tcpx:7900", "tcp:nope", "tcp:70000", "tcp:7900:interface=localhost",
                    "ssl:443:privateKey=/nonexistent/key.pem", "7900"):
            self.assertRefused(["--port", bad], "--port")

    def test_goodEndpoints(self):
        """TCP, TCP6, Unix and interface-bound endpoints are accepted."""
        for good in ("tcp:0", "tcp:7900:interface=127.0.0.1", "tcp6:7900:interface=\\:\\:1",
                     "unix:/tmp/claudemesh.sock"):
            self.assertEqual(parse(["--port", good])["port"], good)

    def test_badDatabaseURLScheme(self):
        """Only postgresql:// and postgres:// URLs are accepted; the password is not echoed."""
        error = self.assertRefused(
            ["--database-url", f"mysql://root:{_PASSWORD}@host/db"], "--database-url", "mysql"
        )
        self.assertNotIn(_PASSWORD, str(error))
        self.assertRefused(["--database-url", "sqlite:///x.db"], "--database-url")
        self.assertRefused([], "--database-url", "DATABASE_URL",
                           environ={"DATABASE_URL": "host=localhost user=postgres"})

    def test_badSchemaIdentifiers(self):
        """Schema names must be lower-case SQL identifiers of at most 63 characters."""
        for bad in ("Claudemesh", "1abc", "a-b", "a b", "x;drop", "a" * 64, "pg_catalog", '"x"'):
            self.assertRefused(["--database-schema", bad], "--database-schema")

    def test_missingTokenFile(self):
        """A missing token file is refused, naming the flag and the path."""
        self.assertRefused(["--admin-token-file", "/nonexistent/token"],
                           "--admin-token-file", "/nonexistent/token")

    def test_emptyTokenFile(self):
        """A token file holding only whitespace is refused."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(" \n")
        self.assertRefused(["--admin-token-file", path], "--admin-token-file", "empty")

    def test_tokenWithSpaces(self):
        """A token that could not travel in an Authorization header is refused."""
        self.assertRefused([], "CLAUDEMESH_ADMIN_TOKEN", "printable",
                           environ={"CLAUDEMESH_ADMIN_TOKEN": "two words"})

    def test_badTrustedProxies(self):
        """Trusted proxies must be IP addresses or CIDR networks without host bits."""
        for bad in ("proxy.example", "10.0.0.5/24", "10.0.0.0/33"):
            self.assertRefused(["--trusted-proxy", bad], "--trusted-proxy", bad)
        self.assertRefused([], "--trusted-proxy", "CLAUDEMESH_TRUSTED_PROXY",
                           environ={"CLAUDEMESH_TRUSTED_PROXY": "10.0.0.1,nope"})

    def test_dataDirNotADirectory(self):
        """A data directory path naming a file is refused."""
        path = self.mktemp()
        with open(path, "w"):
            pass
        self.assertRefused(["--data-dir", path], "--data-dir")


class AdminTokenTests(SynchronousTestCase):
    """
    L{tap.resolve_admin_token} and L{tap.is_loopback_endpoint}.
    """

    def test_loopbackEndpoints(self):
        """Loopback TCP interfaces and Unix sockets are loopback; everything else is not."""
        for endpoint in ("tcp:7900:interface=127.0.0.1", "tcp6:7900:interface=\\:\\:1",
                         "unix:/tmp/x.sock"):
            self.assertTrue(tap.is_loopback_endpoint(endpoint), endpoint)
        for endpoint in ("tcp:7900", "tcp:7900:interface=0.0.0.0",
                         "tcp:7900:interface=192.0.2.1", "tcp6:7900", "garbage:"):
            self.assertFalse(tap.is_loopback_endpoint(endpoint), endpoint)

    def test_configuredTokenWins(self):
        """An operator's token is used as is and nothing is written."""
        data_dir = self.mktemp()
        config = parse(["--port", "tcp:0"], {"CLAUDEMESH_ADMIN_TOKEN": "operator"})
        self.assertEqual(tap.resolve_admin_token(config, data_dir), "operator")
        self.assertFalse(os.path.exists(data_dir))

    def test_loopbackNeedsNoToken(self):
        """A loopback-only broker without a configured token leaves creation open."""
        data_dir = self.mktemp()
        config = parse(["--port", "tcp:0:interface=127.0.0.1"])
        self.assertIsNone(tap.resolve_admin_token(config, data_dir))
        self.assertFalse(os.path.exists(data_dir))

    def test_publicBrokerGeneratesTokenOnce(self):
        """A public broker without a token generates one 0600, logs the path only, and reuses it."""
        data_dir = self.mktemp()
        config = parse(["--port", "tcp:0"])
        with capturedLogs() as events:
            token = tap.resolve_admin_token(config, data_dir)
        path = os.path.join(data_dir, "admin-token")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            self.assertEqual(f.read().strip(), token)
        self.assertGreaterEqual(len(token), 40)
        text = "\n".join(formatEvent(event) for event in events)
        self.assertIn(path, text)
        self.assertNotIn(token, text)
        self.assertEqual(tap.resolve_admin_token(config, data_dir), token)
        self.assertEqual(os.listdir(data_dir), ["admin-token"])


class TimerStepTests(SynchronousTestCase):
    """
    L{tap.timer_step}: a failing step is logged and the loop goes on.
    """

    def test_exceptionLogged(self):
        """An exception is logged with the step's description and not raised."""

        def broken():
            raise ZeroDivisionError("boom")

        with capturedLogs() as events:
            self.assertIsNone(tap.timer_step("exploding step", broken)())
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertIn("exploding step", " ".join(formatEvent(event) for event in events))

    def test_failedDeferredLogged(self):
        """A failed Deferred is logged and turned into success."""
        result = tap.timer_step("failing step", lambda: fail(ZeroDivisionError()))()
        self.assertIsNone(self.successResultOf(result))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_argumentsAndResultPassedThrough(self):
        """Arguments reach the function and a successful result is returned."""
        step = tap.timer_step("adding", lambda a, b=0: succeed(a + b), 2, b=3)
        self.assertEqual(self.successResultOf(step()), 5)

    def test_loopSurvivesFailures(self):
        """A TimerService whose step fails every time keeps calling it."""
        clock = task.Clock()
        calls = []

        def broken():
            calls.append(clock.seconds())
            if len(calls) % 2:
                raise ZeroDivisionError()
            return fail(ValueError())

        timer = TimerService(5, tap.timer_step("broken", broken))
        timer.clock = clock
        timer.startService()
        clock.pump([5] * 4)
        self.assertEqual(calls, [0, 5, 10, 15, 20])
        self.assertTrue(timer._loop.running)
        timer.stopService()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError, ValueError)), 5)


class CountingStore(SQLiteStore):
    """
    An inline SQLite store that counts its pings and, when C{opening} is set
    to a L{Deferred}, opens only once the test fires it.
    """

    def __init__(self):
        super().__init__(":memory:", None)
        self.pings = 0
        self.opening = None

    def open(self):
        if self.opening is None:
            return super().open()
        return self.opening.addCallback(lambda _: super(CountingStore, self).open())

    def ping(self):
        self.pings += 1
        return super().ping()


class MakeServiceTests(SynchronousTestCase):
    """
    L{tap.makeService} on a memory reactor.
    """

    def setUp(self):
        self.stores = []

        def make_store(database_url, data_dir, schema, reactor):
            self.stores.append((database_url, data_dir, schema, reactor))
            self.store = CountingStore()
            return self.store

        self.patch(tap, "make_store", make_store)
        self.reactor = MemoryReactorClock()
        self.data_dir = self.mktemp()

    def test_serviceTree(self):
        """The tree holds the store service, the endpoint service and the probe timer."""
        config = parse(["--data-dir", self.data_dir, "--database-schema", "s1"])
        top = tap.makeService(config, reactor=self.reactor)
        self.assertIsInstance(top, MultiService)
        self.assertIsInstance(top.getServiceNamed("store"), StoreService)
        web = top.getServiceNamed("web")
        self.assertIsInstance(web, StreamServerEndpointService)
        self.assertIsInstance(web.factory, BrokerSite)
        probe = top.getServiceNamed("store-probe")
        self.assertIsInstance(probe, TimerService)
        self.assertEqual(probe.step, tap.STORE_PROBE_SECONDS)
        self.assertIs(probe.clock, self.reactor)
        self.assertEqual(self.stores,
                         [(None, os.path.abspath(self.data_dir), "s1", self.reactor)])

    def test_startListensAndProbes(self):
        """Starting the tree listens on the configured port and pings the store every 5 s."""
        config = parse(["--data-dir", self.data_dir, "--port", "tcp:7911:interface=127.0.0.1"])
        top = tap.makeService(config, reactor=self.reactor)
        site = top.getServiceNamed("web").factory
        top.startService()
        self.addCleanup(top.stopService)
        [(port, factory, _, interface)] = self.reactor.tcpServers
        self.assertEqual((port, factory, interface), (7911, site, "127.0.0.1"))
        self.assertTrue(site.ws_factory.numPorts, "the WebSocket factory was started")
        # Once when the store opened, once at the timer's first tick.
        self.assertEqual(self.store.pings, 2)
        self.reactor.advance(tap.STORE_PROBE_SECONDS)
        self.assertEqual(self.store.pings, 3)

    def test_noPingBeforeOpen(self):
        """The probe leaves the store alone until it has opened, and readiness is down meanwhile."""
        config = parse(["--data-dir", self.data_dir])
        top = tap.makeService(config, reactor=self.reactor)
        self.store.opening = Deferred()
        top.startService()
        self.addCleanup(top.stopService)
        self.reactor.advance(tap.STORE_PROBE_SECONDS)
        self.assertEqual(self.store.pings, 0)
        self.store.opening.callback(None)
        self.assertEqual(self.store.pings, 1, "pinged as soon as it opened")
        self.reactor.advance(tap.STORE_PROBE_SECONDS)
        self.assertEqual(self.store.pings, 2)

    def test_startupLog(self):
        """The start-up line has version, store, port and NVX, and never the password."""
        config = parse(["--data-dir", self.data_dir, "--port", "tcp:7912"],
                       {"DATABASE_URL": _POSTGRES_URL})
        with capturedLogs() as events:
            tap.makeService(config, reactor=self.reactor)
        [startup] = [event for event in events if "nvx" in event]
        self.assertEqual(
            (startup["version"], startup["store_kind"], startup["port"], startup["nvx"]),
            (__version__, "postgres", "tcp:7912", bool(autobahn.websocket.USES_NVX)),
        )
        text = formatEvent(startup)
        for fragment in (__version__, "postgres", "db.example", "tcp:7912", "NVX"):
            self.assertIn(fragment, text)
        everything = "\n".join(formatEvent(event) + repr(event) for event in events)
        self.assertNotIn(_PASSWORD, everything)

    def test_startupLogSQLite(self):
        """On the default store the start-up line names SQLite and the data directory."""
        config = parse(["--data-dir", self.data_dir])
        with capturedLogs() as events:
            tap.makeService(config, reactor=self.reactor)
        [startup] = [event for event in events if "nvx" in event]
        self.assertEqual(startup["store_kind"], "sqlite")
        self.assertIn(os.path.abspath(self.data_dir), formatEvent(startup))


class ScaleOutOptionsTests(SynchronousTestCase):
    """
    The options of several broker processes (issue 15): C{--workers},
    C{--node-name}, C{--reuse-port}, and SQLite's one process.
    """

    def test_workers_need_postgres(self):
        """More than one worker on SQLite is a usage error naming PostgreSQL."""
        for args, environ in ((["--workers", "2"], {}), ([], {"CLAUDEMESH_WORKERS": "3"})):
            error = self.assertRaises(usage.UsageError, parse, args, environ)
            self.assertIn("PostgreSQL", str(error))
            self.assertIn("DATABASE_URL", str(error))

    def test_workers_values(self):
        """Workers: a count, or auto (one per core); nonsense is refused by name."""
        environ = {"DATABASE_URL": "postgresql://u@h/d"}
        self.assertEqual(parse(["--workers", "4"], environ)["workers"], 4)
        self.assertEqual(parse(["--workers", "auto"], environ)["workers"],
                         max(1, os.cpu_count() or 1))
        self.assertEqual(parse([], {})["workers"], 1)
        for bad in ("0", "-1", "x", "257", "1e3"):
            error = self.assertRaises(usage.UsageError, parse, ["--workers", bad], environ)
            self.assertIn("--workers", str(error))

    def test_workers_need_tcp(self):
        """Sharing a port with SO_REUSEPORT needs a tcp: endpoint."""
        environ = {"DATABASE_URL": "postgresql://u@h/d"}
        error = self.assertRaises(usage.UsageError, parse,
                                  ["--workers", "2", "--port", "unix:/tmp/x.sock"], environ)
        self.assertIn("tcp:", str(error))

    def test_node_name(self):
        """A node name: from the flag or CLAUDEMESH_NODE_NAME; control characters refused."""
        self.assertEqual(parse(["--node-name", "eu-1"])["node-name"], "eu-1")
        self.assertEqual(parse([], {"CLAUDEMESH_NODE_NAME": "eu-2"})["node-name"], "eu-2")
        self.assertRaises(usage.UsageError, parse, ["--node-name", "a\x00b"])
        self.assertRaises(usage.UsageError, parse, ["--node-name", "x" * 101])

    def test_second_sqlite_process_refused(self):
        """A second broker on one SQLite data directory stops at start, naming PostgreSQL."""
        data_dir = self.mktemp()
        reactor = MemoryReactorClock()
        first = tap.makeService(parse(["--data-dir", data_dir]), reactor=reactor)
        self.addCleanup(first.getServiceNamed("store").store.release_process)
        error = self.assertRaises(SystemExit, tap.makeService, parse(["--data-dir", data_dir]),
                                  reactor=reactor)
        self.assertIn("PostgreSQL", str(error))
        self.assertIn("another broker process", str(error))
