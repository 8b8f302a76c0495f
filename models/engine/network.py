"""A sequential network built from a list of layer configs.

The list of plain dicts is the architecture as it is stored in a model package and
read by the exporters, so one description drives training, saving and export.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from models.engine.layers import (
    BatchNorm1D,
    Conv1D,
    Dense,
    Dropout,
    Flatten,
    GlobalAveragePool1D,
    Layer,
    Parameter,
    ReLU,
)
from models.errors import ConfigError, ModelFormatError

__all__ = ["Network", "build_layer"]


def build_layer(cfg: Mapping[str, Any], rng: np.random.Generator) -> Layer:
    """Make one layer from its config dict (``{"type": ..., "name": ..., ...}``)."""
    kind = cfg.get("type")
    try:
        if kind == "conv1d":
            return Conv1D(
                int(cfg["in_channels"]), int(cfg["out_channels"]), int(cfg["kernel_size"]), rng,
                stride=int(cfg.get("stride", 1)),
                padding=tuple(int(p) for p in cfg.get("padding", (0, 0))),
                dilation=int(cfg.get("dilation", 1)),
            )
        if kind == "batchnorm1d":
            return BatchNorm1D(int(cfg["channels"]), float(cfg.get("momentum", 0.1)), float(cfg.get("eps", 1e-5)))
        if kind == "dense":
            return Dense(int(cfg["in_features"]), int(cfg["out_features"]), rng)
        if kind == "dropout":
            return Dropout(float(cfg["rate"]), seed=int(rng.integers(2**31)))
        if kind == "relu":
            return ReLU()
        if kind == "flatten":
            return Flatten()
        if kind == "global_avg_pool1d":
            return GlobalAveragePool1D()
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"layer config {dict(cfg)} is incomplete or malformed: {exc}.") from exc
    raise ConfigError(f"unknown layer type {kind!r} in {dict(cfg)}.")


class Network:
    """Layers applied in order; x (batch, ...) -> (batch, outputs).

    Parameters are named ``<layer name>.<parameter>``, e.g. ``conv1.weight``.
    """

    def __init__(self, architecture: Sequence[Mapping[str, Any]], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        names = [str(cfg.get("name", "")) for cfg in architecture]
        if len(set(names)) != len(names) or "" in names:
            raise ConfigError("every layer needs a unique, non-empty name.")
        self.architecture = [dict(cfg) for cfg in architecture]
        self.layers: list[tuple[str, Layer]] = [
            (n, build_layer(c, rng)) for n, c in zip(names, architecture, strict=True)
        ]

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        for _, layer in self.layers:
            x = layer.forward(x, training)
        return x

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        """Fill every parameter's gradient from ``dout``, the loss gradient of the output; returns ``dx``.

        ``need_dx=False`` (training: nobody needs the input's gradient) lets the first
        layer skip it, for a first convolution a third of its work; None is returned.
        """
        last = len(self.layers) - 1
        for i, (_, layer) in enumerate(reversed(self.layers)):
            dout = layer.backward(dout, need_dx=need_dx or i < last)
        return dout

    def release(self) -> None:
        """Drop what every layer keeps for backward, buffers included (call when training is over)."""
        for _, layer in self.layers:
            layer.release()

    def parameters(self) -> dict[str, Parameter]:
        return {f"{ln}.{pn}": p for ln, layer in self.layers for pn, p in layer.params.items()}

    def trainable(self) -> list[Parameter]:
        return [p for p in self.parameters().values() if p.trainable]

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.value.size for p in self.parameters().values() if p.trainable or not trainable_only)

    def zero_grad(self) -> None:
        for p in self.parameters().values():
            p.grad.fill(0)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter and buffer, by name."""
        return {name: p.value.copy() for name, p in self.parameters().items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Set every parameter from ``state``; names and shapes must match exactly."""
        params = self.parameters()
        missing, extra = set(params) - set(state), set(state) - set(params)
        if missing or extra:
            raise ModelFormatError(
                f"weights do not match the architecture (missing: {sorted(missing)}, "
                f"unexpected: {sorted(extra)}); was the package written for another model?"
            )
        for name, p in params.items():
            value = np.asarray(state[name])
            if value.shape != p.value.shape:
                raise ModelFormatError(
                    f"weight {name!r} has shape {value.shape}, the architecture needs {p.value.shape}."
                )
            p.value[...] = value
