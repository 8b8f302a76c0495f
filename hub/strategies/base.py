"""The contract of an aggregation rule: deltas and weights in, one delta out, then a server step.

Why a separate base: rules are pure math over arrays, kept apart from orchestration
(rounds, persistence, MQTT), which calls them. A rule never does I/O or logging.

A rule is two parts that compose: :meth:`Strategy.aggregate` combines the round's
deltas (a weighted mean, a median, Krum, ...) after bounding each one's norm
(``norm_bound``, the server norm bound), and a :class:`ServerOptimizer` steps the
global weights along the result (SGD, momentum, Adam, Yogi, Adagrad), keeping its
state in the object. So a trimmed mean followed by FedAdam is
``FedTrimmedAvg(beta=0.1, optimizer=Adam())``.

A rule with ``streaming = True`` is a weighted mean, so the hub sums updates as they
arrive in one model-sized buffer (:class:`hub.aggregation.StreamingAverage`) after
:meth:`Strategy.prepare`. A rule with ``streaming = False`` (median, trimmed mean,
Krum, Bulyan) needs every delta of the round at once: the hub keeps them in its store
and calls :meth:`Strategy.aggregate` at the close.

What a rule needs of the hub and its edges is data, not something the orchestration
probes for: :meth:`Strategy.capabilities` says whether it works with secure aggregation
(it needs only the sum of the round's updates), the DP clip the edges must honour, and
whether the clients of a secure round add the DP noise, with each one's share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from hub.strategies.optimizers import OPTIMIZERS, ServerOptimizer

if TYPE_CHECKING:
    from hub.accounting import PrivacyAccountant

__all__ = ["Capabilities", "Strategy", "bound_norm", "check_count", "check_round", "stack", "unstack"]

F32 = np.float32


@dataclass(frozen=True)
class Capabilities:
    """What a rule needs of the hub and its edges, stated by the rule.

    ``sum_only``: the rule aggregates by a mean over every update, so it works when the hub
    learns only their sum (secure aggregation). ``dp_clip``: the L2 bound every update must
    be clipped to on its edge (None: the rule is not differentially private).
    ``distributed_noise``: the clients of a secure round add the DP noise, not the hub;
    ``noise_multiplier`` sizes each one's share (:meth:`noise_share`).
    """

    sum_only: bool = False
    dp_clip: float | None = None
    distributed_noise: bool = False
    noise_multiplier: float = 0.0

    def noise_share(self, threshold: int) -> float:
        """Each client's noise std (on the sum) in a secure round that finishes with at least ``threshold``.

        ``noise * dp_clip / sqrt(threshold)``: the survivors' shares together carry at least the
        central mechanism's noise. 0 when the clients add no noise.
        """
        if not self.distributed_noise or self.dp_clip is None:
            return 0.0
        return self.noise_multiplier * self.dp_clip / math.sqrt(max(1, threshold))


class Strategy:
    """Base of aggregation rules: a weighted mean, norm bounding, and a server optimizer."""

    name: ClassVar[str] = "strategy"
    streaming: ClassVar[bool] = True
    asynchronous: ClassVar[bool] = False
    """True: versions are released every ``buffer_size`` updates and stale updates are taken."""
    sum_only: ClassVar[bool] = False
    """True: the aggregate is a mean over every update, which secure aggregation can give (:class:`Capabilities`)."""
    buffer_size: int = 0
    max_staleness: int = 0
    default_optimizer: ClassVar[str] = "sgd"
    params: ClassVar[dict[str, type]] = {}
    """The rule's own parameters (``--strategy-arg KEY=VALUE``) and their types."""

    def __init__(self, optimizer: ServerOptimizer | None = None, norm_bound: float = 0.0) -> None:
        norm_bound = float(norm_bound)
        if not (math.isfinite(norm_bound) and norm_bound >= 0):
            raise ValueError(f"norm_bound must be a finite number >= 0, got {norm_bound}")
        self.optimizer = optimizer if optimizer is not None else OPTIMIZERS[self.default_optimizer]()
        self.norm_bound = norm_bound

    def capabilities(self) -> Capabilities:
        """What the rule needs of the hub and the edges as it is now (a DP clip may move between rounds)."""
        return Capabilities(sum_only=self.sum_only)

    def privacy_accountant(self, expected_clients: int | None = None) -> PrivacyAccountant | None:
        """What one round spends of a privacy budget; None for a rule that is not differentially private."""
        return None

    def describe(self) -> dict[str, Any]:
        """The rule's name, parameters and optimizer, for reports and state files."""
        opt = self.optimizer
        return {"strategy": self.name, "optimizer": opt.name, "norm_bound": self.norm_bound,
                **{k: getattr(self, k) for k in self.params},
                **{k: v for k, v in vars(opt).items() if isinstance(v, int | float)}}

    def min_updates(self) -> int:
        """The fewest updates a round must have for this rule to be defined."""
        return 1

    def client_weight(self, num_examples: int) -> float:
        """How much one update counts in a weighted mean; by default its number of training examples."""
        return float(num_examples)

    def task_config(self) -> dict[str, float | int | str | bool]:
        """Settings the rule needs the edges to use (FedProx's ``prox_mu``); merged into every task."""
        return {}

    def prepare(self, delta: Mapping[str, np.ndarray], staleness: int = 0) -> Mapping[str, np.ndarray]:
        """The server norm bound: ``delta`` scaled down to L2 norm ``norm_bound`` (0: unchanged).

        ``staleness`` (versions behind) matters only to asynchronous rules."""
        if self.norm_bound <= 0:
            return delta
        return bound_norm(delta, self.norm_bound)[0]

    def aggregate(self, deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
        """One delta from the round's deltas (same names and shapes) and their weights: the weighted mean."""
        check_round(deltas, weights, self.min_updates())
        names, shapes, x = stack([self.prepare(d) for d in deltas])
        w = np.asarray(weights, np.float64)
        return unstack(names, shapes, (w @ x) / w.sum())

    def finalize(self, avg: Mapping[str, np.ndarray], count: int) -> Mapping[str, np.ndarray]:
        """The round's aggregate of ``count`` updates as the server step takes it (DP adds its noise here)."""
        return avg

    def server_step(
        self, weights: Mapping[str, np.ndarray], avg_delta: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """New global weights from the current ones and the aggregated delta."""
        current = {k: np.asarray(w, F32) for k, w in weights.items()}
        new = self.optimizer.step(current, {k: np.asarray(avg_delta[k], F32) for k in current})
        # A variance cannot be negative; hostile or extreme deltas must not make it so (NaN outputs).
        return {k: np.maximum(v, F32(0.0)) if k.endswith("running_var") else v for k, v in new.items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The server optimizer's state, to persist with the hub's."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.optimizer.load_state_dict(state)


def bound_norm(delta: Mapping[str, np.ndarray], bound: float) -> tuple[Mapping[str, np.ndarray], float]:
    """``delta`` scaled down to L2 norm ``bound`` (itself when within it), and its norm before."""
    norm = math.sqrt(sum(float(np.vdot(v, v)) for v in delta.values()))
    if norm <= bound:
        return delta, norm
    scale = F32(bound / norm)
    return {k: np.asarray(v, F32) * scale for k, v in delta.items()}, norm


def check_count(name: str, value: int, least: int = 0) -> int:
    """``value`` as an int, or ValueError unless it is an integer >= ``least``."""
    if isinstance(value, bool) or int(value) != value or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value}")
    return int(value)


def check_round(deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], need: int = 1) -> None:
    """ValueError unless there are enough deltas, one finite positive weight per delta, one layout."""
    if len(deltas) < max(need, 1):
        raise ValueError(f"the rule needs at least {max(need, 1)} updates in a round, got {len(deltas)}")
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    w = np.asarray(weights, np.float64)
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError("weights must be finite and > 0")
    names = set(deltas[0])
    if any(set(d) != names for d in deltas[1:]):
        raise ValueError("every delta must have the same tensor names")


def stack(deltas: Sequence[Mapping[str, np.ndarray]]) -> tuple[list[str], dict[str, tuple[int, ...]], np.ndarray]:
    """(names, shapes, matrix): the deltas flattened in name order, one float64 row each."""
    names = sorted(deltas[0])
    shapes = {k: np.shape(deltas[0][k]) for k in names}
    x = np.stack([np.concatenate([np.asarray(d[k], np.float64).reshape(-1) for k in names]) for d in deltas])
    return names, shapes, x


def unstack(names: Sequence[str], shapes: Mapping[str, tuple[int, ...]], flat: np.ndarray) -> dict[str, np.ndarray]:
    """The inverse of one row of :func:`stack`, as float32 tensors."""
    out, offset = {}, 0
    for k in names:
        size = math.prod(shapes[k])
        out[k] = flat[offset : offset + size].reshape(shapes[k]).astype(F32)
        offset += size
    return out
