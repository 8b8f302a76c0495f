"""Losses: each returns ``(loss, dloss/dprediction)`` for a batch mean.

Ordered from simplest to hardest.
"""

from __future__ import annotations

import numpy as np

from models.errors import ConfigError

__all__ = ["MSE", "Huber", "Loss", "SoftmaxCrossEntropy", "softmax"]

F32 = np.float32


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits (batch, classes), numerically stable."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Loss:
    """A loss maps (prediction, target) to a scalar and its gradient."""

    def __call__(self, pred: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
        raise NotImplementedError


class MSE(Loss):
    """Mean squared error; pred and target (batch, outputs)."""

    def __call__(self, pred: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
        diff = pred - target.reshape(pred.shape).astype(F32)
        return float(np.mean(diff * diff)), (F32(2.0 / diff.size) * diff).astype(F32)


class Huber(Loss):
    """Huber loss with threshold ``delta``: quadratic near 0, linear beyond."""

    def __init__(self, delta: float = 1.0) -> None:
        if delta <= 0:
            raise ConfigError(f"Huber delta must be > 0, got {delta}.")
        self.delta = F32(delta)

    def __call__(self, pred: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
        diff = pred - target.reshape(pred.shape).astype(F32)
        absd = np.abs(diff)
        loss = np.where(absd <= self.delta, F32(0.5) * diff * diff, self.delta * (absd - F32(0.5) * self.delta))
        grad = np.clip(diff, -self.delta, self.delta) / F32(diff.size)  # diff inside the band, +-delta beyond
        return float(loss.mean()), grad.astype(F32)


class SoftmaxCrossEntropy(Loss):
    """Cross-entropy of softmax(logits) against integer labels.

    logits: (batch, classes); target: (batch,) ints. With ``class_weights`` the
    loss is the weighted mean sum(w_y * nll) / sum(w_y), as in PyTorch.
    """

    def __init__(self, class_weights: np.ndarray | None = None) -> None:
        if class_weights is not None:
            class_weights = np.asarray(class_weights, dtype=F32)
            if class_weights.ndim != 1 or np.any(class_weights < 0) or not np.all(np.isfinite(class_weights)):
                raise ConfigError("class_weights must be a 1-D array of finite values >= 0.")
        self.class_weights = class_weights

    def __call__(self, pred: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
        labels = np.asarray(target).astype(np.int64).reshape(-1)
        n, k = pred.shape
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= k:
            raise ConfigError(f"labels must lie in [0, {k}), got [{labels.min()}, {labels.max()}].")
        z = pred - pred.max(axis=1, keepdims=True)
        e = np.exp(z)
        sums = e.sum(axis=1)
        rows = np.arange(n)
        nll = np.log(sums) - z[rows, labels]
        w = np.ones(n, F32) if self.class_weights is None else self.class_weights[labels]
        total = F32(max(w.sum(), np.finfo(F32).tiny))
        grad = e / sums[:, None]  # softmax(pred)
        grad[rows, labels] -= F32(1.0)
        grad *= (w / total)[:, None]
        return float((w * nll).sum() / total), grad.astype(F32)
