"""
The client's failures: what a request, a send or a connection can end with,
each with a message for the user.
"""


class ClientError(Exception):
    """
    Base of the client's failures; C{message} is for the user.
    """

    def __init__(self, message):
        Exception.__init__(self, message)
        self.message = message


class TerminalClose(ClientError):
    """
    The broker ended the session and the client must not reconnect
    (4001, 4002, a terminal 1008: docs/protocol.md).
    """

    def __init__(self, code, reason, message):
        ClientError.__init__(self, message)
        self.code = code
        self.reason = reason


class SessionReplaced(ClientError):
    """
    Another process said hello for this session; this one stopped.
    """

    def __init__(self):
        ClientError.__init__(self, "Another process took over this session.")


class Unreachable(ClientError):
    """
    The broker could not be reached within the allowed attempts.
    """


class Stopped(ClientError):
    """
    The client was stopped before the request could be answered.
    """


class QueueFull(ClientError):
    """
    Too many frames wait for the connection.
    """


class MessageTooLarge(ClientError):
    """
    A frame is bigger than the broker accepts. Retrying cannot help.

    @ivar frame_bytes: the encoded frame's size; @ivar limit: the broker's
        largest frame, when known; @ivar text_bytes and @ivar max_text_bytes:
        for a message, its plaintext size and about how much would fit.
    """

    def __init__(self, frame_bytes, limit, text_bytes=None, max_text_bytes=None):
        self.frame_bytes = frame_bytes
        self.limit = limit
        self.text_bytes = text_bytes
        self.max_text_bytes = max_text_bytes
        if text_bytes is not None:
            what = "%s bytes of text make a %s-byte frame" % (
                _n(text_bytes), _n(frame_bytes))
        else:
            what = "the frame is %s bytes" % (_n(frame_bytes),)
        if limit is not None:
            bound = "the broker accepts at most %s bytes per frame" % (_n(limit),)
            if max_text_bytes is not None:
                bound += " (about %s bytes of text)" % (_n(max(max_text_bytes, 0)),)
        else:
            bound = "the broker closed the connection as too big (1009)"
        ClientError.__init__(
            self, "message too large: %s; %s. Shorten it or split it up." % (what, bound))


def _n(number):
    return "{:,}".format(number)


class RequestError(ClientError):
    """
    The broker refused a request: its C{error {code, message}}.
    """

    def __init__(self, code, message, frame=None):
        ClientError.__init__(self, message)
        self.code = code
        self.frame = frame or {}


# What crypto_box and secretbox add to the plaintext (the MAC).
_BOX_OVERHEAD = 16


def too_large(frame, size, limit):
    """
    The L{MessageTooLarge} for C{frame} of C{size} bytes; for a C{send}, with
    its plaintext size and the largest that fits under C{limit}.
    """
    if frame.get("type") != "send":
        return MessageTooLarge(size, limit)
    ciphertext = frame.get("ciphertext", "")
    raw = len(ciphertext) * 3 // 4 - ciphertext[-2:].count("=")
    text = raw - _BOX_OVERHEAD
    fits = None
    if limit is not None:
        room = limit - (size - len(ciphertext))
        fits = room // 4 * 3 - _BOX_OVERHEAD
    return MessageTooLarge(size, limit, text, fits)
