"""
The C{claudemesh} commands of owners and admins: C{audit}, C{disconnect},
C{kick}, C{ban} (rotating the mesh key by default), C{rotate-key},
C{unban}, C{bans}.
"""

import json

from twisted.internet import defer

from claudemesh.cli.exitcodes import (
    EXIT_FAILURE,
    EXIT_OK,
)
from claudemesh.cli.output import (
    out,
    out_json,
    plural,
)
from claudemesh.cli.session import (
    request,
    request_all,
    with_mesh,
)

DISCONNECT_HINT = "They will auto-reconnect within seconds."


KICK_HINT = "They can rejoin anytime by running claudemesh."


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


def removal_command(verb, past, hint):
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
        else:
            # The notice after this command names this ban too.
            yield client.mesh_keys.refresh_status()
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
        # The notice after this command must not tell to rotate because of
        # the ban just undone (the hello_ack read before it still had it).
        yield client.mesh_keys.refresh_status()
        document = {"unbanned": reply["unbanned"]}
        if not arguments.json:
            out("Unbanned %s." % (reply["unbanned"],))
        if client.mesh_keys.unbanned() and not arguments.no_rotate:
            # The current key was made while they were banned and is never
            # theirs (decision 87): a fresh epoch includes them.
            document["rotated"] = yield _rotate(client, arguments,
                                                "unban of %s" % (reply["unbanned"],))
        if arguments.json:
            out_json(document)

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
