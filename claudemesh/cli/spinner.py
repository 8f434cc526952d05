"""
A spinner for the waits of the CLI (connecting, joining, C{inbox --wait}):
drawn on stderr when it is a terminal, nothing at all otherwise, so piped
output and logs stay clean.
"""

import os

from twisted.internet import task

FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
INTERVAL = 0.1


def wanted(stream, environ=None):
    """
    Whether to draw on C{stream}: a terminal, and not C{TERM=dumb}.
    """
    environ = os.environ if environ is None else environ
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and environ.get("TERM") != "dumb"


class Spinner:
    """
    A line C{<frame> <text>} redrawn every 0.1 s on the reactor's clock
    until L{stop}, which erases it.
    """

    def __init__(self, clock, stream, text, environ=None):
        self._stream = stream
        self._text = text
        self._frame = 0
        self._loop = None
        if wanted(stream, environ):
            self._loop = task.LoopingCall(self._draw)
            self._loop.clock = clock
            self._loop.start(INTERVAL, now=True)

    @property
    def drawing(self):
        return self._loop is not None

    def _draw(self):
        self._stream.write("\r%s %s" % (FRAMES[self._frame % len(FRAMES)], self._text))
        self._stream.flush()
        self._frame += 1

    def stop(self):
        if self._loop is None:
            return
        loop, self._loop = self._loop, None
        loop.stop()
        # Carriage return, erase to the end of the line.
        self._stream.write("\r\x1b[K")
        self._stream.flush()


def around(clock, stream, text, d, environ=None):
    """
    Spin while the L{Deferred} C{d} runs; returns C{d}, its result untouched.
    """
    spinner = Spinner(clock, stream, text, environ)

    def done(result):
        spinner.stop()
        return result

    return d.addBoth(done)
