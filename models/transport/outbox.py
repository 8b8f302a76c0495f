"""A durable outbox: signed updates kept on disk until the receiver's receipt is final.

Why: a PUBACK only says the *broker* has an update; the hub may not have stored it yet
(it may be down, or lose its session). So an update stays here, and is re-published after
every reconnect, until a receipt for its sequence number says the hub stored it (or
refused it for good). The hub deduplicates by (client, sequence), so re-publishing is
always safe.

One SQLite database (WAL, ``synchronous=FULL``) in the edge's state directory holds

- ``counter``: the device's monotonic sequence counter. It only ever grows, across
  restarts and removals, so a sequence number is never reused;
- ``entries``: the pending updates (sequence, round, payload, when added, publish count);
- ``state``: a few small values that must change in the same transaction as an update is
  added (the last round trained, the top-k error-feedback residual), so a crash leaves
  either all of them or none.

The sequence is allocated and the payload stored in one transaction. As the payload
carries its own sequence number inside its signature, :meth:`Outbox.add` takes either
finished bytes or a function ``sequence -> bytes`` that builds them.

Bound policy: the outbox holds at most ``max_entries`` updates and ``max_bytes`` bytes of
payload. It never drops an update to make room: :meth:`Outbox.add` raises
:class:`OutboxFull` (nothing is written, the counter does not move) and the runtime pauses
training until receipts free space.

A disk that fills up (or a state directory that turns read-only) under a write raises
:class:`models.files.StorageError` with one clear message; the transaction is rolled back,
so the entries already pending, the counter and the state are exactly as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from models.errors import ConfigError, OutboxFull
from models.files import open_database, rollback, storage_error

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_ENTRIES", "Outbox", "OutboxEntry", "OutboxFull", "OutboxStats"]

log = logging.getLogger(__name__)

DB_NAME = "outbox.sqlite3"
DEFAULT_MAX_ENTRIES = 64
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY CHECK (id = 0), last_sequence INTEGER NOT NULL);
INSERT OR IGNORE INTO counter (id, last_sequence) VALUES (0, 0);
CREATE TABLE IF NOT EXISTS entries (
    sequence INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    publishes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""


@dataclass(frozen=True)
class OutboxEntry:
    """One pending update: its sequence number, round, signed payload, when it was added, publish count."""

    sequence: int
    round: int
    payload: bytes
    created: float
    publishes: int


@dataclass(frozen=True)
class OutboxStats:
    """What the outbox holds, for the status message."""

    entries: int
    bytes: int
    max_entries: int
    max_bytes: int
    last_sequence: int

    @property
    def full(self) -> bool:
        return self.entries >= self.max_entries or self.bytes >= self.max_bytes

    def as_dict(self) -> dict[str, int | bool]:
        return {"entries": self.entries, "bytes": self.bytes, "max_entries": self.max_entries,
                "max_bytes": self.max_bytes, "last_sequence": self.last_sequence, "full": self.full}


class Outbox:
    """A durable, bounded queue of signed updates in ``state_dir/outbox.sqlite3``.

    Thread-safe (one connection behind a lock), so the runtime may call it from worker
    threads; every method is one short transaction.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ConfigError(f"outbox bounds must be >= 1, got max_entries={max_entries}, max_bytes={max_bytes}.")
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / DB_NAME
        self.max_entries, self.max_bytes = int(max_entries), int(max_bytes)
        self._db = open_database(self.state_dir, DB_NAME, _SCHEMA, what=f"the outbox {DB_NAME}",
                                 advice="check that the state directory is writable and not used by another "
                                        "process.")
        self._lock = threading.Lock()
        self._closed = False

    # -- context manager ------------------------------------------------------------------

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def __repr__(self) -> str:
        return f"Outbox({str(self.path)!r})"

    # -- updates --------------------------------------------------------------------------

    def add(
        self,
        round_number: int,
        payload: bytes | Callable[[int], bytes],
        *,
        state: Mapping[str, bytes] | None = None,
    ) -> int:
        """Store one update and return its sequence number, all in one transaction.

        ``payload`` is the signed update, or a function that builds it from the sequence
        number allocated here (so the number inside the signature is the one stored).
        ``state`` values are written in the same transaction (see :meth:`get`).
        Raises :class:`OutboxFull` when the update would exceed a bound; then nothing
        changes.
        """
        with self._lock, self._writing(f"adding an update of round {round_number}"):
            self._check_open()
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                entries, used = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM entries").fetchone()
                if entries >= self.max_entries:
                    raise self._full(entries, used, f"it holds {entries} updates (the bound is {self.max_entries})")
                (last,) = db.execute("SELECT last_sequence FROM counter WHERE id = 0").fetchone()
                sequence = int(last) + 1
                data = payload(sequence) if callable(payload) else payload
                if not isinstance(data, bytes | bytearray | memoryview):
                    raise TypeError(f"an outbox payload must be bytes, got {type(data).__name__}")
                data = bytes(data)
                if used + len(data) > self.max_bytes:
                    why = f"{used} + {len(data)} bytes exceeds its {self.max_bytes}-byte bound"
                    raise self._full(entries, used, why)
                db.execute("UPDATE counter SET last_sequence = ? WHERE id = 0", (sequence,))
                db.execute("INSERT INTO entries (sequence, round, payload, created) VALUES (?, ?, ?, ?)",
                           (sequence, int(round_number), data, time.time()))
                for key, value in (state or {}).items():
                    db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, bytes(value)))
                db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        log.debug("outbox: added sequence %d (round %d, %d bytes)", sequence, round_number, len(data))
        return sequence

    def _rollback(self) -> None:
        rollback(self._db, str(self.path))

    @contextlib.contextmanager
    def _writing(self, doing: str) -> Iterator[None]:
        """Turn a write the storage refuses (disk full, read-only) into one clear StorageError."""
        try:
            yield
        except (OSError, sqlite3.Error) as exc:
            error = storage_error(exc, self.path, doing, "The updates already in the outbox are intact.")
            if error is None or error is exc:
                raise
            raise error from exc

    def _full(self, entries: int, used: int, why: str) -> OutboxFull:
        return OutboxFull(
            f"the outbox {self.path} is full: {why}. The update was not added; training pauses until the hub's "
            "receipts free space (check that the hub is running and reachable).",
            entries=entries, bytes=used, max_entries=self.max_entries, max_bytes=self.max_bytes,
        )

    def pending(self) -> list[OutboxEntry]:
        """Every update still waiting for a final receipt, in sequence order."""
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT sequence, round, payload, created, publishes FROM entries ORDER BY sequence"
            ).fetchall()
        return [OutboxEntry(int(s), int(r), bytes(p), float(c), int(n)) for s, r, p, c, n in rows]

    def get_entry(self, sequence: int) -> OutboxEntry | None:
        with self._lock:
            self._check_open()
            row = self._db.execute(
                "SELECT sequence, round, payload, created, publishes FROM entries WHERE sequence = ?", (sequence,)
            ).fetchone()
        return None if row is None else OutboxEntry(int(row[0]), int(row[1]), bytes(row[2]), float(row[3]), int(row[4]))

    def mark_published(self, sequence: int) -> None:
        """Count one publish of ``sequence`` (the broker acknowledged it); for status and logs."""
        with self._lock, self._writing(f"counting a publish of update {sequence}"):
            self._check_open()
            self._db.execute("UPDATE entries SET publishes = publishes + 1 WHERE sequence = ?", (sequence,))

    def remove(self, sequence: int) -> bool:
        """Drop ``sequence`` (call only on a final receipt); False when it was not pending."""
        with self._lock, self._writing(f"removing update {sequence} after its receipt"):
            self._check_open()
            cursor = self._db.execute("DELETE FROM entries WHERE sequence = ?", (int(sequence),))
        removed = cursor.rowcount > 0
        log.debug("outbox: sequence %d %s", sequence, "removed" if removed else "was not pending")
        return removed

    # -- sizes ----------------------------------------------------------------------------

    def stats(self) -> OutboxStats:
        with self._lock:
            self._check_open()
            entries, used = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM entries"
            ).fetchone()
            (last,) = self._db.execute("SELECT last_sequence FROM counter WHERE id = 0").fetchone()
        return OutboxStats(int(entries), int(used), self.max_entries, self.max_bytes, int(last))

    def __len__(self) -> int:
        return self.stats().entries

    @property
    def nbytes(self) -> int:
        """Bytes of payload pending."""
        return self.stats().bytes

    @property
    def full(self) -> bool:
        """True when no further update fits (by count, or with no byte left)."""
        return self.stats().full

    @property
    def last_sequence(self) -> int:
        """The last sequence number ever allocated (0: none yet)."""
        return self.stats().last_sequence

    # -- small durable state --------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """A value written by :meth:`put` or by :meth:`add`'s ``state``; None when absent."""
        with self._lock:
            self._check_open()
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, key: str, value: bytes | None) -> None:
        """Set (or, with None, delete) a small durable value."""
        with self._lock, self._writing(f"saving the state value {key!r}"):
            self._check_open()
            if value is None:
                self._db.execute("DELETE FROM state WHERE key = ?", (key,))
            else:
                self._db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, bytes(value)))

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
