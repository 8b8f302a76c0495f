"""A model: its spec, its network and its version, with input checks and the output head."""

from __future__ import annotations

import numpy as np

from models.engine import Huber, Loss, Network, SoftmaxCrossEntropy, softmax
from models.errors import InputError
from models.spec import ModelSpec

__all__ = ["Model", "check_input"]

F32 = np.float32


def check_input(x: np.ndarray, spec: ModelSpec, where: str = "input") -> np.ndarray:
    """Return ``x`` as float32 (batch, channels, time), or raise a clear :class:`InputError`."""
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise InputError(f"{where} has dtype {x.dtype}; windows must be numbers.")
    if x.ndim == 2:
        x = x[None]
    expected = spec.input_shape
    if x.ndim != 3 or x.shape[1:] != expected:
        raise InputError(
            f"{where} has shape {x.shape}; the model needs (batch, {expected[0]}, {expected[1]}) "
            f"windows of channels {', '.join(spec.channels)}."
        )
    if x.shape[0] == 0:
        raise InputError(f"{where} holds no windows.")
    x = x.astype(F32, copy=False)
    # A float64 sum of float32 values cannot overflow, so it is finite exactly when every value is;
    # unlike isfinite(x) it needs no temporary the size of x (a replay buffer is megabytes).
    if np.isfinite(x.sum(dtype=np.float64)):
        return x
    bad = ~np.isfinite(x)
    if bad.any():
        first = np.argwhere(bad)[0]
        raise InputError(
            f"{where} holds {int(bad.sum())} NaN or infinite values (first at window {first[0]}, "
            f"channel {spec.channels[first[1]]}, sample {first[2]}); clean or drop those windows."
        )
    return x


class Model:
    """A network with the spec that describes it and a version number.

    ``predict`` gives class probabilities (batch, classes) for a classifier and
    values (batch,) such as BPM for a regressor.
    """

    def __init__(self, spec: ModelSpec, network: Network | None = None, version: int = 0, seed: int = 0) -> None:
        spec.validate()
        self.spec = spec
        self.network = network if network is not None else Network(spec.architecture, seed=seed)
        self.version = version

    def forward_raw(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """The network's raw output: logits, or the normalized value before the head."""
        return self.network.forward(x, training)

    def apply_head(self, raw: np.ndarray) -> np.ndarray:
        if self.spec.is_classifier:
            return softmax(raw)
        return raw[:, 0] * F32(self.spec.head["scale"]) + F32(self.spec.head["offset"])

    def predict(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        x = check_input(x, self.spec)
        out = [self.apply_head(self.forward_raw(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
        return np.concatenate(out).astype(F32)

    def encode_target(self, y: np.ndarray) -> np.ndarray:
        """Targets as the loss sees them: class indices, or values mapped through the inverse head."""
        if self.spec.is_classifier:
            return np.asarray(y).astype(np.int64)
        head = self.spec.head
        return ((np.asarray(y, dtype=F32) - F32(head["offset"])) / F32(head["scale"])).reshape(-1, 1)

    def default_loss(self, class_weights: np.ndarray | None = None) -> Loss:
        if self.spec.is_classifier:
            return SoftmaxCrossEntropy(class_weights)
        return Huber(delta=F32(5.0 / self.spec.head["scale"]))  # quadratic within 5 BPM

    def num_parameters(self) -> int:
        return self.network.num_parameters()
