"""On-device fine-tuning: the policy, the resource hooks that can veto it, and the trainer.

:class:`EdgeTrainer` is the whole contract between a gateway's MQTT session and
learning (after Flower's NumPyClient): ``fit(weights, config)`` returns new weights,
the number of examples and metrics; ``evaluate(weights, config)`` returns loss,
examples and metrics. The session never touches arrays beyond encoding them.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.replay import ReplayBuffer
from models.errors import ConfigError
from models.metrics import task_metrics
from models.model import Model
from models.spec import ModelSpec
from models.training import TrainConfig, fit

__all__ = [
    "EdgeTrainer",
    "FineTunePolicy",
    "ResourceHook",
    "battery_hook",
    "release_free_memory",
    "temperature_hook",
]

EVAL_BATCH = 32
"""Held-out windows evaluated per forward pass (the activations of 32 heart-rate windows are ~2.5 MB)."""

ResourceHook = Callable[[], str | None]
"""Returns a reason to skip training now (low battery, hot CPU), or None to allow it."""


def _load_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    A fit or an evaluation frees megabytes of activations between long-lived allocations;
    glibc keeps such holes resident until told, so a gateway's resident set would creep up
    by a fit's worth of temporaries. Costs well under a millisecond.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass(frozen=True)
class FineTunePolicy:
    """How and when a gateway fine-tunes: the training settings plus when to train at all.

    A round's task config (a flat dict of scalars) may override any field of either,
    e.g. ``{"lr": 5e-4, "prox_mu": 0.01, "cpu_seconds": 20}``.
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    cpu_seconds: float = 60.0
    min_new_windows: int = 16

    def with_overrides(self, config: Mapping[str, Any]) -> FineTunePolicy:
        own = {f.name for f in fields(self)} - {"train"}
        train_fields = {f.name for f in fields(TrainConfig)}

        def typed(holder: object, key: str, value: Any) -> Any:
            current = getattr(holder, key)
            try:
                return type(current)(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"task config {key}={value!r} is not a valid {type(current).__name__}.") from exc

        train = replace(self.train, **{k: typed(self.train, k, v) for k, v in config.items() if k in train_fields})
        policy = replace(self, train=train, **{k: typed(self, k, v) for k, v in config.items() if k in own})
        train.validate()
        if not (math.isfinite(policy.cpu_seconds) and policy.cpu_seconds > 0) or \
                not 0 <= policy.min_new_windows <= MAX_MIN_NEW_WINDOWS:
            raise ConfigError(f"cpu_seconds must be > 0 and min_new_windows 0 .. {MAX_MIN_NEW_WINDOWS}.")
        # a task may lower the gateway's CPU budget, never raise it: the gateway's owner set it
        return replace(policy, cpu_seconds=min(policy.cpu_seconds, self.cpu_seconds))


MAX_MIN_NEW_WINDOWS = 1_000_000


def read_first(paths: Sequence[str]) -> str | None:
    """The stripped text of the first of ``paths`` that can be read (sysfs values), or None."""
    for p in paths:
        try:
            return Path(p).read_text().strip()
        except OSError:
            continue
    return None


def battery_hook(min_percent: float = 30.0, require_charging: bool = False,
                 supply: str = "/sys/class/power_supply/BAT0") -> ResourceHook:
    """Veto training below ``min_percent`` battery unless charging (or always unless charging)."""

    def check() -> str | None:
        capacity = read_first([f"{supply}/capacity"])
        status = (read_first([f"{supply}/status"]) or "").lower()
        if capacity is None:
            return None  # mains-powered gateway
        charging = status in ("charging", "full")
        if require_charging and not charging:
            return "not charging"
        if float(capacity) < min_percent and not charging:
            return f"battery at {capacity}% (< {min_percent:g}%) and not charging"
        return None

    return check


def temperature_hook(max_celsius: float = 70.0, zone: str = "/sys/class/thermal/thermal_zone0/temp") -> ResourceHook:
    """Veto training while the SoC is hotter than ``max_celsius`` (a Pi throttles at 80-85 C)."""

    def check() -> str | None:
        raw = read_first([zone])
        if raw is None:
            return None
        celsius = float(raw) / 1000.0
        return f"SoC at {celsius:.0f} C (> {max_celsius:g} C)" if celsius > max_celsius else None

    return check


class EdgeTrainer:
    """Fine-tunes ``spec``'s model on a replay buffer, within a policy and its resource hooks."""

    def __init__(
        self,
        spec: ModelSpec,
        buffer: ReplayBuffer,
        policy: FineTunePolicy = FineTunePolicy(),
        hooks: Sequence[ResourceHook] = (),
        holdout: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.spec, self.buffer, self.policy, self.hooks = spec, buffer, policy, list(hooks)
        self.holdout = holdout
        self._interrupted = threading.Event()

    def interrupt(self) -> None:
        """Stop a fit in progress (from any thread) after its current step; the edge is stopping."""
        self._interrupted.set()

    def _model(self, weights: Mapping[str, np.ndarray]) -> Model:
        model = Model(self.spec)
        model.network.load_state_dict(weights)
        return model

    def veto(self, policy: FineTunePolicy) -> str | None:
        """Why training should not run now, or None."""
        if self.buffer.new_windows < policy.min_new_windows:
            return f"{self.buffer.new_windows} new windows (< {policy.min_new_windows})"
        for hook in self.hooks:
            reason = hook()
            if reason:
                return reason
        return None

    def fit(
        self, weights: Mapping[str, np.ndarray], config: Mapping[str, Any]
    ) -> tuple[dict[str, np.ndarray], int, dict[str, Any]]:
        """Fine-tune from ``weights``; returns (weights, examples, metrics).

        A vetoed round returns the given weights, 0 examples and ``{"skipped": reason}``.
        """
        policy = self.policy.with_overrides(config)
        reason = self.veto(policy)
        if reason:
            return dict(weights), 0, {"skipped": reason}
        model = self._model(weights)
        # thread_time: the fit runs in one worker thread, and a simulation hosts many edges
        # in one process, whose process_time would charge every edge for all of them.
        start = time.thread_time()
        budget_hit = False

        def on_step(step: int, loss: float) -> bool:
            nonlocal budget_hit
            budget_hit = time.thread_time() - start > policy.cpu_seconds
            return budget_hit or self._interrupted.is_set()

        result = fit(model, self.buffer.x, self.buffer.y, policy.train,
                     global_weights=weights if policy.train.prox_mu > 0 else None, on_step=on_step)
        self.buffer.mark_trained()
        metrics = {"train_loss": result.epoch_losses[-1], "steps": result.steps,
                   "cpu_seconds": time.thread_time() - start, "budget_exhausted": budget_hit,
                   "windows": len(self.buffer), **{f"label_{k}": v for k, v in self.buffer.source_counts().items()}}
        weights = model.network.state_dict()
        del model  # and the activations its layers keep from the last batch
        release_free_memory()
        return weights, result.examples, metrics

    def evaluate(
        self, weights: Mapping[str, np.ndarray], config: Mapping[str, Any]
    ) -> tuple[float, int, dict[str, float]]:
        """Evaluate ``weights`` on the held-out tail of this wearer's stream."""
        if self.holdout is None or len(self.holdout[0]) == 0:
            return float("nan"), 0, {}
        x, y = self.holdout
        model = self._model(weights)
        # One forward pass in small batches: a gateway's activations stay a few MB.
        raw = np.concatenate([model.forward_raw(x[i : i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)])
        loss, _ = model.default_loss()(raw, model.encode_target(y))
        result = float(loss), len(x), task_metrics(self.spec, model.apply_head(raw), y)
        del model
        release_free_memory()
        return result
