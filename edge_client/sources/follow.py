"""``follow:FILE.csv``: a recording file that another program keeps appending to, read as it grows.

Some devices come with a logger that writes CSV; the gateway need not wait for the file to
be finished. :class:`FollowSource` reads FILE.csv from its first row and then follows it
like ``tail -F``: every complete line is parsed as the recording format's row
(``docs/recordings.md``, with ``dataset.toml`` beside the file for the rate, ``[columns]``
renames, ``ignore`` and ``labels``; the parsing is ``recordings.py``'s). The client is the
file's stem unless the edge is given ``--client-id``.

* **Growth**: only complete lines (ending in a newline) are read; a line being written
  waits for its end. Blank lines are skipped.
* **Rotation**: when FILE.csv is replaced (renamed away and created anew), the old file
  is read to its end first, then the new one from its header on. When it is truncated
  (smaller than what was read), it is read again from its header. A new header may order
  the columns differently; sensor columns it lacks are missing samples, ones it adds are
  ignored. A truncation is noticed only while the file is shorter than what had been read,
  so a logger that truncates should not write more than that within :data:`POLL_S`;
  replacing the file (rename, then create) has no such limit.
* **Bad rows** (a cell that is not a number, a wrong number of fields) are logged and
  skipped, the others kept; a bad header stops the source with an InputError naming it.
* **Labels**: ``activity`` names are the classes of ``labels`` in ``dataset.toml``; other
  names are logged once and read as unknown. Without ``labels`` the source has no
  classes and reads every activity as unknown.

Nothing is resumed after a restart: the edge reads a live source as a live stream.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING

from edge_client.sources.base import Chunk
from edge_client.sources.live import PolledSource, SkipLog
from edge_client.sources.recordings import header_from_row, parse_columns, read_config, rows_to_columns
from models.errors import ConfigError, InputError

if TYPE_CHECKING:
    from edge_client.sources.recordings import _Header

__all__ = ["HEADER_TIMEOUT_S", "MAX_LINE_BYTES", "POLL_S", "FollowSource"]

log = logging.getLogger(__name__)

POLL_S = 0.2
"""How often a file at its end is looked at again (and how soon ``close`` ends ``chunks``)."""
HEADER_TIMEOUT_S = 10.0
"""How long opening waits for the file and its header line."""
MAX_LINE_BYTES = 1 << 20
"""A line longer than this (no newline in sight) is dropped as garbage."""
READ_BYTES = 1 << 20
_DOCS = "see docs/devices.md and docs/recordings.md"


class FollowSource(PolledSource):
    """A growing recording file (module docstring); ``close()`` ends ``chunks()`` within :data:`POLL_S`."""

    def __init__(self, path: str | Path, client_id: str | None = None, *, timeout_s: float | None = None,
                 poll_s: float = POLL_S) -> None:
        super().__init__()
        self.path = Path(path).expanduser()
        if self.path.suffix.lower() != ".csv":
            raise ConfigError(f"follow:{path} is not a .csv file; use follow:FILE.csv ({_DOCS}).")
        self._config = read_config(self.path.parent / "dataset.toml")
        self.client_id = client_id or self.path.stem
        self.sampling_rate_hz = self._config.sampling_rate_hz
        self.classes: tuple[str, ...] = self._config.labels or ()
        self.poll_s = float(poll_s)
        self._skip = SkipLog(log, f"follow:{self.path}")
        self._strays: set[str] = set()
        self._file: IO[bytes] | None = None
        self._header: _Header | None = None
        self._pending = b""
        self._line = 0  # lines of the current file consumed, the header included
        timeout = HEADER_TIMEOUT_S if timeout_s is None else float(timeout_s)
        self._header = self._open(timeout)
        self.channels = self._header.sensors
        self.has_heart_rate = self._header.index("hr_bpm") is not None
        if self._header.index("activity") is not None and not self.classes:
            log.warning("%s: no labels in dataset.toml, so every activity is read as unknown; set labels to "
                        "use them", self.path)

    @property
    def skipped_rows(self) -> int:
        """Rows skipped as malformed so far."""
        return self._skip.skipped

    # -- opening, rotation --------------------------------------------------------------------

    def _open(self, timeout_s: float) -> _Header:
        """Open the file and read its header line, waiting up to ``timeout_s`` for both."""
        waited = 0.0
        while True:
            try:
                self._file = self.path.open("rb")
                break
            except FileNotFoundError:
                if waited >= timeout_s:
                    raise InputError(
                        f"{self.path} does not exist (waited {timeout_s:g} s); follow:FILE.csv reads the file a "
                        f"logger writes: start the logger first, or check the path ({_DOCS})."
                    ) from None
            except OSError as exc:
                raise InputError(f"cannot read {self.path} ({exc}).") from None
            self._closed.wait(self.poll_s)
            waited += self.poll_s
        self._line, self._pending = 0, b""
        try:
            while (header := self._read_header()) is None:
                if waited >= timeout_s:
                    raise InputError(
                        f"{self.path} has no complete header line after {timeout_s:g} s; its first line must be a "
                        f"header such as 't,acc_x,acc_y,acc_z' ({_DOCS})."
                    )
                self._closed.wait(self.poll_s)
                waited += self.poll_s
        except BaseException:
            self._release()  # a bad header, or none: nothing stays open
            raise
        return header

    def _read_header(self) -> _Header | None:
        """The current file's header once its first line is complete, else None."""
        assert self._file is not None
        while b"\n" not in self._pending:
            data = self._file.read(READ_BYTES)
            if not data:
                return None
            self._pending += data
        line, self._pending = self._pending.split(b"\n", 1)
        self._line = 1
        text = line.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r")
        return header_from_row(next(csv.reader([text]), None), self.path, self._config)

    def _replaced(self) -> bool:
        """At the end of the file: has it been replaced or truncated? (Then read on from the new start.)"""
        assert self._file is not None
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False  # renamed away, the new one not there yet: keep the old one open
        mine = os.fstat(self._file.fileno())
        if (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev):
            log.info("%s was replaced; reading the new file", self.path)
            return True
        if now.st_size < self._file.tell():
            log.info("%s was truncated; reading it again from its header", self.path)
            self._file.seek(0)
            self._pending, self._line, self._header = b"", 0, None
        return False

    # -- rows ---------------------------------------------------------------------------------

    def _lines(self, data: bytes, *, final: bool = False) -> list[tuple[int, str]]:
        """Complete lines of ``data`` after what was pending, numbered; blank ones left out."""
        buf = self._pending + data
        cut = len(buf) if final else buf.rfind(b"\n") + 1
        complete, self._pending = buf[:cut], buf[cut:]
        if len(self._pending) > MAX_LINE_BYTES:
            self._skip(f"a line of over {MAX_LINE_BYTES} bytes without a newline (line {self._line + 1})")
            self._pending = b""
        texts = complete.decode("utf-8", errors="replace").split("\n")
        if not final or texts[-1] == "":
            texts.pop()
        first = self._line + 1
        self._line += len(texts)
        return [(first + i, s.rstrip("\r")) for i, s in enumerate(texts) if s.strip()]

    def _parse(self, lines: list[tuple[int, str]]) -> Chunk | None:
        """Rows as a chunk: all at once, or (when one is bad) row by row, skipping the bad ones."""
        if not lines:
            return None
        numbers = [n for n, _ in lines]
        rows = list(csv.reader([s for _, s in lines]))
        try:
            return self._chunk(rows, numbers)
        except InputError:
            pass
        good = []
        for i, row in enumerate(rows):  # the error path: find the bad rows
            try:
                self._chunk([row], [numbers[i]])
                good.append(i)
            except InputError as exc:
                self._skip(f"a row: {exc}")
        if not good:
            return None
        return self._chunk([rows[i] for i in good], [numbers[i] for i in good])

    def _chunk(self, rows: list[list[str]], numbers: list[int]) -> Chunk:
        header = self._header

        def line_of(i: int) -> int:
            return numbers[i]

        columns = rows_to_columns(rows, header, line_of)
        chunk, strays = parse_columns(header, columns, self.client_id, self.channels, self.classes, line_of,
                                      unknown_activity="unknown")
        new = set(strays) - self._strays
        if new and self.classes:
            self._strays |= new
            log.warning("%s: activities %s are not in dataset.toml's labels %s; read as unknown", self.path,
                        sorted(new), list(self.classes))
        return chunk

    # -- reading ------------------------------------------------------------------------------

    def _step(self) -> Chunk | None:
        """Read what is new (following rotation); a chunk of the rows, or None when there was none."""
        assert self._file is not None
        if self._header is None:
            self._header = self._read_header()
            if self._header is None:
                return None
        data = self._file.read(READ_BYTES)
        if data or b"\n" in self._pending:  # (reading the header may have read rows too)
            return self._parse(self._lines(data))
        if not self._replaced():
            return None
        new = self.path.open("rb")  # FileNotFoundError (gone again): keep the old one, look again later
        rest = self._file.read()  # what was written to the old file before it was replaced
        last = self._parse(self._lines(rest, final=True))
        self._file.close()
        self._file, self._pending, self._line, self._header = new, b"", 0, None
        return last

    def _read(self, max_samples: int) -> Chunk | None:
        """The rows written since the last read, or None after a poll's wait when there are none."""
        try:
            chunk = self._step()
        except FileNotFoundError:
            chunk = None
        except OSError as exc:
            raise InputError(f"cannot read {self.path} ({exc}).") from None
        if chunk is None:
            self._closed.wait(self.poll_s)
        return chunk

    def _release(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def __repr__(self) -> str:
        return f"FollowSource({str(self.path)!r}, channels={list(self.channels)}, {self.sampling_rate_hz:g} Hz)"
