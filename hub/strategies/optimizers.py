"""Server optimizers: how the hub steps along the aggregated delta (the pseudo-gradient).

SGD with a rate (FedAvg's server step), heavy-ball momentum (FedAvgM, Hsu et al. 2019)
and the adaptive ones of Reddi et al. 2021 (FedAdam, FedYogi, FedAdagrad). Each keeps
its state as named arrays, so the hub can persist it with its state and resume.

BatchNorm running statistics are averages, not parameters: extrapolating them with a
rate or momentum can drive a variance below zero. :func:`is_statistic` names them, and
the strategies move them by the plain mean delta.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

__all__ = ["OPTIMIZERS", "SGD", "Adagrad", "Adam", "Momentum", "ServerOptimizer", "Yogi", "is_statistic"]

F32 = np.float32


def is_statistic(name: str) -> bool:
    """True for tensors that are running statistics (BatchNorm mean and variance)."""
    return name.endswith(("running_mean", "running_var"))


def _positive(name: str, value: float, upper: float | None = None) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0 or (upper is not None and value >= upper):
        bound = f" and < {upper:g}" if upper is not None else ""
        raise ValueError(f"{name} must be a finite number > 0{bound}, got {value}")
    return value


class ServerOptimizer:
    """Turns the current weights and an aggregated delta into new weights; may keep state."""

    name: ClassVar[str] = "optimizer"

    def step(self, weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`; unknown or missing entries start afresh."""


class SGD(ServerOptimizer):
    """``w + lr * Δ``: FedAvg's step (``lr = 1`` is plain FedAvg)."""

    name: ClassVar[str] = "sgd"

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = _positive("server_lr", lr)

    def step(self, weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        lr = F32(self.lr)
        return {k: (w + (delta[k] if is_statistic(k) else lr * delta[k])).astype(F32) for k, w in weights.items()}


class Momentum(ServerOptimizer):
    """Heavy-ball momentum on the pseudo-gradient: ``v = m v + Δ; w += lr v`` (FedAvgM)."""

    name: ClassVar[str] = "momentum"

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        self.lr = _positive("server_lr", lr)
        self.momentum = _positive("momentum", momentum, 1.0)
        self.velocity: dict[str, np.ndarray] = {}

    def step(self, weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for k, w in weights.items():
            if is_statistic(k):
                out[k] = (w + delta[k]).astype(F32)
                continue
            v = self.velocity.get(k)
            v = delta[k].astype(F32) if v is None else (F32(self.momentum) * v + delta[k]).astype(F32)
            self.velocity[k] = v
            out[k] = (w + F32(self.lr) * v).astype(F32)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"velocity/{k}": v for k, v in self.velocity.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.velocity = {k.split("/", 1)[1]: np.asarray(v, F32) for k, v in state.items() if k.startswith("velocity/")}


class _Adaptive(ServerOptimizer):
    """The shared shape of FedAdam, FedYogi and FedAdagrad (Reddi et al. 2021, Algorithm 2).

    ``m = b1 m + (1 - b1) Δ``; ``v`` by the subclass; ``w += eta * m / (sqrt(v) + tau)``.
    No bias correction, as in the paper; ``tau`` bounds the step where ``v`` is small.
    """

    def __init__(self, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.eta = _positive("eta", eta)
        self.beta1 = float(beta1)
        if not 0.0 <= self.beta1 < 1.0:
            raise ValueError(f"beta1 must be in [0, 1), got {beta1}")
        self.beta2 = _positive("beta2", beta2, 1.0)
        self.tau = _positive("tau", tau)
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step(self, weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for k, w in weights.items():
            d = np.asarray(delta[k], F32)
            if is_statistic(k):
                out[k] = (w + d).astype(F32)
                continue
            m = self.m.get(k, np.zeros_like(d))
            v = self.v.get(k, np.full_like(d, F32(self.tau) ** 2))
            m = (F32(self.beta1) * m + F32(1.0 - self.beta1) * d).astype(F32)
            v = self.second_moment(v, d * d).astype(F32)
            self.m[k], self.v[k] = m, v
            out[k] = (w + F32(self.eta) * m / (np.sqrt(v) + F32(self.tau))).astype(F32)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        return {**{f"m/{k}": v for k, v in self.m.items()}, **{f"v/{k}": v for k, v in self.v.items()}}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.m = {k[2:]: np.asarray(v, F32) for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: np.asarray(v, F32) for k, v in state.items() if k.startswith("v/")}


class Adam(_Adaptive):
    name: ClassVar[str] = "adam"

    def second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        return F32(self.beta2) * v + F32(1.0 - self.beta2) * g2


class Yogi(_Adaptive):
    """Adam whose second moment moves additively, by the sign of ``v - Δ²``."""

    name: ClassVar[str] = "yogi"

    def second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        return v - F32(1.0 - self.beta2) * g2 * np.sign(v - g2)


class Adagrad(_Adaptive):
    """The second moment is the running sum of squared deltas (``beta2`` is unused)."""

    name: ClassVar[str] = "adagrad"

    def second_moment(self, v: np.ndarray, g2: np.ndarray) -> np.ndarray:
        return v + g2


OPTIMIZERS: dict[str, type[ServerOptimizer]] = {c.name: c for c in (SGD, Momentum, Adam, Yogi, Adagrad)}
