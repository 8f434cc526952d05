"""
The C{claudemesh} commands about meshes and membership: C{list}, C{whoami},
C{use} (no broker needed), C{new}, C{invite}, C{invites}, C{join},
C{set-broker}, C{leave}, C{role}.
"""

import datetime
import os
import sys

from twisted.internet import defer

from claudemesh import crypto
from claudemesh.cli import spinner
from claudemesh.cli.exitcodes import (
    EXIT_BAD_ARGUMENTS,
    EXIT_FAILURE,
    EXIT_NOT_FOUND,
    EXIT_OK,
)
from claudemesh.cli.output import (
    err,
    out,
    out_json,
)
from claudemesh.cli.session import (
    DEFAULT_BROKER_URL,
    CommandFailed,
    chosen_entry,
    default_display_name,
    load_config,
    request,
    request_all,
    valid_name,
    with_mesh,
)
from claudemesh.client import config as configuration
from claudemesh.client import keyring, membership, meshkeys, messages


def cmd_list(arguments, environ):
    directory, config = load_config(environ)
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
    directory, config = load_config(environ)
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
    directory, config = load_config(environ)
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
    name = valid_name(arguments.mesh_name, "a mesh name")
    display_name = valid_name(arguments.name or default_display_name(environ),
                               "a display name")
    broker_url = _broker_url(
        arguments.broker or environ.get("CLAUDEMESH_BROKER_URL") or DEFAULT_BROKER_URL)
    token = _admin_token(arguments, environ)
    directory, config = load_config(environ)
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
    _, config = load_config(environ)
    entry = chosen_entry(config, arguments, environ)
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
    directory, config = load_config(environ)
    existing = [m for m in config.meshes if m.meshId == invite["meshId"]]
    # A re-join keeps the name already used there unless --name says otherwise.
    known_name = existing[0].displayName if existing else None
    display_name = valid_name(arguments.name or known_name or default_display_name(environ),
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
        # Issue 17: the key of the entry replaced stays in the key ring.
        keyring.keep_replaced_key(existing[0], entry)
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
    directory, config = load_config(environ)
    entry = chosen_entry(config, arguments, environ)
    url = _broker_url(arguments.url, "set-broker")
    moved = configuration.MeshEntry.from_json(dict(entry.to_json(), brokerUrl=url), "config")

    @defer.inlineCallbacks
    def action(client):
        # Reached and said hello as this member: the new URL is a broker
        # that knows the mesh. Only then is it saved.
        _, fresh = load_config(environ)
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
    directory, config = load_config(environ)
    if arguments.mesh_slug:
        entry = config.select(arguments.mesh_slug)
    else:
        entry = chosen_entry(config, arguments, environ)

    @defer.inlineCallbacks
    def action(client):
        yield request(client, {"type": "leave"})

    d = with_mesh(reactor, arguments, environ, action, entry=entry)

    def left(_):
        _, fresh = load_config(environ)
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
