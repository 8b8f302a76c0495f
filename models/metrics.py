"""Evaluation metrics of the two tasks, as plain functions over arrays.

Activity: ``accuracy`` and ``macro_f1``; heart rate: ``mae_bpm`` and ``rmse_bpm``.
The hub, the edges and ``wearfl evaluate`` all report these same keys.
"""

from __future__ import annotations

import numpy as np

from models.spec import ModelSpec

__all__ = ["classification_metrics", "regression_metrics", "task_metrics"]


def classification_metrics(predicted: np.ndarray, actual: np.ndarray, classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (mean over classes that occur in ``actual`` or ``predicted``)."""
    predicted, actual = np.asarray(predicted, np.int64), np.asarray(actual, np.int64)
    if len(actual) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    confusion = np.bincount(actual * classes + predicted, minlength=classes * classes).reshape(classes, classes)
    tp = np.diag(confusion).astype(np.float64)
    support, claimed = confusion.sum(axis=1), confusion.sum(axis=0)
    present = (support + claimed) > 0
    f1 = np.where(present, 2 * tp / np.maximum(support + claimed, 1), 0.0)
    return {"accuracy": float(tp.sum() / len(actual)), "macro_f1": float(f1[present].mean())}


def regression_metrics(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Mean absolute and root-mean-square error in BPM."""
    err = np.asarray(predicted, np.float64) - np.asarray(actual, np.float64)
    if len(err) == 0:
        return {"mae_bpm": float("nan"), "rmse_bpm": float("nan")}
    return {"mae_bpm": float(np.abs(err).mean()), "rmse_bpm": float(np.sqrt((err**2).mean()))}


def task_metrics(spec: ModelSpec, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """The metrics of ``spec``'s task from model outputs (probabilities or BPM) and targets."""
    if spec.is_classifier:
        return classification_metrics(np.asarray(outputs).argmax(axis=1), targets, len(spec.classes))
    return regression_metrics(outputs, targets)
