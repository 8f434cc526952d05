"""
The status hook: a signed report from Claude Code's hook (C{POST
/hook/set-status}, see L{claudemesh.broker.hookroute}) about one of the
caller's own sessions.

The report names the session by its id (or Claude Code's session id), else
by pid and working directory, else by directory alone, and only ever among
the caller's own member's sessions (another member's session with the same
id neither matches nor refuses). A report about a session that has not
said hello yet is kept for a few seconds (keyed on mesh, member and session
id) and applied when it does.
"""

import json

from twisted.internet import defer

from claudemesh import crypto, protocol
from claudemesh.broker.ratelimit import TokenBuckets


def parse_hook_body(body):
    """
    The validated fields of a hook body: C{status}, C{cwd}, C{pid},
    C{session_id}.

    @raise protocol.Refusal: C{malformed}, naming the field.
    """
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: nested deeper than the parser recurses ([[[…).
        raise protocol.Refusal("malformed", "body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise protocol.Refusal("malformed", "body must be a JSON object")
    status = payload.get("status")
    if status not in protocol.STATUSES:
        raise protocol.Refusal("malformed", "field 'status' must be one of idle, working, dnd")
    cwd = payload.get("cwd", "")
    if (not isinstance(cwd, str) or len(cwd) > protocol.MAX_PATH_LENGTH
            or protocol.has_nul(cwd)):
        raise protocol.Refusal("malformed", "field 'cwd' must be a string without NUL")
    pid = payload.get("pid", 0)
    if pid is None:
        pid = 0
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < 2**31:
        raise protocol.Refusal("malformed", "field 'pid' must be an integer from 0 to 2^31-1")
    session_id = payload.get("session_id")
    if session_id is not None and not (isinstance(session_id, str) and len(session_id) <= 128
                                       and not protocol.has_nul(session_id)):
        raise protocol.Refusal("malformed", "field 'session_id' must be a string without NUL")
    return {"status": status, "cwd": cwd, "pid": pid, "session_id": session_id}


class HookStatus:
    """
    The hook part of the broker core.

    @param status: the L{claudemesh.broker.status.StatusBoard} the reports
        are signals to.
    """

    def __init__(self, meshes, status, clock, settings, replays,
                 notify=lambda kind, mesh_id, **data: None):
        """
        @param replays: the L{IReplayMemory} each signed report is used once
            through.
        @param notify: queues a notice for the other nodes (issue 15): a
            report about a session another node holds goes there (C{hook}).
        """
        self._replays = replays
        self._notify = notify
        self._meshes = meshes
        self._status = status
        self._clock = clock
        self._settings = settings
        self._buckets = TokenBuckets(
            clock, settings.hook_rate_limit_per_min, settings.hook_rate_limit_per_min)
        # (mesh id, member id, session id) -> (status, received at ms)
        self.pending = {}

    def _now(self):
        return int(self._clock.seconds() * 1000)

    @defer.inlineCallbacks
    def report(self, mesh_id, pubkey, timestamp, signature, body):
        """
        One signed status report.

        @return: a L{Deferred} firing with the result object.
        @raise protocol.Refusal: C{unauthorized}, C{replayed},
            C{rate_limited} or C{malformed}; nothing changes.
        """
        now = self._now()
        try:
            timestamp = int(timestamp)
        except (TypeError, ValueError):
            raise protocol.Refusal(
                "unauthorized", "missing or bad X-Claudemesh-Timestamp") from None
        if abs(now - timestamp) > protocol.SIGNED_SKEW_MS:
            raise protocol.Refusal("unauthorized", "stale timestamp")
        if not (crypto.is_pubkey(pubkey) and crypto.is_signature(signature or "")):
            raise protocol.Refusal("unauthorized", "missing or malformed signature headers")
        if not crypto.verify(pubkey, crypto.hook_string(mesh_id, timestamp, body), signature):
            raise protocol.Refusal("unauthorized", "bad signature")
        mesh = yield self._meshes.load(mesh_id)
        member = mesh.members_by_pubkey.get(pubkey) if mesh is not None else None
        if member is None or member.revoked_at is not None:
            raise protocol.Refusal("unauthorized", "not a member of this mesh")
        fresh = yield self._replays.first_use("hook", pubkey, signature,
                                              timestamp + protocol.SIGNED_SKEW_MS)
        if not fresh:
            raise protocol.Refusal("replayed", "this signed request was already used")
        if not self._buckets.take(pubkey):
            raise protocol.Refusal("rate_limited", "rate limited")
        payload = parse_hook_body(body)
        status = payload["status"]
        cwd, pid, session_id = payload["cwd"], payload["pid"], payload["session_id"]
        # A watching session (claudemesh ui) is nobody's Claude Code session.
        # On every node (issue 15): the hook may reach any of them.
        mine = [s for s in mesh.sessions_of(member.id) + mesh.remote_of(member.id)
                if not s.watch]
        target = None
        if session_id:
            # The caller's own sessions only: session ids are client-chosen
            # and unique per member at best, so another member's session
            # with the same id (by chance, or squatted in its hello to
            # block this one: issue 11) must neither match nor refuse.
            named = [s for s in mine if session_id in (s.session_id, s.claude_session_id)]
            target = max(named, key=lambda s: s.connected_at, default=None)
        if target is None and pid and cwd:
            candidates = [s for s in mine if s.pid == pid and s.cwd == cwd]
            target = max(candidates, key=lambda s: s.connected_at, default=None)
        if target is None and cwd:
            candidates = [s for s in mine if s.cwd == cwd]
            target = max(candidates, key=lambda s: s.connected_at, default=None)
        if target is None:
            if session_id:
                self.pending[(mesh.id, member.id, session_id)] = (status, now)
                # Its hello may come through another node.
                self._notify("hook", mesh.id, u=member.id, sid=session_id, s=status)
            return {"ok": True, "pending": True}
        if target.remote:
            # Another node holds it: the report goes there.
            self._notify("hook", mesh.id, u=member.id, p=target.presence_id, s=status)
            return {"ok": True, "presence_id": target.presence_id, "status": status}
        self._status.signal(target, status, "hook")
        return {"ok": True, "presence_id": target.presence_id, "status": target.status.status}

    def noticed(self, mesh, notice):
        """
        A C{hook} notice from another node: a report about a session held
        here, or one to keep until its hello.
        """
        data = notice.data
        status = data.get("s")
        if status not in protocol.STATUSES:
            return
        if data.get("p"):
            session = mesh.sessions.get(data["p"])
            if session is not None:
                self._status.signal(session, status, "hook")
        elif data.get("sid") and data.get("u"):
            self.pending[(mesh.id, str(data["u"]), str(data["sid"]))] = (status, self._now())

    def apply_pending(self, session):
        """
        A session said hello: apply a recent report about it, if any.
        """
        horizon = self._now() - self._settings.pending_hook_seconds * 1000
        for key in (session.session_id, session.claude_session_id):
            if not key:
                continue
            pending = self.pending.pop((session.mesh.id, session.member.id, key), None)
            if pending is not None and pending[1] >= horizon:
                self._status.signal(session, pending[0], "hook")
                return

    def sweep(self):
        """
        Forget reports that waited too long for their session.
        """
        horizon = self._now() - self._settings.pending_hook_seconds * 1000
        for key in [k for k, (_, at) in self.pending.items() if at < horizon]:
            del self.pending[key]
        self._buckets.sweep()
