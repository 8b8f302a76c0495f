"""A gateway adapting the global model to its wearer without labels, and checking that it helped.

:func:`adapt_for_wearer` re-estimates an activity model's BatchNorm statistics on the wearer's recent windows
(:func:`models.adaptation.adapt_statistics`) and keeps the adapted model only when its predictions on windows it
did not adapt on are no less certain (mean entropy, the signal test-time adaptation methods minimize: Wang et
al. 2021, "Tent"); otherwise the gateway keeps the global model. This check is weak: on HAPT it kept every
adaptation, including one that cost a wearer 5 points (docs/adaptation.md). The check runs on the last quarter
of the windows; once it passes, the statistics are re-estimated on all of them.

Before any of that, the windows must hold a broad mix of activities: statistics re-estimated on a stretch of
one or two activities follow that mix, not the wearer. On HAPT, adapting on half of one recording (the
protocol's postures, or its walking) cost wearers 6 to 50 points, and the entropy check let all of it through;
the global model's predicted classes on those windows had a normalized entropy of 0.37-0.67, on a whole
recording 0.87-1.0. Below :data:`MIN_CLASS_MIX` the gateway keeps the global model.

A heart-rate model keeps the global model: its last BatchNorm statistics carry the BPM level, so re-estimating
them on one wearer pulls every prediction toward that wearer's mean (measured on ``sim:0``: MAE 0.57 -> 3.97
BPM; the first two layers alone: 0.57 -> 0.50 on the training device, worse on a shifted one). See
docs/adaptation.md for what was measured.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.adaptation import adapt_statistics, mean_entropy, prediction_entropy
from models.model import Model

__all__ = ["CHECK_SHARE", "KEPT_GLOBAL_REASONS", "MIN_CHECK_WINDOWS", "MIN_CLASS_MIX", "adapt_for_wearer", "class_mix"]

CHECK_SHARE = 0.25
MIN_CHECK_WINDOWS = 4
MIN_CLASS_MIX = 0.8
"""The least normalized entropy of the predicted classes (1: every class equally often) that the gateway adapts on."""
KEPT_GLOBAL_REASONS = {
    "regressor": "a heart-rate model is not adapted",
    "too few windows": "too few windows",
    "narrow class mix": "its windows hold too few activities",
    "less certain": "less certain after adapting",
}
"""Each ``reason`` :func:`adapt_for_wearer` gives for keeping the global model, as an operator reads it."""


def class_mix(probabilities: np.ndarray) -> float:
    """How evenly a classifier's predicted classes (rows of class probabilities) spread: their histogram's
    entropy over log(classes)."""
    n, k = probabilities.shape
    share = np.bincount(probabilities.argmax(axis=1), minlength=k) / max(n, 1)
    share = share[share > 0]
    return float(-(share * np.log(share)).sum() / np.log(k)) if k > 1 else 0.0


def adapt_for_wearer(model: Model, x: np.ndarray) -> tuple[Model, dict[str, Any]]:
    """(the model to use for this wearer, ``{"kept_global", "reason", "check": {"class_mix", "global", "adapted"}
    (the predicted classes' spread, then the mean entropies) or None}``); ``x`` are the wearer's unlabelled
    windows."""
    if not model.spec.is_classifier:
        return model, {"kept_global": True, "reason": "regressor", "check": None}
    n_check = round(len(x) * CHECK_SHARE)
    if n_check < MIN_CHECK_WINDOWS or len(x) - n_check < MIN_CHECK_WINDOWS:
        return model, {"kept_global": True, "reason": "too few windows", "check": None}
    predicted = model.predict(x)  # the global model's, for the class mix and for its certainty on the check
    mix = round(class_mix(predicted), 6)
    if mix < MIN_CLASS_MIX:
        return model, {"kept_global": True, "reason": "narrow class mix", "check": {"class_mix": mix}}
    check = x[len(x) - n_check:]
    trial = adapt_statistics(model, x[:len(x) - n_check])
    before, after = prediction_entropy(predicted[len(x) - n_check:]), mean_entropy(trial, check)
    scores = {"class_mix": mix, "global": round(before, 6), "adapted": round(after, 6)}
    if after > before:
        return model, {"kept_global": True, "reason": "less certain", "check": scores}
    return adapt_statistics(model, x), {"kept_global": False, "reason": None, "check": scores}
