"""Per-round learning rates: what the task tells the edges to use in round r of R.

A federation with a fixed number of rounds learns more from a learning rate that
starts high and decays (cosine, as in centralized training) than from a constant one:
early rounds move far, late rounds settle instead of hopping between wearers' optima.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from models.errors import ConfigError

__all__ = ["LR_SCHEDULES", "check_schedule", "round_task_config", "scheduled_lr"]

LR_SCHEDULES = ("constant", "cosine")

Scalar = float | int | str | bool


def scheduled_lr(lr: float, schedule: str, min_factor: float, round_number: int, rounds: int | None) -> float:
    """The learning rate for ``round_number`` (1-based) of ``rounds``."""
    if schedule == "constant" or not rounds:
        return lr
    progress = min(max(round_number - 1, 0) / rounds, 1.0)
    return lr * (min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def check_schedule(config: Mapping[str, Scalar], rounds: int | None) -> None:
    """Refuse an unknown schedule, a bad floor, or a decaying schedule with no end."""
    schedule = str(config.get("lr_schedule", "constant"))
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr_schedule {schedule!r}; use one of {', '.join(LR_SCHEDULES)}.")
    factor = config.get("lr_min_factor", 0.05)
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0.0 <= factor <= 1.0:
        raise ConfigError(f"lr_min_factor must be a number in [0, 1], got {factor!r}.")
    if schedule != "constant" and rounds is None:
        raise ConfigError(f"lr_schedule {schedule!r} decays over a known number of rounds; set --rounds too.")


def round_task_config(config: Mapping[str, Scalar], round_number: int, rounds: int | None) -> dict[str, Scalar]:
    """``config`` with ``lr`` set for this round by its ``lr_schedule``."""
    out = dict(config)
    schedule = str(config.get("lr_schedule", "constant"))
    if schedule != "constant" and "lr" in config:
        lr = scheduled_lr(float(config["lr"]), schedule, float(config.get("lr_min_factor", 0.05)),
                          round_number, rounds)
        out["lr"] = float(f"{lr:.6g}")
    return out
