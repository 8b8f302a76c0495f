"""The attack harness of ``wearfl simulate``: some edges turn hostile.

Model poisoning changes what a malicious edge sends: ``sign-flip`` sends ``-s · Δ`` and
``scale`` sends ``s · Δ``, where ``s`` is ``--attack-scale`` (10; a sign-flip with 1 is the
pure flip, which a mean of many honest edges shrugs off); ``alie`` ("A Little Is Enough", Baruch et al. 2019) has
the malicious edges pool their honest deltas and each send ``mean - z * std`` per coordinate,
small enough to pass outlier filters and aimed against the honest direction. Data
poisoning changes what a malicious edge trains on: ``label-flip`` maps every activity
label ``c`` to ``C - 1 - c`` (heart rate: ``180 - BPM``); ``backdoor`` stamps a trigger
(a ±1.5 alternating pattern on the first channel) on 3 s of every 10 s and labels those
samples as the target class, and the report gives the share of triggered held-out
windows classified as the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_client.sources.base import UNKNOWN, Chunk, Source
from models.errors import ConfigError

if TYPE_CHECKING:
    from edge_client.runtime import WeightsHook

__all__ = ["ATTACKS", "AttackPlan", "Collusion", "PoisonedSource", "add_trigger", "weights_hook"]

ATTACKS = ("sign-flip", "scale", "alie", "label-flip", "backdoor")
MODEL_ATTACKS = ("sign-flip", "scale", "alie")
TRIGGER_AMPLITUDE = 1.5
TRIGGER_PERIOD_S, TRIGGER_ON_S = 10.0, 3.0
BACKDOOR_TARGET = 0


@dataclass(frozen=True)
class AttackPlan:
    """Which attack, by how many of the edges, and which ones."""

    kind: str
    fraction: float
    malicious: tuple[str, ...]
    scale: float = 10.0

    @classmethod
    def choose(cls, kind: str, fraction: float, clients: Sequence[str], seed: int, scale: float = 10.0) -> AttackPlan:
        """``round(fraction · n)`` of ``clients``, picked by ``seed``."""
        if kind not in ATTACKS:
            raise ConfigError(f"unknown attack {kind!r}; use one of {', '.join(ATTACKS)}.")
        if not (math.isfinite(fraction) and 0.0 < fraction < 1.0):
            raise ConfigError(f"--malicious must be a fraction in (0, 1), got {fraction}.")
        if not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"--attack-scale must be > 0, got {scale}.")
        count = max(1, round(fraction * len(clients)))
        picked = np.random.default_rng([seed, 7]).choice(len(clients), size=count, replace=False)
        return cls(kind, float(fraction), tuple(clients[i] for i in sorted(picked)), float(scale))

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "malicious_fraction": self.fraction,
                               "malicious_clients": list(self.malicious)}
        if self.kind in ("scale", "sign-flip"):
            out["scale"] = self.scale
        if self.kind == "backdoor":
            out["target_class"] = BACKDOOR_TARGET
        return out


def alie_z(n: int, malicious: int) -> float:
    """Baruch et al.'s z_max: how many standard deviations still hide among ``n`` updates."""
    supporters = math.floor(n / 2 + 1) - malicious
    return NormalDist().inv_cdf(min(max((n - supporters) / n, 0.5), 0.999))


class Collusion:
    """The malicious edges' shared table of honest deltas, one round at a time (ALIE)."""

    def __init__(self, members: Sequence[str], total_clients: int, timeout_s: float = 30.0) -> None:
        self.members = set(members)
        self.z = alie_z(total_clients, len(self.members))
        self.timeout_s = timeout_s
        self._pool: dict[int, dict[str, dict[str, np.ndarray]]] = {}
        self._ready: dict[int, asyncio.Event] = {}

    async def craft(self, client: str, round_number: int, delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pool = self._pool.setdefault(round_number, {})
        pool[client] = delta
        ready = self._ready.setdefault(round_number, asyncio.Event())
        if self.members <= set(pool):
            ready.set()
        with contextlib.suppress(TimeoutError):  # a colluder skipped the round: use those who came
            await asyncio.wait_for(ready.wait(), self.timeout_s)
        deltas = list(pool.values())
        self._pool.pop(round_number - 2, None)
        return {k: (np.mean([d[k] for d in deltas], axis=0) - self.z * np.std([d[k] for d in deltas], axis=0))
                .astype(np.float32) for k in delta}


def weights_hook(plan: AttackPlan, client: str, collusion: Collusion | None = None) -> WeightsHook | None:
    """The :attr:`EdgeClient.weights_hook` of a malicious ``client`` (None for data attacks)."""
    if plan.kind not in MODEL_ATTACKS:
        return None

    async def hook(round_number: int, base: dict[str, np.ndarray],
                   weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        delta = {k: np.asarray(weights[k], np.float32) - base[k] for k in base}
        if plan.kind == "sign-flip":
            bad = {k: np.float32(-plan.scale) * d for k, d in delta.items()}
        elif plan.kind == "scale":
            bad = {k: np.float32(plan.scale) * d for k, d in delta.items()}
        else:
            assert collusion is not None
            bad = await collusion.craft(client, round_number, delta)
        return {k: (base[k] + bad[k]).astype(np.float32) for k in base}

    return hook


def add_trigger(x: np.ndarray) -> np.ndarray:
    """Windows (n, channels, time) with the backdoor trigger on their first channel."""
    out = np.array(x, np.float32, copy=True)
    pattern = np.where(np.arange(x.shape[-1]) % 2 == 0, TRIGGER_AMPLITUDE, -TRIGGER_AMPLITUDE).astype(np.float32)
    out[:, 0, :] += pattern
    return out


class PoisonedSource:
    """A source whose labels (``label-flip``) or data and labels (``backdoor``) are poisoned."""

    def __init__(self, source: Source, kind: str) -> None:
        if kind not in ("label-flip", "backdoor"):
            raise ConfigError(f"{kind} is not a data-poisoning attack.")
        self.source, self.kind = source, kind
        self.client_id = source.client_id
        self.channels = source.channels
        self.sampling_rate_hz = source.sampling_rate_hz
        self.classes = source.classes

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)

    def chunks(self, max_samples: int = 4096) -> Iterator[Chunk]:
        classes = len(self.classes)
        for chunk in self.source.chunks(max_samples):
            activity, hr = chunk.activity.copy(), chunk.hr_bpm.copy()
            data = chunk.data
            if self.kind == "label-flip":
                known = activity != UNKNOWN
                if classes:
                    activity[known] = classes - 1 - activity[known]
                hr = np.where(np.isfinite(hr), np.float32(180.0) - hr, hr).astype(np.float32)
            else:
                on = np.mod(chunk.t, TRIGGER_PERIOD_S) < TRIGGER_ON_S
                data = np.array(chunk.data, np.float32, copy=True)
                sample = np.rint(chunk.t * self.sampling_rate_hz).astype(np.int64)
                data[on, 0] += np.where(sample[on] % 2 == 0, TRIGGER_AMPLITUDE, -TRIGGER_AMPLITUDE)
                if classes:
                    activity[on & (activity != UNKNOWN)] = BACKDOOR_TARGET
            yield replace(chunk, data=data, activity=activity, hr_bpm=hr)
