"""Where a gateway's training labels come from.

A paired reference sensor (``hr_bpm``, e.g. a chest strap) labels heart-rate windows,
user annotations (``activity``) label activity windows, and, where neither exists,
confident predictions of the current model become pseudo-labels (activity only: a
BPM regressor has no calibrated confidence to threshold).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_client.windowing import Windows
from models.inference import Predictor
from models.spec import ModelSpec

__all__ = ["LabelledWindows", "label_windows"]


@dataclass(frozen=True)
class LabelledWindows:
    """Windows x (n, channels, window), targets y (n,) and each label's source name."""

    x: np.ndarray
    y: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


def label_windows(
    windows: Windows,
    spec: ModelSpec,
    predictor: Predictor | None = None,
    pseudo_threshold: float | None = None,
) -> LabelledWindows:
    """The windows that have a label, with the label and where it came from.

    Pseudo-labels are used only when ``predictor`` and ``pseudo_threshold`` are given:
    an unlabelled activity window whose top class probability reaches the threshold.
    """
    if not spec.is_classifier:
        known = np.isfinite(windows.hr_bpm)
        return LabelledWindows(windows.x[known], windows.hr_bpm[known].astype(np.float32),
                               np.full(int(known.sum()), "reference"))
    known = windows.activity >= 0
    x, y = windows.x[known], windows.activity[known].astype(np.float32)
    source = np.full(len(x), "annotation", dtype=object)
    if predictor is not None and pseudo_threshold is not None and (~known).any():
        probs = predictor.predict(windows.x[~known])
        confident = probs.max(axis=1) >= pseudo_threshold
        x = np.concatenate([x, windows.x[~known][confident]])
        y = np.concatenate([y, probs[confident].argmax(axis=1).astype(np.float32)])
        source = np.concatenate([source, np.full(int(confident.sum()), "pseudo", dtype=object)])
    return LabelledWindows(x, y, source.astype(str))
