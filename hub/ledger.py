"""The model ledger: an append-only, tamper-evident log of every released model version.

Each line of ``<state>/ledger.jsonl`` is one JSON entry: the model version, the round
that produced it, the sha256 of each registered file, the sha256 of every update
aggregated into it, and ``prev``, the hash of the entry before. Its own ``hash`` is the
SHA-256 of the entry's canonical JSON without ``hash``. Editing, dropping or reordering
any entry breaks the chain at that entry, which :func:`verify` names. This is the audit
trail of what went into each clinical model (HIPAA 164.312(b) asks for one).

Appends write one whole line plus fsync. A write the disk refuses part-way (no space left)
is cut off again at once, so the file always ends on a line boundary and the next append
links to the last complete entry; a line cut short by a crash (no newline) was never
complete and is dropped when the hub next opens the ledger.

With ``--state postgresql://...`` each entry is one row of the ``ledger`` table
(:class:`DatabaseLedger`), the same line and the same checks; an append is one INSERT.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from models.errors import LedgerError, WearflError
from models.files import fsync_dir, make_dirs, storage_error
from models.protocol.ledger import GENESIS, entry_hash

__all__ = ["GENESIS", "DatabaseLedger", "Ledger", "LedgerError", "entry_hash", "open_ledger", "verify"]

log = logging.getLogger(__name__)

FIELDS = ("index", "version", "round", "files", "updates", "prev", "time", "hash")



@dataclass(frozen=True)
class VerifiedLedger:
    entries: int
    head: str
    last_version: int | None
    last_entry: dict[str, Any] | None = None


def verify(path: str | Path) -> VerifiedLedger:
    """Check every entry's hash, link and order; :class:`LedgerError` names the first bad entry.

    ``path``: the ledger file, or a ``postgresql://`` URL (its ``ledger`` table)."""
    from hub.database import is_database_url

    if is_database_url(path):
        ledger = DatabaseLedger(str(path))
        ledger.close()
        return VerifiedLedger(ledger.count, ledger.head, ledger.last_version, ledger.last_entry)
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return VerifiedLedger(0, GENESIS, None)
    try:
        return _verify_lines(data)
    except LedgerError as exc:
        raise LedgerError(exc.index, exc.reason, path) from None


def _verify_lines(data: bytes) -> VerifiedLedger:
    prev, last_version, entry = GENESIS, None, None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for index, line in enumerate(lines):
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LedgerError(index, "is not a JSON object (the line was altered or cut)") from None
        if not isinstance(entry, dict) or set(entry) != set(FIELDS):
            raise LedgerError(index, f"must have exactly the fields {', '.join(FIELDS)}")
        if entry["index"] != index:
            raise LedgerError(index, f"says it is entry {entry['index']!r} (entries were dropped or reordered)")
        if entry["hash"] != entry_hash(entry):
            raise LedgerError(index, "its content does not match its hash (the entry was edited)")
        if entry["prev"] != prev:
            raise LedgerError(index, "does not link to the entry before it (an entry was changed, dropped or added)")
        version = entry["version"]
        if not isinstance(version, int) or (last_version is not None and version <= last_version):
            raise LedgerError(index, f"model version {version!r} does not follow v{last_version}")
        prev, last_version = entry["hash"], version
    return VerifiedLedger(len(lines), prev, last_version, entry)


class Ledger:
    """Appends entries to ``path`` (``<state>/ledger.jsonl``); verifies it on open."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._load()

    def reload(self) -> None:
        """Read the ledger again (another hub replica may have appended to it)."""
        self._load()

    def _load(self) -> None:
        """Drop an unfinished last line, verify the chain and take its head (also after a failed append)."""
        try:
            self._repair_tail()
        except OSError as exc:
            _raise_storage(exc, self.path, "repairing the ledger's unfinished last line")
        state = verify(self.path)
        self.count, self.head, self.last_version = state.entries, state.head, state.last_version
        self.last_entry = state.last_entry

    def _repair_tail(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning("dropping an unfinished last line of %s (%d bytes): a crash cut it short",
                        self.path, len(data) - keep)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def append(self, version: int, round_number: int, files: dict[str, str], updates: Sequence[str],
               time: float) -> dict[str, Any]:
        """Add the entry of model ``version``: its files' sha256 and the sha256 of its updates."""
        if self.last_version is not None and version <= self.last_version:
            raise ValueError(f"the ledger already ends at v{self.last_version}; v{version} cannot follow it")
        entry: dict[str, Any] = {"index": self.count, "version": int(version), "round": int(round_number),
                                 "files": dict(sorted(files.items())), "updates": sorted(updates),
                                 "prev": self.head, "time": round(float(time), 3)}
        entry["hash"] = entry_hash(entry)
        line = (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode()
        try:
            self._write_line(line)
        except OSError as exc:
            _raise_storage(exc, self.path, f"appending the entry of model v{version} to the ledger")
        self.count, self.head, self.last_version = self.count + 1, entry["hash"], int(version)
        self.last_entry = entry
        return entry

    def _write_line(self, line: bytes) -> None:
        """Append ``line`` whole and fsync it, or leave the file as it was.

        ``os.write`` may write part of a line before the disk fills up; that part is cut off
        again, so a later append never continues a broken line (should even the cut fail, the
        in-memory head is re-read from the file, and the next open drops the broken line).
        """
        make_dirs(self.path.parent)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                self._cut_back(fd, start)
                raise
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)

    def _cut_back(self, fd: int, size: int) -> None:
        """Truncate the ledger to ``size`` bytes after a failed append; on failure, re-read what is on disk."""
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError as exc:
            log.error("could not cut a failed ledger append back out of %s (%s); it is dropped when the hub "
                      "next opens the ledger", self.path, exc)
            try:
                self._load()
            except (OSError, WearflError) as again:
                log.error("re-reading the ledger %s failed: %s", self.path, again)


def _raise_storage(exc: OSError, path: Path, doing: str) -> NoReturn:
    """Raise the clear :class:`~models.files.StorageError` for a refused ledger write, else ``exc`` itself."""
    error = storage_error(exc, path, doing, "The ledger is intact up to its last complete entry.")
    if error is None or error is exc:
        raise exc
    raise error from exc


SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (idx {INT} PRIMARY KEY, line {TEXT} NOT NULL);
"""


class DatabaseLedger(Ledger):
    """The ledger as rows of a PostgreSQL database's ``ledger`` table (its own connection)."""

    def __init__(self, url: str) -> None:
        from hub.database import PostgresDatabase, redact

        self.db = PostgresDatabase(url, SCHEMA)
        self.path = redact(url)  # type: ignore[assignment]  # for messages only
        self._load()

    def _load(self) -> None:
        rows = self.db.execute("SELECT line FROM ledger ORDER BY idx").fetchall()
        data = b"".join(row[0].encode() + b"\n" for row in rows)
        try:
            state = _verify_lines(data)
        except LedgerError as exc:
            raise LedgerError(exc.index, exc.reason, self.path) from None
        self.count, self.head, self.last_version = state.entries, state.head, state.last_version
        self.last_entry = state.last_entry

    def _write_line(self, line: bytes) -> None:
        self.db.execute("INSERT INTO ledger (idx, line) VALUES (?, ?)", (self.count, line.decode().rstrip("\n")))

    def close(self) -> None:
        self.db.close()


def open_ledger(state: str | Path) -> Ledger:
    """The ledger of a state directory (``ledger.jsonl``) or of a PostgreSQL database."""
    from hub.database import is_database_url

    return DatabaseLedger(str(state)) if is_database_url(state) else Ledger(Path(state) / "ledger.jsonl")
