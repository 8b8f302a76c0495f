"""Where the hub's tables live: SQLite in the state directory (the default), or a PostgreSQL database.

The store (:mod:`hub.store`) writes its SQL once, in what both speak: ``?`` and ``:name``
placeholders, ``INSERT ... ON CONFLICT``, row values. A :class:`Database` runs it on one of
them, with each one's table types (:data:`SQLITE_TYPES`, :data:`POSTGRES_TYPES`), its
``GREATEST`` (SQLite's two-argument ``MAX``), its transactions, and the errors that mean
"the storage failed" (a full disk, a database that went away) as against a bug.

PostgreSQL is what several hub replicas share (``--state postgresql://USER@HOST:PORT/DB``);
SQLite stays the embedded default for one hub.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

from models.errors import ConfigError

__all__ = ["Database", "PostgresDatabase", "SqliteDatabase", "is_database_url", "redact"]

SCHEMES = ("postgresql://", "postgres://")

SQLITE_TYPES = {"BLOB": "BLOB", "INT": "INTEGER", "FLOAT": "REAL", "TEXT": "TEXT", "WITHOUT_ROWID": "WITHOUT ROWID"}
POSTGRES_TYPES = {"BLOB": "BYTEA", "INT": "BIGINT", "FLOAT": "DOUBLE PRECISION", "TEXT": "TEXT", "WITHOUT_ROWID": ""}
"""The schema's type names per back-end: ``{BLOB}``, ``{INT}`` (64-bit), ``{FLOAT}`` (double), ``{TEXT}``."""

_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def is_database_url(state: str | os.PathLike[str]) -> bool:
    """Whether ``--state`` names a PostgreSQL database rather than a folder."""
    return str(state).startswith(SCHEMES)


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


class Database:
    """One connection; the store holds its own lock around it. ``execute`` returns a cursor
    (``fetchone``, ``fetchall``, ``rowcount``, iteration)."""

    dialect: str
    greatest: str  # the SQL function of the larger of two values
    storage_errors: tuple[type[BaseException], ...]
    integrity_error: type[BaseException]

    def execute(self, sql: str, params: Any = ()) -> Any:
        raise NotImplementedError

    def begin(self, write: bool) -> None:
        """A write transaction (one writer at a time), or a read-only snapshot."""
        raise NotImplementedError

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SqliteDatabase(Database):
    """``state_dir/name`` in WAL mode with the tables of ``schema`` (:func:`models.files.open_database`)."""

    dialect = "sqlite"
    greatest = "MAX"
    storage_errors = (OSError, sqlite3.Error)
    integrity_error = sqlite3.IntegrityError

    def __init__(self, state_dir: Path, name: str, schema: str, *, what: str, advice: str,
                 synchronous: str = "FULL") -> None:
        from models.files import open_database

        self.path = Path(state_dir) / name
        self._db = open_database(Path(state_dir), name, schema.format(**SQLITE_TYPES), what=what, advice=advice,
                                 synchronous=synchronous)

    def execute(self, sql: str, params: Any = ()) -> Any:
        return self._db.execute(sql, params)

    def begin(self, write: bool) -> None:
        self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def rollback(self) -> None:
        from models.files import rollback

        rollback(self._db, str(self.path))

    def close(self) -> None:
        self._db.close()


class PostgresDatabase(Database):
    """A psycopg 3 connection to ``url`` (autocommit; transactions are explicit, as with SQLite); with ``schema``,
    its tables are made where missing."""

    dialect = "postgresql"
    greatest = "GREATEST"

    def __init__(self, url: str, schema: str | None = None, *, connect_timeout_s: float = 10.0) -> None:
        try:
            import psycopg
        except ImportError:  # pragma: no cover - a dependency of wearfl
            raise ConfigError("--state postgresql://... needs psycopg: pip install 'psycopg[binary]'.") from None
        self.url, self._timeout = url, max(1, round(connect_timeout_s))
        self.storage_errors = (psycopg.OperationalError, psycopg.errors.DiskFull, psycopg.InterfaceError, OSError)
        self.integrity_error = psycopg.IntegrityError
        self._sql: dict[tuple[str, bool], str] = {}
        try:
            self._db = psycopg.connect(url, autocommit=True, connect_timeout=self._timeout)
        except psycopg.OperationalError as exc:
            raise ConfigError(f"cannot reach the PostgreSQL database {redact(url)} ({_first_line(exc)}); check "
                              "--state, that the server runs and that this user may connect.") from None
        self._in_transaction = False
        if schema is not None:
            self.create(schema)

    def reconnect(self) -> None:
        """A new connection, when the last one broke (the server restarted, the network dropped): the
        storage error of a failed attempt goes to the caller, which waits and tries again."""
        import psycopg

        with contextlib.suppress(psycopg.Error):
            self._db.close()
        self._db = psycopg.connect(self.url, autocommit=True, connect_timeout=self._timeout)
        self._in_transaction = False

    def _usable(self) -> None:
        if (self._db.closed or self._db.broken) and not self._in_transaction:
            self.reconnect()

    def _translate(self, sql: str, named: bool) -> str:
        key = (sql, named)
        translated = self._sql.get(key)
        if translated is None:
            translated = sql.replace("%", "%%")
            translated = _NAMED.sub(r"%(\1)s", translated) if named else translated.replace("?", "%s")
            self._sql[key] = translated
        return translated

    def execute(self, sql: str, params: Any = ()) -> Any:
        self._usable()
        if not params:
            return self._db.execute(sql)
        return self._db.execute(self._translate(sql, isinstance(params, dict)), params)

    def create(self, schema: str) -> None:
        """Create the tables of ``schema`` (``{BLOB}``-style type names) where they are missing."""
        with self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(7261)")  # replicas starting together: one creates
            for statement in schema.format(**POSTGRES_TYPES).split(";"):
                if statement.strip():
                    self._db.execute(statement)

    def begin(self, write: bool) -> None:
        self._usable()
        self._db.execute("BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        self._in_transaction = True

    def commit(self) -> None:
        try:
            self._db.execute("COMMIT")
        finally:
            self._in_transaction = False

    def rollback(self) -> None:
        import psycopg

        self._in_transaction = False
        with contextlib.suppress(psycopg.Error):  # a connection that is gone: the server rolled it back
            self._db.execute("ROLLBACK")

    def close(self) -> None:
        self._db.close()


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
