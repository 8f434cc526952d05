"""
The C{claudemesh} commands. Every command that talks to a mesh goes through
L{with_mesh}: one connection, one short-lived session (C{cli-<pid>-<random>},
no session key, C{receive:false} unless the command reads messages), a
bounded number of connection attempts, and one place that turns the
client's failures into a message and an exit code.
"""

import datetime
import getpass
import json
import os
import secrets
import socket
import sys
import time

from twisted.internet import defer, task

from claudemesh import crypto, protocol
from claudemesh.cli.main import (
    EXIT_AUTH,
    EXIT_BAD_ARGUMENTS,
    EXIT_FAILURE,
    EXIT_INTERNAL,
    EXIT_NETWORK,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_PERMISSION,
)
from claudemesh.client import config as configuration
from claudemesh.client import connection, history, membership, meshkeys, messages

DEFAULT_BROKER_URL = "ws://localhost:7900/ws"
REQUEST_TIMEOUT = 10.0
CONNECT_ATTEMPTS = 3
CONNECT_TIMEOUT = 5.0

DISCONNECT_HINT = "They will auto-reconnect within seconds."
KICK_HINT = "They can rejoin anytime by running claudemesh."

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


LOCAL = {"list": cmd_list, "whoami": cmd_whoami}


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
    if isinstance(e, connection.Unreachable):
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
        return EXIT_FOR_CODE.get(e.code, EXIT_FAILURE)
    if isinstance(e, membership.HTTPRefusal):
        err("claudemesh: %s: %s" % (e.code, e.message))
        if e.code == "unauthorized" and e.status == 401:
            err("  (the broker wants its admin token: --admin-token-file FILE or "
                "CLAUDEMESH_ADMIN_TOKEN)")
        return EXIT_FOR_CODE.get(e.code, EXIT_FAILURE)
    if isinstance(e, messages.TargetError):
        err("claudemesh: %s" % (e.message,))
        for candidate in e.candidates:
            err("  %s  %s" % (candidate["name"], candidate["pubkey"]))
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
              on_event=None, entry=None):
    """
    Connect to the chosen mesh as a short-lived session, run
    C{action(client)} (which may return a L{Deferred}), and close.

    The client's failures (terminal close, unreachable broker, refusals)
    propagate to L{_failure_code}.
    """
    if entry is None:
        _, config = _load(environ)
        entry = config.select(getattr(arguments, "mesh", None))
    display_name = environ.get("CLAUDEMESH_DISPLAY_NAME") or entry.displayName
    client = connection.MeshClient(
        reactor, entry, session_id(), receive=receive, display_name=display_name,
        on_message=on_message, on_event=on_event, max_attempts=CONNECT_ATTEMPTS,
        connect_timeout=CONNECT_TIMEOUT, history=history.from_environ(environ, "cli"))
    try:
        yield client.start()
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


def request(client, frame):
    return client.request(frame, timeout=REQUEST_TIMEOUT)


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


@defer.inlineCallbacks
def cmd_new(reactor, arguments, environ):
    name = _valid_name(arguments.mesh_name, "a mesh name")
    display_name = _valid_name(arguments.name or default_display_name(environ),
                               "a display name")
    broker_url = arguments.broker or environ.get("CLAUDEMESH_BROKER_URL") or DEFAULT_BROKER_URL
    try:
        messages.check_broker_url(broker_url)
    except ValueError as e:
        raise CommandFailed(str(e), EXIT_BAD_ARGUMENTS) from None
    token = _admin_token(arguments, environ)
    directory, config = _load(environ)
    entry = yield membership.create_mesh(reactor, broker_url, name, display_name, token)
    entry.slug = _unique_slug(config, entry.slug, entry.meshId)
    config.put(entry)
    configuration.save(directory, config)
    if arguments.json:
        out_json({"meshId": entry.meshId, "memberId": entry.memberId, "slug": entry.slug,
                  "name": entry.name, "role": entry.role, "displayName": display_name,
                  "brokerUrl": broker_url})
        return
    out('Created mesh "%s" (%s); you own it as %s.' % (entry.name, entry.slug, display_name))
    out("  broker:    %s" % (broker_url,))
    out("  config:    %s" % (os.path.join(directory, configuration.CONFIG_FILE),))
    out("Invite people with: claudemesh invite")


def print_qr(link):
    try:
        import segno
    except ImportError:
        return
    qr = segno.make(link, error="l")
    qr.terminal(out=sys.stdout, compact=True)
    sys.stdout.flush()


def cmd_invite(reactor, arguments, environ):
    _, config = _load(environ)
    entry = config.select(arguments.mesh)
    if entry.mesh_key is None:
        raise CommandFailed('no mesh key for "%s" in the config: an invite without it could '
                            "not read broadcasts" % (entry.slug,))

    @defer.inlineCallbacks
    def action(client):
        reply = yield request(client, {"type": "create_invite", "role": arguments.role,
                                       "maxUses": arguments.uses,
                                       "expiresIn": arguments.expires})
        invite = messages.make_invite(entry.identity, entry.meshId, entry.name,
                                      reply["inviteId"], arguments.role, reply["expiresAt"],
                                      entry.brokerUrl)
        # The current epoch's key (issue 17), fetched at hello if need be.
        yield client.mesh_keys.settled()
        try:
            epoch, key = client.mesh_keys.invite_key()
        except meshkeys.NoKey as e:
            raise CommandFailed(str(e)) from None
        link = messages.invite_link(invite, key, epoch)
        if arguments.json:
            out_json({"link": link, "inviteId": reply["inviteId"],
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
            print_qr(link)
        out("They join with: claudemesh join '<link>'  (the part after # is the mesh key: "
            "share the link privately)")

    return with_mesh(reactor, arguments, environ, action, entry=entry)


def cmd_invites(reactor, arguments, environ):
    @defer.inlineCallbacks
    def action(client):
        if arguments.revoke:
            reply = yield request(client, {"type": "revoke_invite",
                                           "inviteId": arguments.revoke})
            if arguments.json:
                out_json({"revoked": reply["inviteId"]})
            else:
                out("Revoked invite %s." % (reply["inviteId"],))
            return
        reply = yield request(client, {"type": "list_invites"})
        invites = reply.get("invites", [])
        if arguments.json:
            out_json(invites)
            return
        if not invites:
            out("No invites.")
        now = time.time()
        for i in invites:
            state = ("revoked" if i.get("revoked") else
                     "expired" if i.get("expiresAt", 0) < now else
                     "used up" if i.get("usedCount", 0) >= i.get("maxUses", 1) else "open")
            out("  %s  %-6s  %d/%d used  %s" % (i["inviteId"], i["role"], i.get("usedCount", 0),
                                               i.get("maxUses", 0), state))

    return with_mesh(reactor, arguments, environ, action)


@defer.inlineCallbacks
def cmd_join(reactor, arguments, environ):
    try:
        parsed = messages.parse_invite_link(arguments.link, now_seconds=reactor.seconds())
    except messages.InviteError as e:
        raise CommandFailed(str(e), EXIT_BAD_ARGUMENTS) from None
    invite = parsed.invite
    display_name = _valid_name(arguments.name or default_display_name(environ),
                               "a display name")
    directory, config = _load(environ)
    existing = [m for m in config.meshes if m.meshId == invite["meshId"]]
    identity = existing[0].identity if existing else None
    if not arguments.json:
        out('Joining mesh "%s"…' % (invite["meshName"],))
    entry = yield membership.join_mesh(reactor, parsed, display_name, identity)
    if existing:
        entry.slug = existing[0].slug
        if not parsed.mesh_key and existing[0].meshKey:
            entry.meshKey = existing[0].meshKey
            entry.meshKeyEpoch = existing[0].meshKeyEpoch
    else:
        entry.slug = _unique_slug(config, entry.slug, entry.meshId)
    config.put(entry)
    configuration.save(directory, config)
    if arguments.json:
        out_json({"meshId": entry.meshId, "memberId": entry.memberId, "slug": entry.slug,
                  "name": entry.name, "role": entry.role, "displayName": display_name,
                  "brokerUrl": entry.brokerUrl, "alreadyMember": bool(existing)})
        return
    out('Joined "%s" as %s (%s)%s.' % (entry.name, display_name, entry.role,
                                       ", with the key you already had" if existing else ""))
    out("  member id: %s" % (entry.memberId,))
    out("  pubkey:    %s…" % (entry.pubkey[:16],))
    out("  broker:    %s" % (entry.brokerUrl,))
    out("  config:    %s" % (os.path.join(directory, configuration.CONFIG_FILE),))
    if not entry.meshKey:
        out("  (the link had no mesh key after '#': broadcasts will not be readable)")


def cmd_leave(reactor, arguments, environ):
    directory, config = _load(environ)
    entry = config.select(arguments.mesh_slug or arguments.mesh)

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
        reply = yield request(client, {"type": "list_peers"})
        peers = [p for p in reply.get("peers", []) if p.get("sessionId") != client.session_id]
        if arguments.json:
            out_json(peers)
            return
        out("peers on %s (%d)" % (client.mesh.slug, len(peers)))
        if not peers:
            out("  (no peers connected)")
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


@defer.inlineCallbacks
def directory_of(client):
    """
    Members (offline ones included) and live peers, for resolving names.
    """
    members = yield request(client, {"type": "list_members"})
    peers = yield request(client, {"type": "list_peers"})
    return members.get("members", []), peers.get("peers", [])


def cmd_send(reactor, arguments, environ):
    text = " ".join(arguments.message)

    @defer.inlineCallbacks
    def action(client):
        target = arguments.to
        if not messages.is_broadcast(target) and not crypto.is_pubkey(target.lower()):
            members, peers = yield directory_of(client)
            target = messages.resolve_target(target, members, peers)
        ack = yield client.send_text(target, text, arguments.priority, timeout=REQUEST_TIMEOUT)
        if not ack.get("queued"):
            raise CommandFailed("Send failed: %s" % (ack.get("error") or "refused",))
        if arguments.json:
            out_json({"to": arguments.to, "targetSpec": target, "messageId": ack["messageId"],
                      "id": ack.get("id")})
        else:
            out("Sent to %s (%s)" % (arguments.to, ack["messageId"][:8]))

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
        yield task.deferLater(reactor, arguments.wait, lambda: None)
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

    return with_mesh(reactor, arguments, environ, action, receive=True, on_message=on_message)


def cmd_listen(reactor, arguments, environ):
    names = {}

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

    @defer.inlineCallbacks
    def action(client):
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

    return with_mesh(reactor, arguments, environ, unbounded, receive=True,
                     on_message=on_message, on_event=on_event)


def _self_frame(frame, arguments):
    if arguments.session:
        frame["sessionId"] = arguments.session
    else:
        frame["all"] = True
    return frame


def cmd_status(reactor, arguments, environ):
    @defer.inlineCallbacks
    def action(client):
        frame = _self_frame({"type": "set_status", "status": arguments.status}, arguments)
        yield _checked(client, frame)
        if arguments.json:
            out_json({"status": arguments.status})
        else:
            out("Status set to %s." % (arguments.status,))

    return with_mesh(reactor, arguments, environ, action)


def cmd_summary(reactor, arguments, environ):
    text = " ".join(arguments.text)

    @defer.inlineCallbacks
    def action(client):
        yield _checked(client, _self_frame({"type": "set_summary", "summary": text}, arguments))
        if arguments.json:
            out_json({"summary": text})
        else:
            out("Summary set.")

    return with_mesh(reactor, arguments, environ, action)


def _checked(client, frame):
    return client.fire_checked(frame, timeout=REQUEST_TIMEOUT)


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
            if arguments.json:
                out_json({"affected": names})
            elif not names:
                out("No peers matched.")
            else:
                out("%s %d peer(s): %s" % (past, len(names), ", ".join(names)))
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
        reply = yield request(client, {"type": "list_bans"})
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
