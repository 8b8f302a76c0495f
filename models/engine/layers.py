"""Layers of the numpy training engine.

A layer is a small class: ``forward(x, training)`` keeps what ``backward`` needs
(only when training), ``backward(dout)`` fills the gradients of its parameters and
returns ``dx``. Each derivative sits beside its forward. Everything is float32; no
per-sample loops. Layers are ordered from simplest to hardest.

Speed, in two choices:

- The arrays of a batch are (batch, channels, time) for the caller, but the
  convolution, batch-norm and activation layers hand each other *channel-major*
  memory (a (channels, batch, time) buffer seen through a transposed view). Then a
  convolution is one matrix product over all windows, and batch-norm's per-channel
  statistics run over contiguous rows, with no copy in between.
- While training, a layer keeps what backward needs (convolution columns, centered
  batch-norm inputs, activation masks) in buffers of its own, overwritten at every
  step instead of allocated anew. Big fresh arrays cost page faults at every step, above
  all on a gateway, whose malloc hands them back to the system at once. These arrays
  are alive between steps anyway, so reusing them costs no memory; ``release()`` drops
  them when training is over. What a layer returns (outputs, ``dx``) is always new.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar, NamedTuple

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


@lru_cache(maxsize=16)
def _ones(length: int) -> np.ndarray:
    """A read-only float32 vector of ones: a row sum as a matrix-vector product (BLAS beats ufunc reduce)."""
    ones = np.ones(length, F32)
    ones.flags.writeable = False
    return ones


def _row_sums(a: np.ndarray) -> np.ndarray:
    """Sum of each row of a 2-D float32 array."""
    return a @ _ones(a.shape[1])


def _row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot product of each row of ``a`` with the same row of ``b`` (2-D, same shape), as a batched matmul."""
    return (a[:, None, :] @ b[:, :, None]).reshape(a.shape[0])


def _layout(x: np.ndarray) -> tuple[int, ...]:
    """Strides in elements: equal for arrays of the same memory order, whatever their dtypes."""
    return tuple(s // x.itemsize for s in x.strides)


def _channel_rows(x: np.ndarray) -> np.ndarray:
    """(batch, channels, time) -> (channels, batch * time); free for channel-major memory, else a copy."""
    n, c, t = x.shape
    return x.transpose(1, 0, 2).reshape(c, n * t)


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
    kept: ClassVar[tuple[str, ...]] = ()
    """Attributes in which forward keeps what backward needs; ``release()`` drops them."""

    def __init__(self) -> None:
        self.params = {}
        self._buffers: dict[str, np.ndarray] = {}

    def _buffer(self, name: str, shape: tuple[int, ...], training: bool, dtype: type = F32) -> np.ndarray:
        """An uninitialized C-order array to keep for backward: in training this layer's own, reused every step."""
        if not training:
            return np.empty(shape, dtype)
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._buffers[name] = np.empty(shape, dtype)
        return buf

    def _buffer_like(self, name: str, x: np.ndarray, training: bool, dtype: type = F32) -> np.ndarray:
        """Like :meth:`_buffer`, with the shape and memory layout of ``x`` (channel-major stays channel-major)."""
        if not training:
            return np.empty_like(x, dtype)
        buf = self._buffers.get(name)
        if buf is None or buf.shape != x.shape or buf.dtype != dtype or _layout(buf) != _layout(x):
            buf = self._buffers[name] = np.empty_like(x, dtype)
        return buf

    def release(self) -> None:
        """Drop the training buffers and what the last forward kept: training is over, give the memory back."""
        self._buffers.clear()
        for name in self.kept:
            setattr(self, name, None)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        """Gradients of the parameters from ``dout``; returns ``dx``.

        ``need_dx=False`` says nobody uses ``dx`` (the network's first layer): a layer
        may then skip computing it and return None.
        """
        raise NotImplementedError

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one sample's output for one sample's input shape (no batch)."""
        return shape


class ReLU(Layer):
    """max(x, 0), any shape; the output keeps the input's memory layout."""

    kept = ("_mask",)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        mask = np.greater(x, 0, out=self._buffer_like("mask", x, training, bool))
        if training:
            self._mask = mask
        return np.multiply(x, mask, dtype=F32)

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray:
        return np.multiply(dout, self._mask, dtype=F32)


class Flatten(Layer):
    """(batch, ...) -> (batch, features)."""

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        if training:  # inference keeps nothing: a prediction may run while another thread differentiates
            self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray:
        return dout.reshape(self._shape)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (int(np.prod(shape)),)


class Dropout(Layer):
    """Inverted dropout with rate ``rate``; identity outside training.

    It draws from its own seeded generator so that training is reproducible.
    """

    kept = ("_mask",)

    def __init__(self, rate: float, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"Dropout rate must be in [0, 1), got {rate}.")
        self.rate = rate
        self.rng = np.random.default_rng(seed)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        if not training:
            return x
        if self.rate == 0.0:
            self._mask = None
            return x
        keep = F32(1.0 - self.rate)
        self._mask = (self.rng.random(x.shape, dtype=F32) < keep) / keep
        return x * self._mask

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray:
        return dout if self._mask is None else dout * self._mask


class GlobalAveragePool1D(Layer):
    """Mean over time: x (batch, channels, time) -> (batch, channels)."""

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        if training:
            self._shape = x.shape
        return x.mean(axis=2, dtype=F32)

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray:
        n, c, t = self._shape
        dx = np.empty((c, n, t), F32)  # channel-major, like the layers before it
        np.multiply(dout.T[:, :, None], F32(1.0 / t), out=dx)
        return dx.transpose(1, 0, 2)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[:1]


class Dense(Layer):
    """y = x @ W.T + b; x (batch, in_features) -> (batch, out_features).

    ``weight`` is (out_features, in_features), the ONNX Gemm/TFLite layout.
    """

    kept = ("_x",)

    def __init__(self, in_features: int, out_features: int, rng: np.random.Generator) -> None:
        super().__init__()
        bound = np.sqrt(6.0 / in_features)  # He uniform
        self.params = {
            "weight": Parameter(rng.uniform(-bound, bound, (out_features, in_features))),
            "bias": Parameter(np.zeros(out_features)),
        }

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        if training:
            self._x = x
        return x @ self.params["weight"].value.T + self.params["bias"].value

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        self.params["weight"].grad += dout.T @ self._x
        self.params["bias"].grad += dout.sum(axis=0)
        return dout @ self.params["weight"].value if need_dx else None

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.params["weight"].value.shape[0],)


class BatchNorm1D(Layer):
    """Batch normalization over (batch, time) per channel; x (batch, channels, time).

    Training uses batch statistics and updates running ones; inference is a
    per-channel affine map, which export folds into the preceding convolution.
    Statistics run over (channels, batch * time) rows: free views of the
    channel-major memory that Conv1D hands over, and the output is channel-major too.
    """

    kept = ("_centered", "_frozen_x")

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
        n, c, t = x.shape
        xc = _channel_rows(x)
        if not training or self.frozen:
            scale, shift = self.scale_shift()
            if training:
                self._frozen_x, self._frozen_scale = xc, scale
            y = xc * scale[:, None]
            y += shift[:, None]
            return y.reshape(c, n, t).transpose(1, 0, 2)
        self._frozen_x = None
        p = self.params
        m = n * t
        mean = _row_sums(xc) / F32(m)
        centered = np.subtract(xc, mean[:, None], out=self._buffer("centered", (c, m), True))
        var = _row_dots(centered, centered) / F32(m)
        inv_std = F32(1.0) / np.sqrt(var + self.eps)
        # backward needs xhat = centered * inv_std; keeping centered saves a pass over memory here
        self._centered, self._inv_std, self._shape = centered, inv_std, (n, c, t)
        unbiased = var * F32(m / max(m - 1, 1))
        p["running_mean"].value += self.momentum * (mean - p["running_mean"].value)
        p["running_var"].value += self.momentum * (unbiased - p["running_var"].value)
        y = centered * (p["gamma"].value * inv_std)[:, None]
        y += p["beta"].value[:, None]
        return y.reshape(c, n, t).transpose(1, 0, 2)

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray:
        if self.frozen and self._frozen_x is not None:
            return self._backward_frozen(dout)
        p = self.params
        n, c, t = self._shape
        d = _channel_rows(dout)
        centered, inv_std = self._centered, self._inv_std
        dgamma = _row_dots(d, centered) * inv_std  # sum(d * xhat) per channel
        dbeta = _row_sums(d)
        p["gamma"].grad += dgamma
        p["beta"].grad += dbeta
        # dx = gamma * inv_std * (d - mean(d) - xhat * mean(d * xhat)), per channel, in one buffer
        m = F32(n * t)
        dx = centered * (inv_std * dgamma / m)[:, None]
        dx += (dbeta / m)[:, None]
        np.subtract(d, dx, out=dx)
        dx *= (p["gamma"].value * inv_std)[:, None]
        return dx.reshape(c, n, t).transpose(1, 0, 2)

    def _backward_frozen(self, dout: np.ndarray) -> np.ndarray:
        """Gradients of the fixed affine map y = gamma * (x - mean) / std + beta."""
        p = self.params
        n, c, t = dout.shape
        d = _channel_rows(dout)
        inv_std = F32(1.0) / np.sqrt(p["running_var"].value + self.eps)
        xhat = (self._frozen_x - p["running_mean"].value[:, None]) * inv_std[:, None]
        p["gamma"].grad += _row_dots(d, xhat)
        p["beta"].grad += _row_sums(d)
        return (d * self._frozen_scale[:, None]).reshape(c, n, t).transpose(1, 0, 2)


class _Tap(NamedTuple):
    """Where one kernel tap reads: outputs ``lo:hi`` see inputs ``start, start + stride, ...``.

    ``phase``/``offset``: the same inputs as a contiguous run ``offset : offset + hi - lo``
    of the input's ``phase``-th stride phase (inputs ``phase, phase + stride, ...``).
    """

    lo: int
    hi: int
    start: int
    stop: int
    phase: int
    offset: int


class Conv1D(Layer):
    """1-D convolution: x (batch, in_channels, time) -> (batch, out_channels, time_out).

    ``weight`` is (out_channels, in_channels, kernel_size), the ONNX layout.
    ``padding`` is (left, right) zeros. Computed as im2col and one matrix product:
    the columns hold, for every (channel, tap), the input each output position reads
    (zeros where it reads padding), plus a row of ones that carries the bias. The
    backward pass reuses those columns for the weight gradient and scatters the
    columns' gradient back onto the input (col2im) for ``dx``.
    """

    kept = ("_cols",)

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
        self._plans: dict[int, tuple[_Tap, ...]] = {}

    def out_length(self, length: int) -> int:
        k = self.params["weight"].value.shape[2]
        span = self.dilation * (k - 1) + 1
        return (length + sum(self.padding) - span) // self.stride + 1

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.params["weight"].value.shape[0], self.out_length(shape[1]))

    def _taps(self, t_in: int) -> tuple[_Tap, ...]:
        """Each tap's valid output range and input run for inputs of length ``t_in`` (cached).

        Output t of tap j reads input t * stride + j * dilation - left; outside
        0 .. t_in - 1 that is padding, a zero.
        """
        plan = self._plans.get(t_in)
        if plan is None:
            s, t_out = self.stride, self.out_length(t_in)
            taps = []
            for j in range(self.params["weight"].value.shape[2]):
                shift = j * self.dilation - self.padding[0]
                lo = min(max(0, -(shift // s)), t_out)
                hi = max(min(t_out, (t_in - 1 - shift) // s + 1), lo)
                start = lo * s + shift
                taps.append(_Tap(lo, hi, start, start + s * (hi - lo - 1) + 1, start % s, start // s))
            plan = self._plans[t_in] = tuple(taps)
        return plan

    def _im2col(self, x: np.ndarray, t_out: int, training: bool) -> np.ndarray:
        """Columns (in_channels * kernel + 1, batch * t_out): row (c, j) is what tap j of channel c sees."""
        n, c, t_in = x.shape
        k, s = self.params["weight"].value.shape[2], self.stride
        cols = self._buffer("cols", (c * k + 1, n * t_out), training)
        cols[-1] = 1.0  # the bias row
        taps4 = cols[:-1].reshape(c, k, n, t_out)
        xc = x.transpose(1, 0, 2)  # (c, n, t_in): channel-major memory makes this a plain view
        for j, tap in enumerate(self._taps(t_in)):
            dst = taps4[:, j]
            if tap.lo > 0:
                dst[:, :, : tap.lo] = 0.0
            if tap.hi < t_out:
                dst[:, :, tap.hi :] = 0.0
            if tap.hi > tap.lo:
                dst[:, :, tap.lo : tap.hi] = xc[:, :, tap.start : tap.stop : s]
        return cols

    def _col2im(self, dcols: np.ndarray, n: int, t_in: int) -> np.ndarray:
        """Sum the columns' gradient (in_channels * kernel, batch * t_out) back onto the input: (c, n, t_in).

        Strided layers add into one buffer per stride phase (contiguous adds, which
        are fast) and interleave the phases once at the end.
        """
        k, s = self.params["weight"].value.shape[2], self.stride
        c = dcols.shape[0] // k
        t_out = dcols.shape[1] // n
        d4 = dcols.reshape(c, k, n, t_out)
        phases = np.zeros((s, c, n, -(-t_in // s)), F32)
        for j, tap in enumerate(self._taps(t_in)):
            if tap.hi > tap.lo:
                phases[tap.phase, :, :, tap.offset : tap.offset + tap.hi - tap.lo] += d4[:, j, :, tap.lo : tap.hi]
        if s == 1:
            return phases[0]
        dx = np.empty((c, n, t_in), F32)
        for phase in range(s):
            dx[:, :, phase::s] = phases[phase, :, :, : len(range(phase, t_in, s))]
        return dx

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        w, b = self.params["weight"].value, self.params["bias"].value
        o = w.shape[0]
        n, _, t_in = x.shape
        t_out = self.out_length(t_in)
        if t_out < 1:
            raise ConfigError(f"Conv1D input of length {t_in} is shorter than its kernel.")
        cols = self._im2col(x, t_out, training)
        wb = np.empty((o, cols.shape[0]), F32)
        wb[:, :-1] = w.reshape(o, -1)
        wb[:, -1] = b
        y = wb @ cols  # (o, n * t_out): channel-major output
        if training:
            self._cols, self._t_in = cols, t_in
        return y.reshape(o, n, t_out).transpose(1, 0, 2)

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        w = self.params["weight"]
        o = w.value.shape[0]
        n = dout.shape[0]
        d = _channel_rows(dout)  # (o, n * t_out)
        cols, self._cols = self._cols, None  # backward uses up the columns: their buffer takes dcols below
        dwb = d @ cols.T  # weight and bias gradients at once, thanks to the row of ones
        w.grad += dwb[:, :-1].reshape(w.value.shape)
        self.params["bias"].grad += dwb[:, -1]
        if not need_dx:
            return None
        dcols = np.matmul(w.value.reshape(o, -1).T, d, out=cols[:-1])
        return self._col2im(dcols, n, self._t_in).transpose(1, 0, 2)
