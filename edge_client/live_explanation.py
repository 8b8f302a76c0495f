"""Live predictions that say why: the channel and stretch of the newest window that moved the output most.

Asked for with ``wearfl edge --explain-predictions FRACTION``: integrated gradients (16 steps) on the window
live inference scored last, computed when the edge's status message takes that prediction (so only published
predictions are explained, however fast a replayed source is read), as long as explaining has used at most
FRACTION of one core's time since the edge started; past that a prediction goes without, and the budget refills
as time passes. On this project's 2-core VM an activity window takes about 3 ms of CPU, a
heart-rate window about 4-5 ms.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from models.model import Model

__all__ = ["LIVE_STEPS", "LiveExplainer"]

LIVE_STEPS = 16


class LiveExplainer:
    """Explains live predictions within a CPU budget (a fraction of one core's time since it started)."""

    def __init__(self, cpu_fraction: float, steps: int = LIVE_STEPS) -> None:
        self.cpu_fraction, self.steps = float(cpu_fraction), int(steps)
        self.spent_s, self.explained, self.skipped = 0.0, 0, 0
        self._started = time.monotonic()

    def attach(self, prediction: dict[str, Any], window: np.ndarray, predictor: Any) -> None:
        """Add ``explanation`` to ``prediction`` (live inference of ``predictor`` on ``window``) when the
        predictor is a numpy model, whose gradients this needs, and the budget allows."""
        model = getattr(predictor, "model", None)
        if isinstance(model, Model):
            why = self.explain(model, window)
            if why is not None:
                prediction["explanation"] = why

    def explain(self, model: Model, window: np.ndarray) -> dict[str, Any] | None:
        """What moved ``model``'s output on ``window`` (1, channels, samples) most, or None over budget:
        ``{"method", "channel", "from_s", "to_s" (seconds into the window), "attribution" (signed: in probability
        of the predicted class, or in BPM)}``."""
        from models.attribution import default_span, integrated_gradients

        if self.spent_s > self.cpu_fraction * (time.monotonic() - self._started):
            self.skipped += 1
            return None
        started = time.thread_time()
        explanation = integrated_gradients(model, window, steps=self.steps, refine=False)  # a bounded cost
        channel, start, stop, value = explanation.strongest(0, default_span(window.shape[2]))
        self.spent_s += time.thread_time() - started
        self.explained += 1
        rate = float(model.spec.sampling_rate_hz)
        return {"method": "integrated-gradients", "channel": model.spec.channels[channel],
                "from_s": round(start / rate, 3), "to_s": round(stop / rate, 3), "attribution": round(value, 4)}
