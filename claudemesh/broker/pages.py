"""
Replies that fit in one frame.

A reply listing rows (peers, members, invites, bans, a message's recipients,
audit entries) holds as many as fit in C{--max-message-bytes}; when rows
remain it says where to go on: C{nextCursor} (an opaque string the client
sends back as C{cursor}) or, for the audit, C{nextOffset}. A row too large
for a frame on its own is sent shortened and marked C{truncated: true}.
The rules are in docs/protocol.md ("Replies in pages").

A cursor is the sort key of the last row sent, so a page never repeats or
skips a row that stayed while the client paged, whatever joined or left.
"""

import json

from claudemesh import protocol

# What a shortened row keeps of each text: enough to recognise it.
SHORTENED_TEXT = 64
# Room kept for the "nextCursor" member: a cursor is at most this long.
MAX_CURSOR_LENGTH = protocol.MAX_CURSOR_LENGTH


def size_of(value) -> int:
    """
    The bytes C{value} takes in a frame.
    """
    return len(protocol.encode(value))


def cursor_of(key) -> str:
    return json.dumps(list(key), separators=(",", ":"), ensure_ascii=True)


def after_cursor(cursor, shape):
    """
    The sort key a C{cursor} names, checked against C{shape} (the type of
    each part), or C{None} for no cursor.

    @raise protocol.Refusal: C{malformed}, for anything the broker did not
        make.
    """
    if cursor is None:
        return None
    try:
        key = json.loads(cursor)
    except ValueError:
        key = None
    if not (isinstance(key, list) and len(key) == len(shape) and all(
            isinstance(part, kind) and not isinstance(part, bool)
            for part, kind in zip(key, shape))):
        raise protocol.Refusal("malformed", "field 'cursor' is not a cursor this broker gave")
    return tuple(key)


def shortened(entry):
    """
    C{entry} with its texts cut to L{SHORTENED_TEXT} characters and its
    lists emptied, marked C{truncated}.
    """
    short = {}
    for name, value in entry.items():
        if isinstance(value, str):
            value = value[:SHORTENED_TEXT]
        elif isinstance(value, (list, dict)):
            value = type(value)()
        short[name] = value
    short["truncated"] = True
    return short


def fill(reply, field, rows, budget, entry_of, key_of=None, next_field="nextCursor",
         next_value=None):
    """
    Put into C{reply[field]} the entries of as many of C{rows} (in order) as
    fit in C{budget} bytes with the rest of C{reply}; at least one, shortened
    when it does not fit alone. When rows remain, C{reply[next_field]} says
    where the next page starts: the cursor of the last row's C{key_of}, or
    C{next_value(count)} when given.

    @param budget: the frame limit, or 0 for none (everything in one reply).
    @return: C{reply}.
    """
    entries = []
    reply[field] = entries
    rows = list(rows)
    if not budget:
        entries.extend(entry_of(row) for row in rows)
        return reply
    # The reply without entries, the member saying where to go on, and the
    # separators between entries.
    used = size_of(reply) + len(',"%s":""' % (next_field,)) + MAX_CURSOR_LENGTH
    taken = 0
    for row in rows:
        entry = entry_of(row)
        size = size_of(entry) + 1
        if used + size > budget:
            if entries:
                break
            entry = shortened(entry)
            size = size_of(entry) + 1
        entries.append(entry)
        used += size
        taken += 1
    if taken < len(rows):
        if next_value is not None:
            reply[next_field] = next_value(taken)
        else:
            reply[next_field] = cursor_of(key_of(rows[taken - 1]))
    return reply


def page(reply, field, rows, budget, entry_of, key_of, shape, cursor):
    """
    L{fill} with the rows after C{cursor}: C{rows} sorted by C{key_of}, whose
    values have C{shape}.
    """
    after = after_cursor(cursor, shape)
    ordered = sorted(rows, key=key_of)
    if after is not None:
        ordered = [row for row in ordered if key_of(row) > after]
    return fill(reply, field, ordered, budget, entry_of, key_of)
