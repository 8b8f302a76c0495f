"""The wearfl recording format: a folder of CSV files, one per subject, from any device.

HAPT and the simulator cover benchmarks; real deployments record their own wearers.
This format is the one door for such data: convert whatever a device writes into it
once (a rename table in ``dataset.toml`` often suffices) and every wearfl command can
train, fine-tune and evaluate on it. The full description, with examples, is in
``docs/recordings.md``; in short::

    DIR/dataset.toml     sampling_rate_hz = 50            (required)
                         labels = ["walking", "sitting"]  (optional: classes and their order)
                         ignore = ["battery"]             (optional: file columns to skip)
                         name = "ward-3"                  (optional: dataset name, default the folder name)
                         [columns]                        (optional: file column -> wearfl column)
                         AccX = "acc_x"
    DIR/<client>.csv     header from t, acc_x..acc_z (g), gyro_x..gyro_z (rad/s), ppg, hr_bpm, activity

Each file is one client (its stem is the client id). Sensor columns a task does not
need may be absent, but every file must have the same ones. Empty sensor or ``hr_bpm``
cells are missing samples (NaN, as are ``nan`` and ``inf``); an empty ``activity`` is
:data:`~edge_client.sources.base.UNKNOWN`. ``t`` must be present and numeric in
every row.

The split is by time, not by client: ``train_clients`` and ``test_clients`` are both
all clients and :attr:`RecordingsDataset.holdout_fraction` (0.2) says that the last
20% of each client's stream is held out for testing.

Opening the dataset reads ``dataset.toml`` and every file's header (and, without
``labels``, every file's ``activity`` column to find the classes); a client's samples
are parsed as its chunks are iterated, :data:`BLOCK_ROWS` rows at a time, so a file of
any length is read in bounded memory (a gateway replays hours of recording within its
budget). Errors name the file, line and column; a bad cell deep in a file ends the stream
there, after the chunks before it. :meth:`RecordingSource.validate` reads a file through
once, keeping nothing, to find such a cell up front (``wearfl edge`` does at start).
"""

from __future__ import annotations

import csv
import functools
import itertools
import math
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from edge_client.sources.base import CHANNELS, UNKNOWN, Chunk
from models.errors import ConfigError, InputError

__all__ = ["BLOCK_ROWS", "COLUMNS", "HOLDOUT_FRACTION", "RecordingSource", "RecordingsDataset", "write_recording"]

COLUMNS = ("t", *CHANNELS, "hr_bpm", "activity")
"""Every column a recording file may have, in wearfl order."""
HOLDOUT_FRACTION = 0.2
"""Share of each client's stream, at its end, that is held out for testing."""
BLOCK_ROWS = 512
"""Rows parsed at a time. As text cells (a Python string each) a row costs ~0.6 kB until it is parsed,
~40 bytes after; a block is ~0.3 MB whatever the file's length. Reading a 30-minute file at 50 Hz whole
cost ``wearfl edge`` ~85 MB; in blocks of 2048 rows it kept ~4 MB more resident (the cells' memory is
reused by other objects and not given back), in blocks of 512 ~1 MB (scripts/bench_edge_footprint.py)."""

_CONFIG_KEYS = ("sampling_rate_hz", "labels", "columns", "ignore", "name")
LineOf = Callable[[int], int]
"""Row index (0-based, within the rows given) -> the file's line number, for error messages."""
_DOCS = "see docs/recordings.md"


@dataclass(frozen=True)
class _Config:
    """The parsed dataset.toml."""

    sampling_rate_hz: float
    labels: tuple[str, ...] | None
    rename: dict[str, str] = field(default_factory=dict)
    ignore: frozenset[str] = frozenset()
    name: str | None = None


@dataclass(frozen=True)
class _Header:
    """One file's header: the wearfl name of each file column, None for an ignored one."""

    path: Path
    names: tuple[str | None, ...]

    def index(self, column: str) -> int | None:
        return self.names.index(column) if column in self.names else None

    @property
    def sensors(self) -> tuple[str, ...]:
        return tuple(c for c in CHANNELS if c in self.names)


def _string_list(value: object, key: str, path: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise InputError(f"{path}: {key} must be a list of non-empty strings, got {value!r}; {_DOCS}.")
    return tuple(v.strip() for v in value)


def read_config(path: Path) -> _Config:
    """Parse and check DIR/dataset.toml."""
    if not path.is_file():
        raise InputError(
            f"{path} does not exist; a recordings folder needs a dataset.toml with at least "
            f"'sampling_rate_hz = <Hz>' ({_DOCS})."
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid TOML ({exc}); fix the file ({_DOCS}).") from exc
    unknown = sorted(set(raw) - set(_CONFIG_KEYS))
    if unknown:
        raise InputError(f"{path} has unknown keys {unknown}; the keys are {list(_CONFIG_KEYS)} ({_DOCS}).")
    rate = raw.get("sampling_rate_hz")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate) or rate <= 0:
        raise InputError(f"{path} must set sampling_rate_hz to a positive number of samples per second, got {rate!r}.")
    labels = None
    if "labels" in raw:
        labels = _string_list(raw["labels"], "labels", path)
        if not labels or len(set(labels)) != len(labels):
            raise InputError(f"{path}: labels must be a non-empty list of distinct names, got {list(labels)}.")
    rename = raw.get("columns", {})
    if not isinstance(rename, dict) or not all(isinstance(v, str) for v in rename.values()):
        raise InputError(f'{path}: [columns] must map file column names to wearfl names, e.g. AccX = "acc_x".')
    bad = {k: v for k, v in rename.items() if v not in COLUMNS}
    if bad:
        raise InputError(f"{path}: [columns] maps to unknown wearfl columns {bad}; the wearfl columns are {COLUMNS}.")
    ignore = frozenset(_string_list(raw.get("ignore", []), "ignore", path))
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise InputError(f"{path}: name must be a non-empty string, got {name!r}.")
    return _Config(float(rate), labels, dict(rename), ignore, name)


def _open_csv(path: Path):
    try:
        return path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise InputError(f"cannot read {path} ({exc}).") from exc


def _read_header(path: Path, config: _Config) -> _Header:
    """The first row of a file, mapped to wearfl names and checked."""
    with _open_csv(path) as f:
        try:
            row = next(csv.reader(f), None)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise InputError(f"{path} line 1: cannot read the header ({exc}).") from exc
    return header_from_row(row, path, config)


def header_from_row(row: Sequence[str] | None, path: Path, config: _Config) -> _Header:
    """A header row (the file's first line, split) mapped to wearfl names and checked; ``path`` is for messages."""
    if not row:
        raise InputError(f"{path} is empty; its first line must be a header such as 't,acc_x,acc_y,acc_z' ({_DOCS}).")
    names: list[str | None] = []
    unknown = []
    for cell in row:
        cell = cell.strip()
        if cell in config.ignore:
            names.append(None)
            continue
        name = config.rename.get(cell, cell)
        if name not in COLUMNS:
            unknown.append(cell)
        names.append(name)
    if unknown:
        raise InputError(
            f"{path} line 1: unknown columns {unknown}; the wearfl columns are {list(COLUMNS)}. Map a device's "
            f'names in dataset.toml\'s [columns] table (e.g. {unknown[0]} = "acc_x") or list them in ignore.'
        )
    present = [n for n in names if n is not None]
    duplicated = sorted({n for n in present if present.count(n) > 1})
    if duplicated:
        raise InputError(f"{path} line 1: columns {duplicated} appear more than once (after [columns] renaming).")
    if "t" not in present:
        raise InputError(f"{path} line 1: there is no 't' column; every file needs the time of each sample in seconds.")
    header = _Header(path, tuple(names))
    if not header.sensors:
        raise InputError(f"{path} line 1: there is no sensor column; a file needs at least one of {list(CHANNELS)}.")
    return header


def _line_of(path: Path, row: int) -> int:
    """The line number of data row ``row`` (0-based, blank lines skipped); only for error messages."""
    with _open_csv(path) as f:
        reader = csv.reader(f)
        next(reader, None)
        index = 0
        for cells in reader:
            if not cells:
                continue
            if index == row:
                return reader.line_num
            index += 1
    return row + 2


def _column_blocks(header: _Header, block_rows: int | None = None) -> Iterator[tuple[list[tuple[str, ...]], LineOf]]:
    """The file's data rows (blank lines skipped), at most ``block_rows`` (default :data:`BLOCK_ROWS`) at a
    time, as one tuple of strings per file column (:func:`rows_to_columns`), each block with its rows' lines."""
    path, block_rows = header.path, block_rows or BLOCK_ROWS
    with _open_csv(path) as f:
        reader = csv.reader(f)
        first, rest = 0, itertools.islice(reader, 1, None)  # after the header
        while True:
            try:
                rows = list(itertools.islice(rest, block_rows))
            except (csv.Error, UnicodeDecodeError) as exc:
                raise InputError(f"{path} line {reader.line_num}: not readable as CSV ({exc}).") from exc
            if not rows:
                return
            if not all(rows):
                rows = [r for r in rows if r]  # blank lines
            line_of = functools.partial(_line_at, path, first)
            first += len(rows)
            columns = rows_to_columns(rows, header, line_of)
            del rows  # the cells live on in the columns; the row lists go before the block is parsed
            if columns[0]:
                yield columns, line_of
            del columns  # before the next block is read: one block of cells at a time


def _line_at(path: Path, first: int, row: int) -> int:
    """The line number of row ``row`` of a block that starts at data row ``first``."""
    return _line_of(path, first + row)


def rows_to_columns(
    rows: Sequence[Sequence[str]], header: _Header, line_of: Callable[[int], int]
) -> list[tuple[str, ...]]:
    """Rows of cells (no blank rows) as one tuple of strings per file column, every row checked for its width.

    ``line_of(i)`` is the file line of row ``i``, for the error message.
    """
    width = len(header.names)
    if set(map(len, rows)) - {width}:
        bad = next(i for i, r in enumerate(rows) if len(r) != width)
        raise InputError(
            f"{header.path} line {line_of(bad)}: {len(rows[bad])} fields, but the header has {width}; "
            f"every row needs one field per column (leave a cell empty where a value is missing)."
        )
    if not rows:
        return [() for _ in range(width)]
    return list(zip(*rows, strict=True))


def _numbers(
    cells: Sequence[str], header: _Header, column: str, allow_empty: bool, line_of: Callable[[int], int]
) -> np.ndarray:
    """A column of strings as float64, empty cells NaN (if allowed); errors name file, line and column."""
    try:
        return np.array(cells, dtype=np.float64)  # fast path: no empty cell
    except ValueError:
        pass
    strings = np.char.strip(np.array(cells, dtype=str))
    empty = np.char.str_len(strings) == 0
    if empty.any() and not allow_empty:
        row = int(np.argmax(empty))
        raise InputError(
            f"{header.path.name} line {line_of(row)}, column {column}: the cell is empty; "
            f"{column} must be a number in every row ({header.path})."
        )
    out = np.full(len(cells), np.nan)
    valid = ~empty
    try:
        out[valid] = strings[valid].astype(np.float64)
    except ValueError:
        # numpy refused a cell: find it for the message (the error path; per cell is fine here)
        rows = np.flatnonzero(valid)
        for row in rows.tolist():
            try:
                float(cells[row])
            except ValueError:
                raise InputError(
                    f"{header.path.name} line {line_of(row)}, column {column}: {cells[row]!r} is "
                    f"not a number; fix the cell or leave it empty for a missing value ({header.path})."
                ) from None
        out[valid] = np.fromiter(map(float, strings[valid].tolist()), np.float64, count=len(rows))  # e.g. "1_000"
    return out


def _activity_names(cells: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct stripped names of an activity column and each row's index into them."""
    return np.unique(np.char.strip(np.array(cells, dtype=str)), return_inverse=True)


def parse_columns(
    header: _Header,
    columns: Sequence[Sequence[str]],
    client_id: str,
    channels: tuple[str, ...],
    classes: tuple[str, ...],
    line_of: Callable[[int], int],
    *,
    unknown_activity: Literal["error", "unknown"] = "error",
) -> tuple[Chunk, tuple[str, ...]]:
    """Cells of one header's rows (from :func:`rows_to_columns`) as a checked :class:`Chunk`.

    ``channels`` absent from the header come out NaN. An activity name not in ``classes``
    is an error naming the line, or with ``unknown_activity="unknown"`` (a live file whose
    labels may grow) an unknown activity; the second value lists such names.
    """
    n = len(columns[0]) if columns else 0

    def column(name: str) -> Sequence[str] | None:
        i = header.index(name)
        return None if i is None else columns[i]

    t = _numbers(column("t"), header, "t", False, line_of)
    if not np.isfinite(t).all():
        row = int(np.argmax(~np.isfinite(t)))
        raise InputError(
            f"{header.path.name} line {line_of(row)}, column t: {t[row]} is not a finite time; "
            f"t must be seconds in every row ({header.path})."
        )
    data = np.full((n, len(channels)), np.nan, np.float32)
    for j, name in enumerate(channels):
        if (cells := column(name)) is not None:
            data[:, j] = _numbers(cells, header, name, True, line_of)
    data[~np.isfinite(data)] = np.nan
    hr = np.full(n, np.nan, np.float32)
    if (cells := column("hr_bpm")) is not None:
        hr[:] = _numbers(cells, header, "hr_bpm", True, line_of)
        hr[~np.isfinite(hr)] = np.nan
    activity = np.full(n, UNKNOWN, np.int16)
    strays: tuple[str, ...] = ()
    if (cells := column("activity")) is not None and n:
        names, inverse = _activity_names(cells)
        index = {c: i for i, c in enumerate(classes)}
        lookup = np.array([UNKNOWN if not s else index.get(str(s), -2) for s in names], np.int16)
        codes = lookup[inverse.reshape(-1)]
        if (codes == -2).any():
            if unknown_activity == "error":
                row = int(np.argmax(codes == -2))
                raise InputError(
                    f"{header.path.name} line {line_of(row)}, column activity: {cells[row].strip()!r} "
                    f"is not one of the dataset's labels {list(classes)}; add it to labels in dataset.toml "
                    f"or fix the cell ({header.path})."
                )
            strays = tuple(str(s) for s in names[lookup == -2])
            codes[codes == -2] = UNKNOWN
        activity[:] = codes
    return Chunk(client_id, t, data, channels, activity, hr, classes), strays


def _slice(chunk: Chunk, lo: int, hi: int) -> Chunk:
    return Chunk(chunk.client_id, chunk.t[lo:hi], chunk.data[lo:hi], chunk.channels, chunk.activity[lo:hi],
                 chunk.hr_bpm[lo:hi], chunk.classes)


def _joined(parts: Sequence[Chunk], like: RecordingSource) -> Chunk:
    """Consecutive chunks as one (the only one as it is)."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return Chunk(like.client_id, np.empty(0), np.empty((0, len(like.channels)), np.float32), like.channels,
                     np.empty(0, np.int16), np.empty(0, np.float32), like.classes)
    return Chunk(like.client_id, np.concatenate([p.t for p in parts]), np.concatenate([p.data for p in parts]),
                 like.channels, np.concatenate([p.activity for p in parts]),
                 np.concatenate([p.hr_bpm for p in parts]), like.classes)


def _take(parts: list[Chunk], n: int, like: RecordingSource) -> tuple[Chunk, list[Chunk]]:
    """The first ``n`` samples of ``parts`` (which hold at least ``n``) as one chunk, and the rest."""
    if len(parts[0]) >= n:  # the usual case: a view of one block
        head, rest = _slice(parts[0], 0, n), _slice(parts[0], n, len(parts[0]))
        return head, ([rest] if len(rest) else []) + parts[1:]
    used, k = 0, 0
    while k < len(parts) and used + len(parts[k]) <= n:
        used += len(parts[k])
        k += 1
    cut = n - used
    head = [*parts[:k], *([_slice(parts[k], 0, cut)] if cut else [])]
    rest = [_slice(parts[k], cut, len(parts[k])), *parts[k + 1:]] if k < len(parts) else []
    return _joined(head, like), [r for r in rest if len(r)]


class RecordingSource:
    """One recording file as a stream of chunks."""

    def __init__(self, dataset: RecordingsDataset, header: _Header) -> None:
        self.client_id = header.path.stem
        self.path = header.path
        self.channels = dataset.channels
        self.sampling_rate_hz = dataset.sampling_rate_hz
        self.classes = dataset.classes
        self._header = header

    def _blocks(self, block_rows: int | None = None) -> Iterator[Chunk]:
        """The file parsed and checked, ``block_rows`` rows at a time (the last block may be shorter)."""
        for columns, line_of in _column_blocks(self._header, block_rows):
            chunk, _ = parse_columns(self._header, columns, self.client_id, self.channels, self.classes, line_of)
            del columns
            yield chunk

    def validate(self) -> int:
        """Parse and check the whole file, keeping nothing; the number of samples it holds.

        InputError names the first bad cell's file, line and column. ``wearfl edge`` calls this at
        start, so that a bad row stops it then rather than when the hub's first model arrives and
        the stream is read. Memory stays one block's (:data:`BLOCK_ROWS` rows); the time is one
        parse of the file (~0.8 s for 30 minutes at 50 Hz on a desktop core).
        """
        return sum(len(chunk) for chunk in self._blocks())

    def read(self) -> Chunk:
        """The whole file as one chunk (parsed and checked)."""
        return _joined(list(self._blocks()), self)

    def chunks(self, max_samples: int = 4096) -> Iterator[Chunk]:
        """Yield the file's samples in file order, ``max_samples`` a chunk (the last one may have fewer).

        The file is parsed as it is read (:data:`BLOCK_ROWS` rows at a time), so memory does not
        grow with the file's length; a chunk longer than a block is joined from several.
        """
        if max_samples < 1:
            raise ConfigError(f"max_samples must be at least 1, got {max_samples}.")
        # blocks of whole chunks where a chunk is shorter than a block: every chunk is then a view of one block
        block_rows = max(1, BLOCK_ROWS // max_samples) * max_samples if max_samples <= BLOCK_ROWS else BLOCK_ROWS
        pending: list[Chunk] = []
        have = 0
        for block in self._blocks(block_rows):
            pending.append(block)
            have += len(block)
            while have >= max_samples:
                chunk, pending = _take(pending, max_samples, self)
                have -= len(chunk)
                yield chunk
        if have:
            yield _joined(pending, self)


class RecordingsDataset:
    """A folder in the wearfl recording format (module docstring, docs/recordings.md)."""

    holdout_fraction = HOLDOUT_FRACTION

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise InputError(
                f"the recordings folder {self.path} does not exist; point recordings:DIR at a folder with "
                f"dataset.toml and one CSV per subject ({_DOCS})."
            )
        config = read_config(self.path / "dataset.toml")
        files = sorted(p for p in self.path.glob("*.csv") if p.is_file())
        if not files:
            raise InputError(f"{self.path} holds no .csv files; put one CSV per subject beside dataset.toml ({_DOCS}).")
        self._headers = {p.stem: _read_header(p, config) for p in files}
        first = next(iter(self._headers.values()))
        for header in self._headers.values():
            if header.sensors != first.sensors:
                raise InputError(
                    f"{header.path} has sensor columns {list(header.sensors)} but {first.path} has "
                    f"{list(first.sensors)}; every file of a dataset needs the same sensor columns."
                )
        self.name = config.name or self.path.resolve().name
        self.sampling_rate_hz = config.sampling_rate_hz
        self.channels = first.sensors
        self.has_heart_rate = any(h.index("hr_bpm") is not None for h in self._headers.values())
        self.clients = tuple(self._headers)
        self.train_clients = self.clients
        self.test_clients = self.clients
        self.classes = config.labels if config.labels is not None else self._found_classes()

    def _found_classes(self) -> tuple[str, ...]:
        """The sorted activity names found in all files (the classes when dataset.toml has no labels).

        Read block by block, like the samples: only the set of names is kept.
        """
        found: set[str] = set()
        for header in self._headers.values():
            i = header.index("activity")
            if i is not None:
                for columns, _ in _column_blocks(header):
                    found.update(str(s) for s in _activity_names(columns[i])[0])
        found.discard("")
        return tuple(sorted(found))

    def source(self, client_id: str) -> RecordingSource:
        """The stream of one client (a file stem)."""
        if client_id not in self._headers:
            raise ConfigError(
                f"{self.path} has no client {client_id!r} (no {client_id}.csv); its clients are {list(self.clients)}."
            )
        return RecordingSource(self, self._headers[client_id])

    def __repr__(self) -> str:
        return f"RecordingsDataset({str(self.path)!r}, clients={len(self.clients)}, classes={list(self.classes)})"


def write_recording(path: str | Path, t: Sequence[float] | np.ndarray, **columns: Sequence | np.ndarray) -> None:
    """Write one client's file in the recording format (a helper for converters and tests).

    ``columns`` are wearfl columns (``acc_x=...``, ``activity=[...]``); NaN and None
    are written as empty cells.
    """
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown:
        raise ConfigError(f"unknown columns {unknown}; the wearfl columns are {list(COLUMNS)}.")
    names = ["t", *(c for c in COLUMNS if c in columns)]
    n = len(t)

    def cell(value: object) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return repr(float(value)) if isinstance(value, float | np.floating) else str(value)

    cols = [np.asarray(t, np.float64).tolist(), *(np.asarray(columns[c]).tolist() for c in names[1:])]
    for name, col in zip(names, cols, strict=True):
        if len(col) != n:
            raise ConfigError(f"column {name} has {len(col)} values but t has {n}.")
    with Path(path).open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        writer.writerows([cell(v) for v in row] for row in zip(*cols, strict=True))
