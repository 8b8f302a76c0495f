"""Files written so that a crash leaves the old content or the new, never half of either.

Also the one place that turns a write the storage refuses (no space left, a read-only or
unwritable directory, a failing disk) into a clear :class:`StorageError`: hub and edge
state writes go through :func:`write_atomic` or SQLite, and :func:`storage_error` maps
both kinds of failure to one message that says what failed, where, and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import tempfile
from collections.abc import Sequence
from pathlib import Path

from models.errors import ConfigError, StorageError, StorageKind

__all__ = [
    "StorageError",
    "check_writable",
    "fsync_dir",
    "make_dirs",
    "open_database",
    "rollback",
    "state_dir_error",
    "storage_error",
    "storage_failure",
    "write_atomic",
]


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_READONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
_IO_ERRNOS = frozenset({errno.EIO})
# SQLite's primary result codes (the low byte of an extended code)
_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 3, 8, 10, 13, 14



def storage_failure(exc: BaseException) -> StorageKind | None:
    """Whether ``exc`` (an OSError or a sqlite3 error) means the storage refused a write, and how."""
    if isinstance(exc, StorageError):
        return exc.kind
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        primary = None if code is None else code & 0xFF
        if primary == _SQLITE_FULL:
            return "full"
        if primary in (_SQLITE_READONLY, _SQLITE_PERM, _SQLITE_CANTOPEN):
            return "read-only"
        if primary == _SQLITE_IOERR:
            return "io"
        return None
    if isinstance(exc, OSError):
        if exc.errno in _FULL_ERRNOS:
            return "full"
        if exc.errno in _READONLY_ERRNOS:
            return "read-only"
        if exc.errno in _IO_ERRNOS:
            return "io"
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def storage_error(exc: BaseException, where: str | os.PathLike[str], doing: str = "writing",
                  advice: str = "") -> StorageError | None:
    """The clear error for a write to ``where`` that failed with ``exc``; None when ``exc`` is another failure.

    ``doing`` says what was being written ("storing an update"); ``advice`` is appended to
    the standard what-to-do (e.g. how to restart). An existing StorageError comes back as it is.
    """
    kind = storage_failure(exc)
    if kind is None:
        return None
    if isinstance(exc, StorageError):
        return exc
    reason = _reason(exc)
    code = exc.errno if isinstance(exc, OSError) else None
    tail = f" {advice}" if advice else ""
    if kind == "full":
        text = (f"no space left on the device of {where} ({reason}) while {doing}; free space on that filesystem "
                f"(or move the state directory to a larger one) and start again.{tail}")
    elif kind == "read-only":
        text = (f"{where} is not writable ({reason}) while {doing}; remount it read-write or fix its permissions, "
                f"or use another --state directory.{tail}")
    else:
        text = (f"a disk I/O error on {where} ({reason}) while {doing}; the disk may be full or failing: check it "
                f"(dmesg, df) and start again.{tail}")
    return StorageError(text, kind=kind, where=where, errno_code=code)


def state_dir_error(exc: BaseException, state_dir: str | os.PathLike[str], service: str, advice: str,
                    database: str) -> StorageError | None:
    """The one error a service (``"hub"``, ``"edge"``) stops with when its state directory refused a write.

    ``exc`` is what stopped it: a StorageError, a sqlite3 error (a write to ``database``, a
    file name in ``state_dir``), or an OSError on a file under ``state_dir``; anything else
    (None) is not a storage failure of the state directory and should propagate as it is.
    ``advice`` says what a restart does. The message names the state directory, the
    failure and what to do.
    """
    state_dir = Path(state_dir)
    if storage_failure(exc) is None:
        return None
    if isinstance(exc, StorageError):
        inner = exc
    elif isinstance(exc, sqlite3.Error):
        inner = storage_error(exc, state_dir / database, f"writing the database {database}")
    elif isinstance(exc, OSError) and exc.filename is not None and _is_under(exc.filename, state_dir):
        inner = storage_error(exc, exc.filename)
    else:
        return None
    assert inner is not None
    text = f"the {service} stopped: {inner} {advice}".strip()
    if str(state_dir) not in text:
        text += f" (state directory {state_dir})"
    return StorageError(text, kind=inner.kind, where=inner.where, errno_code=inner.errno)


def _is_under(path: str | bytes | os.PathLike[str], directory: Path) -> bool:
    try:
        Path(os.fsdecode(path)).resolve().relative_to(directory.resolve())
    except (ValueError, OSError):
        return False
    return True


def check_writable(directory: str | os.PathLike[str], what: str = "state directory") -> None:
    """Create ``directory`` if needed and prove a file can be created and written in it.

    Raises :class:`StorageError` (read-only, full) with a message naming ``directory``, so a
    service fails at start, in one clear line, rather than at its first write; ConfigError when
    ``directory`` or a folder on its path is a file. Cheap (no
    fsync): a thousand simulated edges each check their own directory.
    """
    directory = Path(directory)
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"the {what} {directory} cannot be made: {existing} is a file, not a folder; "
                          "give another path.")
    try:
        make_dirs(directory)
        fd, tmp = tempfile.mkstemp(prefix=".wearfl-write-check.", dir=directory)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            Path(tmp).unlink(missing_ok=True)
    except OSError as exc:
        error = storage_error(exc, directory, f"checking that the {what} is writable")
        if error is None:
            raise
        raise error from exc


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync ``directory`` itself, so the names created, renamed or removed in it are durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def make_dirs(directory: str | os.PathLike[str]) -> None:
    """``mkdir -p`` that fsyncs the parent of every directory it creates, so a new one survives power loss."""
    directory = Path(directory)
    if directory.is_dir():
        return
    missing: list[Path] = []
    at = directory
    while not at.is_dir():
        missing.append(at)
        if at.parent == at:
            break
        at = at.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:
            if not new.is_dir():
                raise
            continue
        fsync_dir(new.parent)


def write_atomic(
    path: str | os.PathLike[str], data: bytes | Sequence[bytes | memoryview], *, doing: str = "writing it"
) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never half.

    ``data`` may be a sequence of byte buffers (e.g. memoryviews of arrays), written one after
    the other: a large file is then never assembled in memory.

    Temp file in the same directory, fsync, rename over ``path``, fsync of the directory
    (and of the parent of any directory created for it). A write the storage refuses (no
    space left, read-only) raises :class:`StorageError` naming ``path`` and what was being
    done (``doing``), and leaves the old file and no temp file behind.
    """
    path = Path(path)
    try:
        _write_atomic(path, data)
    except OSError as exc:
        error = storage_error(exc, path, doing)
        if error is None or error is exc:
            raise
        raise error from exc


def _write_atomic(path: Path, data: bytes | Sequence[bytes | memoryview]) -> None:
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in (data,) if isinstance(data, bytes | bytearray | memoryview) else data:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def rollback(db: sqlite3.Connection, where: str) -> None:
    """Undo ``db``'s open transaction, if SQLite has not already (it rolls back itself on a full disk).

    A failed ROLLBACK is logged, not raised: it must not hide the error that called for it.
    """
    if not db.in_transaction:
        return
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error as exc:
        logging.getLogger(__name__).error("rolling back a transaction in %s failed: %s", where, exc)


def open_database(state_dir: Path, name: str, schema: str, *, what: str, advice: str,
                  synchronous: str = "FULL") -> sqlite3.Connection:
    """Open (or create) the SQLite database ``state_dir/name`` in WAL mode and apply ``schema``.

    Autocommit (transactions are explicit) and usable from worker threads. A disk that is
    full or read-only raises :class:`StorageError`; any other failure a ``ConfigError``
    naming ``what`` (e.g. "the outbox outbox.sqlite3") and ending with ``advice``.
    """
    from models.errors import ConfigError

    if synchronous not in ("FULL", "NORMAL", "EXTRA"):
        raise ConfigError(f"synchronous must be FULL, NORMAL or EXTRA, got {synchronous!r}.")
    path = Path(state_dir) / name
    try:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.executescript(schema)
    except (OSError, sqlite3.Error) as exc:
        storage = storage_error(exc, state_dir, f"opening {what}")
        if storage is not None:
            raise storage from exc
        raise ConfigError(f"cannot open {what} at {path} ({exc}); {advice}") from exc
    return db
