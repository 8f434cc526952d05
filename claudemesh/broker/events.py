"""
System events: the presence, status and mesh key pushes the broker sends on
its own (C{subtype: "system"}), to the live sessions of a mesh.
"""

import uuid

from twisted.logger import Logger

from claudemesh import protocol
from claudemesh.audit import iso_millis

_log = Logger()


def peer_event_data(session):
    """
    The C{eventData} of a presence event about C{session}.
    """
    return {
        "name": session.display_name,
        "pubkey": session.pubkey,
        "memberPubkey": session.member.pubkey,
        "sessionId": session.session_id,
        "groups": sorted(session.groups),
    }


def broadcast_system(about, event, data, now, watchers_only=False):
    """
    Push a system event about session C{about}: to the live receiving
    sessions of other members, and to every watching session but C{about}
    (watchers see their own member's sessions too). With C{watchers_only},
    to the watching sessions alone.
    """
    push_system(about.mesh, event, data, [
        other for other in about.mesh.sessions.values()
        if other is not about and (other.watch or (
            not watchers_only and other.announced and other.member.id != about.member.id))],
        now)


def push_system(mesh, event, data, sessions, now):
    """
    Push the system event C{event} (C{eventData} C{data}) to those of
    C{sessions} that are live and hear events (receiving or watching).
    """
    payload = None
    for other in sessions:
        if not other.live or not (other.announced or other.watch):
            continue
        if payload is None:
            payload = protocol.encode(protocol.SystemPush(
                event=event, eventData=data, messageId=str(uuid.uuid4()),
                meshId=mesh.id, createdAt=iso_millis(now)).to_wire())
        try:
            other.connection.send_encoded(payload)
        except Exception as e:
            # One connection that cannot take it must not keep the event
            # from the others.
            _log.warn("could not send {event} to a session: {error}",
                      event=event, error=str(e)[:200])
