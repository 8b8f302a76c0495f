"""Layers of the numpy training engine.

A layer is a small class: ``forward(x, training)`` keeps what ``backward`` needs,
``backward(dout)`` fills the gradients of its parameters and returns ``dx``. Each
derivative sits beside its forward. Everything is float32; no per-sample loops.
Layers are ordered from simplest to hardest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.errors import ConfigError

__all__ = [
    "BatchNorm1D",
    "Conv1D",
    "Dense",
    "Dropout",
    "Flatten",
    "GlobalAveragePool1D",
    "Layer",
    "Parameter",
    "ReLU",
]

F32 = np.float32


@dataclass(eq=False)
class Parameter:
    """A named float32 array with its gradient.

    ``trainable=False`` marks state that is learned without gradients (running
    statistics); optimizers skip it but it travels with the weights.
    """

    value: np.ndarray
    trainable: bool = True
    grad: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.value = np.ascontiguousarray(self.value, dtype=F32)
        self.grad = np.zeros_like(self.value)


class Layer:
    """Base layer: no parameters, identity shapes."""

    params: dict[str, Parameter]

    def __init__(self) -> None:
        self.params = {}

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dout: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one sample's output for one sample's input shape (no batch)."""
        return shape


class ReLU(Layer):
    """max(x, 0), any shape."""

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._mask = x > 0
        return x * self._mask

    def backward(self, dout: np.ndarray) -> np.ndarray:
        return dout * self._mask


class Flatten(Layer):
    """(batch, ...) -> (batch, features)."""

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        return dout.reshape(self._shape)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (int(np.prod(shape)),)


class Dropout(Layer):
    """Inverted dropout with rate ``rate``; identity outside training.

    It draws from its own seeded generator so that training is reproducible.
    """

    def __init__(self, rate: float, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"Dropout rate must be in [0, 1), got {rate}.")
        self.rate = rate
        self.rng = np.random.default_rng(seed)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        if not training or self.rate == 0.0:
            self._mask = None
            return x
        keep = F32(1.0 - self.rate)
        self._mask = (self.rng.random(x.shape, dtype=F32) < keep) / keep
        return x * self._mask

    def backward(self, dout: np.ndarray) -> np.ndarray:
        return dout if self._mask is None else dout * self._mask


class GlobalAveragePool1D(Layer):
    """Mean over time: x (batch, channels, time) -> (batch, channels)."""

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._shape = x.shape
        return x.mean(axis=2, dtype=F32)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        n, c, t = self._shape
        return np.broadcast_to((dout / F32(t))[:, :, None], (n, c, t)).copy()

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[:1]


class Dense(Layer):
    """y = x @ W.T + b; x (batch, in_features) -> (batch, out_features).

    ``weight`` is (out_features, in_features), the ONNX Gemm/TFLite layout.
    """

    def __init__(self, in_features: int, out_features: int, rng: np.random.Generator) -> None:
        super().__init__()
        bound = np.sqrt(6.0 / in_features)  # He uniform
        self.params = {
            "weight": Parameter(rng.uniform(-bound, bound, (out_features, in_features))),
            "bias": Parameter(np.zeros(out_features)),
        }

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._x = x
        return x @ self.params["weight"].value.T + self.params["bias"].value

    def backward(self, dout: np.ndarray) -> np.ndarray:
        self.params["weight"].grad += dout.T @ self._x
        self.params["bias"].grad += dout.sum(axis=0)
        return dout @ self.params["weight"].value

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.params["weight"].value.shape[0],)


class BatchNorm1D(Layer):
    """Batch normalization over (batch, time) per channel; x (batch, channels, time).

    Training uses batch statistics and updates running ones; inference is a
    per-channel affine map, which export folds into the preceding convolution.
    """

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ConfigError(f"BatchNorm1D momentum must be in (0, 1], got {momentum}.")
        self.momentum = F32(momentum)
        self.eps = F32(eps)
        self.frozen = False  # True: training uses (and keeps) the running statistics
        self.params = {
            "gamma": Parameter(np.ones(channels)),
            "beta": Parameter(np.zeros(channels)),
            "running_mean": Parameter(np.zeros(channels), trainable=False),
            "running_var": Parameter(np.ones(channels), trainable=False),
        }

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """The inference-time affine map: y = x * scale + shift, per channel."""
        p = self.params
        scale = p["gamma"].value / np.sqrt(p["running_var"].value + self.eps)
        return scale.astype(F32), (p["beta"].value - p["running_mean"].value * scale).astype(F32)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        p = self.params
        if not training or self.frozen:
            scale, shift = self.scale_shift()
            if training:
                self._frozen_x, self._frozen_scale = x, scale
            return x * scale[None, :, None] + shift[None, :, None]
        self._frozen_x = None
        n, c, t = x.shape
        # Statistics over a (channels, batch*time) view: Conv1D hands over channel-major
        # memory, so this reshape is free and every reduction runs over contiguous rows.
        xc = x.transpose(1, 0, 2).reshape(c, n * t)
        mean = xc.mean(axis=1, dtype=F32)
        centered = xc - mean[:, None]
        var = np.einsum("ij,ij->i", centered, centered) / F32(n * t)
        inv_std = F32(1.0) / np.sqrt(var + self.eps)
        self._xhat = centered * inv_std[:, None]
        self._inv_std, self._shape = inv_std, (n, c, t)
        unbiased = var * F32(n * t / max(n * t - 1, 1))
        p["running_mean"].value += self.momentum * (mean - p["running_mean"].value)
        p["running_var"].value += self.momentum * (unbiased - p["running_var"].value)
        y = self._xhat * p["gamma"].value[:, None] + p["beta"].value[:, None]
        return y.reshape(c, n, t).transpose(1, 0, 2)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        p = self.params
        if self.frozen and self._frozen_x is not None:
            return self._backward_frozen(dout)
        n, c, t = self._shape
        d = dout.transpose(1, 0, 2).reshape(c, n * t)
        xhat = self._xhat
        dgamma = np.einsum("ij,ij->i", d, xhat)
        dbeta = d.sum(axis=1, dtype=F32)
        p["gamma"].grad += dgamma
        p["beta"].grad += dbeta
        # dx = gamma * inv_std * (d - mean(d) - xhat * mean(d * xhat)), per channel
        m = F32(n * t)
        k = (p["gamma"].value * self._inv_std)[:, None]
        dx = k * (d - (dbeta / m)[:, None] - xhat * (dgamma / m)[:, None])
        return dx.reshape(c, n, t).transpose(1, 0, 2)

    def _backward_frozen(self, dout: np.ndarray) -> np.ndarray:
        """Gradients of the fixed affine map y = gamma * (x - mean) / std + beta."""
        p = self.params
        inv_std = F32(1.0) / np.sqrt(p["running_var"].value + self.eps)
        xhat = (self._frozen_x - p["running_mean"].value[None, :, None]) * inv_std[None, :, None]
        p["gamma"].grad += np.sum(dout * xhat, axis=(0, 2), dtype=F32)
        p["beta"].grad += np.sum(dout, axis=(0, 2), dtype=F32)
        return dout * self._frozen_scale[None, :, None]


class Conv1D(Layer):
    """1-D convolution: x (batch, in_channels, time) -> (batch, out_channels, time_out).

    ``weight`` is (out_channels, in_channels, kernel_size), the ONNX layout.
    ``padding`` is (left, right) zeros. Computed as shifted matmuls: one GEMM of all
    kernel taps against the padded input, whose shifted slices sum to the output,
    so there is no im2col copy and no per-window loop.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        rng: np.random.Generator,
        stride: int = 1,
        padding: tuple[int, int] = (0, 0),
        dilation: int = 1,
    ) -> None:
        super().__init__()
        if min(in_channels, out_channels, kernel_size, stride, dilation) < 1:
            raise ConfigError("Conv1D channels, kernel_size, stride and dilation must be >= 1.")
        if min(padding) < 0:
            raise ConfigError(f"Conv1D padding must be >= 0, got {padding}.")
        self.stride, self.dilation, self.padding = stride, dilation, tuple(padding)
        bound = np.sqrt(6.0 / (in_channels * kernel_size))  # He uniform
        self.params = {
            "weight": Parameter(rng.uniform(-bound, bound, (out_channels, in_channels, kernel_size))),
            "bias": Parameter(np.zeros(out_channels)),
        }

    def out_length(self, length: int) -> int:
        k = self.params["weight"].value.shape[2]
        span = self.dilation * (k - 1) + 1
        return (length + sum(self.padding) - span) // self.stride + 1

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.params["weight"].value.shape[0], self.out_length(shape[1]))

    def _phases(self) -> list[tuple[int, list[int], list[int]]]:
        """Kernel taps grouped by input phase: (phase, taps, offsets within the phase).

        Output t of tap j reads padded input t*stride + j*dilation, i.e. phase
        (j*dilation) % stride at offset t + (j*dilation) // stride; grouping taps by
        phase lets strided layers compute only the outputs they keep.
        """
        k = self.params["weight"].value.shape[2]
        groups: dict[int, tuple[list[int], list[int]]] = {}
        for j in range(k):
            phase, offset = divmod(j * self.dilation, self.stride)[::-1]
            taps, offsets = groups.setdefault(phase, ([], []))
            taps.append(j)
            offsets.append(offset)
        return [(p, taps, offsets) for p, (taps, offsets) in sorted(groups.items())]

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        w = self.params["weight"].value
        o, c, _ = w.shape
        n, _, t_in = x.shape
        t_out = self.out_length(t_in)
        if t_out < 1:
            raise ConfigError(f"Conv1D input of length {t_in} is shorter than its kernel.")
        left, right = self.padding
        # Channel-major padded copy (c, n, time): every tap of every window is then a
        # shifted slice of one GEMM's output (one GEMM per input phase when strided).
        xp = np.zeros((c, n, t_in + left + right), F32)
        xp[:, :, left : left + t_in] = x.transpose(1, 0, 2)
        y = np.zeros((o, n, t_out), F32)
        saved = []
        for phase, taps, offsets in self._phases():
            xs = xp if self.stride == 1 else np.ascontiguousarray(xp[:, :, phase :: self.stride])
            t_ph = xs.shape[2]
            w_taps = w[:, :, taps].transpose(2, 0, 1).reshape(len(taps) * o, c)
            z = (w_taps @ xs.reshape(c, n * t_ph)).reshape(len(taps), o, n, t_ph)
            for i, q in enumerate(offsets):
                y += z[i, :, :, q : q + t_out]
            saved.append(xs)
        y += self.params["bias"].value[:, None, None]
        self._saved, self._t_out, self._t_in, self._t_pad = saved, t_out, t_in, xp.shape[2]
        return y.transpose(1, 0, 2)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        w = self.params["weight"]
        o, c, _ = w.value.shape
        t_out = self._t_out
        d = dout.transpose(1, 0, 2)  # (o, n, t_out)
        n = d.shape[1]
        dxp = np.zeros((c, n, self._t_pad), F32)
        for (phase, taps, offsets), xs in zip(self._phases(), self._saved, strict=False):
            t_ph = xs.shape[2]
            dz = np.zeros((len(taps), o, n, t_ph), F32)
            for i, q in enumerate(offsets):
                dz[i, :, :, q : q + t_out] = d
            dz = dz.reshape(len(taps) * o, n * t_ph)
            dw = dz @ xs.reshape(c, n * t_ph).T  # (taps*o, c)
            w.grad[:, :, taps] += dw.reshape(len(taps), o, c).transpose(1, 2, 0)
            w_taps = w.value[:, :, taps].transpose(2, 0, 1).reshape(len(taps) * o, c)
            dxp[:, :, phase :: self.stride] += (w_taps.T @ dz).reshape(c, n, t_ph)
        self.params["bias"].grad += d.sum(axis=(1, 2))
        left = self.padding[0]
        return dxp[:, :, left : left + self._t_in].transpose(1, 0, 2)
