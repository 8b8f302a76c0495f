"""Optimizers over :class:`Parameter` lists, and gradient-norm clipping.

An optimizer has ``step()`` and ``zero_grad()``; subclasses write only the update
rule. Bad hyper-parameters raise :class:`ConfigError` at construction. Ordered from
simplest to hardest.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from models.engine.layers import Parameter
from models.errors import ConfigError

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "clip_grad_norm"]

F32 = np.float32


def clip_grad_norm(params: Iterable[Parameter], max_norm: float) -> float:
    """Scale all gradients so their joint L2 norm is at most ``max_norm``.

    Returns the norm before clipping.
    """
    params = [p for p in params if p.trainable]
    norm = float(np.sqrt(sum(float(np.vdot(p.grad, p.grad)) for p in params)))
    if norm > max_norm > 0:
        scale = F32(max_norm / (norm + 1e-12))
        for p in params:
            p.grad *= scale
    return norm


class Optimizer:
    """Base optimizer: holds the trainable parameters and the learning rate.

    The parameters are packed: their values live in one flat float32 buffer
    (``values``) and their gradients in another (``grads``), and each Parameter's
    ``value`` and ``grad`` become views into them (same numbers, same shapes). An
    update is then a handful of whole-buffer numpy operations instead of a handful per
    parameter, which matters at small batches where numpy's cost per call dominates.
    Code that gives a parameter a new array gets it packed again at the next step.
    """

    def __init__(self, params: Iterable[Parameter], lr: float) -> None:
        if not lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {lr}.")
        self.params = list(dict.fromkeys(p for p in params if p.trainable))
        self.lr = F32(lr)
        self._pack()
        self._scratch = np.empty_like(self.values)

    def _pack(self) -> None:
        """Copy every parameter's value and grad into the flat buffers and rebind them as views."""
        total = sum(p.value.size for p in self.params)
        if getattr(self, "values", None) is not None and self.values.size != total:
            raise ConfigError("a parameter changed its size during training; make a new optimizer.")
        self.values, self.grads = np.empty(total, F32), np.empty(total, F32)
        self._views: list[tuple[np.ndarray, np.ndarray]] = []
        start = 0
        for p in self.params:
            stop = start + p.value.size
            value = self.values[start:stop].reshape(p.value.shape)
            grad = self.grads[start:stop].reshape(p.value.shape)
            value[...], grad[...] = p.value, p.grad
            p.value, p.grad = value, grad
            self._views.append((value, grad))
            start = stop

    def _ensure_packed(self) -> None:
        for p, (value, grad) in zip(self.params, self._views, strict=True):
            if p.value is not value or p.grad is not grad:
                self._pack()
                return

    def flat(self, arrays: Iterable[np.ndarray]) -> np.ndarray:
        """One array per parameter (in ``params`` order) as one flat float32 array aligned with ``values``."""
        return np.concatenate([np.asarray(a, dtype=F32).ravel() for a in arrays]) if self.params else self.values

    def zero_grad(self) -> None:
        self._ensure_packed()
        self.grads.fill(0)

    def clip_grad_norm(self, max_norm: float) -> float:
        """:func:`clip_grad_norm` of this optimizer's parameters, on the flat buffer."""
        self._ensure_packed()
        norm = float(np.sqrt(np.dot(self.grads, self.grads)))
        if norm > max_norm > 0:
            self.grads *= F32(max_norm / (norm + 1e-12))
        return norm

    def step(self) -> None:
        self._ensure_packed()
        self.update(self.values, self.grads)

    def update(self, values: np.ndarray, grads: np.ndarray) -> None:
        """Change the flat ``values`` in place from the flat ``grads``."""
        raise NotImplementedError


class SGD(Optimizer):
    """SGD with optional (Nesterov) momentum and L2 weight decay."""

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        super().__init__(params, lr)
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {momentum}.")
        if weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}.")
        self.momentum, self.weight_decay, self.nesterov = F32(momentum), F32(weight_decay), nesterov
        self.velocity = np.zeros_like(self.values)

    def update(self, values: np.ndarray, grads: np.ndarray) -> None:
        g = grads + self.weight_decay * values if self.weight_decay else grads
        if self.momentum:
            v = self.velocity
            v *= self.momentum
            v += g
            g = g + self.momentum * v if self.nesterov else v
        np.multiply(g, self.lr, out=self._scratch)
        values -= self._scratch


class Adam(Optimizer):
    """Adam (Kingma and Ba 2015); ``weight_decay`` adds L2 to the gradient."""

    decoupled = False

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr)
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"betas must be in [0, 1), got {betas}.")
        if eps <= 0 or weight_decay < 0:
            raise ConfigError("eps must be > 0 and weight_decay >= 0.")
        self.b1, self.b2 = F32(betas[0]), F32(betas[1])
        self.eps, self.weight_decay = F32(eps), F32(weight_decay)
        self.m = np.zeros_like(self.values)
        self.v = np.zeros_like(self.values)
        self.t = 0

    def update(self, values: np.ndarray, grads: np.ndarray) -> None:
        self.t += 1
        g, tmp = grads, self._scratch
        if self.weight_decay:
            if self.decoupled:
                values *= F32(1.0) - self.lr * self.weight_decay
            else:
                g = g + self.weight_decay * values
        # m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2, in place
        self.m *= self.b1
        np.multiply(g, F32(1.0) - self.b1, out=tmp)
        self.m += tmp
        self.v *= self.b2
        np.multiply(g, g, out=tmp)
        tmp *= F32(1.0) - self.b2
        self.v += tmp
        # values -= lr_t * m / (sqrt(v) + eps), lr_t folding in both bias corrections
        lr_t = self.lr * F32(np.sqrt(1.0 - float(self.b2) ** self.t) / (1.0 - float(self.b1) ** self.t))
        np.sqrt(self.v, out=tmp)
        tmp += self.eps
        np.divide(self.m, tmp, out=tmp)
        tmp *= lr_t
        values -= tmp


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov and Hutter 2019)."""

    decoupled = True

    def __init__(self, params: Iterable[Parameter], lr: float = 1e-3, weight_decay: float = 0.01, **kw: float) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, **kw)
