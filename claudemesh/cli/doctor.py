"""
C{claudemesh doctor}: check what a working setup needs and say how to fix
what is wrong. One line per check, C{✓} or C{✗} (with C{→ fix}); exit 0
when everything passed, else 1.

Checks: the config directory (0700) and C{config.json} (0600, readable), the
keys of each mesh, each mesh's broker (a real signed hello as a one-shot
session: reachability, latency, membership) and the clock skew against the
broker's C{serverTime}, the MCP server and hook registration with Claude
Code, and C{claude} on C{PATH}.
"""

import os
import stat

from twisted.internet import defer

from claudemesh import __version__
from claudemesh.cli import install, launch
from claudemesh.cli.commands import out, out_json, session_id
from claudemesh.cli.main import EXIT_FAILURE, EXIT_OK
from claudemesh.client import config as configuration
from claudemesh.client import connection

CONNECT_TIMEOUT = 5.0
MAX_SKEW_SECONDS = 30.0


class Report:
    def __init__(self):
        self.checks = []

    def add(self, ok, text, fix=None):
        self.checks.append({"ok": bool(ok), "check": text, "fix": None if ok else fix})

    @property
    def ok(self):
        return all(c["ok"] for c in self.checks)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def local_checks(report, environ):
    """
    Config, keys, Claude Code registration; returns the loaded config or
    C{None}.
    """
    directory = configuration.config_dir(environ)
    path = os.path.join(directory, configuration.CONFIG_FILE)
    config = None
    if not os.path.isdir(directory):
        report.add(False, "config directory %s does not exist" % (directory,),
                   "join a mesh: claudemesh join '<invite link>'")
    else:
        mode = _mode(directory)
        report.add(mode & 0o077 == 0, "config directory %s (%04o)" % (directory, mode),
                   "chmod 700 %s" % (directory,))
        if not os.path.exists(path):
            report.add(False, "no %s" % (path,), "join a mesh: claudemesh join '<invite link>'")
        else:
            mode = _mode(path)
            report.add(mode & 0o077 == 0, "%s (%04o)" % (path, mode), "chmod 600 %s" % (path,))
            try:
                config = configuration.load(directory)
            except configuration.ConfigError as e:
                report.add(False, "config unreadable: %s" % (e,), "fix or move the file away")
    if config is not None:
        if not config.meshes:
            report.add(False, "no meshes joined", "claudemesh join '<invite link>'")
        for entry in config.meshes:
            # load() already refused a key pair that does not match.
            report.add(True, "%s: member key %s… matches its secret" % (
                entry.slug, entry.pubkey[:16]))
            report.add(bool(entry.meshKey), "%s: mesh key %s" % (
                entry.slug, "present" if entry.meshKey else "missing (broadcasts unreadable)"),
                "join again with the full link (the part after '#' is the mesh key)")
    try:
        registered = install.mcp_registered(environ)
        report.add(registered, "MCP server %sregistered in %s" % (
            "" if registered else "not ", install.claude_json_path(environ)),
            "claudemesh install")
    except install.InstallError as e:
        report.add(False, str(e), "fix the file, then claudemesh install")
    try:
        found = install.hooks_registered(environ)
        missing = [s for s in ("working", "idle") if s not in found]
        report.add(not missing, "status hooks %s in %s" % (
            "registered" if not missing else "missing (%s)" % (", ".join(missing),),
            install.settings_path(environ)), "claudemesh install")
    except install.InstallError as e:
        report.add(False, str(e), "fix the file, then claudemesh install")
    claude = launch.find_claude(environ)
    report.add(claude is not None, "claude found at %s" % (claude,) if claude else
               "claude not found on PATH", "install Claude Code")
    return config


@defer.inlineCallbacks
def broker_checks(reactor, report, entry):
    """
    A signed hello as a one-shot session: reachability, latency,
    membership, clock skew.
    """
    client = connection.MeshClient(
        reactor, entry, session_id(), receive=False, max_attempts=1,
        connect_timeout=CONNECT_TIMEOUT, hello_timeout=CONNECT_TIMEOUT)
    started = reactor.seconds()
    try:
        ack = yield client.start()
    except connection.TerminalClose as e:
        report.add(False, "%s: broker %s refused this member: %s" % (
            entry.slug, entry.brokerUrl, e.message), "ask the mesh owner")
        return
    except connection.ClientError as e:
        report.add(False, "%s: broker %s unreachable: %s" % (entry.slug, entry.brokerUrl,
                                                              e.message),
                   "is the broker running and the URL right? (claudemesh list)")
        return
    received = reactor.seconds()
    latency_ms = (received - started) * 1000
    try:
        report.add(True, "%s: broker %s reachable (%.0f ms), member %s (%s)" % (
            entry.slug, entry.brokerUrl, latency_ms, ack.get("memberDisplayName") or "?",
            ack.get("role") or entry.role))
        server_time = ack.get("serverTime")
        if isinstance(server_time, (int, float)):
            skew = server_time / 1000.0 - (started + received) / 2.0
            report.add(abs(skew) <= MAX_SKEW_SECONDS,
                       "%s: clock skew against the broker %+.1f s" % (entry.slug, skew),
                       "synchronise this machine's clock (NTP); the broker refuses "
                       "signatures more than 60 s off")
    finally:
        try:
            yield client.stop()
        except connection.ClientError:
            pass


@defer.inlineCallbacks
def cmd_doctor(reactor, arguments, environ):
    report = Report()
    config = local_checks(report, environ)
    if config is not None:
        entries = config.meshes
        if getattr(arguments, "mesh", None):
            entries = [config.select(arguments.mesh)]
        yield defer.DeferredList([broker_checks(reactor, report, e) for e in entries],
                                 consumeErrors=True)
    if arguments.json:
        out_json({"ok": report.ok, "checks": report.checks})
    else:
        out("claudemesh doctor  (v%s)" % (__version__,))
        out("─" * 60)
        for c in report.checks:
            out("%s %s" % ("✓" if c["ok"] else "✗", c["check"]))
            if not c["ok"] and c["fix"]:
                out("    → %s" % (c["fix"],))
    return EXIT_OK if report.ok else EXIT_FAILURE
