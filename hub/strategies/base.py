"""The contract of an aggregation rule: deltas and weights in, a new global model out.

Why a separate base: rules (FedAvg now, robust and adaptive ones later) are pure math
over arrays, kept apart from orchestration (rounds, persistence, MQTT), which calls
them. A rule never does I/O or logging.

A rule with ``streaming = True`` is a weighted mean of the deltas, so the hub can sum
updates as they arrive in one model-sized buffer
(:class:`hub.aggregation.StreamingAverage`) and call only :meth:`Strategy.server_step`
at the end. A rule with ``streaming = False`` (a median, a trimmed mean) gets every
delta of the round at once through :meth:`Strategy.aggregate`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

__all__ = ["Strategy"]


class Strategy:
    """Base of aggregation rules; subclasses write ``aggregate`` and, when needed, ``server_step``."""

    name: ClassVar[str] = "strategy"
    streaming: ClassVar[bool] = False

    def client_weight(self, num_examples: int) -> float:
        """How much one update counts in the mean; by default its number of training examples."""
        return float(num_examples)

    def aggregate(self, deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
        """One delta from the round's deltas (same names and shapes) and their weights."""
        raise NotImplementedError

    def server_step(
        self, weights: Mapping[str, np.ndarray], avg_delta: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """New global weights from the current ones and the aggregated delta: ``w + Δ`` by default."""
        return {k: (np.asarray(w, np.float32) + np.asarray(avg_delta[k], np.float32)).astype(np.float32)
                for k, w in weights.items()}


def check_round(deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> None:
    """ValueError unless there is at least one delta, one finite positive weight per delta, one layout."""
    if not deltas:
        raise ValueError("a round needs at least one delta")
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    w = np.asarray(weights, np.float64)
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError("weights must be finite and > 0")
    names = set(deltas[0])
    if any(set(d) != names for d in deltas[1:]):
        raise ValueError("every delta must have the same tensor names")
