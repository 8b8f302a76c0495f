"""Attributions: how much each input sample of a window moved the model's output, and in which direction.

Three methods, all for the output a clinician reads (a class's probability, or the BPM):

* ``integrated-gradients`` (Sundararajan et al. 2017): the gradient averaged along the straight path from a
  baseline window to the window, times the difference between them. Its attributions add up to the output on
  the window minus the output on the baseline (completeness). The path integral is taken with Gauss-Legendre
  nodes; a ReLU network's gradient jumps at a few points of the path, so a fixed number of steps can miss by
  several percent on some windows (Captum's too), and :func:`integrated_gradients` integrates those again
  until their sum is within 1% (see there).
* ``gradient``: gradient times input, one backward pass; cheap, local, and not complete.
* ``occlusion``: the output drop when a patch of one channel (``span`` samples) is replaced by the baseline;
  needs only forward passes, so it also explains ``.onnx`` and ``.tflite`` files.

The baseline is the zero window of the model's input (:func:`baseline_like`), for each task:

* heart rate: the model's windows are centred and scaled per channel, so zero is each channel's resting level
  with no variation, a flat PPG and a still wrist;
* activity: the windows are in g and rad/s, not normalized, so zero is no signal at all, no gravity on any axis
  (what no worn sensor reads). Attributions then credit the gravity components too: a posture is explained by
  the axes gravity lies on, a movement by the samples that move.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from models.engine import BatchNorm1D
from models.engine.layers import Dropout
from models.engine.network import Network
from models.errors import ConfigError, InputError
from models.model import Model, check_input
from models.spec import ModelSpec

__all__ = [
    "DEFAULT_STEPS",
    "EXPLAIN_SEGMENTS",
    "EXPLAIN_STEPS",
    "EXPLAIN_WINDOWS",
    "METHODS",
    "Explanation",
    "attribution_map",
    "baseline_like",
    "default_span",
    "explain",
    "explain_settings",
    "gradient_times_input",
    "integrated_gradients",
    "occlusion",
    "output_gradients",
]

F32 = np.float32
METHODS = ("integrated-gradients", "gradient", "occlusion")
DEFAULT_STEPS = 32
MAX_STEPS = 1024
PASS_ROWS = 512
"""Windows per forward/backward pass: integrated gradients batches (window, step) pairs up to this many."""


class _Predictor(Protocol):
    spec: ModelSpec | None

    def predict(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Explanation:
    """Attributions of ``n`` windows: ``attributions`` (n, channels, samples), and for each window the explained
    target, the model's output for it on the window and on the baseline."""

    method: str
    channels: tuple[str, ...]
    targets: np.ndarray  # (n,) int: class index (0 for a regressor's one output)
    outputs: np.ndarray  # (n,) float32
    baseline_outputs: np.ndarray  # (n,) float32
    attributions: np.ndarray  # (n, channels, samples) float32

    def to_json(self) -> dict[str, Any]:
        """The ``wearfl explain --json`` contract."""
        return {"method": self.method, "channels": list(self.channels), "targets": self.targets.tolist(),
                "outputs": self.outputs.tolist(), "baseline_outputs": self.baseline_outputs.tolist(),
                "attributions": self.attributions.tolist()}

    def strongest(self, window: int, span: int) -> tuple[int, int, int, float]:
        """The (channel, first sample, end sample, attribution) of the ``span``-sample stretch of one channel that
        moved window ``window``'s output most, either way: what a one-line explanation names. The attribution is
        the stretch's sum (for occlusion, whose samples each carry their patch's drop, its mean)."""
        a = self.attributions[window]
        t = a.shape[1]
        span = max(1, min(span, t))
        sums = np.add.reduceat(a, np.arange(0, t, span), axis=1)  # (channels, segments)
        if self.method == "occlusion":  # every sample of a patch holds the patch's whole drop: not additive
            sums = sums / np.diff(np.append(np.arange(0, t, span), t))
        ch, seg = np.unravel_index(int(np.abs(sums).argmax()), sums.shape)
        return int(ch), int(seg * span), int(min(t, (seg + 1) * span)), float(sums[ch, seg])

    def completeness_gap(self) -> np.ndarray:
        """Per window: the attributions' sum minus (output - baseline output); about 0 for integrated gradients."""
        return self.attributions.sum(axis=(1, 2), dtype=np.float64) - (
            self.outputs.astype(np.float64) - self.baseline_outputs)


def baseline_like(x: np.ndarray) -> np.ndarray:
    """The documented baseline: the zero window (see the module docstring for what it means per task)."""
    return np.zeros_like(x, dtype=F32)


def default_span(window: int) -> int:
    """Occlusion's patch length: a sixteenth of the window (8 samples of a 128-sample window), at least 1."""
    return max(1, window // 16)


Target = int | np.ndarray | None
"""The class to explain: one for every window, one per window (an array), or None for each window's prediction."""


def _targets(spec: ModelSpec | None, probabilities: np.ndarray, target: Target) -> np.ndarray:
    n = len(probabilities)
    wanted = None if target is None else np.broadcast_to(np.asarray(target, np.int64), (n,))
    if probabilities.ndim == 1:  # a regressor: its one output
        if wanted is not None and wanted.any():
            raise ConfigError("a heart-rate model has one output (BPM) to explain; drop --target.")
        return np.zeros(n, np.int64)
    classes = probabilities.shape[1]
    if wanted is None:
        return probabilities.argmax(axis=1).astype(np.int64)
    if n and not (wanted.min() >= 0 and wanted.max() < classes):
        names = f" ({', '.join(spec.classes)})" if spec is not None and spec.classes else ""
        bad = int(wanted[(wanted < 0) | (wanted >= classes)][0])
        raise ConfigError(f"target class {bad} is not one of the model's {classes} classes{names}.")
    return wanted.copy()


def _pick(out: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return (out if out.ndim == 1 else out[np.arange(len(out)), targets]).astype(F32)


_BACKWARD = threading.Lock()
"""One differentiable pass at a time: the layers keep what backward needs in themselves, and a gateway may explain
a live prediction in one thread while its federated evaluation explains the same model in another."""


@contextmanager
def _differentiable(network: Network) -> Iterator[None]:
    """Inference behaviour (BatchNorm on its running statistics, no dropout) with what backward needs kept."""
    with _BACKWARD:
        saved: list[tuple[Any, str, Any]] = []
        for _, layer in network.layers:
            if isinstance(layer, BatchNorm1D):
                saved.append((layer, "frozen", layer.frozen))
                layer.frozen = True
            elif isinstance(layer, Dropout):
                saved.append((layer, "rate", layer.rate))
                layer.rate = 0.0
        try:
            yield
        finally:
            for layer, name, value in saved:
                setattr(layer, name, value)
            network.release()
            network.zero_grad()


def output_gradients(model: Model, x: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the explained output per window (n,), its gradient with respect to the window (n, channels, samples))."""
    outs, grads = [], []
    with _differentiable(model.network):
        for i in range(0, len(x), PASS_ROWS):
            xb, tb = np.ascontiguousarray(x[i:i + PASS_ROWS], dtype=F32), targets[i:i + PASS_ROWS]
            raw = model.network.forward(xb, training=True)
            head = model.apply_head(raw)  # probabilities, or BPM
            if model.spec.is_classifier:
                out = head[np.arange(len(head)), tb]
                dout = -head * out[:, None]  # d p_t / d z = p_t (onehot_t - p)
                dout[np.arange(len(head)), tb] += out
            else:
                out = head
                dout = np.full_like(raw, F32(model.spec.head["scale"]))
            dx = model.network.backward(dout.astype(F32), need_dx=True)
            outs.append(out.astype(F32))
            grads.append(np.asarray(dx, dtype=F32))
    return np.concatenate(outs), np.concatenate(grads)


def _prepare(model: Model, x: np.ndarray, target: Target,
             baseline: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(the windows checked, the baseline, the targets, the explained output on each window)."""
    x = check_input(x, model.spec, "windows to explain")
    base = baseline_like(x) if baseline is None else np.broadcast_to(np.asarray(baseline, F32), x.shape)
    predicted = model.predict(x)
    targets = _targets(model.spec, predicted, target)
    return x, np.ascontiguousarray(base), targets, _pick(predicted, targets)


COMPLETENESS = 0.01
"""Integrated gradients integrate again, with twice the steps, any window whose attributions miss its output
difference by more than this share of it (and by more than :data:`COMPLETENESS_ABS`)."""
COMPLETENESS_ABS = 5e-4


DOUBLING_UP_TO = 256
"""Steps up to which a window that misses completeness is integrated again with twice the steps; past that the
path is split where it bends (:func:`_adaptive_integral`)."""
ADAPTIVE_NODES = 8
ADAPTIVE_EVALS = 8192
"""Gradient evaluations one window's adaptive integral may take at most."""


def _adaptive_integral(model: Model, diff: np.ndarray, base: np.ndarray, target: int, tolerance: float) -> np.ndarray:
    """One window's attributions with the path split into pieces until, piece by piece, the integral matches the
    exact output difference between the piece's ends. A ReLU network is piecewise linear along the path, so the
    error of a fixed grid sits at a few kinks; the exact differences show which pieces hold them."""
    nodes, weights = np.polynomial.legendre.leggauss(ADAPTIVE_NODES)

    def integrate(bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo, width = bounds[:, :1], bounds[:, 1:] - bounds[:, :1]
        alphas = (lo + width * (nodes + 1) / 2).astype(F32)  # (pieces, nodes)
        points = base[None] + alphas.reshape(-1)[:, None, None] * diff[None]
        _, grads = output_gradients(model, points, np.full(len(points), target))
        piece = np.einsum("pn,pnct->pct", (width * weights / 2).astype(F32),
                          grads.reshape(len(bounds), ADAPTIVE_NODES, *diff.shape)) * diff
        ends = (base[None] + bounds.reshape(-1)[:, None, None].astype(F32) * diff[None]).astype(F32)
        f = _pick(model.predict(ends), np.full(len(ends), target)).astype(np.float64).reshape(-1, 2)
        return piece, piece.sum(axis=(1, 2), dtype=np.float64) - (f[:, 1] - f[:, 0])  # each piece's own miss

    bounds = np.stack([np.linspace(0, 1, 17)[:-1], np.linspace(0, 1, 17)[1:]], axis=1)
    pieces, errors = integrate(bounds)
    evaluations = len(bounds) * ADAPTIVE_NODES
    while abs(errors.sum()) > tolerance and evaluations < ADAPTIVE_EVALS:  # the window's gap: misses may cancel
        size = np.abs(errors)
        worst = np.argsort(-size)[:max(1, min(32, int((size > tolerance / len(size)).sum())))]
        middle = bounds[worst].mean(axis=1)
        halves = np.concatenate([np.stack([bounds[worst, 0], middle], 1), np.stack([middle, bounds[worst, 1]], 1)])
        new_pieces, new_errors = integrate(halves)
        keep = np.setdiff1d(np.arange(len(bounds)), worst)
        bounds = np.concatenate([bounds[keep], halves])
        pieces = np.concatenate([pieces[keep], new_pieces])
        errors = np.concatenate([errors[keep], new_errors])
        evaluations += len(halves) * ADAPTIVE_NODES
    return pieces.sum(axis=0).astype(F32)


def _path_integral(model: Model, diff: np.ndarray, base: np.ndarray, targets: np.ndarray,
                   steps: int) -> np.ndarray:
    """``diff`` times the gradient averaged along the straight path from ``base`` (Gauss-Legendre, ``steps``)."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas, weights = ((nodes + 1) / 2).astype(F32), (weights / 2).astype(F32)
    shape = diff.shape[1:]
    attributions = np.empty_like(diff)
    per_pass = max(1, PASS_ROWS // steps)
    for i in range(0, len(diff), per_pass):
        d, b, t = diff[i:i + per_pass], base[i:i + per_pass], targets[i:i + per_pass]
        path = b[:, None] + alphas[None, :, None, None] * d[:, None]  # (windows, steps, channels, samples)
        _, grads = output_gradients(model, path.reshape(-1, *shape), np.repeat(t, steps))
        mean_grad = np.tensordot(weights, grads.reshape(len(d), steps, *shape), axes=([0], [1]))
        attributions[i:i + per_pass] = d * mean_grad
    return attributions


def integrated_gradients(model: Model, x: np.ndarray, target: Target = None, steps: int = DEFAULT_STEPS,
                         baseline: np.ndarray | None = None, refine: bool = True) -> Explanation:
    """Integrated gradients of each window's target from ``baseline`` (default: :func:`baseline_like`).

    With ``refine`` a window whose attributions miss completeness (:data:`COMPLETENESS`) is integrated again
    with twice the steps, up to :data:`DOUBLING_UP_TO`, and then adaptively (:func:`_adaptive_integral`): a
    ReLU network's path turns sharply at a few points, and a class probability saturates, so a fixed number of
    steps is exact for most windows and off by several percent for a few (measured on HAPT: 45 of 240 windows at
    32 steps, none at 64; on heart-rate windows whose BPM barely differs from the baseline's, a few hundredths of
    a BPM even at 1,024 steps).
    """
    if not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"--steps must be 1 .. {MAX_STEPS}, not {steps}.")
    x, base, targets, outputs = _prepare(model, x, target, baseline)
    diff = x - base
    attributions = _path_integral(model, diff, base, targets, steps)
    baseline_outputs = _pick(model.predict(base), targets)
    change = outputs.astype(np.float64) - baseline_outputs
    tolerance = np.maximum(COMPLETENESS * np.abs(change), COMPLETENESS_ABS)

    def missing() -> np.ndarray:
        return np.flatnonzero(np.abs(attributions.sum(axis=(1, 2), dtype=np.float64) - change) > tolerance)

    while refine and steps < DOUBLING_UP_TO and len(off := missing()):
        steps = min(DOUBLING_UP_TO, 2 * steps)
        attributions[off] = _path_integral(model, diff[off], base[off], targets[off], steps)
    for i in missing() if refine else ():
        attributions[i] = _adaptive_integral(model, diff[i], base[i], int(targets[i]), float(tolerance[i]))
    return Explanation("integrated-gradients", model.spec.channels, targets, outputs, baseline_outputs,
                       attributions)


def gradient_times_input(model: Model, x: np.ndarray, target: Target = None,
                         baseline: np.ndarray | None = None) -> Explanation:
    """Gradient times input: the first-order effect of each sample (one backward pass a window)."""
    x, base, targets, _ = _prepare(model, x, target, baseline)
    outputs, grads = output_gradients(model, x, targets)
    return Explanation("gradient", model.spec.channels, targets, outputs, _pick(model.predict(base), targets),
                       (x * grads).astype(F32))


def occlusion(predictor: _Predictor | Model, x: np.ndarray, target: Target = None, span: int | None = None,
              baseline: np.ndarray | None = None) -> Explanation:
    """The output drop when each patch of ``span`` samples of one channel is set to the baseline, given to every
    sample of the patch (Captum's ``Occlusion`` with window (1, span) and the same stride)."""
    x = np.asarray(x, F32)
    if x.ndim != 3:
        raise InputError(f"windows to explain must be (n, channels, samples), not shape {x.shape}.")
    spec = predictor.spec
    n, c, t = x.shape
    span = default_span(t) if span is None else span
    if not 1 <= span <= t:
        raise ConfigError(f"the occlusion span must be 1 .. {t} samples (the window), not {span}.")
    base = baseline_like(x) if baseline is None else np.broadcast_to(np.asarray(baseline, F32), x.shape)
    full = predictor.predict(x)
    targets = _targets(spec, full, target)
    outputs = _pick(full, targets)
    patches = [(ch, s) for ch in range(c) for s in range(0, t, span)]
    masks = np.zeros((len(patches), c, t), bool)  # patch k covers channel ch, samples s .. s + span
    for k, (ch, s) in enumerate(patches):
        masks[k, ch, s:s + span] = True
    attributions = np.empty_like(x)
    per_pass = max(1, PASS_ROWS // len(patches))
    for i in range(0, n, per_pass):
        xw, bw, tw = x[i:i + per_pass], base[i:i + per_pass], targets[i:i + per_pass]
        batch = np.where(masks[None], bw[:, None], xw[:, None]).reshape(-1, c, t)
        occluded = _pick(predictor.predict(batch), np.repeat(tw, len(patches))).reshape(len(xw), len(patches))
        drop = outputs[i:i + per_pass, None] - occluded
        attributions[i:i + per_pass] = np.tensordot(drop, masks.astype(F32), axes=([1], [0]))  # patches tile it
    channels = tuple(spec.channels) if spec is not None else tuple(f"channel {i}" for i in range(c))
    return Explanation("occlusion", channels, targets, outputs, _pick(predictor.predict(base), targets),
                       attributions)


EXPLAIN_SEGMENTS = 8
"""Time segments per window of a federated explanation map (``explain_segments`` in a task)."""
EXPLAIN_WINDOWS = 64
"""Held-out windows an edge explains per round at most (``explain_windows``), spread over the classes."""
EXPLAIN_STEPS = 16
"""Integrated-gradients steps of a federated map: its means need no exact completeness, half the CPU of 32."""


MAX_EXPLAIN_SEGMENTS = 32
MAX_EXPLAIN_WINDOWS = 1024


def explain_settings(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """A task's ``explain`` settings: None when it does not ask for explanations, else (segments, windows).
    ConfigError names a bad ``explain_segments`` or ``explain_windows``."""
    flag = config.get("explain")
    if flag in (None, False, 0, "false", "0"):
        return None
    if flag not in (True, 1, "true", "1"):
        raise ConfigError(f"task setting explain={flag!r} must be true or false.")
    out = []
    for key, default, top in (("explain_segments", EXPLAIN_SEGMENTS, MAX_EXPLAIN_SEGMENTS),
                              ("explain_windows", EXPLAIN_WINDOWS, MAX_EXPLAIN_WINDOWS)):
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) \
                or not 1 <= value <= top:
            raise ConfigError(f"task setting {key}={value!r} must be a whole number 1 .. {top}.")
        out.append(int(value))
    return out[0], out[1]


def _spread(y: np.ndarray, limit: int) -> np.ndarray:
    """Indices of at most ``limit`` windows, taking the classes in turn (the rarest are not crowded out)."""
    if len(y) <= limit:
        return np.arange(len(y))
    order = np.argsort(y, kind="stable")
    labels = y[order]
    rank = np.arange(len(y)) - np.searchsorted(labels, labels)  # position within its class
    return np.sort(order[np.argsort(rank, kind="stable")[:limit]])


def attribution_map(model: Model, x: np.ndarray, y: np.ndarray, segments: int = EXPLAIN_SEGMENTS,
                    windows: int = EXPLAIN_WINDOWS, steps: int = EXPLAIN_STEPS) -> dict[str, Any]:
    """What an edge shares of its explanations: the mean absolute integrated-gradients attribution per class
    (by true label; one group, BPM, for a regressor), per channel and per time segment, over at most ``windows``
    of its labelled held-out windows. No window, label or prediction of one window leaves in it.

    ``{"method", "segments", "windows": [per class], "map": [class][channel][segment]}``.
    """
    x = check_input(x, model.spec, "windows to explain")
    t = x.shape[2]
    if not 1 <= segments <= t:
        raise ConfigError(f"explain_segments must be 1 .. {t} (the window's samples), not {segments}.")
    classifier = model.spec.is_classifier
    groups = len(model.spec.classes) if classifier else 1
    labels = np.asarray(y).astype(np.int64) if classifier else np.zeros(len(x), np.int64)
    keep = _spread(labels, windows)
    x, labels = x[keep], labels[keep]
    counts = np.bincount(labels, minlength=groups)[:groups]
    sums = np.zeros((groups, x.shape[1], segments))
    if len(x):
        attributions = integrated_gradients(model, x, labels if classifier else None, steps,
                                            refine=False).attributions  # means over windows: no exact sums needed
        edges = np.linspace(0, t, segments + 1).round().astype(int)
        per_segment = np.add.reduceat(np.abs(attributions), edges[:-1], axis=2) / np.diff(edges)
        np.add.at(sums, labels, per_segment)
    means = sums / np.maximum(counts, 1)[:, None, None]
    return {"method": "integrated-gradients", "segments": segments, "windows": counts.tolist(),
            "map": means.round(6).tolist()}


def explain(model: Model | _Predictor, x: np.ndarray, method: str = "integrated-gradients",
            target: Target = None, steps: int = DEFAULT_STEPS, span: int | None = None) -> Explanation:
    """Explain ``x`` with ``method`` (one of :data:`METHODS`); gradient methods need a numpy :class:`Model`."""
    if method not in METHODS:
        raise ConfigError(f"unknown explanation method {method!r}; use one of {', '.join(METHODS)}.")
    if method == "occlusion":
        return occlusion(model, x, target, span)
    if not isinstance(model, Model):
        raise ConfigError(f"{method} needs the model's gradients: give a model package (.safetensors), or use "
                          "--method occlusion for .onnx and .tflite files.")
    if method == "gradient":
        return gradient_times_input(model, x, target)
    return integrated_gradients(model, x, target, steps)
