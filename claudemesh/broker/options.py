"""
The options of C{twistd claudemesh-broker}: every flag with its environment
fallback (a flag beats its variable, which beats the default; an empty
variable counts as unset, so C{DATABASE_URL=} in a compose file means
"SQLite"), their validation, and the admin token that C{POST /meshes}
requires. L{Options} turns them into a configuration dictionary whose
C{"settings"} is a L{BrokerSettings}; L{claudemesh.broker.tap} builds the
service tree from it. This and the tap are the only modules that read flags
and environment variables.
"""

import ipaddress
import os
import re
import secrets
import tempfile
from urllib.parse import urlsplit

import attr
import autobahn
from twisted.internet.endpoints import _parseServer, serverFromString
from twisted.logger import Logger
from twisted.python import usage

from claudemesh import __version__
from claudemesh.broker.settings import BrokerSettings

_log = Logger()

# The name of the generated admin token inside the data directory
# (docs/membership.md).
ADMIN_TOKEN_FILE_NAME = "admin-token"

# Unquoted lower-case SQL identifiers only: Postgres folds unquoted names to
# lower case, so "MySchema" would silently become "myschema" in some
# statements and not in others. 63 bytes is Postgres' NAMEDATALEN - 1.
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")

_DATABASE_URL_SCHEMES = ("postgresql", "postgres")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _IntegerOption:
    """
    One integer tunable: its flag, environment variable, default, the
    smallest value that makes sense, the L{BrokerSettings} attribute it sets,
    what it means and (when 0 is allowed) what 0 means.
    """

    flag: str
    env: str
    default: int
    minimum: int
    setting: str
    meaning: str
    zero_means: str = ""

    def help_text(self):
        zero = f" 0 {self.zero_means}." if self.zero_means else ""
        return f"{self.meaning}{zero} [env {self.env}; default: {self.default}]"

    def expected(self):
        """
        What a valid value looks like, for error messages.
        """
        if self.minimum == 0:
            zero = f" (0 {self.zero_means})" if self.zero_means else ""
            return f"a non-negative integer{zero}"
        return f"an integer of at least {self.minimum}"


_INTEGER_OPTIONS = (
    _IntegerOption(
        "status-ttl-seconds", "STATUS_TTL_SECONDS", 60, 1, "status_ttl_seconds",
        "Seconds after which a 'working' status without a refresh decays to 'idle'.",
    ),
    _IntegerOption(
        "hook-fresh-window-seconds", "HOOK_FRESH_WINDOW_SECONDS", 30, 0,
        "hook_fresh_window_seconds",
        "Seconds during which a hook status is not overridden by a lower-ranked source.",
    ),
    _IntegerOption(
        "max-connections-per-mesh", "MAX_CONNECTIONS_PER_MESH", 100, 0,
        "max_connections_per_mesh",
        "Most live WebSocket sessions one mesh may hold.", "turns the limit off",
    ),
    _IntegerOption(
        "max-message-bytes", "MAX_MESSAGE_BYTES", 65536, 1024, "max_message_bytes",
        "Largest WebSocket frame/message in bytes (at least 1024); bigger ones close with 1009.",
    ),
    _IntegerOption(
        "hook-rate-limit-per-min", "HOOK_RATE_LIMIT_PER_MIN", 30, 0, "hook_rate_limit_per_min",
        "POST /hook/set-status requests allowed per member per minute.", "turns the limit off",
    ),
    _IntegerOption(
        "send-rate-limit-per-min", "SEND_RATE_LIMIT_PER_MIN", 60, 0, "send_rate_limit_per_min",
        "Sustained 'send' frames allowed per session per minute.", "turns the send rate limit off",
    ),
    _IntegerOption(
        "send-rate-limit-burst", "SEND_RATE_LIMIT_BURST", 10, 0, "send_rate_limit_burst",
        "'send' frames allowed in a burst above the sustained rate.",
        "is only allowed when the send rate limit is off",
    ),
    _IntegerOption(
        "retention-days", "CLAUDEMESH_RETENTION_DAYS", 7, 0, "retention_days",
        "Days delivered and expired messages are kept before deletion.", "keeps them forever",
    ),
    _IntegerOption(
        "max-connections-per-ip", "CLAUDEMESH_MAX_CONNECTIONS_PER_IP", 200, 0,
        "max_connections_per_ip",
        "Most simultaneous connections from one client address, counted from accept "
        "(HTTP 429 beyond).",
        "turns the limit off",
    ),
    _IntegerOption(
        "hello-rate-per-ip", "CLAUDEMESH_HELLO_RATE_PER_IP", 20, 0, "hello_rate_per_ip",
        "WebSocket upgrades (hellos) allowed per second from one client address (HTTP 429 beyond).",
        "turns the limit off",
    ),
    _IntegerOption(
        "header-timeout-seconds", "CLAUDEMESH_HEADER_TIMEOUT_SECONDS", 10, 0,
        "header_timeout_seconds",
        "Seconds a connection has to send a request's headers, from accept or its last "
        "answer (HTTP 408 and close beyond).", "turns the deadline off",
    ),
    _IntegerOption(
        "hello-timeout-seconds", "CLAUDEMESH_HELLO_TIMEOUT_SECONDS", 10, 0,
        "hello_timeout_seconds",
        "Seconds a WebSocket has to complete its hello (close 1008 hello_timeout beyond).",
        "turns the deadline off",
    ),
)

# (flag, environment variable, default, help) for the string options.
_STRING_OPTIONS = (
    (
        "port", "BROKER_PORT", "tcp:7900",
        "Where to listen, as a Twisted endpoint string, e.g. tcp:7900:interface=127.0.0.1, "
        "or ssl:443:privateKey=key.pem:certKey=cert.pem for TLS. "
        "[env BROKER_PORT; default: tcp:7900]",
    ),
    (
        "data-dir", "CLAUDEMESH_DATA_DIR", "./claudemesh-data",
        "Directory for the embedded SQLite database and the generated admin token "
        "(created 0700 when missing). [env CLAUDEMESH_DATA_DIR; default: ./claudemesh-data]",
    ),
    (
        "database-url", "DATABASE_URL", None,
        "postgresql://user:password@host:port/dbname to use Postgres; unset means an SQLite "
        "file in the data directory. Prefer the environment variable: flags show in ps. "
        "[env DATABASE_URL; default: unset (SQLite)]",
    ),
    (
        "database-schema", "CLAUDEMESH_DATABASE_SCHEMA", "claudemesh",
        "Postgres schema holding the broker's tables (a lower-case SQL identifier). "
        "[env CLAUDEMESH_DATABASE_SCHEMA; default: claudemesh]",
    ),
    (
        "node-name", "CLAUDEMESH_NODE_NAME", None,
        "This broker's name among the nodes sharing one Postgres database (at most 100 "
        "printable characters); a restart under the same name releases its previous "
        "process's sessions at once. With --workers, each worker adds /w<N>. "
        "[env CLAUDEMESH_NODE_NAME; default: <hostname>:<port>]",
    ),
    (
        "workers", "CLAUDEMESH_WORKERS", "1",
        "Broker processes to run on this machine, sharing the listening port and the "
        "Postgres database; 'auto' is one per CPU core. More than 1 needs DATABASE_URL. "
        "[env CLAUDEMESH_WORKERS; default: 1]",
    ),
    (
        "admin-token-file", None, None,
        "File holding the admin token that authorises POST /meshes (surrounding whitespace "
        "is ignored). Beats CLAUDEMESH_ADMIN_TOKEN, which holds the token itself. "
        "[default: none: mesh creation is open on loopback-only brokers, otherwise a token "
        "is generated in <data-dir>/admin-token]",
    ),
)

# flag -> (environment variable, default)
_STRING_FALLBACKS = {flag: (env, default) for flag, env, default, _ in _STRING_OPTIONS}


class Options(usage.Options):
    """
    The options of C{twistd claudemesh-broker} (docs/configuration.md).

    After parsing, the dictionary holds every option under its flag name
    (integers as L{int}, C{trusted-proxy} as a tuple of
    L{ipaddress.IPv4Network}/L{ipaddress.IPv6Network}, C{data-dir} as an
    absolute path), C{admin-token} (the resolved token or C{None}) and
    C{settings}, the L{BrokerSettings} for the rest of the broker.
    """

    synopsis = "[options]"
    longdesc = (
        "Run the claudemesh broker: WebSocket routing of end-to-end-encrypted "
        "messages between Claude Code sessions, with /health, /health/ready and "
        "/metrics on the same port. Every option also reads an environment "
        "variable (shown in brackets); a flag beats its environment variable."
    )

    optParameters = [[flag, None, None, text] for flag, _, _, text in _STRING_OPTIONS] + [
        [option.flag, None, None, option.help_text()] for option in _INTEGER_OPTIONS
    ]

    optFlags = [
        ["reuse-port", None,
         "Listen with SO_REUSEPORT, so that several broker processes on this machine share "
         "the port (each --workers process does; TCP ports only)."],
    ]

    def __init__(self, environ=None):
        """
        @param environ: the environment to read fallbacks from; L{os.environ}
            (read when the options are parsed) when C{None}.
        """
        super().__init__()
        self._environ = environ
        self["trusted-proxy"] = []

    def opt_trusted_proxy(self, value):
        """
        Address (IP or CIDR network) of a reverse proxy whose X-Forwarded-For
        is believed for per-address limits. Repeat it, or give a
        comma-separated list. [env CLAUDEMESH_TRUSTED_PROXY; default: none]
        """
        self["trusted-proxy"].append(value)

    # usage.Options shows the docstring as the help text, indentation and all.
    opt_trusted_proxy.__doc__ = " ".join(opt_trusted_proxy.__doc__.split())

    def opt_version(self):
        """
        Print the broker's version (and Twisted's and Autobahn's) and exit.
        """
        # twistd's own --version (before the plugin name) prints Twisted's;
        # after it, this one answers.
        print(version_text())
        raise SystemExit(0)

    opt_version.__doc__ = " ".join(opt_version.__doc__.split())

    def postOptions(self):
        environ = os.environ if self._environ is None else self._environ

        def choose(flag, env, default):
            # -> (value, where it came from, for error messages)
            if self[flag] is not None:
                return self[flag], ""
            if env is not None and environ.get(env, "").strip():
                return environ[env], f" (from the environment variable {env})"
            return default, ""

        port, source = choose("port", *_STRING_FALLBACKS["port"])
        self["port"] = _checked_endpoint(port.strip(), source)

        data_dir, source = choose("data-dir", *_STRING_FALLBACKS["data-dir"])
        data_dir = os.path.abspath(os.path.expanduser(data_dir.strip()))
        if os.path.exists(data_dir) and not os.path.isdir(data_dir):
            raise usage.UsageError(
                f"--data-dir: {data_dir} exists and is not a directory{source}"
            )
        self["data-dir"] = data_dir

        database_url, source = choose("database-url", *_STRING_FALLBACKS["database-url"])
        if database_url is not None:
            database_url = database_url.strip()
            scheme = urlsplit(database_url).scheme.lower()
            if scheme not in _DATABASE_URL_SCHEMES:
                # Name the scheme only: the rest of the URL may hold a password.
                raise usage.UsageError(
                    f"--database-url: unsupported scheme {scheme!r}{source}; expected "
                    "postgresql://user:password@host:port/dbname, or leave it unset for "
                    "the embedded SQLite store"
                )
        self["database-url"] = database_url

        schema, source = choose("database-schema", *_STRING_FALLBACKS["database-schema"])
        schema = schema.strip()
        if not _SCHEMA_NAME.match(schema) or schema.startswith("pg_"):
            raise usage.UsageError(
                f"--database-schema: {schema!r}{source} is not a usable schema name; use "
                "lower-case letters, digits and underscores (at most 63, not starting with a "
                "digit or pg_)"
            )
        self["database-schema"] = schema

        node_name, source = choose("node-name", *_STRING_FALLBACKS["node-name"])
        if node_name is not None:
            node_name = node_name.strip()
            if not (0 < len(node_name) <= 100 and node_name.isprintable()):
                raise usage.UsageError(
                    f"--node-name: {node_name[:40]!r}{source} must be 1 to 100 printable "
                    "characters")
        self["node-name"] = node_name

        workers, source = choose("workers", *_STRING_FALLBACKS["workers"])
        self["workers"] = _checked_workers(workers.strip(), source)
        if self["workers"] > 1 and database_url is None:
            raise usage.UsageError(
                f"--workers {self['workers']}{source}: several broker processes need "
                "PostgreSQL (set DATABASE_URL=postgresql://user@host/dbname); the SQLite "
                "store serves one process only")
        if (self["workers"] > 1 or self["reuse-port"]) and not _is_tcp(self["port"]):
            raise usage.UsageError(
                "--workers and --reuse-port need a tcp: port (the processes share it with "
                "SO_REUSEPORT)")

        self["admin-token"] = _admin_token(self["admin-token-file"], environ)

        for option in _INTEGER_OPTIONS:
            raw, source = choose(option.flag, option.env, option.default)
            self[option.flag] = _checked_integer(option, raw, source)
        if self["send-rate-limit-per-min"] > 0 and self["send-rate-limit-burst"] == 0:
            raise usage.UsageError(
                "--send-rate-limit-burst: must be at least 1 while --send-rate-limit-per-min "
                "is on (set --send-rate-limit-per-min=0 to turn the send rate limit off)"
            )

        if self["trusted-proxy"]:
            proxies, source = self["trusted-proxy"], ""
        else:
            env_value = environ.get("CLAUDEMESH_TRUSTED_PROXY", "")
            proxies = [env_value] if env_value.strip() else []
            source = " (from the environment variable CLAUDEMESH_TRUSTED_PROXY)"
        self["trusted-proxy"] = _checked_networks(proxies, source)

        self["settings"] = BrokerSettings(
            trusted_proxies=self["trusted-proxy"],
            **{option.setting: self[option.flag] for option in _INTEGER_OPTIONS},
        )


def _checked_workers(raw, source):
    """
    The number of worker processes C{--workers} asks for.
    """
    if raw.lower() == "auto":
        return max(1, os.cpu_count() or 1)
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 256:
        raise usage.UsageError(
            f"--workers: {raw[:20]!r}{source} must be a number of processes from 1 to 256, "
            "or auto (one per CPU core)")
    return value


def _is_tcp(endpoint):
    return endpoint.split(":", 1)[0].lower() in ("tcp", "tcp6")


def _checked_integer(option, raw, source):
    """
    Convert one integer option, refusing anything below its minimum.
    """
    if isinstance(raw, int):
        return raw
    try:
        value = int(raw.strip(), 10)
    except ValueError:
        value = None
    if value is None or value < option.minimum:
        raise usage.UsageError(
            f"--{option.flag}: expected {option.expected()}, got {raw!r}{source}"
        )
    return value


def _listening_address(description):
    """
    Parse an endpoint string far enough to know where it listens.

    @return: C{(kind, interface, port)}: C{kind} upper-case (C{"TCP"},
        C{"SSL"}, C{"TCP6"}, C{"UNIX"}, ...), C{interface} the address string
        (C{""} for all interfaces) or C{None} when not an IP endpoint, and
        C{port} an L{int} or C{None}.
    @raise ValueError: when the string is not a valid server endpoint.
    """
    kind, args, kwargs = _parseServer(description, None)
    if not isinstance(kind, str):
        # A plugin parser (tcp6, or a third-party endpoint type).
        kind = getattr(kind, "prefix", type(kind).__name__)
    kind = kind.upper()
    if kind in ("TCP", "SSL", "TCP6"):
        return kind, kwargs.get("interface", ""), int(args[0])
    return kind, None, None


def _checked_endpoint(description, source):
    """
    Refuse an endpoint string twistd could not listen on, at parse time
    rather than as a traceback at start.
    """
    try:
        kind, interface, port = _listening_address(description)
        # Building the endpoint runs each type's own argument checks (and
        # loads the certificate files of ssl: endpoints). It does not listen,
        # and it does not touch the reactor.
        serverFromString(None, description)
    except Exception as e:
        raise usage.UsageError(f"--port: invalid endpoint {description!r}{source}: {e}") from None
    if port is not None and not 0 <= port <= 65535:
        raise usage.UsageError(f"--port: port {port} out of range in {description!r}{source}")
    if interface:
        try:
            ipaddress.ip_address(interface)
        except ValueError:
            raise usage.UsageError(
                f"--port: interface {interface!r} in {description!r}{source} is not an IP "
                "address"
            ) from None
    return description


def _checked_networks(values, source):
    """
    Parse trusted proxies: IP addresses or CIDR networks, comma-separated or
    repeated.

    @return: a tuple of L{ipaddress.IPv4Network}/L{ipaddress.IPv6Network},
        duplicates removed, in the order given.
    """
    networks = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            try:
                # strict: 10.0.0.5/24 is more likely a typo than a network.
                networks.append(ipaddress.ip_network(item, strict=True))
            except ValueError as e:
                raise usage.UsageError(
                    f"--trusted-proxy: {item!r}{source} is not an IP address or CIDR "
                    f"network: {e}"
                ) from None
    return tuple(dict.fromkeys(networks))


def _admin_token(token_file, environ):
    """
    The admin token the operator configured: the content of
    C{--admin-token-file}, else C{CLAUDEMESH_ADMIN_TOKEN}, else C{None}.
    """
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise usage.UsageError(f"--admin-token-file: cannot read {token_file!r}: {e}") from None
        where = f"--admin-token-file: {token_file!r}"
    else:
        token = environ.get("CLAUDEMESH_ADMIN_TOKEN", "").strip()
        if not token:
            return None
        where = "CLAUDEMESH_ADMIN_TOKEN (--admin-token-file)"
    if not token:
        raise usage.UsageError(f"{where} is empty")
    # It travels in an Authorization header: printable ASCII, no spaces.
    if not all("!" <= character <= "~" for character in token):
        raise usage.UsageError(
            f"{where}: the token must be printable ASCII without spaces"
        )
    return token


def is_loopback_endpoint(description):
    """
    Whether an endpoint string only accepts connections from this machine: a
    TCP/SSL endpoint bound to a loopback address, or a Unix socket.
    """
    try:
        kind, interface, port = _listening_address(description)
    except Exception:
        return False
    if kind == "UNIX":
        return True
    if not interface:
        return False
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def resolve_admin_token(config, data_dir):
    """
    The token that authorises C{POST /meshes} (docs/membership.md).

    The operator's token when one is configured. Otherwise C{None} (creation
    open) when the broker listens on loopback only; otherwise a token kept
    in C{<data_dir>/admin-token} (mode 0600), generated on first use. The
    path is logged, the token never.

    @param config: parsed L{Options}.
    @param data_dir: the directory holding the generated token.
    @return: the token, or C{None}.
    """
    if config["admin-token"] is not None:
        return config["admin-token"]
    if is_loopback_endpoint(config["port"]):
        return None
    path = os.path.join(data_dir, ADMIN_TOKEN_FILE_NAME)
    token = _read_token_file(path)
    if token is None:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        # Write a temporary file (mkstemp creates it 0600) and hard-link it
        # into place: the link fails if another broker got there first, so
        # no process ever reads a half-written token or overwrites one.
        descriptor, temporary = tempfile.mkstemp(dir=data_dir, prefix=".admin-token-")
        try:
            with os.fdopen(descriptor, "w", encoding="ascii") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            try:
                os.link(temporary, path)
                _log.info(
                    "generated an admin token for POST /meshes in {path}", path=path
                )
            except FileExistsError:
                pass
        finally:
            os.unlink(temporary)
        token = _read_token_file(path)
    else:
        _log.info("admin token for POST /meshes is in {path}", path=path)
    return token


def _read_token_file(path):
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def version_text():
    """
    C{claudemesh-broker <version> (Twisted …, Autobahn …)}.
    """
    import twisted

    return "claudemesh-broker %s (Twisted %s, Autobahn %s)" % (
        __version__, twisted.__version__, autobahn.__version__)
