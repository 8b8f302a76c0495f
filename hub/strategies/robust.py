"""Byzantine-robust rules: coordinate-wise median and trimmed mean, Krum, Multi-Krum, Bulyan.

Each needs every delta of the round at once (the hub buffers them in its store), and
each bounds what ``f`` hostile edges can do to the result:

- FedMedian (Yin et al. 2018): the coordinate-wise median; unweighted.
- FedTrimmedAvg (Yin et al. 2018): per coordinate, drop the ``floor(beta * n)`` largest
  and smallest values and average the rest; unweighted.
- Krum (Blanchard et al. 2017): the one delta whose ``n - f - 2`` nearest neighbours are
  closest (sum of squared distances); needs ``n > 2f + 2``.
- Multi-Krum: the ``m`` best-scored deltas, averaged with FedAvg's weights.
- Bulyan (El Mhamdi et al. 2018): Krum picks ``n - 2f`` deltas one at a time; then per
  coordinate the ``n - 4f`` values nearest the median are averaged; needs ``n >= 4f + 3``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from hub.strategies.base import Strategy, check_count, check_round, stack, unstack
from hub.strategies.optimizers import ServerOptimizer

__all__ = ["Bulyan", "FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "krum_scores"]


def pairwise_sq_distances(x: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between the rows of ``x`` (n, d), from one Gram matrix."""
    sq = np.einsum("ij,ij->i", x, x)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.fill_diagonal(d2, 0.0)
    return np.maximum(d2, 0.0)


def krum_scores(d2: np.ndarray, f: int) -> np.ndarray:
    """Each row's sum of squared distances to its ``n - f - 2`` nearest other rows (at least one)."""
    n = len(d2)
    k = max(n - f - 2, 1)
    if n == 1:
        return np.zeros(1)
    others = np.sort(d2 + np.diag(np.full(n, np.inf)), axis=1)[:, :k]
    return others.sum(axis=1)


class _Buffered(Strategy):
    streaming: ClassVar[bool] = False

    def _rows(self, deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]):
        check_round(deltas, weights, self.min_updates())
        return stack([self.prepare(d) for d in deltas])


class FedMedian(_Buffered):
    """The coordinate-wise median of the deltas."""

    name: ClassVar[str] = "fedmedian"

    def aggregate(self, deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
        names, shapes, x = self._rows(deltas, weights)
        return unstack(names, shapes, np.median(x, axis=0))


class FedTrimmedAvg(_Buffered):
    """Per coordinate, the mean after cutting ``floor(beta * n)`` values from each end."""

    name: ClassVar[str] = "fedtrimmedavg"
    params: ClassVar[dict[str, type]] = {"beta": float}

    def __init__(self, beta: float = 0.2, optimizer: ServerOptimizer | None = None, norm_bound: float = 0.0) -> None:
        super().__init__(optimizer, norm_bound)
        if not (math.isfinite(beta) and 0.0 <= beta < 0.5):
            raise ValueError(f"beta (the fraction cut from each end) must be in [0, 0.5), got {beta}")
        self.beta = float(beta)

    def aggregate(self, deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
        names, shapes, x = self._rows(deltas, weights)
        n = len(x)
        cut = math.floor(self.beta * n)
        kept = np.sort(x, axis=0)[cut : n - cut]
        return unstack(names, shapes, kept.mean(axis=0))


class _Tolerant(_Buffered):
    """A rule built to withstand at most ``f`` hostile edges."""

    params: ClassVar[dict[str, type]] = {"f": int}

    def __init__(self, f: int = 1, optimizer: ServerOptimizer | None = None, norm_bound: float = 0.0) -> None:
        super().__init__(optimizer, norm_bound)
        self.f = check_count("f", f)


class Krum(_Tolerant):
    """The single delta with the smallest Krum score, for at most ``f`` hostile edges."""

    name: ClassVar[str] = "krum"

    def min_updates(self) -> int:
        return 2 * self.f + 3  # n > 2f + 2

    def select(self, x: np.ndarray, m: int, weights: Sequence[float] | None = None) -> np.ndarray:
        """Indices of the ``m`` rows with the lowest scores; ties go by the rows' bytes and weights, not order."""
        scores = krum_scores(pairwise_sq_distances(x), self.f)
        w = list(weights) if weights is not None else [0.0] * len(x)
        return np.array(sorted(range(len(x)), key=lambda i: (scores[i], x[i].tobytes(), w[i]))[:m], dtype=np.int64)

    def aggregate(self, deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
        names, shapes, x = self._rows(deltas, weights)
        return unstack(names, shapes, x[self.select(x, 1)[0]])


class MultiKrum(Krum):
    """The ``m`` best-scored deltas (default ``n - f``), averaged with their FedAvg weights."""

    name: ClassVar[str] = "multikrum"
    params: ClassVar[dict[str, type]] = {"f": int, "m": int}

    def __init__(self, f: int = 1, m: int = 0, optimizer: ServerOptimizer | None = None,
                 norm_bound: float = 0.0) -> None:
        super().__init__(f, optimizer, norm_bound)
        self.m = check_count("m", m)  # 0: n - f

    def min_updates(self) -> int:
        return max(2 * self.f + 3, self.m)

    def aggregate(self, deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
        names, shapes, x = self._rows(deltas, weights)
        chosen = self.select(x, self.m or len(x) - self.f, weights)
        w = np.asarray(weights, np.float64)[chosen]
        return unstack(names, shapes, (w @ x[chosen]) / w.sum())


class Bulyan(_Tolerant):
    """Krum selection of ``n - 2f`` deltas, then a per-coordinate trimmed mean around the median."""

    name: ClassVar[str] = "bulyan"

    def min_updates(self) -> int:
        return 4 * self.f + 3

    def aggregate(self, deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
        names, shapes, x = self._rows(deltas, weights)
        n, f = len(x), self.f
        d2 = pairwise_sq_distances(x)
        remaining = list(range(n))
        selected: list[int] = []
        while len(selected) < n - 2 * f:
            scores = krum_scores(d2[np.ix_(remaining, remaining)], f)
            best = min(zip(scores, remaining, strict=True), key=lambda p: (p[0], x[p[1]].tobytes()))[1]
            selected.append(best)
            remaining.remove(best)
        s = x[selected]
        beta = len(s) - 2 * f
        median = np.median(s, axis=0)
        nearest = np.argsort(np.abs(s - median), axis=0, kind="stable")[:beta]
        return unstack(names, shapes, np.take_along_axis(s, nearest, axis=0).mean(axis=0))
