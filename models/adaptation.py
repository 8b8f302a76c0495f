"""Unsupervised adaptation: what a gateway can learn about its own wearer (or device) without a single label.

A global model's BatchNorm layers normalize every feature with statistics averaged over the federation's
wearers. Another wearer, or another device, shifts those features; re-estimating the statistics on the
gateway's own recent windows puts its features back where the rest of the network expects them
(Li et al. 2016, "AdaBN"). :func:`adapt_statistics` does it layer by layer (each layer sees the layers before it
already adapted) and blends the wearer's statistics with the global ones as if the global ones were
``prior_windows`` windows, so that a handful of windows moves them little. Nothing is learnt from labels, and
the adapted statistics stay on the gateway: the federated update is computed against the global model's.
"""

from __future__ import annotations

import numpy as np

from models.engine import BatchNorm1D
from models.model import Model, check_input

__all__ = ["PRIOR_WINDOWS", "adapt_statistics", "mean_entropy", "prediction_entropy"]

F32 = np.float32
PRIOR_WINDOWS = 32
"""How many windows' worth of weight the global statistics keep against the wearer's."""
PASS_WINDOWS = 256


def _copy(model: Model) -> Model:
    local = Model(model.spec, version=model.version)
    local.network.load_state_dict(model.network.state_dict())
    return local


def adapt_statistics(model: Model, x: np.ndarray, prior_windows: int = PRIOR_WINDOWS) -> Model:
    """A copy of ``model`` whose BatchNorm statistics are re-estimated on the unlabelled windows ``x``."""
    x = check_input(x, model.spec, "windows to adapt on")
    local = _copy(model)
    w = len(x) / (len(x) + max(0, prior_windows))
    hidden = x
    for _, layer in local.network.layers:
        if isinstance(layer, BatchNorm1D):
            mean = hidden.mean(axis=(0, 2), dtype=np.float64)
            var = hidden.var(axis=(0, 2), dtype=np.float64)
            stats = layer.params
            old_mean = stats["running_mean"].value.astype(np.float64)
            old_var = stats["running_var"].value.astype(np.float64)
            # the variance of the mixture of the two populations, not only the mean of their variances
            stats["running_mean"].value[...] = (w * mean + (1 - w) * old_mean).astype(F32)
            stats["running_var"].value[...] = (w * var + (1 - w) * old_var
                                               + w * (1 - w) * (mean - old_mean) ** 2).astype(F32)
        hidden = np.concatenate([layer.forward(hidden[i:i + PASS_WINDOWS], training=False)
                                 for i in range(0, len(hidden), PASS_WINDOWS)])
    return local


def mean_entropy(model: Model, x: np.ndarray) -> float:
    """The mean entropy (nats) of a classifier's predictions on ``x``: how unsure it is, label-free."""
    return prediction_entropy(model.predict(x))


def prediction_entropy(probabilities: np.ndarray) -> float:
    """The mean entropy (nats) of rows of class probabilities (a classifier's predictions)."""
    p = np.clip(probabilities.astype(np.float64), 1e-12, 1.0)
    return float(-(p * np.log(p)).sum(axis=1).mean())
