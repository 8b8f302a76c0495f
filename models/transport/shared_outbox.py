"""Many edges' outboxes in one SQLite database: how a simulation keeps thousands of edges' updates.

Why: an :class:`~models.transport.outbox.Outbox` is one database per state directory, which is
what a gateway has. Ten thousand simulated edges in one process would hold 30,000 open files
(database, WAL, shared memory) and ten thousand page caches. Here every client has the same
three things (its sequence counter, its pending updates, a few state values) keyed by its id,
behind one connection. :meth:`SharedOutbox.view` gives one client's part with the methods
:class:`~models.transport.sender.Sender` uses, under the same contract: a sequence number is
allocated and the payload stored in one transaction with the state values; an update stays until
a final receipt removes it; a full outbox refuses (:class:`~models.errors.OutboxFull`) and drops
nothing.

WAL with ``synchronous=NORMAL``: every committed update survives the process being killed, not
a power cut (a simulation's edges do not plan for one; a gateway's outbox syncs fully).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from models.errors import ConfigError, OutboxFull
from models.files import open_database, rollback
from models.transport.outbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, OutboxEntry, OutboxStats

__all__ = ["ClientOutbox", "SharedOutbox"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (client TEXT PRIMARY KEY, last_sequence INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    client TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    round INTEGER NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    publishes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (client, sequence)
);
CREATE TABLE IF NOT EXISTS state (client TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
                                  PRIMARY KEY (client, key));
"""


class SharedOutbox:
    """The outboxes of many clients in ``path`` (a SQLite file); thread-safe, every method one short transaction."""

    def __init__(self, path: str | Path, *, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ConfigError(f"outbox bounds must be >= 1, got max_entries={max_entries}, max_bytes={max_bytes}.")
        self.path = Path(path)
        self.max_entries, self.max_bytes = int(max_entries), int(max_bytes)
        self._db = open_database(self.path.parent, self.path.name, _SCHEMA, what=f"the shared outbox {self.path}",
                                 advice="check that the folder is writable.", synchronous="NORMAL")
        self._lock = threading.Lock()

    def view(self, client: str) -> ClientOutbox:
        """``client``'s outbox."""
        return ClientOutbox(self, client)

    def states(self, key: str) -> dict[str, bytes]:
        """Every client's state value ``key`` (e.g. the last round each trained), in one query."""
        with self._lock:
            rows = self._db.execute("SELECT client, value FROM state WHERE key = ?", (key,)).fetchall()
        return {str(c): bytes(v) for c, v in rows}

    def pending_clients(self) -> list[str]:
        """The clients with updates waiting for a receipt."""
        with self._lock:
            return [str(c) for (c,) in self._db.execute("SELECT DISTINCT client FROM entries ORDER BY client")]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _read(self, sql: str, args: tuple[object, ...]) -> list[tuple[object, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _write(self, sql: str, args: tuple[object, ...]) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount


class ClientOutbox:
    """One client's part of a :class:`SharedOutbox`: the :class:`~models.transport.outbox.Outbox` methods a
    :class:`~models.transport.sender.Sender` and a simulated edge call."""

    def __init__(self, shared: SharedOutbox, client: str) -> None:
        self._shared, self.client = shared, client
        self.path = shared.path
        self.max_entries, self.max_bytes = shared.max_entries, shared.max_bytes

    def __repr__(self) -> str:
        return f"ClientOutbox({self.client!r} in {str(self.path)!r})"

    def add(self, round_number: int, payload: bytes | Callable[[int], bytes], *,
            state: Mapping[str, bytes] | None = None) -> int:
        """Store one update and return its sequence number, all in one transaction with ``state``;
        :class:`OutboxFull` (nothing written) when it would exceed a bound."""
        shared, client = self._shared, self.client
        with shared._lock:
            db = shared._db
            db.execute("BEGIN IMMEDIATE")
            try:
                entries, used = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM entries "
                                           "WHERE client = ?", (client,)).fetchone()
                if entries >= self.max_entries:
                    raise self._full(entries, used, f"it holds {entries} updates (the bound is {self.max_entries})")
                row = db.execute("SELECT last_sequence FROM counters WHERE client = ?", (client,)).fetchone()
                sequence = (int(row[0]) if row else 0) + 1
                data = bytes(payload(sequence) if callable(payload) else payload)
                if used + len(data) > self.max_bytes:
                    raise self._full(entries, used, f"{used} + {len(data)} bytes exceeds its {self.max_bytes}-byte "
                                                    "bound")
                db.execute("INSERT OR REPLACE INTO counters (client, last_sequence) VALUES (?, ?)", (client, sequence))
                db.execute("INSERT INTO entries (client, sequence, round, payload, created) VALUES (?, ?, ?, ?, ?)",
                           (client, sequence, int(round_number), data, time.time()))
                for key, value in (state or {}).items():
                    db.execute("INSERT OR REPLACE INTO state (client, key, value) VALUES (?, ?, ?)",
                               (client, key, bytes(value)))
                db.execute("COMMIT")
            except BaseException:
                rollback(db, str(self.path))
                raise
        return sequence

    def _full(self, entries: int, used: int, why: str) -> OutboxFull:
        return OutboxFull(f"the outbox of {self.client} in {self.path} is full: {why}. The update was not added.",
                          entries=entries, bytes=used, max_entries=self.max_entries, max_bytes=self.max_bytes)

    def pending(self) -> list[OutboxEntry]:
        rows = self._shared._read("SELECT sequence, round, payload, created, publishes FROM entries WHERE client = ? "
                                  "ORDER BY sequence", (self.client,))
        return [OutboxEntry(int(s), int(r), bytes(p), float(c), int(n)) for s, r, p, c, n in rows]  # type: ignore[arg-type]

    def get_entry(self, sequence: int) -> OutboxEntry | None:
        rows = self._shared._read("SELECT sequence, round, payload, created, publishes FROM entries WHERE client = ? "
                                  "AND sequence = ?", (self.client, int(sequence)))
        return None if not rows else OutboxEntry(*(t(v) for t, v in zip((int, int, bytes, float, int), rows[0],
                                                                          strict=True)))

    def mark_published(self, sequence: int) -> None:
        self._shared._write("UPDATE entries SET publishes = publishes + 1 WHERE client = ? AND sequence = ?",
                            (self.client, int(sequence)))

    def remove(self, sequence: int) -> bool:
        """Drop ``sequence`` (only on a final receipt); False when it was not pending."""
        return self._shared._write("DELETE FROM entries WHERE client = ? AND sequence = ?",
                                   (self.client, int(sequence))) > 0

    def stats(self) -> OutboxStats:
        shared = self._shared
        with shared._lock:
            entries, used = shared._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM entries "
                                               "WHERE client = ?", (self.client,)).fetchone()
            row = shared._db.execute("SELECT last_sequence FROM counters WHERE client = ?", (self.client,)).fetchone()
        return OutboxStats(int(entries), int(used), self.max_entries, self.max_bytes, int(row[0]) if row else 0)

    def get(self, key: str) -> bytes | None:
        rows = self._shared._read("SELECT value FROM state WHERE client = ? AND key = ?", (self.client, key))
        return bytes(rows[0][0]) if rows else None  # type: ignore[arg-type]

    def put(self, key: str, value: bytes | None) -> None:
        if value is None:
            self._shared._write("DELETE FROM state WHERE client = ? AND key = ?", (self.client, key))
        else:
            self._shared._write("INSERT OR REPLACE INTO state (client, key, value) VALUES (?, ?, ?)",
                                (self.client, key, bytes(value)))
