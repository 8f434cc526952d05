"""
Reading the audit log: C{audit_query} and C{audit_verify}, for the mesh's
owner and admins. The log itself is written by the store, each entry in the
transaction of what it records (L{claudemesh.store.sql.audit}).
"""

from twisted.internet import defer

from claudemesh import protocol
from claudemesh.audit import iso_millis
from claudemesh.broker import pages

AUDITORS = ("owner", "admin")


class AuditLog:
    """
    The audit-reading part of the broker core.
    """

    def __init__(self, store, writes, settings):
        self._store = store
        self._writes = writes
        self._settings = settings

    @staticmethod
    def _require_auditor(session):
        if session.member.role not in AUDITORS:
            raise protocol.Refusal("forbidden", "only owner or admin can read the audit log")

    @defer.inlineCallbacks
    def audit_query(self, session, frame):
        self._require_auditor(session)
        entries, total = yield self._store.audit_entries(
            session.mesh.id, frame.limit, frame.offset, frame.eventType)
        names = session.mesh.members

        def entry(e):
            return {
                "seq": e.seq, "eventType": e.event_type,
                "actor": names[e.actor].display_name if e.actor in names
                else (e.actor or "system"),
                "payload": e.payload, "hash": e.hash, "createdAt": iso_millis(e.created_at)}

        reply = pages.fill(protocol.AuditResult(total=total, entries=[]).to_wire(), "entries",
                           entries, self._settings.max_message_bytes, entry,
                           next_field="nextOffset",
                           next_value=lambda taken: frame.offset + taken)
        if "nextOffset" not in reply and frame.offset + len(entries) < total:
            # A full page (limit rows) with more after it.
            reply["nextOffset"] = frame.offset + len(entries)
        return reply

    @defer.inlineCallbacks
    def audit_verify(self, session, frame):
        self._require_auditor(session)
        # What this session did just before is in the chain it verifies.
        yield self._writes.flushed()
        result = yield self._store.verify_chain(session.mesh.id)
        return protocol.AuditVerifyResult(
            valid=result.valid, entries=result.entries, brokenAt=result.broken_at).to_wire()
