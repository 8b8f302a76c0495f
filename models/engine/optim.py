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
    """Base optimizer: holds the trainable parameters and the learning rate."""

    def __init__(self, params: Iterable[Parameter], lr: float) -> None:
        if not lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {lr}.")
        self.params = [p for p in params if p.trainable]
        self.lr = F32(lr)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad.fill(0)

    def step(self) -> None:
        for i, p in enumerate(self.params):
            self.update(i, p)

    def update(self, i: int, p: Parameter) -> None:
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
        self.velocity = [np.zeros_like(p.value) for p in self.params]

    def update(self, i: int, p: Parameter) -> None:
        g = p.grad + self.weight_decay * p.value if self.weight_decay else p.grad
        if self.momentum:
            v = self.velocity[i]
            v *= self.momentum
            v += g
            g = g + self.momentum * v if self.nesterov else v
        p.value -= self.lr * g


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
        self.m = [np.zeros_like(p.value) for p in self.params]
        self.v = [np.zeros_like(p.value) for p in self.params]
        self.t = 0

    def step(self) -> None:
        self.t += 1
        super().step()

    def update(self, i: int, p: Parameter) -> None:
        g = p.grad
        if self.weight_decay:
            if self.decoupled:
                p.value *= F32(1.0) - self.lr * self.weight_decay
            else:
                g = g + self.weight_decay * p.value
        m, v = self.m[i], self.v[i]
        m *= self.b1
        m += (F32(1.0) - self.b1) * g
        v *= self.b2
        v += (F32(1.0) - self.b2) * g * g
        lr_t = self.lr * F32(np.sqrt(1.0 - float(self.b2) ** self.t) / (1.0 - float(self.b1) ** self.t))
        p.value -= lr_t * m / (np.sqrt(v) + self.eps)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov and Hutter 2019)."""

    decoupled = True

    def __init__(self, params: Iterable[Parameter], lr: float = 1e-3, weight_decay: float = 0.01, **kw: float) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, **kw)
