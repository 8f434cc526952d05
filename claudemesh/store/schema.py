"""
Versioned schema files and the upgrade loop.

The schema lives in this package's C{schema/} directory:

  - C{v1.sql} is the first schema;
  - C{upgrade-to-v<N>.sql} takes a database from version C{N - 1} to C{N}.

An empty database is created by running them all in order (L{full_schema}),
so there is one way to each version and every upgrade is exercised by every
fresh database.

The database records its version in the one-row C{schema_version} table.
L{migrate} is written once for both backends: it is a generator of SQL
operations (L{claudemesh.store.sql.operations}) that the SQLite and
Postgres stores run inside a single transaction, so a failed upgrade leaves the database as it
was. Backend specifics (the Postgres schema, its advisory lock, its sequence)
come from the store's dialect.
"""

from importlib import resources

from claudemesh.store.interface import SchemaTooNew, StoreError
from claudemesh.store.sql.operations import Execute, Query

CURRENT_VERSION = 6

# The table whose single row holds the version number.
VERSION_TABLE = "schema_version"


def _read(name: str) -> str:
    return (
        resources.files("claudemesh.store")
        .joinpath("schema", name)
        .read_text(encoding="utf-8")
    )


def full_schema(version: int = CURRENT_VERSION) -> str:
    """
    The text that creates the schema of C{version} in an empty database: the
    first schema and every upgrade after it. There is one way to every
    version, so a database created at version N and one upgraded to N are
    the same (but for the order of columns that upgrades added).
    """
    return "\n".join([_read("v1.sql")] + [upgrade_script(v) for v in range(2, version + 1)])


def upgrade_script(version: int) -> str:
    """
    The text of the script that upgrades a database from C{version - 1} to
    C{version}.
    """
    return _read("upgrade-to-v%d.sql" % (version,))


def split_statements(text: str) -> list[str]:
    """
    Split an SQL script into its statements.

    Semicolons end statements except inside C{'strings'}, C{"identifiers"},
    C{-- line comments} and C{/* block comments */}; comments are dropped.
    Bodies that contain semicolons of their own (Postgres C{$$} quoting,
    SQLite trigger bodies) are not supported: keep such things out of the
    schema files, or teach this function about them first.
    """
    statements = []
    current = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "-" and text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end == -1 else end
            continue
        if ch == "/" and text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end == -1:
                raise ValueError("unterminated /* comment in SQL script")
            # A comment separates tokens like whitespace does.
            current.append(" ")
            i = end + 2
            continue
        if ch in ("'", '"'):
            # Quotes are escaped by doubling them, which this loop handles
            # naturally: '' closes and reopens the literal.
            end = text.find(ch, i + 1)
            if end == -1:
                raise ValueError("unterminated %s quote in SQL script" % (ch,))
            current.append(text[i : end + 1])
            i = end + 1
            continue
        if ch == "$" and i + 1 < n and text[i + 1] == "$":
            raise ValueError("$$ quoting is not supported in schema files")
        if ch == ";":
            statement = "".join(current).strip()
            if statement:
                statements.append(statement)
            current = []
            i += 1
            continue
        current.append(ch)
        i += 1
    tail = "".join(current).strip()
    if tail:
        statements.append(tail)
    return statements


def migrate(dialect, current_version: int = CURRENT_VERSION):
    """
    Bring the database up to C{current_version}: create it when it is empty,
    run each C{upgrade-to-v<N>.sql} in turn when it is older, refuse with
    L{SchemaTooNew} when it is newer.

    A generator of SQL operations, to run inside one transaction. C{dialect}
    provides C{migration_prologue()} (operations to run first, e.g. taking a
    lock), C{table_exists(name)} (a generator firing with a bool) and
    C{migration_epilogue()}.

    @return: (as the generator's value) the version the database was at
        before, or C{None} when it was empty.
    """
    yield from dialect.migration_prologue()
    found = None
    if (yield from dialect.table_exists(VERSION_TABLE)):
        rows = yield Query("SELECT version FROM schema_version")
        if len(rows) != 1:
            raise StoreError(
                "schema_version must hold exactly one row, found %d" % (len(rows),)
            )
        found = int(rows[0][0])
    if found is None:
        for statement in split_statements(full_schema(current_version)):
            yield Execute(statement)
        yield Execute(
            "INSERT INTO schema_version (version) VALUES (%s)", (current_version,)
        )
    elif found > current_version:
        raise SchemaTooNew(
            "the database is at schema version %d but this claudemesh only "
            "knows version %d: upgrade claudemesh" % (found, current_version)
        )
    else:
        for version in range(found + 1, current_version + 1):
            for statement in split_statements(upgrade_script(version)):
                yield Execute(statement)
            yield Execute("UPDATE schema_version SET version = %s", (version,))
    yield from dialect.migration_epilogue()
    return found
