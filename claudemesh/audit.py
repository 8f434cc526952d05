"""
The audit log's hash chain: canonical JSON and the per-row hash.

Each mesh's audit rows form a chain: a row's hash is
C{sha256_hex(prevHash|meshId|eventType|actor|canonicalJson(payload)|createdAtISO)}
with C{genesis} as the first C{prevHash} and the literal C{null} for a missing
actor. The canonical form follows the original broker so a chain can be
verified by either implementation: keys sorted at every depth, no whitespace,
integral floats written as integers (as JavaScript prints them).
"""

import hashlib
import json
import math
from datetime import datetime, timezone

GENESIS = "genesis"


def _normalise(value):
    # JavaScript has one number type: 1.0 prints as 1. Normalise before
    # json.dumps so the canonical text is the same on both sides.
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return int(value)
        return value
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def _flat(value) -> bool:
    # The common payload (message_sent) is a flat object of strings and
    # integers: nothing to normalise.
    return isinstance(value, dict) and all(
        isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) or v is None
        for v in value.values()) and all(isinstance(k, str) for k in value)


def canonical_json(value) -> str:
    """
    Serialise C{value} canonically: sorted keys, compact separators, UTF-8 kept.
    """
    if not _flat(value):
        value = _normalise(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def iso_millis(ms: int) -> str:
    """
    Format integer milliseconds since the epoch as ISO-8601 UTC with
    milliseconds and C{Z}, e.g. C{2026-04-15T12:00:00.000Z}.
    """
    seconds, millis = divmod(int(ms), 1000)
    # Formatting the date is the costly part; consecutive calls on the hot
    # path mostly fall in the same second.
    cached_seconds, prefix = _last_second
    if seconds != cached_seconds:
        prefix = datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _last_second[:] = [seconds, prefix]
    return "%s.%03dZ" % (prefix, millis)


_last_second = [None, ""]


def chain_hash(
    prev_hash: str,
    mesh_id: str,
    event_type: str,
    actor: str | None,
    payload: dict,
    created_at: int,
) -> str:
    """
    Compute one audit row's hash from its predecessor's.
    """
    return chain_hash_text(prev_hash, mesh_id, event_type, actor, canonical_json(payload),
                           created_at)


def chain_hash_text(prev_hash, mesh_id, event_type, actor, payload_json, created_at) -> str:
    """
    L{chain_hash} for a payload already in its canonical JSON text.
    """
    text = "|".join(
        [
            prev_hash,
            mesh_id,
            event_type,
            "null" if actor is None else actor,
            payload_json,
            iso_millis(created_at),
        ]
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
