"""Streaming weighted averaging of model deltas in one model-sized buffer.

Why: a hub may take thousands of updates a round; keeping them all to average at the
end costs O(clients x model) memory. :class:`StreamingAverage` keeps only the
running weighted sum (one flat float64 buffer, or float32 to halve it) and the total
weight, so memory is O(model) whatever the number of clients. Partial sums are
mergeable (:meth:`StreamingAverage.merge`), so several hub workers can each sum their
share of the intake and one of them adds the others' buffers in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["StreamingAverage"]

GATHER_MAX = 1 << 20  # values up to which a delta is gathered into one scratch buffer
CHUNK = 1 << 15  # values per step for larger models: the scratch stays in cache


class StreamingAverage:
    """Σ weight·delta and Σ weight over deltas of one layout (names and shapes).

    ``add`` takes a delta ``{name: array}``; ``mean`` returns ``{name: float32 array}``
    shaped like the layout. The sum lives in one flat buffer of ``dtype``; ``add`` does
    a few NumPy calls per delta, never per-element Python work.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtype: type = np.float64) -> None:
        if np.dtype(dtype) not in (np.dtype(np.float64), np.dtype(np.float32)):
            raise ValueError(f"the sum buffer must be float64 or float32, got {np.dtype(dtype).name}")
        self.names = sorted(shapes)
        self.shapes = {k: tuple(int(d) for d in shapes[k]) for k in self.names}
        sizes = [math.prod(self.shapes[k]) for k in self.names]
        self.size = int(sum(sizes))
        self.dtype = np.dtype(dtype)
        self.buffer = np.zeros(self.size, self.dtype)
        # Small models: gather the delta into one model-sized scratch and do one fused
        # multiply-add (few NumPy calls, since per-call overhead dominates). Large ones:
        # per tensor, in cache-sized chunks (or BLAS axpy for a float32 buffer).
        self._gather = self.size <= GATHER_MAX
        self._scratch = np.empty(self.size if self._gather else min(CHUNK, self.size), self.dtype)
        self._views: dict[str, np.ndarray] = {}
        offset = 0
        for name, size in zip(self.names, sizes, strict=True):
            self._views[name] = self.buffer[offset : offset + size]
            offset += size
        self.total_weight = 0.0
        self.count = 0

    @classmethod
    def like(cls, weights: Mapping[str, np.ndarray], dtype: type = np.float64) -> StreamingAverage:
        """An empty average for deltas shaped like ``weights``."""
        return cls({k: v.shape for k, v in weights.items()}, dtype)

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Add ``weight * delta``; ``delta`` must have exactly the layout's names and shapes."""
        weight = float(weight)
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"a weight must be finite and > 0, got {weight}")
        if len(delta) != len(self.names) or any(k not in delta for k in self.names):
            raise ValueError("the delta's tensor names do not match the layout")
        for name in self.names:
            value = np.asarray(delta[name])
            if value.shape != self.shapes[name]:
                raise ValueError(f"tensor {name!r} has shape {value.shape}, the layout {self.shapes[name]}")
        if self._gather:
            np.concatenate([np.asarray(delta[k]).reshape(-1) for k in self.names], out=self._scratch,
                           casting="same_kind")
            self._scratch *= weight
            self.buffer += self._scratch
        else:
            for name in self.names:
                self._axpy(np.asarray(delta[name]).reshape(-1), weight, self._views[name])
        self.total_weight += weight
        self.count += 1

    def _axpy(self, x: np.ndarray, a: float, y: np.ndarray) -> None:
        """``y += a * x`` in place without a model-sized temporary."""
        if y.dtype == np.float32 and x.dtype == np.float32 and y.flags.c_contiguous and x.flags.c_contiguous:
            from scipy.linalg import blas  # only here: importing SciPy costs a hub ~15 MB

            blas.saxpy(x, y, a=a)  # writes into y's memory
            return
        for start in range(0, len(x), CHUNK):
            part = slice(start, start + CHUNK)
            tmp = self._scratch[: min(CHUNK, len(x) - start)]
            np.multiply(x[part], a, out=tmp, casting="same_kind")
            y[part] += tmp

    def merge(self, other: StreamingAverage) -> None:
        """Add another partial sum of the same layout (for example another hub worker's)."""
        if other.shapes != self.shapes:
            raise ValueError("cannot merge averages of different layouts")
        self.buffer += other.buffer
        self.total_weight += other.total_weight
        self.count += other.count

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean delta as float32 tensors; ValueError when nothing was added."""
        if self.count == 0:
            raise ValueError("no deltas were added; the mean is undefined")
        flat = (self.buffer / self.total_weight).astype(np.float32)
        out: dict[str, np.ndarray] = {}
        offset = 0
        for name in self.names:
            size = self._views[name].size
            out[name] = flat[offset : offset + size].reshape(self.shapes[name])
            offset += size
        return out

    def reset(self) -> None:
        """Forget every delta (the buffer is reused)."""
        self.buffer.fill(0)
        self.total_weight = 0.0
        self.count = 0

    @property
    def nbytes(self) -> int:
        """Memory held by the buffer and its scratch space."""
        return int(self.buffer.nbytes + self._scratch.nbytes)
