"""
What the C{claudemesh} commands print: lines and JSON on stdout, messages on
stderr.

Lines carry what peers wrote (messages, names, summaries, folders), so
control characters are made visible before they reach the terminal
(L{printable}); JSON escapes them by itself.
"""

import json
import re
import sys

# C0 controls but tab and newline, DEL, and the C1 controls (U+009B is a
# one-character CSI for terminals that honour it).
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_WIDE_CONTROLS = re.compile("[\x7f-\x9f]")


def printable(text):
    """
    C{text} with every control character but tab and newline written as
    C{\\xNN}: a peer's text cannot clear the screen, retitle the window,
    move the cursor or overwrite a line with a fake one (a carriage return).
    """
    return _CONTROLS.sub(lambda m: "\\x%02x" % (ord(m.group()),), text)


def out(text=""):
    sys.stdout.write(printable(text) + "\n")
    sys.stdout.flush()


def out_json(document, indent=2):
    # json escapes the C0 controls; DEL and C1 (kept as they are with
    # ensure_ascii off) are escaped too, the same JSON.
    text = json.dumps(document, indent=indent, ensure_ascii=False)
    sys.stdout.write(_WIDE_CONTROLS.sub(lambda m: "\\u%04x" % (ord(m.group()),), text) + "\n")
    sys.stdout.flush()


def err(text):
    sys.stderr.write(printable(text) + "\n")
    sys.stderr.flush()


def plural(count, word, many=None):
    return "%d %s" % (count, word if count == 1 else (many or word + "s"))
