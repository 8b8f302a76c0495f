"""The training loop: mini-batches, optimizer, gradient clipping, FedProx.

Deterministic for a seed: batch order, dropout and initialization all draw from
seeded generators.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from models.augment import rotate_windows, sensor_triads
from models.engine import SGD, Adam, AdamW, BatchNorm1D, Loss, Optimizer
from models.engine.layers import Parameter
from models.errors import ConfigError, InputError
from models.model import Model, check_input

__all__ = ["TrainConfig", "TrainResult", "fit", "make_optimizer"]

F32 = np.float32


MAX_EPOCHS = 1000
MAX_LOCAL_STEPS = 1_000_000
MAX_BATCH = 65_536
MAX_LR = 10.0
MAX_SETTING = 1e6


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``prox_mu > 0`` adds FedProx's mu/2 * ||w - w_global||^2."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    """The gradient clip: each step's gradients scaled to at most this global L2 norm (0: none)."""
    prox_mu: float = 0.0
    seed: int = 0
    train_only: tuple[str, ...] = ()
    """Layer names to train (empty: all). The others stay fixed, BatchNorm statistics included."""
    rotation_deg: float = 0.0
    """Std of a random rotation (degrees) applied to each window's three-axis sensors (0: none)."""
    local_steps: int = 0
    """A fixed amount of local work: exactly this many optimizer steps, over as many passes of the windows
    as that takes (``epochs`` is then ignored); 0: ``epochs`` passes."""

    def validate(self) -> None:
        """Every setting within its bounds (a task from the network sets them): ConfigError naming the first not."""
        if not (1 <= self.epochs <= MAX_EPOCHS and 1 <= self.batch_size <= MAX_BATCH):
            raise ConfigError(f"epochs must be 1 .. {MAX_EPOCHS} and batch_size 1 .. {MAX_BATCH}.")
        if not (math.isfinite(self.lr) and 0 < self.lr <= MAX_LR):
            raise ConfigError(f"lr must be a number in (0, {MAX_LR:g}], got {self.lr}.")
        if not (0 <= self.momentum < 1 and 0 <= self.weight_decay <= 1):
            raise ConfigError(f"momentum must be in [0, 1) and weight_decay in [0, 1], got {self.momentum} and "
                              f"{self.weight_decay}.")
        if not (0 <= self.grad_clip <= MAX_SETTING and 0 <= self.prox_mu <= MAX_SETTING):
            raise ConfigError(f"grad_clip and prox_mu must be 0 .. {MAX_SETTING:g}.")
        if not 0 <= self.seed < 1 << 63:
            raise ConfigError(f"seed must be 0 .. 2**63, got {self.seed}.")
        if not 0 <= self.local_steps <= MAX_LOCAL_STEPS:
            raise ConfigError(f"local_steps must be 0 .. {MAX_LOCAL_STEPS}, got {self.local_steps}.")
        if not 0 <= self.rotation_deg <= 180:
            raise ConfigError(f"rotation_deg must be 0..180 degrees, got {self.rotation_deg}.")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; use sgd, adam or adamw.")


@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`fit` did."""

    epoch_losses: list[float]
    steps: int
    examples: int


def _trainable(model: Model, config: TrainConfig) -> list[Parameter]:
    if not config.train_only:
        return model.network.trainable()
    names = {name for name, _ in model.network.layers}
    unknown = sorted(set(config.train_only) - names)
    if unknown:
        raise ConfigError(f"train_only names unknown layers {unknown}; the model has {sorted(names)}.")
    return [p for name, layer in model.network.layers if name in config.train_only
            for p in layer.params.values() if p.trainable]


def make_optimizer(model: Model, config: TrainConfig) -> Optimizer:
    params = _trainable(model, config)
    if config.optimizer == "sgd":
        return SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def fit(
    model: Model,
    x: np.ndarray,
    y: np.ndarray,
    config: TrainConfig = TrainConfig(),
    global_weights: Mapping[str, np.ndarray] | None = None,
    class_weights: np.ndarray | None = None,
    on_step: Callable[[int, float], bool | None] | None = None,
    keep_buffers: bool = False,
) -> TrainResult:
    """Train ``model`` in place on windows ``x`` (n, channels, time) and targets ``y`` (n,).

    ``global_weights`` is the FedProx anchor (defaults to the weights at the start
    when ``prox_mu > 0``). ``on_step(step, loss)`` is called after every step; when it
    returns True training stops there (a CPU budget, a veto). The layers' training buffers are dropped at the
    end unless ``keep_buffers`` (a process that fits one model for many simulated edges in turn reuses them; it
    calls ``model.network.release()`` when it is done).
    """
    config.validate()
    x = check_input(x, model.spec, "training windows")
    y = np.asarray(y)
    if len(y) != len(x):
        raise InputError(f"{len(x)} training windows but {len(y)} targets; they must match one to one.")
    target = model.encode_target(y)
    if not model.spec.is_classifier and not np.all(np.isfinite(target)):
        raise InputError("training targets hold NaN or infinite values; drop those windows.")
    loss_fn = model.default_loss(class_weights)
    optimizer = make_optimizer(model, config)
    params = model.network.parameters()
    anchor = None
    if config.prox_mu > 0:
        source = global_weights if global_weights is not None else model.network.state_dict()
        anchor = {k: np.asarray(source[k], dtype=F32) for k, p in params.items()
                  if any(p is q for q in optimizer.params)}
    try:
        with _fixed_statistics(model, config):
            return _loop(model, x, target, config, optimizer, loss_fn, anchor, on_step)
    finally:
        if not keep_buffers:
            model.network.release()  # the layers' training buffers: a gateway keeps no memory between rounds


@contextmanager
def _fixed_statistics(model: Model, config: TrainConfig) -> Iterator[None]:
    """BatchNorm layers outside ``train_only`` keep their running statistics while training."""
    fixed = [layer for name, layer in model.network.layers
             if config.train_only and name not in config.train_only and isinstance(layer, BatchNorm1D)]
    for layer in fixed:
        layer.frozen = True
    try:
        yield
    finally:
        for layer in fixed:
            layer.frozen = False


def _flat_anchor(model: Model, optimizer: Optimizer, anchor: dict[str, np.ndarray]) -> np.ndarray:
    """The FedProx anchor as one flat array aligned with the optimizer's packed parameters."""
    names = {id(p): name for name, p in model.network.parameters().items()}
    return optimizer.flat(anchor[names[id(p)]] for p in optimizer.params)


def _loop(
    model: Model, x: np.ndarray, target: np.ndarray, config: TrainConfig, optimizer: Optimizer, loss_fn: Loss,
    anchor: dict[str, np.ndarray] | None, on_step: Callable[[int, float], bool | None] | None,
) -> TrainResult:
    mu = F32(config.prox_mu)
    prox = None if anchor is None else _flat_anchor(model, optimizer, anchor)
    rng = np.random.default_rng(config.seed)
    augment_rng = np.random.default_rng([config.seed, 1])
    triads = sensor_triads(model.spec.channels) if config.rotation_deg > 0 else []
    losses, step, examples, stop = [], 0, 0, False
    batch_buffer = np.empty((min(config.batch_size, len(x)), *x.shape[1:]), x.dtype)  # one, not one per step
    steps_per_pass = -(-len(x) // config.batch_size)
    passes = -(-config.local_steps // steps_per_pass) if config.local_steps else config.epochs
    for _ in range(passes):
        order = rng.permutation(len(x))
        total, seen = 0.0, 0
        for start in range(0, len(x), config.batch_size):
            idx = order[start : start + config.batch_size]
            optimizer.zero_grad()
            windows = np.take(x, idx, axis=0, out=batch_buffer[: len(idx)])
            batch = rotate_windows(windows, triads, config.rotation_deg, augment_rng)
            out = model.forward_raw(batch, training=True)
            loss, dout = loss_fn(out, target[idx])
            model.network.backward(dout, need_dx=False)
            if prox is not None:  # FedProx: + mu * (w - w_global), on the optimizer's flat buffers
                optimizer.grads += mu * (optimizer.values - prox)
            if config.grad_clip > 0:
                optimizer.clip_grad_norm(config.grad_clip)
            optimizer.step()
            step += 1
            total += loss * len(idx)
            seen += len(idx)
            examples += len(idx)
            if (on_step is not None and on_step(step, loss)) or step == config.local_steps:
                stop = True
                break
        losses.append(total / max(seen, 1))
        if stop:
            break
    return TrainResult(losses, step, examples)
