"""
C{claudemesh doctor}: check what a working setup needs and say how to fix
what is wrong. One line per check, C{✓} or C{✗} (with C{→ fix}); exit 0
when everything passed, else 1.

Checks: the config directory (0700) and C{config.json} (0600, readable), the
keys of each mesh, each mesh's broker (a real signed hello as a one-shot
session: reachability, latency, membership) and the clock skew against the
broker's C{serverTime}; then the Claude Code side: C{claude} on C{PATH} and
its version, the MCP server, hook and status line registration, and which
path messages will take into a session (inbox socket, channel, hooks only).

The Claude Code checks only matter to someone who uses Claude Code: without
C{claude} on C{PATH} they are shown as optional (C{–}) and do not make
doctor fail, so a CLI-only user gets exit 0.
"""

import os
import re
import stat
import subprocess
import sys

from twisted.internet import defer

from claudemesh import __version__
from claudemesh.cli import install, launch
from claudemesh.cli.exitcodes import EXIT_FAILURE, EXIT_OK
from claudemesh.cli.output import out, out_json
from claudemesh.cli.session import session_id
from claudemesh.client import config as configuration
from claudemesh.client import connection, meshkeys

CONNECT_TIMEOUT = 5.0
MAX_SKEW_SECONDS = 30.0
VERSION_TIMEOUT = 5.0
# Claude Code's cross-session inbox socket (CLAUDE_CODE_MESSAGING_SOCKET).
INBOX_SINCE = (2, 1, 224)
THIRD_PARTY = ("CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_USE_VERTEX", "CLAUDE_CODE_USE_FOUNDRY")
UPDATE = "npm install -g @anthropic-ai/claude-code  (or: claude update)"


class Report:
    def __init__(self):
        self.checks = []

    def add(self, ok, text, fix=None, optional=False):
        check = {"ok": bool(ok), "check": text, "fix": None if ok else fix}
        if optional:
            check["optional"] = True
        self.checks.append(check)

    @property
    def ok(self):
        return all(c["ok"] or c.get("optional") for c in self.checks)


def claude_version(claude):
    """
    C{(2, 1, 332)} from C{claude --version}, or C{None}.
    """
    try:
        done = subprocess.run([claude, "--version"], capture_output=True, text=True,
                              timeout=VERSION_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"(\d+)\.(\d+)\.(\d+)", done.stdout or "")
    return tuple(int(n) for n in found.groups()) if found else None


def delivery_path(version, environ, platform=None, hooks=True):
    """
    C{(path, why)}: the way messages will reach a session, C{inbox},
    C{channel}, C{hooks} or C{None} (none works), and why not a better one.
    """
    from claudemesh.mcpserver.server import channels_wanted

    platform = sys.platform if platform is None else platform
    provider = [v for v in THIRD_PARTY if environ.get(v) not in (None, "", "0", "false")]
    if version is None:
        why = "the Claude Code version is unknown"
    elif version < INBOX_SINCE:
        why = "Claude Code %s has no inbox socket (2.1.224 and later)" % (
            ".".join(map(str, version)),)
    elif not (platform.startswith("linux") or platform == "darwin"):
        why = "the inbox socket is not on %s" % (platform,)
    elif provider:
        why = "the inbox socket is not on %s" % (provider[0][len("CLAUDE_CODE_USE_"):].title(),)
    else:
        return "inbox", None
    try:
        extra = configuration.load(configuration.config_dir(environ)).extra
    except configuration.ConfigError:
        extra = {}
    if channels_wanted(environ, extra):
        return "channel", why
    return ("hooks" if hooks else None), why


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
            verified = entry.key_verified()
            if not entry.meshKey:
                state = "missing (broadcasts unreadable)"
            elif verified is None:
                state = "present (not verifiable: no check value from the invite)"
            elif verified:
                state = "present and matches the invite's check value"
            else:
                state = "WRONG: it does not match the invite's check value"
            report.add(bool(entry.meshKey) and verified is not False,
                       "%s: mesh key %s" % (entry.slug, state),
                       "join again with the full link, as the owner sent it (the part after "
                       "'#' is the mesh key): claudemesh join '<link>'")
    claude_checks(report, environ)
    return config


def claude_checks(report, environ):
    """
    The Claude Code side; optional when C{claude} is not installed.
    """
    claude = launch.find_claude(environ)
    optional = claude is None
    if claude is None:
        report.add(False, "claude not found on PATH (only needed to use claudemesh from "
                   "Claude Code)", "install Claude Code", optional=True)
        version = None
    else:
        version = claude_version(claude)
        report.add(True, "claude found at %s (Claude Code %s)" % (
            claude, ".".join(map(str, version)) if version else "version unknown"))
    try:
        registered = install.mcp_registered(environ)
        report.add(registered, "MCP server %sregistered in %s" % (
            "" if registered else "not ", install.claude_json_path(environ)),
            "claudemesh install", optional=optional)
    except install.InstallError as e:
        report.add(False, str(e), "fix the file, then claudemesh install", optional=optional)
    hooks = False
    try:
        found = install.hooks_registered(environ)
        missing = [event for event, _ in install.HOOKS if event not in found]
        hooks = "UserPromptSubmit" in found and "Stop" in found
        report.add(not missing, "hooks %s in %s" % (
            "registered" if not missing else "missing (%s)" % (", ".join(missing),),
            install.settings_path(environ)), "claudemesh install", optional=optional)
    except install.InstallError as e:
        report.add(False, str(e), "fix the file, then claudemesh install", optional=optional)
    if claude is None:
        return
    path, why = delivery_path(version, environ, hooks=hooks)
    inside = " (this shell runs in a session that has one)" if environ.get(
        "CLAUDE_CODE_MESSAGING_SOCKET") else ""
    if path == "inbox":
        report.add(True, "delivery: inbox socket%s: a message starts a turn as it arrives, "
                   "or joins the turn in progress; the hooks are the fallback" % (inside,))
    elif path == "channel":
        report.add(True, "delivery: channel notifications ($CLAUDEMESH_CHANNELS; needs "
                   "channels enabled for your account), because %s" % (why,))
    elif path == "hooks":
        report.add(True, "delivery: hooks only, because %s: messages arrive with your next "
                   "prompt, or before Claude stops" % (why,))
    else:
        report.add(False, "delivery: none works: %s, and the hooks are not installed" % (why,),
                   "claudemesh install (hooks), or update Claude Code: " + UPDATE)


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
        yield key_checks(report, entry, client)
    finally:
        try:
            yield client.stop()
        except connection.ClientError:
            pass


@defer.inlineCallbacks
def key_checks(report, entry, client):
    """
    Issue 17: does this member hold the key of the mesh's current epoch, and
    (owners and admins) has everyone who left since the last rotation been
    rotated out?
    """
    keys = client.mesh_keys
    yield keys.settled()
    epoch = keys.current or 0
    held = keys.key_of(epoch) is not None
    # A refused copy, or an epoch made while this member was banned: only
    # a rotation helps, and the sentence says why (decisions 86, 87).
    refused = keys.refused.get(epoch)
    report.add(held, "%s: mesh key of the current epoch %d %s" % (
        entry.slug, epoch, "held" if held else "missing (broadcasts unreadable)"
        + ("; " + refused if refused else "")),
        "ask an owner or admin to run claudemesh rotate-key" if refused else
        "an owner's or admin's claudemesh seals one for you when it next connects; "
        "then run claudemesh doctor again")
    departed = (keys.status or {}).get("departedSinceRotation")
    if keys.status is not None:
        report.add(not departed, "%s: %s" % (
            entry.slug, meshkeys.departure_notice(departed, keys.status.get("departedTotal"))
            if departed else "no member left or was banned since the mesh key was last "
            "rotated"), "claudemesh rotate-key --mesh %s" % (entry.slug,))
        unbanned = keys.unbanned()
        if unbanned:
            report.add(False, "%s: %s" % (entry.slug, meshkeys.unbanned_notice(unbanned, epoch)),
                       "claudemesh rotate-key --mesh %s" % (entry.slug,))


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
            out("%s %s" % ("✓" if c["ok"] else "–" if c.get("optional") else "✗",
                           c["check"]))
            if not c["ok"] and c["fix"]:
                out("    → %s" % (c["fix"],))
    return EXIT_OK if report.ok else EXIT_FAILURE
