"""What a model is: task, input spec, class names, architecture and output head.

A :class:`ModelSpec` is plain data; it is stored as JSON inside a model package and
is all that is needed to rebuild the network, export it, or check an input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from models.errors import ConfigError, ModelFormatError

__all__ = [
    "ACTIVITY_CLASSES",
    "TASKS",
    "ModelSpec",
    "activity_spec",
    "default_spec",
    "heart_rate_spec",
]

TASKS = ("activity", "heart-rate")
ACTIVITY_CLASSES = ("walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "laying")
ACTIVITY_CHANNELS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")
HEART_RATE_CHANNELS = ("ppg", "acc_x", "acc_y", "acc_z")


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a model except its weights.

    ``head`` is ``{"type": "softmax"}`` for class probabilities or
    ``{"type": "affine", "scale": s, "offset": o}`` for a value (BPM = s * y + o).
    ``preprocessing`` is how a gateway turns raw samples into the model's windows:
    ``{"bandpass": {channel: [low_hz, high_hz]}, "normalization": {channel or sensor: mode}}``
    (modes ``none``, ``center``, ``zscore``), so training and inference always agree.
    """

    task: str
    channels: tuple[str, ...]
    window: int
    sampling_rate_hz: float
    classes: tuple[str, ...]
    architecture: tuple[dict[str, Any], ...] = field(compare=True)
    head: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int]:
        """One window's shape: (channels, time)."""
        return (len(self.channels), self.window)

    @property
    def is_classifier(self) -> bool:
        return self.head.get("type") == "softmax"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            d = json.loads(text)
            spec = cls(
                task=str(d["task"]),
                channels=tuple(str(c) for c in d["channels"]),
                window=int(d["window"]),
                sampling_rate_hz=float(d["sampling_rate_hz"]),
                classes=tuple(str(c) for c in d["classes"]),
                architecture=tuple(dict(layer) for layer in d["architecture"]),
                head=dict(d["head"]),
                preprocessing=dict(d.get("preprocessing", {})),
            )
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise ModelFormatError(f"the model spec in the package is malformed ({exc}).") from None
        spec.validate()
        return spec

    def validate(self) -> None:
        """Raise :class:`ConfigError` when the spec cannot describe a working model."""
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; use one of {', '.join(TASKS)}.")
        if not self.channels or len(set(self.channels)) != len(self.channels):
            raise ConfigError(f"channels must be unique and non-empty, got {list(self.channels)}.")
        if self.window < 8:
            raise ConfigError(f"window must be at least 8 samples, got {self.window}.")
        if not (math.isfinite(self.sampling_rate_hz) and self.sampling_rate_hz > 0):
            raise ConfigError(f"sampling_rate_hz must be > 0, got {self.sampling_rate_hz}.")
        if self.head.get("type") == "softmax":
            if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
                raise ConfigError(f"a classifier needs at least two unique class names, got {list(self.classes)}.")
        elif self.head.get("type") != "affine":
            raise ConfigError(f"unknown output head {self.head!r}.")
        for key in ("bandpass", "normalization"):
            if not isinstance(self.preprocessing.get(key, {}), dict):
                raise ConfigError(f"preprocessing[{key!r}] must be a table, got {self.preprocessing[key]!r}.")
        for layer in self.architecture:
            for key in ("in_channels", "out_channels", "kernel_size", "stride", "channels", "in_features",
                        "out_features", "dilation"):
                value = layer.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    raise ConfigError(f"layer {layer.get('name')!r}: {key} must be a positive integer, got {value!r}.")
        for channel, band in self.preprocessing.get("bandpass", {}).items():
            if channel not in self.channels or len(band) != 2:
                raise ConfigError(f"band-pass for {channel!r} needs an input channel and [low_hz, high_hz].")
        for key, mode in self.preprocessing.get("normalization", {}).items():
            if mode not in ("none", "center", "zscore"):
                raise ConfigError(f"normalization {mode!r} for {key!r} is not one of none, center, zscore.")


def declared_parameters(spec: ModelSpec) -> int:
    """How many numbers the spec's layers hold (weights, biases, BatchNorm statistics), without building them."""
    total = 0
    for layer in spec.architecture:
        kind = layer.get("type")
        if kind == "conv1d":
            total += layer["out_channels"] * (layer["in_channels"] * layer["kernel_size"] + 1)
        elif kind == "dense":
            total += layer["out_features"] * (layer["in_features"] + 1)
        elif kind == "batchnorm1d":
            total += 4 * layer["channels"]
    return int(total)


def _same_padding(length: int, kernel: int, stride: int) -> tuple[tuple[int, int], int]:
    """TensorFlow's SAME padding (left, right) and output length, so export needs no PAD op."""
    out = -(-length // stride)
    total = max((out - 1) * stride + kernel - length, 0)
    return (total // 2, total - total // 2), out


def _conv_stack(
    in_channels: int, length: int, blocks: Sequence[tuple[int, int, int]]
) -> tuple[list[dict[str, Any]], int]:
    """Conv1D + BatchNorm1D + ReLU blocks, each (out_channels, kernel, stride)."""
    layers: list[dict[str, Any]] = []
    for i, (out, kernel, stride) in enumerate(blocks, start=1):
        padding, length = _same_padding(length, kernel, stride)
        layers += [
            {"type": "conv1d", "name": f"conv{i}", "in_channels": in_channels, "out_channels": out,
             "kernel_size": kernel, "stride": stride, "padding": list(padding)},
            {"type": "batchnorm1d", "name": f"bn{i}", "channels": out},
            {"type": "relu", "name": f"relu{i}"},
        ]
        in_channels = out
    layers.append({"type": "global_avg_pool1d", "name": "pool"})
    return layers, in_channels


def activity_spec(
    channels: Sequence[str] = ACTIVITY_CHANNELS,
    window: int = 128,
    sampling_rate_hz: float = 50.0,
    classes: Sequence[str] = ACTIVITY_CLASSES,
) -> ModelSpec:
    """A small 1-D CNN (about 11k parameters) from motion channels to class probabilities."""
    layers, width = _conv_stack(len(channels), window, [(16, 5, 1), (32, 5, 2), (48, 5, 2)])
    layers += [
        {"type": "dropout", "name": "dropout", "rate": 0.2},
        {"type": "dense", "name": "fc", "in_features": width, "out_features": len(classes)},
    ]
    spec = ModelSpec("activity", tuple(channels), int(window), float(sampling_rate_hz), tuple(classes),
                     tuple(layers), {"type": "softmax"}, {"bandpass": {}, "normalization": {}})
    spec.validate()
    return spec


def heart_rate_spec(
    channels: Sequence[str] = HEART_RATE_CHANNELS,
    window: int = 256,
    sampling_rate_hz: float = 32.0,
) -> ModelSpec:
    """A 1-D CNN (about 18k parameters) from PPG and acceleration to BPM.

    The accelerometer channels enter the first convolution with the PPG, so the
    network can learn to discount motion artifacts at the cadence frequency.
    """
    layers, width = _conv_stack(len(channels), window, [(16, 7, 2), (32, 5, 2), (32, 5, 2), (48, 5, 2)])
    layers += [
        {"type": "dense", "name": "fc1", "in_features": width, "out_features": 32},
        {"type": "relu", "name": "relu_fc1"},
        {"type": "dense", "name": "fc2", "in_features": 32, "out_features": 1},
    ]
    spec = ModelSpec("heart-rate", tuple(channels), int(window), float(sampling_rate_hz), (),
                     tuple(layers), {"type": "affine", "scale": 30.0, "offset": 90.0},
                     {"bandpass": {"ppg": [0.5, 4.0]}, "normalization": {"ppg": "zscore", "acc": "center"}})
    spec.validate()
    return spec


def default_spec(
    task: str,
    channels: Sequence[str] | None = None,
    window: int | None = None,
    classes: Sequence[str] | None = None,
    sampling_rate_hz: float | None = None,
) -> ModelSpec:
    """The default spec of ``task`` with the given input overrides."""
    kw: dict[str, Any] = {}
    if channels is not None:
        kw["channels"] = tuple(channels)
    if window is not None:
        kw["window"] = int(window)
    if sampling_rate_hz is not None:
        kw["sampling_rate_hz"] = float(sampling_rate_hz)
    if task == "activity":
        if classes is not None:
            kw["classes"] = tuple(classes)
        return activity_spec(**kw)
    if task == "heart-rate":
        if classes:
            raise ConfigError("the heart-rate task predicts BPM and takes no class names.")
        return heart_rate_spec(**kw)
    raise ConfigError(f"unknown task {task!r}; use one of {', '.join(TASKS)}.")
