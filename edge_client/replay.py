"""The replay buffer: the labelled windows a gateway fine-tunes on, bounded and persisted.

Bounded both in windows and in bytes (a gateway's SD card and RAM are small).
``reservoir`` keeps a uniform sample of everything seen (Vitter's algorithm R);
``balanced`` keeps targets (classes; BPM rounded to whole beats) equally represented
by evicting from the largest class,
so a wearer who mostly sits still does not drown out their rare runs. Every window
remembers where its label came from (``reference``, ``annotation``, ``pseudo``).

The storage for the bound is reserved once (zero pages: resident only as windows fill it)
instead of grown by copies, and checkpoints are written from it and read into it (the
safetensors layout, byte for byte), so a buffer never needs twice its size in memory.
"""

from __future__ import annotations

import json
import os

import numpy as np

from models.errors import ConfigError, ModelFormatError
from models.files import write_atomic

__all__ = ["LABEL_SOURCES", "POLICIES", "REPLAY_MAX_BYTES", "REPLAY_MAX_WINDOWS", "ReplayBuffer"]

LABEL_SOURCES = ("reference", "annotation", "pseudo")
POLICIES = ("reservoir", "balanced")
REPLAY_MAX_WINDOWS = 2048
REPLAY_MAX_BYTES = 4 * 1024 * 1024
"""A gateway's replay buffer, resident once full: 1022 heart-rate windows (4 x 256 float32, 68 minutes
of stream at the default half-window hop) or 1361 activity windows (6 x 128, 29 minutes). A round trains
one epoch on the whole buffer. 30 minutes of stream, the length every training result in this repository
was measured on (simulated wearers, recordings), leaves at most ~1125 activity and ~360 heart-rate windows
for training after the holdout, so those buffers are the same as under the former 8 MiB; on a gateway that
runs for months the full buffer costs 4 MiB instead of 8 (``wearfl edge`` over 10 heart-rate rounds on
3 hours of recording peaked at 69 MiB instead of 75: scripts/bench_edge_footprint.py --recording-minutes 180)."""
_DTYPES = {"<f4": "F32", "|i1": "I8"}
"""numpy dtype -> safetensors dtype of the stored arrays."""
_MAX_HEADER = 1 << 20


class ReplayBuffer:
    """Windows x (channels, window) with float targets (class index or BPM) and label sources."""

    def __init__(
        self,
        window_shape: tuple[int, int],
        max_windows: int = REPLAY_MAX_WINDOWS,
        max_bytes: int = REPLAY_MAX_BYTES,
        policy: str = "reservoir",
        seed: int = 0,
    ) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"unknown replay policy {policy!r}; use one of {', '.join(POLICIES)}.")
        per_window = int(np.prod(window_shape)) * 4 + 8
        self.capacity = min(int(max_windows), int(max_bytes) // per_window)
        if self.capacity < 1:
            raise ConfigError(f"a replay buffer of {max_bytes} bytes cannot hold one {window_shape} window.")
        self.window_shape, self.policy = tuple(window_shape), policy
        self.max_windows, self.max_bytes = int(max_windows), int(max_bytes)
        self._reserve(self.capacity)
        self.seen = 0  # windows ever offered
        self.new_windows = 0  # windows added since the last mark_trained()
        self.rng = np.random.default_rng(seed)

    def _reserve(self, capacity: int) -> None:
        """Empty storage for ``capacity`` windows: np.zeros maps zero pages, which use no memory until written."""
        self._x = np.zeros((capacity, *self.window_shape), np.float32)
        self._y = np.zeros(capacity, np.float32)
        self._source = np.zeros(capacity, np.int8)
        self._n = 0

    @property
    def x(self) -> np.ndarray:
        """The windows (n, *window_shape), a view of the storage."""
        return self._x[: self._n]

    @property
    def y(self) -> np.ndarray:
        return self._y[: self._n]

    @property
    def source(self) -> np.ndarray:
        """Each window's label source, an index into :data:`LABEL_SOURCES`."""
        return self._source[: self._n]

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return self.x.nbytes + self.y.nbytes + self.source.nbytes

    def add(self, x: np.ndarray, y: np.ndarray, source: str | np.ndarray) -> int:
        """Offer windows; returns how many were stored."""
        x = np.asarray(x, np.float32).reshape(-1, *self.window_shape)
        y = np.asarray(y, np.float32).reshape(-1)
        codes = self._codes(source, len(x))
        if len(x) != len(y):
            raise ConfigError(f"{len(x)} windows but {len(y)} targets.")
        stored = 0
        room = self.capacity - len(self.x)
        if room > 0:
            take = min(room, len(x))
            self._append(x[:take], y[:take], codes[:take])
            self.seen += take
            x, y, codes, stored = x[take:], y[take:], codes[take:], take
        if len(x):
            stored += self._replace(x, y, codes)
        self.new_windows += stored
        return stored

    def _append(self, x: np.ndarray, y: np.ndarray, codes: np.ndarray) -> None:
        n, k = self._n, len(x)
        self._x[n : n + k], self._y[n : n + k], self._source[n : n + k] = x, y, codes
        self._n = n + k

    def _replace(self, x: np.ndarray, y: np.ndarray, codes: np.ndarray) -> int:
        if self.policy == "reservoir":
            # Item i (1-based count seen+i) replaces a uniform slot with probability capacity/count.
            counts = self.seen + np.arange(1, len(x) + 1)
            slots = (self.rng.random(len(x)) * counts).astype(np.int64)
            self.seen += len(x)
            keep = slots < self.capacity
            self.x[slots[keep]] = x[keep]
            self.y[slots[keep]] = y[keep]
            self.source[slots[keep]] = codes[keep]
            return int(keep.sum())
        self.seen += len(x)
        # balanced: a new window evicts a random window of the largest class, or of its own
        # class when that is (one of) the largest, so class counts converge to equal.
        for i in range(len(x)):
            labels = np.rint(self.y).astype(np.int64)
            values, counts = np.unique(labels, return_counts=True)
            own = int(np.rint(y[i]))
            own_count = counts[values == own]
            victim = own if len(own_count) and own_count[0] == counts.max() else int(values[counts.argmax()])
            slot = int(self.rng.choice(np.flatnonzero(labels == victim)))
            self.x[slot], self.y[slot], self.source[slot] = x[i], y[i], codes[i]
        return len(x)

    @staticmethod
    def _codes(source: str | np.ndarray, n: int) -> np.ndarray:
        names = [source] * n if isinstance(source, str) else list(source)
        unknown = sorted({s for s in names if s not in LABEL_SOURCES})
        if unknown:
            raise ConfigError(f"unknown label sources {unknown}; use {', '.join(LABEL_SOURCES)}.")
        return np.array([LABEL_SOURCES.index(s) for s in names], np.int8).reshape(n)

    def source_counts(self) -> dict[str, int]:
        counts = np.bincount(self.source, minlength=len(LABEL_SOURCES))
        return {name: int(c) for name, c in zip(LABEL_SOURCES, counts, strict=True)}

    def mark_trained(self) -> None:
        """Training consumed the new windows; the next round waits for fresh ones."""
        self.new_windows = 0

    def save(self, path: str | os.PathLike[str]) -> None:
        """Persist atomically (safetensors: loading it never executes anything), written from the storage."""
        meta = {"policy": self.policy, "seen": self.seen, "new_windows": self.new_windows,
                "window_shape": list(self.window_shape), "max_windows": self.max_windows,
                "max_bytes": self.max_bytes, "rng": self.rng.bit_generator.state}
        arrays = {"x": self.x, "y": self.y, "source": self.source}
        header: dict[str, object] = {"__metadata__": {"wearfl_replay": json.dumps(meta, sort_keys=True)}}
        offset = 0
        for name, a in arrays.items():
            header[name] = {"dtype": _DTYPES[a.dtype.str], "shape": list(a.shape),
                            "data_offsets": [offset, offset + a.nbytes]}
            offset += a.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        parts = [len(text).to_bytes(8, "little"), text]
        parts += [memoryview(np.ascontiguousarray(a).reshape(-1)).cast("B") for a in arrays.values()]
        write_atomic(path, parts)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReplayBuffer:
        """A buffer saved by :meth:`save`; the windows are read straight into its storage."""
        try:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if not 2 <= header_len <= _MAX_HEADER:
                    raise ValueError(f"header length {header_len}")
                header = json.loads(f.read(header_len))
                meta = json.loads(header["__metadata__"]["wearfl_replay"])
                buf = cls(tuple(meta["window_shape"]), meta["max_windows"], meta["max_bytes"], meta["policy"])
                n = int(header["y"]["shape"][0])
                if n > buf.capacity:
                    buf._reserve(n)
                expect = {"x": [n, *buf.window_shape], "y": [n], "source": [n]}
                offset = 0
                for name, target in (("x", buf._x), ("y", buf._y), ("source", buf._source)):
                    entry, size = header[name], n * target[0].nbytes if len(target) else 0
                    if (entry["dtype"] != _DTYPES[target.dtype.str] or list(entry["shape"]) != expect[name]
                            or list(entry["data_offsets"]) != [offset, offset + size]):
                        raise ValueError(f"tensor {name} is not as saved")
                    if f.readinto(memoryview(target[:n].reshape(-1)).cast("B")) != size:
                        raise ValueError("the file is truncated")
                    offset += size
                if f.read(1):
                    raise ValueError("trailing bytes")
            buf._n = n
            buf.seen, buf.new_windows = int(meta["seen"]), int(meta["new_windows"])
            buf.rng.bit_generator.state = meta["rng"]
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
            raise ModelFormatError(
                f"replay buffer {path} is unreadable ({exc}); move it aside to start with an empty buffer."
            ) from exc
        return buf
