"""
The status rules of DESIGN section 4.3, as pure functions of their inputs.

Sources rank hook > manual > jsonl. A signal of equal or higher rank replaces
the status. A lower-rank signal applies only once the current status is older
than the hook freshness window; while it is fresh, a lower-rank signal that
agrees with it only refreshes its time (so a transcript that keeps saying
"working" keeps a hook's "working" from decaying). C{dnd} is cleared only by a
manual signal.
"""

import attr

RANK = {"jsonl": 1, "manual": 2, "hook": 3}
# What each status lets through (DESIGN section 4.2 gating).
DELIVERABLE = {
    "idle": ("now", "next", "low"),
    "working": ("now",),
    "dnd": ("now",),
}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class StatusState:
    status: str
    source: str
    updated_at: int


def apply_signal(current, status, source, now, fresh_window_ms):
    """
    The status after a signal, or C{None} when the signal changes nothing.
    """
    if current.status == "dnd" and status != "dnd" and source != "manual":
        return None
    if RANK[source] >= RANK[current.source]:
        return StatusState(status, source, now)
    fresh = now - current.updated_at <= fresh_window_ms
    if not fresh:
        return StatusState(status, source, now)
    if status == current.status:
        return StatusState(current.status, current.source, now)
    return None


def decay(current, now, ttl_ms):
    """
    C{working} without a refresh for the TTL becomes C{idle}, attributed to
    the lowest source so that the next hook or manual signal wins at once.
    Returns C{None} when nothing decays.
    """
    if current.status == "working" and now - current.updated_at >= ttl_ms:
        return StatusState("idle", "jsonl", now)
    return None


def may_receive(status, priority) -> bool:
    return priority in DELIVERABLE[status]
