"""
What the client does when the broker closes its connection: reconnect (with
full-jitter backoff), stop, or end for good with a message for the user — the
close-code table of docs/protocol.md — and the hint for a failed TLS
handshake.
"""

import random as _random
import urllib.parse

from claudemesh import protocol

BACKOFF_CAPS = (1, 2, 4, 8, 16, 30)

RECONNECT = "reconnect"
STOP = "stop"
TERMINAL = "terminal"

# 1008 reasons that will not get better by retrying (docs/protocol.md, close
# codes); the others
# (capacity, timestamp_skew, flood) are temporary.
TERMINAL_POLICY_REASONS = frozenset(
    ["unauthorized", "bad_signature", "bad_session_pubkey", "malformed"])


def backoff_delay(attempt, random=_random.random):
    """
    The wait before reconnect attempt C{attempt} (0 for the first after a
    working connection): full jitter, uniform in [0, cap), caps 1, 2, 4, 8,
    16 and then 30 s.
    """
    cap = BACKOFF_CAPS[min(max(attempt, 0), len(BACKOFF_CAPS) - 1)]
    return random() * cap


def close_action(code, reason):
    """
    What the client does after the broker closed with C{(code, reason)}:
    L{RECONNECT}, L{STOP} (C{session_replaced}) or L{TERMINAL}.
    """
    if code == protocol.CLOSE_NORMAL and reason == protocol.REASON_SESSION_REPLACED:
        return STOP
    if code in (protocol.CLOSE_KICKED, protocol.CLOSE_BANNED):
        return TERMINAL
    if code == protocol.CLOSE_POLICY and reason in TERMINAL_POLICY_REASONS:
        return TERMINAL
    return RECONNECT


def tls_hint(url, error):
    """
    The message for a failed TLS handshake with C{url} (C{wss://} or
    C{https://}): most often a plain broker given a TLS URL.
    """
    parts = urllib.parse.urlsplit(url)
    plain = urllib.parse.urlunsplit(("ws", parts.netloc, "/ws", "", ""))
    return ("the TLS handshake with %s failed (%s): if that broker serves plain WebSocket "
            "(no TLS), its URL is %s" % (parts.netloc, error, plain))


def is_tls_failure(failure):
    try:
        from OpenSSL import SSL
    except ImportError:
        return False
    return failure.check(SSL.Error) is not None


def tls_error_text(failure):
    """
    OpenSSL's reason (C{wrong version number}) rather than its tuple repr.
    """
    args = getattr(failure.value, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        last = args[0][-1]
        if isinstance(last, tuple) and last:
            return str(last[-1])
    return failure.getErrorMessage()


def terminal_message(code, reason, mesh_name, revoked=None, error=None):
    """
    The text a user sees when the broker ended the session for good.

    @param revoked: the message of an C{error revoked} received before the
        close; it wins over anything the close says.
    @param error: the last C{error} frame's message (a refused hello).
    """
    if code == protocol.CLOSE_KICKED:
        return protocol.KICKED_MESSAGE
    if code == protocol.CLOSE_BANNED or revoked is not None:
        return revoked or protocol.revoked_message(mesh_name)
    detail = error or reason or "refused"
    return "The broker refused this client (%s): %s" % (reason or code, detail)
