"""
Identifiers the broker makes: mesh, member, invite, message and presence ids.
"""

import random
import secrets

_ids = random.Random(secrets.randbits(256))


def new_id() -> str:
    """
    A fresh 128-bit identifier as 32 hex characters, from a generator seeded
    from the system's randomness rather than one system call per id (the hot
    path makes one per message). Ids need to be unique, not secret: knowing
    one grants nothing (C{message_status} is scoped to the mesh, and a
    C{client_ack} only touches the caller's own deliveries).
    """
    return "%032x" % _ids.getrandbits(128)


def new_message_id(now_ms: int) -> str:
    """
    A message id: 32 hex characters like L{new_id}, the first 12 the
    creation time in milliseconds and the other 20 random (80 bits).

    Time first, so the rows a store keys by message id — the message and
    its deliveries — are inserted at the end of their indexes rather than
    at a random page of them: on a database of a million messages a random
    id cost an index page read per insert that the page cache no longer
    held (bench growth). The time is in the message anyway (C{createdAt}).
    """
    return "%012x%020x" % (now_ms & 0xFFFFFFFFFFFF, _ids.getrandbits(80))
