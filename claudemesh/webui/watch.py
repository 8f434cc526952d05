"""
The page's view of one mesh: members, live sessions, conversations and
delivery states, kept current by a watching session (docs/protocol.md,
C{watch: true}) and the local history, and the actions the page may take.

L{MeshWatch} knows nothing of HTTP: it hands JSON-able events to its
subscribers (L{MeshWatch.subscribe}) and answers actions with L{Deferred}s.
The reactor is a parameter; nothing here imports the global one.
"""

import collections
import socket

from twisted.internet import defer, task
from twisted.logger import Logger

from claudemesh import crypto
from claudemesh.client import connection, meshkeys, messages

REQUEST_TIMEOUT = 10.0
HISTORY_POLL_SECONDS = 1.0
STATUS_POLL_SECONDS = 3.0
REFRESH_SECONDS = 30.0
# Sent messages whose delivery state is still asked for, newest first.
MAX_TRACKED = 50
TRACK_FOR_MS = 7 * 86400 * 1000
MAX_MESSAGES = 5000
MAX_TEXT = 65536

FINAL_STATES = ("delivered", "expired", "unknown")


def conversation_of(record, own_keys, session_owner):
    """
    The conversation a history record belongs to: C{*} for C{*}/C{@all},
    the group for C{@group}, else the other party's member key (a session
    key is mapped to its member when known).

    @param own_keys: this identity's keys (member and session keys).
    @param session_owner: session key → member key, as far as known.
    """
    target = record.get("targetSpec") or ""
    if target in ("*", "@all"):
        return "*"
    if target.startswith("@"):
        return target
    if record.get("kind") == "sent":
        other = target
    else:
        other = record.get("senderMemberPubkey") or record.get("senderPubkey") or ""
        if other in own_keys:
            other = target
    return session_owner.get(other, other)


def delivery_state(recipients):
    """
    One word for a sent message from its C{message_status} recipients.
    """
    states = {r.get("status") for r in recipients}
    if not states:
        return "queued"
    if states == {"delivered"}:
        return "delivered"
    if states == {"expired"}:
        return "expired"
    if "queued" in states:
        return "queued" if "delivered" not in states else "partly delivered"
    return "delivered" if "delivered" in states else "expired"


class MeshWatch:
    """
    One mesh as the page shows it.

    @ivar members: member key → C{members_list} row.
    @ivar sessions: session key → C{peers_list} row (this watcher left out).
    @ivar messages: message key (C{kind:messageId}) → page message.
    """

    _log = Logger()

    def __init__(self, reactor, entry, session_id, session_identity=None, history=None,
                 history_reader=None, display_name=None,
                 client_factory=connection.MeshClient):
        """
        @param history: the L{claudemesh.client.history.History} this
            watcher's own session writes to.
        @param history_reader: where to read the conversations of this
            machine's sessions (a L{History}); C{None} shows only this run's.
        """
        self.reactor = reactor
        self.entry = entry
        self.history = history_reader
        self.subscribers = []
        self.members = {}
        self.sessions = {}
        self.messages = collections.OrderedDict()
        self.state = "connecting"
        self.problem = None
        self.role = entry.role
        # Issue 17: who left or was banned since the mesh key last changed
        # (keyStatus rows), as far as this owner's or admin's page knows.
        self.departed = []
        # …and who was banned when it was made and is unbanned since.
        self.unbanned = []
        self._session_owner = {}
        self._tail = history_reader.tail(entry.meshId) if history_reader is not None else None
        self._refresh_pending = None
        self._loops = []
        self.client = client_factory(
            reactor, entry, session_id, session_identity=session_identity, receive=True,
            display_name=display_name or entry.displayName,
            hello_extra={"watch": True, "peerType": "human", "channel": "claudemesh-ui",
                         "hostname": socket.gethostname()[:255]},
            on_message=self._message, on_event=self._event, on_connect=self._connected,
            on_terminal_close=self._ended, history=history)

    # -- lifecycle ------------------------------------------------------------------

    def start(self):
        self.client.start().addErrback(lambda f: None)
        self.client.when_done().addErrback(self._done)
        self.poll_history()
        for interval, call in ((HISTORY_POLL_SECONDS, self.poll_history),
                               (STATUS_POLL_SECONDS, self.poll_delivery),
                               (REFRESH_SECONDS, self.refresh)):
            loop = task.LoopingCall(call)
            loop.clock = self.reactor
            loop.start(interval, now=False).addErrback(
                lambda f: self._log.failure("a UI poll failed", f))
            self._loops.append(loop)

    def stop(self):
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        if self._refresh_pending is not None and self._refresh_pending.active():
            self._refresh_pending.cancel()
        return self.client.stop().addErrback(lambda f: None)

    def subscribe(self, callback):
        """
        Call C{callback(event)} with each change; returns the unsubscriber.
        """
        self.subscribers.append(callback)
        return lambda: self.subscribers.remove(callback) if callback in self.subscribers \
            else None

    def _publish(self, event):
        for callback in list(self.subscribers):
            try:
                callback(event)
            except Exception:
                self._log.failure("a UI subscriber failed")

    # -- what the page is shown -------------------------------------------------------

    def snapshot(self):
        """
        Everything the page shows of this mesh, as one JSON-able object.
        """
        return {"type": "snapshot", "presence": self.presence(),
                "messages": list(self.messages.values())}

    def presence(self):
        me = self.client.hello_ack or {}
        return {
            "mesh": {"slug": self.entry.slug, "name": self.entry.name,
                     "meshId": self.entry.meshId},
            "me": {"memberPubkey": self.entry.pubkey, "sessionPubkey": self.client.pubkey,
                   "role": me.get("role", self.role),
                   "displayName": me.get("memberDisplayName", self.entry.displayName)},
            "state": self.state,
            "problem": self.problem,
            "members": sorted(self.members.values(),
                              key=lambda m: ((m.get("name") or "").lower(),
                                             m.get("memberPubkey", ""))),
            "sessions": sorted(self.sessions.values(),
                               key=lambda s: (s.get("connectedAt") or "", s.get("pubkey", ""))),
            "serverTime": me.get("serverTime"),
            "meshKey": self.key_state(),
        }

    def key_state(self):
        """
        The mesh key as the page shows it (issue 17): the current epoch,
        whether this member holds its key, and for owners and admins the
        departures since the last rotation, as one sentence.
        """
        keys = self.client.mesh_keys
        epoch = keys.current
        sentences = []
        if self._moderator() and self.departed:
            sentences.append(meshkeys.departure_notice(self.departed))
        if self._moderator() and self.unbanned:
            sentences.append(meshkeys.unbanned_notice(self.unbanned, epoch or 0))
        return {"epoch": epoch, "held": None if epoch is None else keys.key_of(epoch) is not None,
                "departedSinceRotation": list(self.departed),
                "unbannedSinceRotation": list(self.unbanned),
                "notice": " ".join(sentences) or None}

    def _moderator(self):
        return (self.client.hello_ack or {}).get("role", self.role) in meshkeys.MODERATORS

    def _publish_presence(self):
        self._publish({"type": "presence", "presence": self.presence()})

    # -- the watching session -----------------------------------------------------------

    def _connected(self, ack):
        self.state = "connected"
        self.problem = None
        self.role = ack.get("role", self.role)
        if not ack.get("watch"):
            # An older broker ignored the watch option: this session would take
            # messages meant for the user's Claude Code sessions. Leave now.
            self.problem = ("This broker does not know watching sessions (hello watch); "
                            "upgrade it to use claudemesh ui.")
            self.state = "ended"
            self._publish_presence()
            self.client.stop()
            return
        self._keep_status(ack.get("keyStatus"))
        self._publish_presence()
        self.refresh()

    def _done(self, failure):
        failure.trap(connection.ClientError)
        self.state = "ended"
        self.problem = self.problem or failure.value.message
        self._publish_presence()

    def _ended(self, code, reason, message):
        self.state = "ended"
        self.problem = message
        self._publish_presence()

    def refresh(self):
        """
        Ask the broker for the members and sessions again.
        """
        if self._refresh_pending is not None and self._refresh_pending.active():
            self._refresh_pending.cancel()
        self._refresh_pending = None
        if not self.client.connected:
            if self.state == "connected":
                self.state = "reconnecting"
                self._publish_presence()
            return defer.succeed(None)
        d = defer.gatherResults([self._request({"type": "list_members"}),
                                 self._request({"type": "list_peers"})], consumeErrors=True)

        def got(replies):
            members, peers = replies
            self.members = {m["memberPubkey"]: m for m in members.get("members", [])
                            if isinstance(m, dict) and m.get("memberPubkey")}
            self.sessions = {}
            for row in peers.get("peers", []):
                self._put_session(row)
            self._publish_presence()
            if self._moderator():
                return self._key_status()

        def failed(f):
            self._log.info("refreshing the UI's presence failed: {error}",
                           error=f.getErrorMessage())

        return d.addCallbacks(got, failed)

    def _refresh_soon(self):
        if self._refresh_pending is None or not self._refresh_pending.active():
            self._refresh_pending = self.reactor.callLater(0.2, self.refresh)

    def _put_session(self, row):
        if not isinstance(row, dict) or not isinstance(row.get("pubkey"), str):
            return
        if row.get("sessionId") == self.client.session_id and \
                row.get("memberPubkey") == self.entry.pubkey:
            return
        self.sessions[row["pubkey"] + "|" + str(row.get("sessionId"))] = row
        if row.get("memberPubkey"):
            self._session_owner[row["pubkey"]] = row["memberPubkey"]

    def _event(self, frame):
        event = frame.get("event")
        data = frame.get("eventData")
        if not isinstance(data, dict):
            return
        if event == "peer_status":
            self._put_session(data)
            self._publish_presence()
        elif event == "peer_left":
            key = "%s|%s" % (data.get("pubkey"), data.get("sessionId"))
            self.sessions.pop(key, None)
            self._publish_presence()
            self._refresh_soon()
        elif event in ("peer_joined", "peer_returned"):
            self._refresh_soon()
        elif event in ("mesh_key_rotated", "mesh_key_shared"):
            # The key changed (whoever rotated) or a copy arrived: ask again
            # what the page shows of it (the departures are cleared).
            self._refresh_soon()

    # -- the mesh key (issue 17) ----------------------------------------------------------

    def _key_status(self):
        """
        Ask an owner's or admin's broker who left since the key last changed
        (C{mesh_key_status}); the live sessions are told of no departure.
        """
        def got(reply):
            status = reply.get("keyStatus")
            self._keep_status(status)
            self._publish_presence()

        def failed(f):
            # A broker without the request: the hello's keyStatus stays.
            f.trap(connection.ClientError)

        return self._request({"type": "mesh_key_status"}).addCallbacks(got, failed)

    def _keep_status(self, status):
        departed = status.get("departedSinceRotation") if isinstance(status, dict) else None
        self.departed = [d for d in departed or () if isinstance(d, dict)]
        unbanned = status.get("unbannedSinceRotation") if isinstance(status, dict) else None
        self.unbanned = [u for u in unbanned or () if isinstance(u, dict)
                         and crypto.is_pubkey(u.get("memberPubkey"))]

    @defer.inlineCallbacks
    def rotate_key(self, reason="manual"):
        """
        Rotate the mesh key (L{meshkeys.EpochKeys.rotate}): a fresh key
        sealed for every current member, committed as the next epoch.
        """
        epoch, names = yield self.client.mesh_keys.rotate(reason)
        self.departed, self.unbanned = [], []
        self._publish_presence()
        return {"epoch": epoch, "members": sorted(names)}

    # -- conversations --------------------------------------------------------------------

    def _own_keys(self):
        return {self.entry.pubkey, self.client.pubkey}

    def _page_message(self, record):
        kind = record.get("kind")
        message_id = record.get("messageId")
        if kind not in ("sent", "received") or not isinstance(message_id, str) or not message_id:
            return None
        text = record.get("text")
        if isinstance(text, str) and len(text) > MAX_TEXT:
            text = text[:MAX_TEXT] + "…"
        message = {
            "key": "%s:%s" % (kind, message_id),
            "kind": kind,
            "messageId": message_id,
            "at": record.get("at"),
            "via": record.get("via"),
            "sessionId": record.get("sessionId"),
            "targetSpec": record.get("targetSpec"),
            "priority": record.get("priority"),
            "text": text if isinstance(text, str) else None,
            "error": record.get("error"),
            "senderPubkey": record.get("senderPubkey"),
            "senderMemberPubkey": record.get("senderMemberPubkey"),
            "createdAt": record.get("createdAt"),
            "conversation": conversation_of(record, self._own_keys(), self._session_owner),
        }
        if kind == "sent":
            message["delivery"] = "queued"
            message["recipients"] = []
        return message

    def add_records(self, records):
        """
        Put history records (or records of this process) into the
        conversations and tell the page about the new ones.
        """
        fresh = []
        for record in records:
            message = self._page_message(record)
            if message is None or message["key"] in self.messages:
                continue
            self.messages[message["key"]] = message
            fresh.append(message)
        while len(self.messages) > MAX_MESSAGES:
            self.messages.popitem(last=False)
        if fresh:
            self._publish({"type": "messages", "messages": fresh})
        return fresh

    def poll_history(self):
        if self._tail is None:
            return
        try:
            records = self._tail.poll()
        except OSError as e:
            self._log.warn("reading the message history failed: {error}", error=e.strerror)
            return
        self.add_records(records)

    def _message(self, inbound):
        # This watcher's own session-key messages (replies to the page).
        record = inbound.to_json()
        record.update({"kind": "received", "via": "ui", "sessionId": self.client.session_id,
                       "at": int(self.reactor.seconds() * 1000)})
        self.add_records([record])

    @defer.inlineCallbacks
    def poll_delivery(self):
        """
        Ask the broker how the newest unsettled sent messages fared.
        """
        if not self.client.connected:
            return
        horizon = int(self.reactor.seconds() * 1000) - TRACK_FOR_MS
        unsettled = [m for m in reversed(self.messages.values())
                     if m["kind"] == "sent" and m["delivery"] not in FINAL_STATES
                     and (m.get("at") or 0) >= horizon][:MAX_TRACKED]
        for message in unsettled:
            try:
                reply = yield self._request({"type": "message_status",
                                             "messageId": message["messageId"]})
            except connection.RequestError as e:
                if e.code != "not_found":
                    return
                state, recipients = "unknown", []
            else:
                recipients = [{"name": r.get("name"), "pubkey": r.get("pubkey"),
                               "status": r.get("status")}
                              for r in reply.get("recipients", []) if isinstance(r, dict)]
                state = delivery_state(recipients)
            if (state, recipients) != (message["delivery"], message["recipients"]):
                message["delivery"], message["recipients"] = state, recipients
                self._publish({"type": "messages", "messages": [message]})

    # -- actions ---------------------------------------------------------------------------

    def _request(self, frame):
        return self.client.request(frame, timeout=REQUEST_TIMEOUT)

    @defer.inlineCallbacks
    def send(self, to, text, priority="next"):
        """
        Send C{text} to C{to} (a name, key, key prefix, C{*} or C{@group})
        from the watcher's session key.

        @raise messages.TargetError: C{to} names nobody or several.
        """
        target = to
        if not messages.is_broadcast(target) and not crypto.is_pubkey(target.lower()):
            target = messages.resolve_target(
                target, list(self.members.values()), list(self.sessions.values()))
        target = target.lower() if crypto.is_pubkey(target.lower()) else target
        ack = yield self.client.send_text(target, text, priority, timeout=REQUEST_TIMEOUT)
        if not ack.get("queued"):
            raise connection.RequestError("refused", ack.get("error") or "refused", ack)
        self.add_records([{
            "kind": "sent", "messageId": ack["messageId"], "via": "ui",
            "sessionId": self.client.session_id, "at": int(self.reactor.seconds() * 1000),
            "senderPubkey": self.client.pubkey, "senderMemberPubkey": self.entry.pubkey,
            "targetSpec": target, "priority": priority, "text": text}])
        return {"messageId": ack["messageId"], "targetSpec": target}

    @defer.inlineCallbacks
    def moderate(self, action, target, role=None, rotate=True):
        """
        C{disconnect}, C{kick}, C{ban}, C{unban} or C{set_role} on
        C{target}; the broker decides who may. A ban rotates the mesh key
        after it, as C{claudemesh ban} does, and so does an unban when the
        current key was made during the ban (decision 87), unless C{rotate}
        is false; a rotation that fails after them is reported beside it.
        """
        frame = {"type": action, "target": target}
        if action == "set_role":
            frame["role"] = role
        reply = yield self._request(frame)
        self._refresh_soon()
        if action == "ban":
            reply = {"banned": reply.get("banned")}
            reason = "ban of %s" % (reply["banned"],)
        elif action == "unban":
            reply = {"unbanned": reply.get("unbanned")}
            reason = "unban of %s" % (reply["unbanned"],)
            yield self._key_status()
            rotate = rotate and bool(self.unbanned)
        else:
            return reply
        if rotate:
            try:
                reply["rotated"] = yield self.rotate_key(reason)
            except connection.ClientError as e:
                # The ban stands; the page shows why the key did not change.
                reply["rotateError"] = {"error": e.code, "message": e.message}
        return reply

    @defer.inlineCallbacks
    def invite(self, role="member", uses=1, expires_in=7 * 86400):
        """
        Make an invite: the link (signed here, with the mesh key after the
        C{#}) and its QR code as an SVG C{data:} URI.
        """
        import segno

        entry = self.entry
        if entry.mesh_key is None:
            raise connection.RequestError(
                "invalid", "this config has no mesh key: an invite without it could not "
                           "read broadcasts")
        reply = yield self._request({"type": "create_invite", "role": role, "maxUses": uses,
                                     "expiresIn": expires_in})
        # The current key epoch's key (issue 17), once a fetch under way is done.
        yield self.client.mesh_keys.settled()
        try:
            epoch, key = self.client.mesh_keys.invite_key()
        except meshkeys.NoKey as e:
            raise connection.RequestError("invalid", str(e)) from None
        # Signed with the check value of the key the link carries (issue 13),
        # with the broker URL the client uses (normalised), as the CLI's.
        invite = messages.make_invite(entry.identity, entry.meshId, entry.name,
                                      reply["inviteId"], role, reply["expiresAt"],
                                      self.client.mesh.brokerUrl, key)
        link = messages.invite_link(invite, key, epoch)
        # The QR code holds the compact form of the same invite.
        compact = messages.compact_invite_link(invite, key, epoch)
        qr = segno.make(compact or link, error="l").svg_data_uri(scale=4, border=2)
        return {"link": link, "compactLink": compact, "qr": qr, "inviteId": reply["inviteId"],
                "expiresAt": reply["expiresAt"], "role": role, "maxUses": uses,
                "keyEpoch": epoch}

    def invites(self):
        return self._request({"type": "list_invites"}).addCallback(
            lambda reply: {"invites": reply.get("invites", [])})

    def revoke_invite(self, invite_id):
        return self._request({"type": "revoke_invite", "inviteId": invite_id}).addCallback(
            lambda reply: {"revoked": reply.get("inviteId")})

    def bans(self):
        return self._request({"type": "list_bans"}).addCallback(
            lambda reply: {"bans": reply.get("bans", [])})

    @defer.inlineCallbacks
    def audit(self, limit=100):
        entries = yield self._request({"type": "audit_query", "limit": limit, "offset": 0})
        verified = yield self._request({"type": "audit_verify"})
        return {"entries": entries.get("entries", []), "total": entries.get("total"),
                "valid": verified.get("valid"), "checked": verified.get("entries"),
                "brokenAt": verified.get("brokenAt")}
