"""
The wire form of the notices nodes send each other through Postgres
C{NOTIFY} (issue 15): one channel per schema, one JSON payload per notice,
each under Postgres' 8000-byte limit. Wake-ups of one mesh from one batch
are folded into one payload (split when they name too many members).
"""

import json

from claudemesh.store.records import Notice

# Postgres refuses a payload of 8000 bytes or more; room for the envelope.
MAX_PAYLOAD_BYTES = 7000


def channel_name(schema):
    """
    The channel the nodes of the cluster in C{schema} listen on.
    """
    return "claudemesh_%s" % (schema,)


def _encode(origin, kind, mesh_id, data):
    return json.dumps({"o": origin, "k": kind, "m": mesh_id, "d": data},
                      separators=(",", ":"), ensure_ascii=False)


def payloads(notices):
    """
    The payloads that carry C{notices}, wake-ups folded per (origin, mesh).
    """
    out = []
    wakes = {}
    for notice in notices:
        if notice.kind == "wake":
            members = wakes.setdefault((notice.origin, notice.mesh_id), {})
            for member_id in notice.data.get("u", ()):
                members[member_id] = None
        else:
            out.append(_encode(notice.origin, notice.kind, notice.mesh_id, notice.data))
    for (origin, mesh_id), members in wakes.items():
        chunk, size = [], 0
        for member_id in members:
            if chunk and size + len(member_id) + 4 > MAX_PAYLOAD_BYTES:
                out.append(_encode(origin, "wake", mesh_id, {"u": chunk}))
                chunk, size = [], 0
            chunk.append(member_id)
            size += len(member_id) + 4
        out.append(_encode(origin, "wake", mesh_id, {"u": chunk}))
    return out


def decode(payload):
    """
    The L{Notice} of one payload, or C{None} for one this broker cannot read
    (another version's, say): a notice is only a hint.
    """
    try:
        value = json.loads(payload)
        if not isinstance(value.get("d"), dict):
            return None
        notice = Notice(str(value["o"]), str(value["k"]), str(value["m"]), dict(value["d"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return notice
