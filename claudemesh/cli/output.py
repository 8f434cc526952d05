"""
What the C{claudemesh} commands print: lines and JSON on stdout, messages on
stderr.
"""

import json
import sys


def out(text=""):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def out_json(document, indent=2):
    sys.stdout.write(json.dumps(document, indent=indent, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def err(text):
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def plural(count, word, many=None):
    return "%d %s" % (count, word if count == 1 else (many or word + "s"))
