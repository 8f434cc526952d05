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
