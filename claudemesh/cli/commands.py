"""
The C{claudemesh} commands. Every command that talks to a mesh goes through
L{with_mesh}: one connection, one short-lived session (C{cli-<pid>-<random>},
no session key, C{receive:false} unless the command reads messages, and
never announced as a presence unless it is C{listen}), a bounded number of
connection attempts, and one place that turns the client's failures into a
message and an exit code.

Results are honest: a command says what the broker actually did (who a
message is for and whether it was pushed now or waits, how many sessions a
status reached, which of the kicked sessions were connected) rather than
what was asked.
"""

import datetime
import getpass
import json
import os
import secrets
import socket
import sys

from twisted.internet import defer, task

from claudemesh import crypto, protocol
from claudemesh.cli import spinner
from claudemesh.cli.exitcodes import (
    EXIT_AUTH,
    EXIT_BAD_ARGUMENTS,
    EXIT_FAILURE,
    EXIT_INTERNAL,
    EXIT_NETWORK,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_PERMISSION,
    EXIT_TOO_LARGE,
)
from claudemesh.client import config as configuration
from claudemesh.client import connection, history, membership, meshkeys, messages

DEFAULT_BROKER_URL = "ws://localhost:7900/ws"
REQUEST_TIMEOUT = 10.0
CONNECT_ATTEMPTS = 3
CONNECT_TIMEOUT = 5.0

DISCONNECT_HINT = "They will auto-reconnect within seconds."
KICK_HINT = "They can rejoin anytime by running claudemesh."
DIRECTORY_HINT = "'claudemesh peers' lists who is connected, 'claudemesh members' everyone"
NO_SESSION = ("no session of yours is connected to \"%s\", so nothing changed: a status, "
              "a summary and groups belong to running sessions (Claude Code started with "
              "'claudemesh', or 'claudemesh listen')")
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


def out(text=""):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def out_json(document, indent=2):
    sys.stdout.write(json.dumps(document, indent=indent, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def err(text):
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def default_display_name(environ):
    for name in (environ.get("USER"), environ.get("USERNAME")):
        if name:
            return name
    try:
        return getpass.getuser()
    except Exception:
        return socket.gethostname() or "me"


def _valid_name(name, what):
    if not protocol.is_valid_name(name):
        raise CommandFailed("%s must be 1-64 characters without '|' or control characters"
                            % (what,), EXIT_BAD_ARGUMENTS)
    return name


def _load(environ):
    directory = configuration.config_dir(environ)
    return directory, configuration.load(directory)


def _chosen(config, arguments, environ):
    return configuration.choose(config, getattr(arguments, "mesh", None), environ)


def plural(count, word, many=None):
    return "%d %s" % (count, word if count == 1 else (many or word + "s"))


# -- local commands ------------------------------------------------------------------


def run_local(arguments, environ):
    """
    Run a command that needs no broker; returns the exit code.
    """
    try:
        return LOCAL[arguments.command](arguments, environ)
    except configuration.ConfigError as e:
        err("claudemesh: %s" % (e,))
        return EXIT_FAILURE
    except CommandFailed as e:
        err("claudemesh: %s" % (e.message,))
        return e.code


def cmd_list(arguments, environ):
    directory, config = _load(environ)
    meshes = config.meshes
    if arguments.mesh:
        meshes = [config.select(arguments.mesh)]
    if arguments.json:
        out_json([{"slug": m.slug, "name": m.name, "meshId": m.meshId, "role": m.role,
                   "displayName": m.displayName, "brokerUrl": m.brokerUrl,
                   "joinedAt": m.joinedAt} for m in meshes])
        return EXIT_OK
    if not meshes:
        out("No meshes joined. Join one with 'claudemesh join <invite link>' or create "
            "one with 'claudemesh new <name>'.")
        return EXIT_OK
    for m in meshes:
        out("  %s  %s  (%s as %s)  %s" % (m.slug, '"%s"' % m.name, m.role,
                                          m.displayName or "?", m.brokerUrl))
    return EXIT_OK


def cmd_whoami(arguments, environ):
    directory, config = _load(environ)
    meshes = [config.select(arguments.mesh)] if arguments.mesh else config.meshes
    rows = [{"mesh": m.slug, "meshId": m.meshId, "memberId": m.memberId,
             "displayName": environ.get("CLAUDEMESH_DISPLAY_NAME") or m.displayName,
             "role": m.role, "pubkey": m.pubkey, "brokerUrl": m.brokerUrl} for m in meshes]
    if arguments.json:
        out_json({"configDir": directory, "meshes": rows})
        return EXIT_OK
    if not rows:
        out("Not a member of any mesh yet (config: %s)." % (directory,))
        return EXIT_OK
    for row in rows:
        out("%s on %s (%s)" % (row["displayName"] or "?", row["mesh"], row["role"]))
        out("  member id: %s" % (row["memberId"],))
        out("  pubkey:    %s" % (row["pubkey"],))
        out("  broker:    %s" % (row["brokerUrl"],))
    out("  config:    %s" % (os.path.join(directory, configuration.CONFIG_FILE),))
    return EXIT_OK


def cmd_use(arguments, environ):
    directory, config = _load(environ)
    if arguments.clear:
        config.defaultMesh = None
        configuration.save(directory, config)
        out("No default mesh any more.")
        return EXIT_OK
    if not arguments.mesh_slug:
        current = config.defaultMesh if config.find(config.defaultMesh or "") else None
        if arguments.json:
            out_json({"defaultMesh": current, "environment": environ.get(
                configuration.MESH_VARIABLE) or None})
        elif current:
            out("Default mesh: %s" % (current,))
        else:
            out("No default mesh (joined: %s). Pick one with: claudemesh use <mesh>"
                % (", ".join(m.slug for m in config.meshes) or "none",))
        return EXIT_OK
    entry = config.select(arguments.mesh_slug)
    config.defaultMesh = entry.slug
    configuration.save(directory, config)
    if arguments.json:
        out_json({"defaultMesh": entry.slug})
    else:
        out('Commands now act on "%s" unless --mesh or $CLAUDEMESH_MESH says otherwise.'
            % (entry.slug,))
    return EXIT_OK


LOCAL = {"list": cmd_list, "whoami": cmd_whoami, "use": cmd_use}


# -- networked commands -----------------------------------------------------------------


def run_networked(reactor, arguments, environ):
    """
    The L{task.react} main function: run the command, print a failure, and
    fire with the exit code (as L{SystemExit}).
    """
    handler = NETWORKED[arguments.command]
    d = defer.maybeDeferred(handler, reactor, arguments, environ)
    d.addCallback(lambda code: EXIT_OK if code is None else code)
    d.addErrback(_failure_code)

    def finish(code):
        if code:
            raise SystemExit(code)

    return d.addCallback(finish)


def _failure_code(failure):
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
    propagate to L{_failure_code}.

    @param presence: whether the session is announced to the mesh (only
        C{listen}, a person watching, is).
    """
    if entry is None:
        _, config = _load(environ)
        entry = _chosen(config, arguments, environ)
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


# -- new, invite, join, leave ------------------------------------------------------------


def _admin_token(arguments, environ):
    if arguments.admin_token_file:
        try:
            with open(arguments.admin_token_file, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as e:
            raise CommandFailed("cannot read %s: %s" % (arguments.admin_token_file,
                                                         e.strerror or e)) from None
    return environ.get("CLAUDEMESH_ADMIN_TOKEN") or None


def _unique_slug(config, slug, mesh_id):
    if config.find(slug) is None:
        return slug
    return "%s-%s" % (slug, mesh_id[:6])


def _broker_url(url, what="--broker"):
    """
    The canonical form of a broker URL the user typed, telling them when it
    was corrected.
    """
    try:
        fixed, changed = messages.normalise_broker_url(url)
    except ValueError as e:
        raise CommandFailed("%s: %s" % (what, e), EXIT_BAD_ARGUMENTS) from None
    if changed:
        err("claudemesh: using %s (the broker's WebSocket URL) for %s" % (fixed, url))
    return fixed


@defer.inlineCallbacks
def cmd_new(reactor, arguments, environ):
    name = _valid_name(arguments.mesh_name, "a mesh name")
    display_name = _valid_name(arguments.name or default_display_name(environ),
                               "a display name")
    broker_url = _broker_url(
        arguments.broker or environ.get("CLAUDEMESH_BROKER_URL") or DEFAULT_BROKER_URL)
    token = _admin_token(arguments, environ)
    directory, config = _load(environ)
    twins = [m for m in config.meshes if m.name == name and m.brokerUrl == broker_url]
    entry = yield spinner.around(
        reactor, sys.stderr, "creating the mesh on %s…" % (broker_url,),
        membership.create_mesh(reactor, broker_url, name, display_name, token), environ)
    entry.slug = _unique_slug(config, entry.slug, entry.meshId)
    entry.meshKeyCheck = crypto.mesh_key_check(entry.mesh_key, entry.meshId)
    config.put(entry)
    configuration.save(directory, config)
    if twins:
        # Said after the fact because a second mesh of that name may well be
        # wanted; what matters is that it is not a surprise later.
        err('claudemesh: note: you already had a mesh called "%s" on this broker (%s); this '
            'is another one, "%s". Commands now need --mesh, or pick a default with '
            "'claudemesh use <slug>'." % (name, ", ".join(m.slug for m in twins), entry.slug))
    if arguments.json:
        out_json({"meshId": entry.meshId, "memberId": entry.memberId, "slug": entry.slug,
                  "name": entry.name, "role": entry.role, "displayName": display_name,
                  "brokerUrl": broker_url})
        return
    out('Created mesh "%s" (%s); you own it as %s.' % (entry.name, entry.slug, display_name))
    out("  broker:    %s" % (broker_url,))
    out("  config:    %s" % (os.path.join(directory, configuration.CONFIG_FILE),))
    out("Invite people with: claudemesh invite")


def qr_text(link):
    """
    The QR code of C{link} for a terminal: half-block characters (two module
    rows per line), full quiet zone, light modules drawn in the foreground
    colour as terminals with a dark background need. Returns the text, or
    C{None} without segno.
    """
    try:
        import segno
    except ImportError:
        return None
    import io

    buffer = io.StringIO()
    segno.make(link, error="l").terminal(out=buffer, compact=True)
    return buffer.getvalue()


def cmd_invite(reactor, arguments, environ):
    _, config = _load(environ)
    entry = _chosen(config, arguments, environ)
    if entry.mesh_key is None:
        raise CommandFailed('no mesh key for "%s" in the config: an invite without it could '
                            "not read broadcasts" % (entry.slug,))

    @defer.inlineCallbacks
    def action(client):
        reply = yield request(client, {"type": "create_invite", "role": arguments.role,
                                       "maxUses": arguments.uses,
                                       "expiresIn": arguments.expires})
        # The current epoch's key (issue 17), fetched at hello if need be.
        yield client.mesh_keys.settled()
        try:
            epoch, key = client.mesh_keys.invite_key()
        except meshkeys.NoKey as e:
            raise CommandFailed(str(e)) from None
        # Signed with the check value of the key the link carries (issue 13).
        invite = messages.make_invite(entry.identity, entry.meshId, entry.name,
                                      reply["inviteId"], arguments.role, reply["expiresAt"],
                                      client.mesh.brokerUrl, key)
        link = messages.invite_link(invite, key, epoch)
        compact = messages.compact_invite_link(invite, key, epoch)
        if arguments.json:
            out_json({"link": link, "compactLink": compact, "inviteId": reply["inviteId"],
                      "expiresAt": reply["expiresAt"]})
            return
        expires = datetime.datetime.fromtimestamp(reply["expiresAt"], datetime.timezone.utc)
        out('Invite to "%s" as %s, %d use%s, until %s:' % (
            entry.name, arguments.role, arguments.uses, "" if arguments.uses == 1 else "s",
            expires.strftime("%Y-%m-%d %H:%M UTC")))
        out()
        out(link)
        out()
        if sys.stdout.isatty():
            text = qr_text(compact or link)
            if text:
                # The QR code holds the compact form of the same invite.
                sys.stdout.write(text)
                sys.stdout.flush()
        out("They join with: claudemesh join '<link>'  (the part after # is the mesh key: "
            "share the link privately)")

    return with_mesh(reactor, arguments, environ, action, entry=entry)


def _when(seconds):
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC")


INVITE_ID_PREFIX = 8


def _invite_by_prefix(invites, text):
    """
    The one invite whose id is C{text} or starts with it (8+ characters).
    """
    text = text.strip().lower()
    exact = [i for i in invites if i["inviteId"] == text]
    if exact:
        return exact[0]
    if len(text) < INVITE_ID_PREFIX:
        raise CommandFailed("an invite id prefix needs %d or more characters ('claudemesh "
                            "invites' lists them)" % (INVITE_ID_PREFIX,), EXIT_BAD_ARGUMENTS)
    found = [i for i in invites if i["inviteId"].startswith(text)]
    if not found:
        raise CommandFailed('no invite "%s" on this mesh (\'claudemesh invites\' lists them)'
                            % (text,), EXIT_NOT_FOUND)
    if len(found) > 1:
        raise CommandFailed('"%s" matches %d invites: give more of the id'
                            % (text, len(found)), EXIT_FAILURE)
    return found[0]


def cmd_invites(reactor, arguments, environ):
    @defer.inlineCallbacks
    def action(client):
        reply = yield request_all(client, {"type": "list_invites"})
        invites = reply.get("invites", [])
        if arguments.revoke:
            invite = _invite_by_prefix(invites, arguments.revoke)
            reply = yield request(client, {"type": "revoke_invite",
                                           "inviteId": invite["inviteId"]})
            if arguments.json:
                out_json({"revoked": reply["inviteId"]})
            else:
                out("Revoked invite %s." % (reply["inviteId"],))
            return
        if arguments.json:
            out_json(invites)
            return
        if not invites:
            out("No invites.")
            return
        now = reactor.seconds()
        out("  %-8s  %-6s  %-9s  %-20s  %s" % ("id", "role", "used", "expires", "state"))
        for i in invites:
            state = ("revoked" if i.get("revoked") else
                     "expired" if i.get("expiresAt", 0) < now else
                     "used up" if i.get("usedCount", 0) >= i.get("maxUses", 1) else "open")
            out("  %-8s  %-6s  %-9s  %-20s  %s" % (
                i["inviteId"][:INVITE_ID_PREFIX], i["role"],
                "%d/%d" % (i.get("usedCount", 0), i.get("maxUses", 0)),
                _when(i.get("expiresAt", 0)), state))
        out("(revoke one with: claudemesh invites --revoke <id>)")

    return with_mesh(reactor, arguments, environ, action)


@defer.inlineCallbacks
def cmd_join(reactor, arguments, environ):
    try:
        parsed = messages.parse_invite_link(arguments.link, now_seconds=reactor.seconds())
    except messages.InviteError as e:
        raise CommandFailed(str(e), EXIT_BAD_ARGUMENTS) from None
    invite = parsed.invite
    directory, config = _load(environ)
    existing = [m for m in config.meshes if m.meshId == invite["meshId"]]
    # A re-join keeps the name already used there unless --name says otherwise.
    known_name = existing[0].displayName if existing else None
    display_name = _valid_name(arguments.name or known_name or default_display_name(environ),
                               "a display name")
    identity = existing[0].identity if existing else None
    if not arguments.json:
        out('Joining mesh "%s"…' % (invite["meshName"],))
    entry = yield spinner.around(
        reactor, sys.stderr, "joining through %s…" % (invite["brokerUrl"],),
        membership.join_mesh(reactor, parsed, display_name, identity), environ)
    # The invite's check value is of the key (and epoch) its link carries.
    entry.meshKeyCheck = invite.get("meshKeyCheck") if parsed.mesh_key else None
    entry.meshKeyCheckEpoch = entry.meshKeyEpoch
    try:
        # An invite made before URLs were normalised may lack the /ws.
        entry.brokerUrl = messages.check_broker_url(entry.brokerUrl)
    except ValueError:
        pass
    if existing:
        entry.slug = existing[0].slug
        entry.groups = existing[0].groups
        entry.extra = existing[0].extra
        if not parsed.mesh_key and existing[0].meshKey:
            entry.meshKey = existing[0].meshKey
            entry.meshKeyEpoch = existing[0].meshKeyEpoch
            entry.meshKeyCheck = existing[0].meshKeyCheck
            entry.meshKeyCheckEpoch = existing[0].meshKeyCheckEpoch
    else:
        entry.slug = _unique_slug(config, entry.slug, entry.meshId)
    config.put(entry)
    configuration.save(directory, config)
    if arguments.json:
        out_json({"meshId": entry.meshId, "memberId": entry.memberId, "slug": entry.slug,
                  "name": entry.name, "role": entry.role, "displayName": display_name,
                  "brokerUrl": entry.brokerUrl, "alreadyMember": bool(existing),
                  "meshKeyVerified": entry.key_verified()})
        return
    out('Joined "%s" as %s (%s)%s.' % (entry.name, display_name, entry.role,
                                       ", with the key you already had" if existing else ""))
    out("  member id: %s" % (entry.memberId,))
    out("  pubkey:    %s…" % (entry.pubkey[:16],))
    out("  broker:    %s" % (entry.brokerUrl,))
    out("  config:    %s" % (os.path.join(directory, configuration.CONFIG_FILE),))
    if not entry.meshKey:
        out("  (the link had no mesh key after '#': broadcasts will not be readable)")
    elif parsed.key_checked:
        out("  mesh key:  verified against the invite")
    if len(config.meshes) > 1 and not config.defaultMesh:
        out("Several meshes joined now: pick one per command with --mesh, or a default with "
            "'claudemesh use %s'." % (entry.slug,))


def cmd_set_broker(reactor, arguments, environ):
    directory, config = _load(environ)
    entry = _chosen(config, arguments, environ)
    url = _broker_url(arguments.url, "set-broker")
    moved = configuration.MeshEntry.from_json(dict(entry.to_json(), brokerUrl=url), "config")

    @defer.inlineCallbacks
    def action(client):
        # Reached and said hello as this member: the new URL is a broker
        # that knows the mesh. Only then is it saved.
        _, fresh = _load(environ)
        current = fresh.find(entry.slug)
        if current is None:
            raise CommandFailed('"%s" was removed from the config meanwhile' % (entry.slug,))
        before = current.brokerUrl
        current.brokerUrl = url
        configuration.save(directory, fresh)
        if arguments.json:
            out_json({"mesh": entry.slug, "brokerUrl": url, "before": before})
        else:
            out('"%s" now uses %s (was %s).' % (entry.slug, url, before))
        yield defer.succeed(None)

    return with_mesh(reactor, arguments, environ, action, entry=moved)


def cmd_leave(reactor, arguments, environ):
    directory, config = _load(environ)
    if arguments.mesh_slug:
        entry = config.select(arguments.mesh_slug)
    else:
        entry = _chosen(config, arguments, environ)

    @defer.inlineCallbacks
    def action(client):
        yield request(client, {"type": "leave"})

    d = with_mesh(reactor, arguments, environ, action, entry=entry)

    def left(_):
        _, fresh = _load(environ)
        fresh.remove(entry.slug)
        configuration.save(directory, fresh)
        if arguments.json:
            out_json({"left": entry.slug})
        else:
            out('Left "%s".' % (entry.name,))

    return d.addCallback(left)


def cmd_role(reactor, arguments, environ):
    @defer.inlineCallbacks
    def action(client):
        reply = yield request(client, {"type": "set_role", "target": arguments.peer,
                                       "role": arguments.role})
        if arguments.json:
            out_json({"target": reply["target"], "role": reply["role"]})
        else:
            out("%s is now %s." % (reply["target"], reply["role"]))

    return with_mesh(reactor, arguments, environ, action)


# -- peers and messages --------------------------------------------------------------------


def cmd_peers(reactor, arguments, environ):
    @defer.inlineCallbacks
    def action(client):
        reply = yield request_all(client, {"type": "list_peers"})
        peers = [p for p in reply.get("peers", []) if p.get("sessionId") != client.session_id]
        if arguments.json:
            out_json(peers)
            return
        out("peers on %s (%d)" % (client.mesh.slug, len(peers)))
        if not peers:
            out("  (no peers connected; 'claudemesh members' lists everyone)")
        for p in peers:
            groups = ", ".join("@" + g["name"] + (":" + g["role"] if g.get("role") else "")
                               for g in p.get("groups") or [])
            line = "  %s %s [%s]%s · %s…" % (
                "●" if p.get("online", True) else "○", p.get("displayName"),
                p.get("status"), " [%s]" % (groups,) if groups else "", p["pubkey"][:16])
            if p.get("summary"):
                line += "  — %s" % (p["summary"],)
            out(line)
            if p.get("cwd"):
                out("      cwd: %s" % (p["cwd"],))

    return with_mesh(reactor, arguments, environ, action)


def cmd_members(reactor, arguments, environ):
    @defer.inlineCallbacks
    def action(client):
        members, peers = yield directory_of(client)
        sessions = {}
        for p in peers:
            if p.get("sessionId") != client.session_id:
                sessions.setdefault(p.get("memberPubkey"), []).append(p)
        rows = []
        for m in members:
            mine = sessions.get(m["memberPubkey"], [])
            rows.append(dict(m, sessions=len(mine),
                             online=any(p.get("online", True) for p in mine),
                             you=m["memberPubkey"] == client.identity.pubkey))
        if arguments.json:
            out_json(rows)
            return
        out("members of %s (%d)" % (client.mesh.slug, len(rows)))
        for r in rows:
            out("  %s %-20s %-6s  %s…  %s%s" % (
                "●" if r["online"] else "○", r["name"], r["role"], r["memberPubkey"][:16],
                plural(r["sessions"], "session") if r["sessions"] else "offline",
                "  (you)" if r["you"] else ""))

    return with_mesh(reactor, arguments, environ, action)


@defer.inlineCallbacks
def directory_of(client):
    """
    Members (offline ones included) and live peers, for resolving names.
    """
    members = yield request_all(client, {"type": "list_members"})
    peers = yield request_all(client, {"type": "list_peers"})
    return members.get("members", []), peers.get("peers", [])


MAX_STDIN_BYTES = 16 * 1024 * 1024


def _message_text(arguments):
    """
    The text of C{send}: its words, or stdin for C{-}.
    """
    if arguments.message != ["-"]:
        return " ".join(arguments.message)
    data = sys.stdin.buffer.read(MAX_STDIN_BYTES + 1) if hasattr(sys.stdin, "buffer") \
        else sys.stdin.read(MAX_STDIN_BYTES + 1).encode("utf-8")
    if len(data) > MAX_STDIN_BYTES:
        raise CommandFailed("the message on stdin is over 16 MiB", EXIT_TOO_LARGE)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandFailed("the message on stdin is not UTF-8 text", EXIT_BAD_ARGUMENTS) \
            from None
    if text.endswith("\n"):
        # What `echo` adds is not part of the message.
        text = text[:-1]
    if not text:
        raise CommandFailed("the message on stdin is empty", EXIT_BAD_ARGUMENTS)
    return text


def _why_waiting(target, peers, client):
    """
    Why a direct message to C{target} was not pushed at once, from the
    peers list: offline, or each live session's status.
    """
    sessions = [p for p in peers if p.get("sessionId") != client.session_id
                and target in (p.get("memberPubkey"), p.get("pubkey"))]
    live = [p for p in sessions if p.get("online", True)]
    if not live:
        return "not connected now: delivered when one of their sessions connects"
    statuses = sorted({p.get("status") for p in live})
    return ("%s: held until they are idle, or send with --priority now"
            % (" / ".join(statuses),))


def cmd_send(reactor, arguments, environ):
    text = _message_text(arguments)

    @defer.inlineCallbacks
    def action(client):
        target = arguments.to
        members, peers = [], []
        if not messages.is_broadcast(target):
            members, peers = yield directory_of(client)
            if not crypto.is_pubkey(target.lower()):
                target = messages.resolve_target(target, members, peers)
        ack = yield client.send_text(target, text, arguments.priority, timeout=REQUEST_TIMEOUT)
        if not ack.get("queued"):
            raise CommandFailed("Send failed: %s" % (ack.get("error") or "refused",))
        recipients, pushed = ack.get("recipients"), ack.get("pushed")
        if arguments.json:
            out_json({"to": arguments.to, "targetSpec": target, "messageId": ack["messageId"],
                      "id": ack.get("id"), "recipients": recipients, "pushed": pushed})
        if recipients == 0:
            raise CommandFailed(
                "nobody received it: no other member%s is connected. A message to %s reaches "
                "the members connected when it is sent (%s)" % (
                    "" if target in ("*", "@all") else " in " + target, target,
                    DIRECTORY_HINT))
        if arguments.json:
            return
        if recipients is None:
            # A broker older than these counts.
            out("Sent to %s (%s)" % (arguments.to, ack["messageId"]))
            return
        if messages.is_broadcast(target):
            waiting = recipients - pushed
            out("Sent to %s: %s, %d pushed now%s (%s)" % (
                arguments.to, plural(recipients, "member"), pushed,
                ", %d waiting (busy or away)" % (waiting,) if waiting else "",
                ack["messageId"]))
        elif pushed:
            out("Sent to %s: pushed to a live session (%s)" % (arguments.to, ack["messageId"]))
        else:
            out("Queued for %s — %s (%s)" % (arguments.to, _why_waiting(target, peers, client),
                                            ack["messageId"]))
        out("  follow it with: claudemesh status %s" % (ack["messageId"],))

    return with_mesh(reactor, arguments, environ, action)


def _names(members, peers):
    names = {}
    for m in members:
        names[m.get("memberPubkey")] = m.get("name")
    for p in peers:
        names.setdefault(p.get("pubkey"), p.get("displayName"))
    return names


def format_message(inbound, names):
    sender = names.get(inbound.senderMemberPubkey) or names.get(inbound.senderPubkey) or \
        inbound.senderPubkey[:8]
    where = "direct" if inbound.kind == "direct" else inbound.targetSpec
    body = inbound.text if inbound.error is None else "[%s]" % (inbound.error,)
    return "%s %s → %s: %s" % (inbound.createdAt, sender, where, body)


def message_json(inbound, names):
    document = inbound.to_json()
    document["senderName"] = names.get(inbound.senderMemberPubkey) or names.get(
        inbound.senderPubkey)
    return document


def cmd_inbox(reactor, arguments, environ):
    received = []
    holds = []

    def on_message(inbound):
        # Acknowledged once printed (below).
        received.append(inbound)
        hold = defer.Deferred()
        holds.append(hold)
        return hold

    @defer.inlineCallbacks
    def action(client):
        members, peers = yield directory_of(client)
        yield spinner.around(reactor, sys.stderr, "waiting %gs for messages…" % (arguments.wait,),
                             task.deferLater(reactor, arguments.wait, lambda: None), environ)
        names = _names(members, peers)
        if arguments.json:
            out_json([message_json(m, names) for m in received])
        elif not received:
            out('No messages on mesh "%s".' % (client.mesh.slug,))
        else:
            n = len(received)
            out("inbox — %s (%d message%s)" % (client.mesh.slug, n, "" if n == 1 else "s"))
            for m in received:
                out("  " + format_message(m, names))
        for hold in holds:
            hold.callback(None)
        # Let the client_acks go out before the close.
        yield task.deferLater(reactor, 0.1, lambda: None)

    # Receives, but is no presence: nobody sees a peer come and go for it.
    return with_mesh(reactor, arguments, environ, action, receive=True, on_message=on_message)


def cmd_listen(reactor, arguments, environ):
    names = {}
    lost = []

    def on_message(inbound):
        if arguments.json:
            out_json(message_json(inbound, names), indent=None)
        else:
            out(format_message(inbound, names))

    def on_event(frame):
        data = frame.get("eventData") or {}
        if data.get("name") and data.get("memberPubkey"):
            names.setdefault(data["memberPubkey"], data["name"])
        if arguments.json:
            out_json({"event": frame.get("event"), "eventData": data}, indent=None)
        else:
            out("* %s %s" % (data.get("name", "?"), frame.get("event")))

    def note(event, data, text):
        if arguments.json:
            out_json({"event": event, "eventData": data}, indent=None)
        else:
            err("claudemesh: " + text)

    def on_disconnect(code, reason):
        lost.append(reactor.seconds())
        note("broker_lost", {"code": code, "reason": reason or ""},
             "lost the connection to the broker (%s%s); reconnecting…"
             % (code, " " + reason if reason else ""))

    def on_connect(ack):
        if lost:
            note("broker_reconnected", {"afterSeconds": round(reactor.seconds() - lost[0], 1)},
                 "reconnected to %s after %.0f s." % (
                     client_box[0].mesh.brokerUrl, reactor.seconds() - lost[0]))
            del lost[:]

    client_box = []

    @defer.inlineCallbacks
    def action(client):
        client_box.append(client)
        members, peers = yield directory_of(client)
        names.update(_names(members, peers))
        if not arguments.json:
            err('Listening on "%s"; Ctrl-C to stop.' % (client.mesh.slug,))
        # Until Ctrl-C (the reactor stops) or the broker ends the session.
        yield client.when_done()

    # A long-lived listener reconnects forever; only the first connection
    # is bounded.
    @defer.inlineCallbacks
    def unbounded(client):
        client.max_attempts = None
        yield action(client)

    return with_mesh(reactor, arguments, environ, unbounded, receive=True, presence=True,
                     on_message=on_message, on_event=on_event,
                     on_disconnect=on_disconnect, on_connect=on_connect)


def _self_frame(frame, arguments):
    if arguments.session:
        frame["sessionId"] = arguments.session
    else:
        frame["all"] = True
    return frame


def _own_sessions(client, peers_list):
    """
    The caller's member's sessions in a C{peers_list}, this one-shot
    session left out.
    """
    return [p for p in (peers_list or {}).get("peers", [])
            if p.get("memberPubkey") == client.identity.pubkey
            and p.get("sessionId") != client.session_id]


@defer.inlineCallbacks
def _on_own_sessions(client, frame, arguments):
    """
    Send a change for the caller's sessions; fail when there is none for it
    to reach (the one-shot session of this command ends at once). Returns
    the sessions it reached.
    """
    if not arguments.session:
        before = yield request_all(client, {"type": "list_peers"})
        if not _own_sessions(client, before):
            raise CommandFailed(NO_SESSION % (client.mesh.slug,))
    after = yield _checked(client, _self_frame(frame, arguments))
    if after.get("nextCursor"):
        after = yield request_all(client, {"type": "list_peers"})
    return [p for p in _own_sessions(client, after)
            if not arguments.session or p.get("sessionId") == arguments.session]


def _sessions_text(sessions):
    online = sum(1 for p in sessions if p.get("online", True))
    text = plural(len(sessions), "session")
    if online != len(sessions):
        text += " (%d not connected right now)" % (len(sessions) - online,)
    return text


def cmd_status(reactor, arguments, environ):
    if arguments.status not in ("idle", "working", "dnd"):
        return cmd_message_status(reactor, arguments, environ)

    @defer.inlineCallbacks
    def action(client):
        frame = {"type": "set_status", "status": arguments.status}
        sessions = yield _on_own_sessions(client, frame, arguments)
        changed = [p for p in sessions if p.get("status") == arguments.status]
        if arguments.json:
            out_json({"status": arguments.status, "sessions": len(sessions),
                      "changed": len(changed)})
            return
        out("Status set to %s on %s." % (arguments.status, _sessions_text(sessions)))
        if len(changed) != len(sessions):
            out("  %d kept another status: a fresher Claude Code hook status wins for %ss, "
                "and only a manual status clears dnd" % (
                    len(sessions) - len(changed),
                    (client.hello_ack or {}).get("hookFreshWindowSeconds", 30)))

    return with_mesh(reactor, arguments, environ, action)


def cmd_message_status(reactor, arguments, environ):
    @defer.inlineCallbacks
    def action(client):
        reply = yield request_all(client, {"type": "message_status",
                                       "messageId": arguments.status.lower()})
        recipients = reply.get("recipients", [])
        if arguments.json:
            out_json({"messageId": reply.get("messageId"), "targetSpec": reply.get("targetSpec"),
                      "recipients": recipients})
            return
        out("message %s to %s: %s" % (reply.get("messageId"), reply.get("targetSpec"),
                                      plural(len(recipients), "recipient")))
        if not recipients:
            out("  (nobody: no member was connected to receive it when it was sent)")
        for r in recipients:
            out("  %-10s %s  %s…" % (r.get("status"), r.get("name"), (r.get("pubkey") or "")[:16]))

    return with_mesh(reactor, arguments, environ, action)


def cmd_summary(reactor, arguments, environ):
    text = " ".join(arguments.text)

    @defer.inlineCallbacks
    def action(client):
        sessions = yield _on_own_sessions(
            client, {"type": "set_summary", "summary": text}, arguments)
        if arguments.json:
            out_json({"summary": text, "sessions": len(sessions)})
        else:
            out("Summary set on %s." % (_sessions_text(sessions),))

    return with_mesh(reactor, arguments, environ, action)


def _checked(client, frame):
    return client.fire_checked(frame, timeout=REQUEST_TIMEOUT)


def _group_name(text):
    name = text[1:] if text.startswith("@") else text
    if not protocol.is_valid_group(name) or name == "all":
        raise CommandFailed("%r is not a group name: letters, digits and _.:- in parts "
                            "separated by '/', like devs or team/backend" % (text,),
                            EXIT_BAD_ARGUMENTS)
    return name


def _group_command(joining):
    def command(reactor, arguments, environ):
        name = _group_name(arguments.group)
        directory, config = _load(environ)
        entry = _chosen(config, arguments, environ)

        @defer.inlineCallbacks
        def action(client):
            frame = {"type": "join_group" if joining else "leave_group", "name": name}
            if joining and arguments.role:
                frame["role"] = arguments.role
            frame = _self_frame(frame, arguments)
            after = yield _checked(client, frame)
            if after.get("nextCursor"):
                after = yield request_all(client, {"type": "list_peers"})
            sessions = [p for p in _own_sessions(client, after)
                        if not arguments.session or p.get("sessionId") == arguments.session]
            if not arguments.session:
                # Remembered for the sessions this machine starts later.
                _, fresh = _load(environ)
                current = fresh.find(entry.slug)
                if current is not None:
                    groups = [g for g in current.groups if g.get("name") != name]
                    if joining:
                        groups.append({"name": name, "role": arguments.role} if arguments.role
                                      else {"name": name})
                    current.groups = groups
                    configuration.save(directory, fresh)
            if arguments.json:
                out_json({"group": name, "joined": joining, "sessions": len(sessions),
                          "remembered": not arguments.session})
                return
            if sessions:
                out("@%s: %s by %s of yours." % (name, "joined" if joining else "left",
                                                 _sessions_text(sessions)))
            else:
                out("@%s: no session of yours is connected right now." % (name,))
            if not arguments.session:
                out("Sessions you start on this machine from now on %s @%s."
                    % ("join" if joining else "no longer join", name))

        return with_mesh(reactor, arguments, environ, action, entry=entry)

    return command


def cmd_audit(reactor, arguments, environ):
    @defer.inlineCallbacks
    def action(client):
        if arguments.verify:
            reply = yield request(client, {"type": "audit_verify"})
            document = {k: reply[k] for k in ("valid", "entries", "brokenAt") if k in reply}
            if arguments.json:
                out_json(document)
            elif reply.get("valid"):
                out("Audit chain valid (%d entries)." % (reply.get("entries", 0),))
            else:
                out("Audit chain BROKEN at entry %s (%d entries)." % (
                    reply.get("brokenAt"), reply.get("entries", 0)))
            return EXIT_OK if reply.get("valid") else EXIT_FAILURE
        reply = yield request(client, {"type": "audit_query", "limit": arguments.limit})
        entries = reply.get("entries", [])
        if arguments.json:
            out_json(reply.get("entries", []))
            return
        for e in entries:
            out("  %s  #%s  %-20s %s  %s" % (e.get("createdAt"), e.get("seq"),
                                             e.get("eventType"), e.get("actor"),
                                             json.dumps(e.get("payload"), sort_keys=True)))
        if not entries:
            out("No audit entries.")

    return with_mesh(reactor, arguments, environ, action)


def _named(sessions):
    """
    C{bob (2 sessions), carol} from session rows.
    """
    counts = {}
    for row in sessions:
        counts[row["name"]] = counts.get(row["name"], 0) + 1
    return ", ".join(name if n == 1 else "%s (%d sessions)" % (name, n)
                     for name, n in counts.items())


def _remove(verb, past, hint):
    def command(reactor, arguments, environ):
        frame = {"type": verb}
        if arguments.peer is not None:
            frame["target"] = arguments.peer
        elif arguments.stale is not None:
            frame["stale"] = arguments.stale * 1000
        else:
            frame["all"] = True

        @defer.inlineCallbacks
        def action(client):
            reply = yield request(client, frame)
            names = reply.get("affected") or reply.get("kicked") or []
            sessions = reply.get("sessions")
            if sessions is None:
                # A broker older than the per-session detail.
                sessions = [{"name": n, "online": True} for n in names]
            online = [r for r in sessions if r.get("online")]
            away = [r for r in sessions if not r.get("online")]
            if arguments.json:
                out_json({"affected": names, "sessions": sessions})
            elif not sessions:
                out("No peers matched.")
            else:
                if online:
                    out("%s %d peer(s): %s" % (past, len(online), _named(online)))
                else:
                    out("No connected peer matched.")
                if away:
                    out("Also ended %s that %s not connected (in grace after a drop): %s"
                        % (plural(len(away), "session"), "was" if len(away) == 1 else "were",
                           _named(away)))
                if online:
                    out(hint)

        return with_mesh(reactor, arguments, environ, action)

    return command


def cmd_ban(reactor, arguments, environ):
    @defer.inlineCallbacks
    def action(client):
        reply = yield request(client, {"type": "ban", "target": arguments.peer})
        document = {"banned": reply["banned"]}
        if not arguments.json:
            out("Banned %s. They can no longer connect or rejoin until unbanned."
                % (reply["banned"],))
        if not arguments.no_rotate:
            # Issue 17: what is broadcast from now on, they cannot read.
            document["rotated"] = yield _rotate(client, arguments,
                                                "ban of %s" % (reply["banned"],))
        if arguments.json:
            out_json(document)

    return with_mesh(reactor, arguments, environ, action)


@defer.inlineCallbacks
def _rotate(client, arguments, reason):
    """
    Rotate the mesh key (claudemesh.client.meshkeys) and say so.
    """
    epoch, names = yield client.mesh_keys.rotate(reason)
    if not arguments.json:
        out("Rotated the mesh key to epoch %d, sealed for %d member%s: %s." % (
            epoch, len(names), "" if len(names) == 1 else "s", ", ".join(sorted(names))))
    return {"epoch": epoch, "members": sorted(names)}


def cmd_rotate_key(reactor, arguments, environ):
    @defer.inlineCallbacks
    def action(client):
        document = yield _rotate(client, arguments, arguments.reason or "manual")
        if arguments.json:
            out_json(document)

    return with_mesh(reactor, arguments, environ, action)


def cmd_unban(reactor, arguments, environ):
    @defer.inlineCallbacks
    def action(client):
        reply = yield request(client, {"type": "unban", "target": arguments.peer})
        if arguments.json:
            out_json({"unbanned": reply["unbanned"]})
        else:
            out("Unbanned %s." % (reply["unbanned"],))

    return with_mesh(reactor, arguments, environ, action)


def cmd_bans(reactor, arguments, environ):
    @defer.inlineCallbacks
    def action(client):
        reply = yield request_all(client, {"type": "list_bans"})
        bans = reply.get("bans", [])
        if arguments.json:
            out_json(bans)
        elif not bans:
            out("No banned members.")
        else:
            for b in bans:
                out("  %s  %s…  banned %s" % (b["name"], b["pubkey"][:16], b["revokedAt"]))

    return with_mesh(reactor, arguments, environ, action)


def cmd_doctor(reactor, arguments, environ):
    from claudemesh.cli import doctor

    return doctor.cmd_doctor(reactor, arguments, environ)


NETWORKED = {
    "doctor": cmd_doctor,
    "new": cmd_new,
    "invite": cmd_invite,
    "invites": cmd_invites,
    "join": cmd_join,
    "leave": cmd_leave,
    "role": cmd_role,
    "set-broker": cmd_set_broker,
    "members": cmd_members,
    "join-group": _group_command(joining=True),
    "leave-group": _group_command(joining=False),
    "peers": cmd_peers,
    "send": cmd_send,
    "inbox": cmd_inbox,
    "listen": cmd_listen,
    "status": cmd_status,
    "summary": cmd_summary,
    "audit": cmd_audit,
    "disconnect": _remove("disconnect", "Disconnected", DISCONNECT_HINT),
    "kick": _remove("kick", "Kicked", KICK_HINT),
    "ban": cmd_ban,
    "rotate-key": cmd_rotate_key,
    "unban": cmd_unban,
    "bans": cmd_bans,
}
