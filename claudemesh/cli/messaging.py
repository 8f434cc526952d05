"""
The C{claudemesh} commands about peers and messages: C{peers}, C{members},
C{send}, C{inbox}, C{listen}, C{status}, C{message-status}, C{summary},
C{join-group}, C{leave-group}.

Results are honest: a command says what the broker actually did (who a
message is for and whether it was pushed now or waits, how many sessions a
status reached) rather than what was asked.
"""

import sys

from twisted.internet import defer, task

from claudemesh import crypto, protocol
from claudemesh.cli import spinner
from claudemesh.cli.exitcodes import (
    EXIT_BAD_ARGUMENTS,
    EXIT_TOO_LARGE,
)
from claudemesh.cli.output import (
    err,
    out,
    out_json,
    plural,
)
from claudemesh.cli.session import (
    DIRECTORY_HINT,
    REQUEST_TIMEOUT,
    CommandFailed,
    checked_request,
    chosen_entry,
    load_config,
    request_all,
    with_mesh,
)
from claudemesh.client import config as configuration
from claudemesh.client import messages

NO_SESSION = ("no session of yours is connected to \"%s\", so nothing changed: a status, "
              "a summary and groups belong to running sessions (Claude Code started with "
              "'claudemesh', or 'claudemesh listen')")


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
            out("* " + key_event_text(frame.get("event"), data)
                if frame.get("event") in KEY_EVENTS
                else "* %s %s" % (data.get("name", "?"), frame.get("event")))

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
            # Issue 17: an owner's or admin's listener says at once who left
            # since the last rotation (it may never reach the end of a command).
            yield client.mesh_keys.settled()
            for line in client.mesh_keys.notices():
                err("claudemesh: %s" % (line,))
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


# The mesh key events (issue 17) and how listen says them.
KEY_EVENTS = ("mesh_key_rotated", "mesh_key_shared", "mesh_key_wanted")


def key_event_text(event, data):
    epoch = data.get("epoch")
    if event == "mesh_key_rotated":
        return "%s rotated the mesh key (epoch %s)" % (data.get("by") or "someone", epoch)
    if event == "mesh_key_shared":
        return "a copy of the mesh key (epoch %s) was sealed for this member" % (epoch,)
    return "%s has no copy of the mesh key (epoch %s)" % (data.get("name") or "?", epoch)


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
    after = yield checked_request(client, _self_frame(frame, arguments))
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


def _target_text(target, recipients):
    """
    How a sent message's target reads: a member or session key as the name
    of the recipient it is (or shortened, as keys are everywhere else);
    C{*} and C{@group} as they are.
    """
    if not isinstance(target, str):
        return "?"
    for r in recipients:
        if target == r.get("pubkey") and r.get("name"):
            return r["name"]
    if len(target) == 64 and all(c in "0123456789abcdef" for c in target):
        return target[:16] + "…"
    return target


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
        out("message %s to %s: %s" % (reply.get("messageId"),
                                      _target_text(reply.get("targetSpec"), recipients),
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


def _group_name(text):
    name = text[1:] if text.startswith("@") else text
    if not protocol.is_valid_group(name) or name == "all":
        raise CommandFailed("%r is not a group name: letters, digits and _.:- in parts "
                            "separated by '/', like devs or team/backend" % (text,),
                            EXIT_BAD_ARGUMENTS)
    return name


def group_command(joining):
    def command(reactor, arguments, environ):
        name = _group_name(arguments.group)
        directory, config = load_config(environ)
        entry = chosen_entry(config, arguments, environ)

        @defer.inlineCallbacks
        def action(client):
            frame = {"type": "join_group" if joining else "leave_group", "name": name}
            if joining and arguments.role:
                frame["role"] = arguments.role
            frame = _self_frame(frame, arguments)
            after = yield checked_request(client, frame)
            if after.get("nextCursor"):
                after = yield request_all(client, {"type": "list_peers"})
            sessions = [p for p in _own_sessions(client, after)
                        if not arguments.session or p.get("sessionId") == arguments.session]
            if not arguments.session:
                # Remembered for the sessions this machine starts later.
                _, fresh = load_config(environ)
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
