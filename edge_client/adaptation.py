"""A gateway adapting the global model to its wearer without labels, and checking that it helped.

:func:`adapt_for_wearer` re-estimates an activity model's BatchNorm statistics on the wearer's recent windows
(:func:`models.adaptation.adapt_statistics`) and keeps the adapted model only when its predictions on windows it
did not adapt on are no less certain (mean entropy, the signal test-time adaptation methods minimize: Wang et
al. 2021, "Tent"); otherwise the gateway keeps the global model. This check is weak: on HAPT it kept every
adaptation, including one that cost a wearer 5 points (docs/adaptation.md). The check runs on the last quarter
of the windows; once it passes, the statistics are re-estimated on all of them.

A heart-rate model keeps the global model: its last BatchNorm statistics carry the BPM level, so re-estimating
them on one wearer pulls every prediction toward that wearer's mean (measured on ``sim:0``: MAE 0.57 -> 3.97
BPM; the first two layers alone: 0.57 -> 0.50 on the training device, worse on a shifted one). See
docs/adaptation.md for what was measured.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.adaptation import adapt_statistics, mean_entropy
from models.model import Model

__all__ = ["CHECK_SHARE", "MIN_CHECK_WINDOWS", "adapt_for_wearer"]

CHECK_SHARE = 0.25
MIN_CHECK_WINDOWS = 4


def adapt_for_wearer(model: Model, x: np.ndarray) -> tuple[Model, dict[str, Any]]:
    """(the model to use for this wearer, ``{"kept_global", "reason", "check": {"global", "adapted"} (mean
    entropies) or None}``); ``x`` are the wearer's unlabelled windows."""
    if not model.spec.is_classifier:
        return model, {"kept_global": True, "reason": "regressor", "check": None}
    n_check = round(len(x) * CHECK_SHARE)
    if n_check < MIN_CHECK_WINDOWS or len(x) - n_check < MIN_CHECK_WINDOWS:
        return model, {"kept_global": True, "reason": "too few windows", "check": None}
    check = x[len(x) - n_check:]
    trial = adapt_statistics(model, x[:len(x) - n_check])
    before, after = mean_entropy(model, check), mean_entropy(trial, check)
    scores = {"global": round(before, 6), "adapted": round(after, 6)}
    if after > before:
        return model, {"kept_global": True, "reason": "less certain", "check": scores}
    return adapt_statistics(model, x), {"kept_global": False, "reason": None, "check": scores}
