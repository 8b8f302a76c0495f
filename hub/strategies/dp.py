"""DP-FedAvg (McMahan et al. 2018): clipped updates, a fixed denominator and Gaussian noise.

Every update is clipped to L2 norm ``dp_clip``, the DP clip (the edges are told to clip to
it as their ``update_clip``, and the hub clips again, so the bound holds whatever an edge
did) and counts the same whatever its number of examples. The round's sum is divided by
the *expected* number of clients ``expected_clients`` (not the number that came: that
count is data the noise must not depend on), and Gaussian noise of standard deviation
``noise * dp_clip / expected_clients`` is added to every coordinate. One client's whole
update then moves the average by at most ``dp_clip / expected_clients``, and ``noise`` is
the noise multiplier that :mod:`hub.accounting` turns into (epsilon, delta).

Adaptive clipping (Andrew et al. 2021): with ``target_quantile`` set, the DP clip
follows the ``target_quantile`` quantile of the updates' norms. After each round the
hub counts the updates that were already within the bound, adds Gaussian noise of std
``count_noise`` to that count, and moves the bound geometrically:
``dp_clip *= exp(-clip_lr * (noisy fraction - target_quantile))``. The count's noise costs
privacy too; :meth:`DPFedAvg.effective_noise` is the multiplier that the accountant
composes.

The noise is drawn from the operating system's entropy unless ``seed`` is given (only for
simulations that must repeat exactly).

``distributed=1`` (with secure aggregation, for a hub that is not trusted to add noise):
the hub adds none. Each client of a secure round adds its share instead, Gaussian noise
of std ``noise * dp_clip / sqrt(t)`` rounded onto the secure-aggregation grid, where t is
the fewest clients a secure round can finish with (its threshold). The sum then carries
at least the noise of the central mechanism (:meth:`hub.strategies.base.Capabilities.noise_share`;
:meth:`DPFedAvg.capabilities` tells the hub the clip, the multiplier and that the clients add it).

Accounting (:meth:`DPFedAvg.privacy_accountant`): ``population`` is how many clients
could take part (0: unknown, so no amplification by sampling: q = 1), ``delta`` the
target delta, ``budget`` the epsilon after which the hub stops releasing models (0: no
budget), ``accountant`` ``rdp`` or ``pld``, ``sampling`` the assumption stated in every
report: ``poisson`` (each client joins a round with probability q = expected_clients /
population) or ``fixed`` (exactly that many, without replacement; its neighbouring
relation is replace-one, whose sensitivity is twice the clip, so the accountant sees
half the noise multiplier).

The ``dp_clip`` arg was ``clip`` (still read, with a warning: :mod:`hub.renamed`); the
persisted state keeps the key ``dp_clip``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from hub.strategies.base import Capabilities, bound_norm
from hub.strategies.fedavg import FedAvg
from hub.strategies.optimizers import ServerOptimizer

if TYPE_CHECKING:
    from hub.accounting import PrivacyAccountant

__all__ = ["DPFedAvg"]

F32 = np.float32


class DPFedAvg(FedAvg):
    """FedAvg with per-client clipping to ``dp_clip``, uniform weights and Gaussian noise ``noise``."""

    name: ClassVar[str] = "dpfedavg"
    params: ClassVar[dict[str, type]] = {
        "noise": float, "dp_clip": float, "expected_clients": int, "target_quantile": float, "clip_lr": float,
        "count_noise": float, "seed": int, "delta": float, "budget": float, "population": int,
        "accountant": str, "sampling": str, "distributed": int,
    }

    def __init__(
        self,
        noise: float = 1.0,
        dp_clip: float = 1.0,
        expected_clients: int = 0,
        target_quantile: float = -1.0,
        clip_lr: float = 0.2,
        count_noise: float = 0.0,
        seed: int = -1,
        delta: float = 1e-5,
        budget: float = 0.0,
        population: int = 0,
        accountant: str = "rdp",
        sampling: str = "poisson",
        distributed: int = 0,
        optimizer: ServerOptimizer | None = None,
        norm_bound: float = 0.0,
    ) -> None:
        super().__init__(optimizer=optimizer)
        if not (math.isfinite(noise) and noise > 0):
            raise ValueError(f"noise (the noise multiplier) must be a finite number > 0, got {noise}")
        if not 0 < delta < 1 or not (math.isfinite(budget) and budget >= 0) or population < 0:
            raise ValueError("delta must be in (0, 1), budget >= 0 (0: none) and population >= 0 (0: unknown)")
        if accountant not in ("rdp", "pld") or sampling not in ("poisson", "fixed"):
            raise ValueError("accountant must be rdp or pld, sampling poisson or fixed")
        if not (math.isfinite(dp_clip) and dp_clip > 0):
            raise ValueError(f"dp_clip (the L2 bound of one update) must be a finite number > 0, got {dp_clip}")
        if expected_clients < 0:
            raise ValueError(f"expected_clients must be >= 0 (0: the hub's clients per round), got {expected_clients}")
        adaptive = target_quantile >= 0
        if adaptive and not 0 < target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {target_quantile}")
        if not (math.isfinite(clip_lr) and clip_lr > 0) or not (math.isfinite(count_noise) and count_noise >= 0):
            raise ValueError("clip_lr must be > 0 and count_noise >= 0")
        if norm_bound:
            raise ValueError("dpfedavg clips every update to dp_clip; norm_bound does not apply")
        self.noise, self.dp_clip, self.expected_clients = float(noise), float(dp_clip), int(expected_clients)
        self.target_quantile, self.clip_lr = float(target_quantile), float(clip_lr)
        self.count_noise = float(count_noise)
        self.seed = int(seed)
        self.delta, self.budget, self.population = float(delta), float(budget), int(population)
        self.accountant, self.sampling = accountant, sampling
        if distributed not in (0, 1):
            raise ValueError(f"distributed must be 0 or 1, got {distributed}")
        if distributed and self.adaptive:
            raise ValueError("adaptive clipping needs the hub to see update norms; it does not go with distributed=1")
        self.distributed = int(distributed)
        self._rng = np.random.default_rng(self.seed if self.seed >= 0 else int.from_bytes(os.urandom(16), "little"))
        self._within = 0  # updates of the open round already within the bound (adaptive clipping)

    @property
    def adaptive(self) -> bool:
        return self.target_quantile >= 0

    def effective_noise(self) -> float:
        """The noise multiplier for accounting: with adaptive clipping, the count's noise costs too.

        Andrew et al. 2021, Theorem 1: z_eff = (z^-2 + (2 sigma_b)^-2)^(-1/2).
        """
        if not self.adaptive:
            return self.noise
        if self.noise == 0 or self.count_noise == 0:
            return 0.0
        return (self.noise ** -2 + (2 * self.count_noise) ** -2) ** -0.5

    def capabilities(self) -> Capabilities:
        return Capabilities(sum_only=True, dp_clip=self.dp_clip, distributed_noise=bool(self.distributed),
                            noise_multiplier=self.noise)

    def privacy_accountant(self, expected_clients: int | None = None) -> PrivacyAccountant:
        """What this configuration spends per round, for ``expected_clients`` a round (default: its own)."""
        from hub.accounting import PrivacyAccountant

        m = expected_clients or self.expected_clients
        if not m:
            raise ValueError("set expected_clients (the hub sets it to its clients per round)")
        population = self.population or None
        if population is not None and m > population:
            raise ValueError(f"expected_clients ({m}) exceeds population ({population})")
        budget = self.budget or None
        if self.sampling == "fixed":
            if population is None:
                raise ValueError("fixed-size sampling needs population (how many clients could take part)")
            return PrivacyAccountant(self.effective_noise() / 2, self.delta, clients_per_round=m, population=population,
                                     accountant=self.accountant, sampling="fixed",  # type: ignore[arg-type]
                                     budget_epsilon=budget)
        return PrivacyAccountant(self.effective_noise(), self.delta, sample_rate=m / population if population else 1.0,
                                 accountant=self.accountant, sampling="poisson",  # type: ignore[arg-type]
                                 budget_epsilon=budget)

    def client_weight(self, num_examples: int) -> float:
        return 1.0

    def task_config(self) -> dict[str, float | int | str | bool]:
        return {"update_clip": self.dp_clip}

    def prepare(self, delta: Mapping[str, np.ndarray], staleness: int = 0) -> Mapping[str, np.ndarray]:
        bounded, norm = bound_norm(delta, self.dp_clip)
        self._within += norm <= self.dp_clip
        return bounded

    def finalize(self, avg: Mapping[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
        """The noisy average: the clipped sum (``avg * count``) over the expected clients, plus noise."""
        m = self.expected_clients or count
        out = {k: (np.asarray(v, np.float64) * (count / m)).astype(F32) for k, v in avg.items()}
        if not self.distributed:  # distributed: the clients of the secure round added it
            std = self.noise * self.dp_clip / m
            out = {k: (v + std * self._rng.standard_normal(v.shape)).astype(F32) for k, v in out.items()}
        if self.adaptive:
            noisy = self._within + self.count_noise * float(self._rng.standard_normal())
            fraction = noisy / m
            self.dp_clip *= math.exp(-self.clip_lr * (fraction - self.target_quantile))
        self._within = 0
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "effective_noise": self.effective_noise()}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {**super().state_dict(), "dp_clip": np.asarray([self.dp_clip], np.float64)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        state = dict(state)
        clip = state.pop("dp_clip", None)
        if clip is not None:
            self.dp_clip = float(np.asarray(clip).reshape(-1)[0])
        super().load_state_dict(state)
