# -*- test-case-name: tests.test_architecture -*-
"""
The house rules of claudemesh's source, checked on the source itself
(docs/design.md): no import circle anywhere in the package, no module over
the size a reader can hold, no SQL outside the store, no sockets, web or SQL
in the broker core's domain modules.

Run alone with C{python -m twisted.trial tests.test_architecture}.
"""

import ast
import os
import re

from twisted.trial import unittest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "claudemesh")
MAX_MODULE_LINES = 600
# The broker core's domain: no twisted.web, no Autobahn, no database driver.
CORE_MODULES = (
    "claudemesh.broker.auditlog", "claudemesh.broker.core", "claudemesh.broker.delivery",
    "claudemesh.broker.events", "claudemesh.broker.hook", "claudemesh.broker.membership",
    "claudemesh.broker.outbox", "claudemesh.broker.presence", "claudemesh.broker.sessions",
    "claudemesh.broker.status", "claudemesh.broker.groupcommit", "claudemesh.broker.cluster",
    "claudemesh.broker.remote",
)
CORE_FORBIDDEN = ("autobahn", "twisted.web", "twisted.enterprise", "txpostgres", "psycopg2",
                  "sqlite3", "socket")
_SQL = re.compile(r"\b(SELECT\s+\S.*\bFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM)\b")


def modules():
    """
    Every module of the package: dotted name -> path.
    """
    found = {}
    for directory, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
            if relative[-1] == "__init__":
                relative = relative[:-1]
            found[".".join(relative)] = path
    return found


def imports_of(name, path, known):
    """
    The package modules C{name} imports, at top level or inside functions
    (a lazy import is a dependency too).
    """
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                # "from a import b" names module a.b when there is one.
                candidate = base + "." + alias.name
                targets.add(candidate if candidate in known else base)
    return {t for t in targets if t in known and t != name}


def import_graph():
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def find_cycle(graph):
    """
    One import circle as a list of module names, or C{None}.
    """
    state = {}
    stack = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


class ArchitectureTests(unittest.TestCase):
    def test_find_cycle_finds_one(self):
        """The circle finder reports a circle when there is one, and none otherwise."""
        self.assertEqual(find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}), ["a", "b", "c", "a"])
        self.assertIsNone(find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}))

    def test_graph_sees_lazy_and_relative_imports(self):
        """Imports inside functions and relative imports count as dependencies."""
        graph = import_graph()
        self.assertIn("claudemesh.protocol.codes", graph["claudemesh.protocol.inbound"])
        self.assertIn("claudemesh.broker.delivery", graph["claudemesh.broker.core"])

    def test_no_import_circle(self):
        """No module of claudemesh imports (directly or through others) itself."""
        self.assertIsNone(find_cycle(import_graph()))

    def test_module_size(self):
        """No module of claudemesh is over 600 lines."""
        long = {name: n for name, path in modules().items()
                if (n := sum(1 for _ in open(path, encoding="utf-8"))) > MAX_MODULE_LINES}
        self.assertEqual(long, {})

    def test_sql_only_in_the_store(self):
        """SQL statements appear in claudemesh/store only."""
        outside = []
        for name, path in modules().items():
            if name.startswith("claudemesh.store"):
                continue
            for number, line in enumerate(open(path, encoding="utf-8"), 1):
                if _SQL.search(line):
                    outside.append("%s:%d" % (name, number))
        self.assertEqual(outside, [])

    def test_core_knows_no_sockets_web_or_sql(self):
        """The broker core's domain modules import no web, WebSocket, socket or database code."""
        known = modules()
        offending = {}
        for name in CORE_MODULES:
            tree = ast.parse(open(known[name], encoding="utf-8").read())
            names = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names.add(node.module)
            bad = sorted(n for n in names
                         if any(n == f or n.startswith(f + ".") for f in CORE_FORBIDDEN))
            if bad:
                offending[name] = bad
        self.assertEqual(offending, {})
