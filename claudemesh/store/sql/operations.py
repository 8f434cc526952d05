"""
The SQL operations a transaction function yields, and the small helpers that
build their text.

A transaction function (C{*_txn} by convention) is a generator: it yields
L{Query}, L{Execute} or L{InsertRows} and receives each one's result, and
its return value is the transaction's result. The engine of each backend
(L{claudemesh.store.sqlite}, L{claudemesh.store.postgres}) drives the
generator inside one database transaction, synchronously or asynchronously,
so the semantics are written once for both.

SQL text uses C{%s} placeholders (psycopg2's style); the SQLite engine
rewrites them to C{?}. No statement contains a literal C{%}.
"""

import attr


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Query:
    """
    A statement whose rows are wanted: the engine sends back a list of
    tuples.
    """

    sql: str
    params: tuple = ()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Execute:
    """
    A statement run for its effect: the engine sends back its row count.
    """

    sql: str
    params: tuple = ()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class InsertRows:
    """
    Insert many rows into one table in one round trip (SQLite:
    C{executemany}; Postgres: one multi-row C{INSERT}). C{conflict} is an
    optional C{ON CONFLICT …} clause. The engine sends back C{None}.
    """

    table: str
    columns: tuple
    rows: list
    conflict: str = ""

    def statement(self, values_sql: str) -> str:
        return "INSERT INTO %s (%s) VALUES %s %s" % (
            self.table,
            ", ".join(self.columns),
            values_sql,
            self.conflict,
        )


# SQLite allows 32766 bound variables per statement; stay well below it for
# the IN lists built here, whatever the tuple width.
CHUNK = 500


def chunks(items, size=CHUNK):
    items = list(items)
    for start in range(0, len(items), size):
        yield items[start : start + size]


def placeholders(count: int, width: int = 1) -> str:
    """
    C{%s, %s} for single values or C{(%s, %s), (%s, %s)} for tuples.
    """
    if width == 1:
        return ", ".join(["%s"] * count)
    one = "(" + ", ".join(["%s"] * width) + ")"
    return ", ".join([one] * count)


def flatten(pairs):
    return tuple(value for pair in pairs for value in pair)


def run_inline(generator, execute):
    """
    Drive a transaction generator to completion with a synchronous
    C{execute(operation)}; return the generator's value.
    """
    result = None
    while True:
        try:
            operation = generator.send(result)
        except StopIteration as stop:
            return stop.value
        result = execute(operation)
