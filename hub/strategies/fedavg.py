"""The mean-based rules: FedAvg, FedAvgM, FedProx, and the adaptive FedAdam, FedYogi, FedAdagrad.

All aggregate by the example-weighted mean of the deltas (streaming, O(model) memory)
and differ in the server optimizer (Reddi et al. 2021) or, for FedProx (Li et al.
2020), in what the edges are told to do: the proximal term ``mu/2 ||w - w_global||²``
is added on the edge, and ``mu`` travels in the task as ``prox_mu``.
"""

from __future__ import annotations

import math
from typing import ClassVar

from hub.strategies.base import Strategy
from hub.strategies.optimizers import OPTIMIZERS, SGD, Momentum, ServerOptimizer

__all__ = ["FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedProx", "FedYogi"]


class FedAvg(Strategy):
    """Weighted mean of deltas (McMahan et al. 2017); ``server_lr`` scales the server's step."""

    name: ClassVar[str] = "fedavg"
    sum_only: ClassVar[bool] = True

    def __init__(self, server_lr: float = 1.0, optimizer: ServerOptimizer | None = None,
                 norm_bound: float = 0.0) -> None:
        if optimizer is None:
            cls = OPTIMIZERS[self.default_optimizer]
            optimizer = cls(lr=server_lr) if cls in (SGD, Momentum) else cls()
        super().__init__(optimizer, norm_bound)

    @property
    def server_lr(self) -> float:
        return float(getattr(self.optimizer, "lr", 1.0))


class FedAvgM(FedAvg):
    """FedAvg with server momentum (Hsu et al. 2019): ``server_lr`` and ``momentum``."""

    name: ClassVar[str] = "fedavgm"
    default_optimizer: ClassVar[str] = "momentum"


class FedProx(FedAvg):
    """FedAvg whose edges add a proximal term of strength ``mu`` to their local loss."""

    name: ClassVar[str] = "fedprox"
    params: ClassVar[dict[str, type]] = {"mu": float}

    def __init__(self, mu: float = 0.01, optimizer: ServerOptimizer | None = None, norm_bound: float = 0.0) -> None:
        super().__init__(optimizer=optimizer, norm_bound=norm_bound)
        if not (math.isfinite(mu) and mu >= 0):
            raise ValueError(f"mu must be a finite number >= 0, got {mu}")
        self.mu = float(mu)

    def task_config(self) -> dict[str, float | int | str | bool]:
        return {"prox_mu": self.mu}


class FedAdam(FedAvg):
    """Mean delta, then Adam on the server (``eta``, ``beta1``, ``beta2``, ``tau``)."""

    name: ClassVar[str] = "fedadam"
    default_optimizer: ClassVar[str] = "adam"


class FedYogi(FedAvg):
    """Mean delta, then Yogi on the server: Adam with an additive second moment, steadier late on."""

    name: ClassVar[str] = "fedyogi"
    default_optimizer: ClassVar[str] = "yogi"


class FedAdagrad(FedAvg):
    """Mean delta, then Adagrad on the server: steps shrink where updates have been large."""

    name: ClassVar[str] = "fedadagrad"
    default_optimizer: ClassVar[str] = "adagrad"
