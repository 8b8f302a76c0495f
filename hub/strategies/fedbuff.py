"""FedBuff (Nguyen et al. 2022): asynchronous aggregation with a buffer of K updates.

Edges train whenever they can and send their delta against whatever model version
they had. The hub folds each update into its buffer as it arrives, its delta scaled by
a staleness discount ``1 / sqrt(1 + s)`` (``s``: how many versions behind the update
is) and weighted by its example count, so the buffer holds ``Σ n_i d(s_i) Δ_i / Σ n_i``
as in the paper. It refuses updates more than ``max_staleness`` versions behind
(``stale``) and releases a new model every ``buffer_size`` updates: no round waits for
the slowest edge. (BatchNorm statistics of a stale update are re-based on the current
model by the hub before they reach the rule, and are not discounted: they are
estimates of the data, not steps.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from hub.strategies.base import Strategy, check_count
from hub.strategies.optimizers import ServerOptimizer, is_statistic

__all__ = ["STALENESS", "FedBuff"]

STALENESS = ("sqrt", "constant")


class FedBuff(Strategy):
    """Release a version every ``buffer_size`` updates; discount stale ones by ``staleness``."""

    name: ClassVar[str] = "fedbuff"
    asynchronous: ClassVar[bool] = True
    params: ClassVar[dict[str, type]] = {"buffer_size": int, "max_staleness": int, "staleness": str}

    def __init__(self, buffer_size: int = 10, max_staleness: int = 4, staleness: str = "sqrt",
                 optimizer: ServerOptimizer | None = None, norm_bound: float = 0.0) -> None:
        super().__init__(optimizer, norm_bound)
        if staleness not in STALENESS:
            raise ValueError(f"staleness must be one of {', '.join(STALENESS)}, got {staleness!r}")
        self.buffer_size = check_count("buffer_size", buffer_size, 1)
        self.max_staleness = check_count("max_staleness", max_staleness)
        self.staleness = staleness

    def discount(self, staleness: int) -> float:
        """The weight factor of an update ``staleness`` versions behind."""
        return 1.0 / math.sqrt(1.0 + staleness) if self.staleness == "sqrt" else 1.0

    def prepare(self, delta: Mapping[str, np.ndarray], staleness: int = 0) -> Mapping[str, np.ndarray]:
        delta = super().prepare(delta)
        factor = np.float32(self.discount(staleness))
        if factor == 1.0:
            return delta
        return {k: v if is_statistic(k) else np.asarray(v, np.float32) * factor for k, v in delta.items()}
