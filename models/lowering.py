"""An inference graph for export: the network with BatchNorm folded and ReLU fused.

Both exporters (ONNX, TFLite) and the int8 calibration read this one list of ops,
so folding is written once. Each op's ``forward`` is the numpy reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.engine import (
    BatchNorm1D,
    Conv1D,
    Dense,
    Dropout,
    Flatten,
    GlobalAveragePool1D,
    ReLU,
    softmax,
)
from models.errors import ConfigError
from models.model import Model

__all__ = ["ConvOp", "DenseOp", "HeadOp", "InferenceOp", "PoolOp", "lower", "run_ops"]

F32 = np.float32


@dataclass
class ConvOp:
    """Conv1D, bias and optional ReLU; weight (out, in, kernel); x (batch, in, time)."""

    name: str
    weight: np.ndarray
    bias: np.ndarray
    stride: int
    padding: tuple[int, int]
    dilation: int
    relu: bool = False

    def forward(self, x: np.ndarray) -> np.ndarray:
        left, right = self.padding
        xp = np.pad(x, ((0, 0), (0, 0), (left, right)))
        k = self.weight.shape[2]
        t_out = (xp.shape[2] - self.dilation * (k - 1) - 1) // self.stride + 1
        y = sum(
            np.matmul(self.weight[:, :, j], xp[:, :, j * self.dilation :: self.stride][:, :, :t_out])
            for j in range(k)
        )
        y = y + self.bias[None, :, None]
        return np.maximum(y, F32(0)) if self.relu else y


@dataclass
class PoolOp:
    """Global average over time: (batch, channels, time) -> (batch, channels)."""

    name: str

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x.mean(axis=2, dtype=F32)


@dataclass
class DenseOp:
    """x @ weight.T + bias, optional ReLU; weight (out, in)."""

    name: str
    weight: np.ndarray
    bias: np.ndarray
    relu: bool = False

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.weight.T + self.bias
        return np.maximum(y, F32(0)) if self.relu else y


@dataclass
class HeadOp:
    """The output head: ``softmax`` over classes, or ``value`` = the single output (batch,)."""

    name: str
    kind: str

    def forward(self, x: np.ndarray) -> np.ndarray:
        return softmax(x) if self.kind == "softmax" else x[:, 0]


InferenceOp = ConvOp | PoolOp | DenseOp | HeadOp


def lower(model: Model) -> list[InferenceOp]:
    """The model as inference ops: BN folded into its convolution, ReLU fused, dropout gone.

    A regression head's scale and offset are folded into the last dense layer, so
    every exported model outputs final values (BPM, probabilities).
    """
    ops: list[InferenceOp] = []
    for name, layer in model.network.layers:
        p = {k: v.value.astype(F32).copy() for k, v in layer.params.items()}
        if isinstance(layer, Conv1D):
            ops.append(ConvOp(name, p["weight"], p["bias"], layer.stride, layer.padding, layer.dilation))
        elif isinstance(layer, BatchNorm1D):
            if not ops or not isinstance(ops[-1], ConvOp) or ops[-1].relu:
                raise ConfigError(f"export needs BatchNorm1D {name!r} right after a Conv1D.")
            scale, shift = layer.scale_shift()
            conv = ops[-1]
            conv.weight = (conv.weight * scale[:, None, None]).astype(F32)
            conv.bias = (conv.bias * scale + shift).astype(F32)
        elif isinstance(layer, ReLU):
            if not ops or not isinstance(ops[-1], ConvOp | DenseOp) or ops[-1].relu:
                raise ConfigError(f"export needs ReLU {name!r} right after a Conv1D or Dense layer.")
            ops[-1].relu = True
        elif isinstance(layer, GlobalAveragePool1D):
            ops.append(PoolOp(name))
        elif isinstance(layer, Dense):
            ops.append(DenseOp(name, p["weight"], p["bias"]))
        elif isinstance(layer, Dropout | Flatten):
            if isinstance(layer, Flatten) and ops and isinstance(ops[-1], ConvOp):
                raise ConfigError("export does not support Flatten after a convolution; pool first.")
        else:
            raise ConfigError(f"export does not support layer {name!r} ({type(layer).__name__}).")
    if not ops or not isinstance(ops[-1], DenseOp) or ops[-1].relu:
        raise ConfigError("export needs the network to end in a Dense layer without activation.")
    head = model.spec.head
    if head["type"] == "affine":
        last = ops[-1]
        if last.weight.shape[0] != 1:
            raise ConfigError("a value head needs a single output.")
        last.weight = (last.weight * F32(head["scale"])).astype(F32)
        last.bias = (last.bias * F32(head["scale"]) + F32(head["offset"])).astype(F32)
        ops.append(HeadOp("head", "value"))
    else:
        ops.append(HeadOp("head", "softmax"))
    return ops


def run_ops(ops: list[InferenceOp], x: np.ndarray) -> np.ndarray:
    """Run the lowered ops in numpy: the reference the exporters are checked against."""
    for op in ops:
        x = op.forward(x)
    return x
