"""
Running a C{claudemesh} command against a mesh: every command that talks to a
mesh goes through L{with_mesh}: one connection, one short-lived session
(C{cli-<pid>-<random>}, no session key, C{receive:false} unless the command
reads messages, and never announced as a presence unless it is C{listen}), a
bounded number of connection attempts, and one place (L{failure_code}) that
turns the client's failures into a message and an exit code.
"""

import getpass
import os
import secrets
import socket
import sys

from twisted.internet import defer

from claudemesh import protocol
from claudemesh.cli import spinner
from claudemesh.cli.exitcodes import (
    EXIT_AUTH,
    EXIT_BAD_ARGUMENTS,
    EXIT_FAILURE,
    EXIT_INTERNAL,
    EXIT_NETWORK,
    EXIT_NOT_FOUND,
    EXIT_PERMISSION,
    EXIT_TOO_LARGE,
)
from claudemesh.cli.output import (
    err,
)
from claudemesh.client import config as configuration
from claudemesh.client import connection, history, membership, messages

DEFAULT_BROKER_URL = "ws://localhost:7900/ws"


REQUEST_TIMEOUT = 10.0


CONNECT_ATTEMPTS = 3


CONNECT_TIMEOUT = 5.0


DIRECTORY_HINT = "'claudemesh peers' lists who is connected, 'claudemesh members' everyone"


# Broker refusals of a join, and what the user can do about them.
INVITE_CODES = ("invite_not_found", "invite_revoked", "invite_expired", "invite_exhausted",
                "invite_bad_signature", "invite_mesh_mismatch")


# Broker error codes and the exit code each means.
EXIT_FOR_CODE = {
    "forbidden": EXIT_PERMISSION,
    "not_found": EXIT_NOT_FOUND,
    "invite_not_found": EXIT_NOT_FOUND,
    "unauthorized": EXIT_AUTH,
    "bad_signature": EXIT_AUTH,
    "bad_proof": EXIT_AUTH,
    "malformed": EXIT_BAD_ARGUMENTS,
}


class CommandFailed(Exception):
    """
    End the command with C{message} on stderr and exit code C{code}.
    """

    def __init__(self, message, code=EXIT_FAILURE):
        Exception.__init__(self, message)
        self.message = message
        self.code = code


def default_display_name(environ):
    for name in (environ.get("USER"), environ.get("USERNAME")):
        if name:
            return name
    try:
        return getpass.getuser()
    except Exception:
        return socket.gethostname() or "me"


def valid_name(name, what):
    if not protocol.is_valid_name(name):
        raise CommandFailed("%s must be 1-64 characters without '|' or control characters"
                            % (what,), EXIT_BAD_ARGUMENTS)
    return name


def load_config(environ):
    directory = configuration.config_dir(environ)
    return directory, configuration.load(directory)


def chosen_entry(config, arguments, environ):
    return configuration.choose(config, getattr(arguments, "mesh", None), environ)


def failure_code(failure):
    e = failure.value
    if isinstance(e, CommandFailed):
        err("claudemesh: %s" % (e.message,))
        return e.code
    if isinstance(e, configuration.ConfigError):
        err("claudemesh: %s" % (e,))
        return EXIT_FAILURE
    if isinstance(e, connection.TerminalClose):
        err(e.message)
        return EXIT_AUTH if e.code == protocol.CLOSE_POLICY else EXIT_FAILURE
    if isinstance(e, connection.MessageTooLarge):
        err("claudemesh: %s" % (e.message,))
        return EXIT_TOO_LARGE
    if isinstance(e, connection.Unreachable):
        if "TLS handshake" in e.message:
            err("claudemesh: %s" % (e.message,))
        else:
            err("claudemesh: %s Is it running?" % (e.message,))
        return EXIT_NETWORK
    if isinstance(e, connection.SessionReplaced):
        err("claudemesh: %s" % (e.message,))
        return EXIT_FAILURE
    if isinstance(e, connection.RequestError):
        if e.code == "timeout" or e.code == "connection_lost":
            err("claudemesh: %s" % (e.message,))
            return EXIT_NETWORK
        err("claudemesh: %s: %s" % (e.code, e.message))
        for candidate in e.frame.get("candidates") or []:
            err("  %s  %s" % (candidate.get("name"), candidate.get("pubkey")))
        if e.code == "not_found" and "peer" in e.message:
            err("  (%s; a key prefix needs 8 or more hex characters)" % (DIRECTORY_HINT,))
        return EXIT_FOR_CODE.get(e.code, EXIT_FAILURE)
    if isinstance(e, membership.HTTPRefusal):
        err("claudemesh: %s: %s" % (e.code, e.message))
        if e.code == "unauthorized" and e.status == 401:
            err("  (the broker wants its admin token: --admin-token-file FILE or "
                "CLAUDEMESH_ADMIN_TOKEN)")
        if e.code in INVITE_CODES:
            err("  (%s)" % (messages.EXPIRED_HINT,))
        if e.status == 404 and e.code == "not_found":
            err("  (nothing at that address answers like a claudemesh broker: is the URL "
                "right? It looks like %s)" % (messages.URL_FORM,))
        return EXIT_FOR_CODE.get(e.code, EXIT_FAILURE)
    if isinstance(e, messages.TargetError):
        err("claudemesh: %s" % (e.message,))
        for candidate in e.candidates:
            err("  %s  %s" % (candidate["name"], candidate["pubkey"]))
        if e.code == "not_found":
            err("  (%s)" % (DIRECTORY_HINT,))
        return EXIT_NOT_FOUND if e.code == "not_found" else EXIT_FAILURE
    if isinstance(e, connection.ClientError):
        err("claudemesh: %s" % (e.message,))
        return EXIT_FAILURE
    if environ_debug():
        err(failure.getTraceback())
    err("claudemesh: internal error: %s: %s" % (type(e).__name__, e))
    return EXIT_INTERNAL


def environ_debug():
    return os.environ.get("CLAUDEMESH_DEBUG", "").lower() in ("1", "true")


def session_id():
    return "cli-%d-%s" % (os.getpid(), secrets.token_hex(4))


@defer.inlineCallbacks
def with_mesh(reactor, arguments, environ, action, receive=False, on_message=None,
              on_event=None, entry=None, presence=False, **client_options):
    """
    Connect to the chosen mesh as a short-lived session, run
    C{action(client)} (which may return a L{Deferred}), and close.

    The client's failures (terminal close, unreachable broker, refusals)
    propagate to L{failure_code}.

    @param presence: whether the session is announced to the mesh (only
        C{listen}, a person watching, is).
    """
    if entry is None:
        _, config = load_config(environ)
        entry = chosen_entry(config, arguments, environ)
    entry = _usable_url(entry)
    display_name = environ.get("CLAUDEMESH_DISPLAY_NAME") or entry.displayName
    client = connection.MeshClient(
        reactor, entry, session_id(), receive=receive, display_name=display_name,
        on_message=on_message, on_event=on_event, max_attempts=CONNECT_ATTEMPTS,
        connect_timeout=CONNECT_TIMEOUT, presence=presence,
        history=history.from_environ(environ, "cli"), **client_options)
    try:
        yield spinner.around(reactor, sys.stderr, "connecting to %s…" % (entry.brokerUrl,),
                             client.start(), environ)
        result = yield action(client)
        # Issue 17: key copies being fetched or shared, then what an owner
        # or admin should know about the mesh key.
        yield client.mesh_keys.settled()
        for line in client.mesh_keys.notices():
            err("claudemesh: %s" % (line,))
    finally:
        if not client.outcome:
            try:
                yield client.stop()
            except connection.ClientError:
                pass
    return result


def _usable_url(entry):
    """
    An entry saved before broker URLs were normalised (C{ws://host:port},
    no C{/ws}) is used with the normalised URL, saying how to fix it for
    good; anything else as it is.
    """
    try:
        fixed, changed = messages.normalise_broker_url(entry.brokerUrl)
    except ValueError:
        return entry
    if not changed:
        return entry
    err("claudemesh: using %s for %s (the broker's WebSocket URL); save it with: claudemesh "
        "set-broker %s --mesh %s" % (fixed, entry.brokerUrl, fixed, entry.slug))
    return configuration.MeshEntry.from_json(dict(entry.to_json(), brokerUrl=fixed), "config")


def request(client, frame):
    return client.request(frame, timeout=REQUEST_TIMEOUT)


# The list each paged reply carries (the broker pages replies so that each
# fits a frame; nextCursor says where the next page starts).
PAGED = {"list_peers": "peers", "list_members": "members", "list_invites": "invites",
         "list_bans": "bans", "message_status": "recipients"}


MAX_PAGES = 1000


@defer.inlineCallbacks
def request_all(client, frame):
    """
    A paged request, every page of it: the first reply with the rows of all
    pages in its list.
    """
    field = PAGED[frame["type"]]
    reply = yield request(client, frame)
    rows = list(reply.get(field) or [])
    for _ in range(MAX_PAGES):
        cursor = reply.get("nextCursor")
        if not isinstance(cursor, str) or not cursor:
            break
        reply = yield request(client, dict(frame, cursor=cursor))
        rows += reply.get(field) or []
    first = dict(reply, **{field: rows})
    first.pop("nextCursor", None)
    return first


def checked_request(client, frame):
    return client.fire_checked(frame, timeout=REQUEST_TIMEOUT)
