"""FedAvg (McMahan et al., 2017): the example-weighted mean of client deltas, times a server rate.

``w_new = w + server_lr * Σ n_i Δ_i / Σ n_i``. With ``server_lr = 1`` this is plain
FedAvg; other rates are the simplest server optimizer (SGD on the pseudo-gradient).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from hub.aggregation import StreamingAverage
from hub.strategies.base import Strategy, check_round

__all__ = ["FedAvg"]


class FedAvg(Strategy):
    """Weighted mean of deltas; ``server_lr`` scales the step the server takes along it."""

    name: ClassVar[str] = "fedavg"
    streaming: ClassVar[bool] = True

    def __init__(self, server_lr: float = 1.0) -> None:
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be finite and > 0, got {server_lr}")
        self.server_lr = float(server_lr)

    def aggregate(self, deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
        check_round(deltas, weights)
        total = StreamingAverage.like(deltas[0])
        for delta, weight in zip(deltas, weights, strict=True):
            total.add(delta, weight)
        return total.mean()

    def server_step(
        self, weights: Mapping[str, np.ndarray], avg_delta: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        lr = np.float32(self.server_lr)
        return {k: (np.asarray(w, np.float32) + lr * np.asarray(avg_delta[k], np.float32)).astype(np.float32)
                for k, w in weights.items()}
