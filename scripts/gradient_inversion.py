#!/usr/bin/env python
"""Gradient-inversion check (issue 7): does one client's update give its window away?

The attack. For a dense (fully connected) first layer ``y = W x + b`` trained on ONE
window ``x``, the gradients are ``dL/dW = delta x^T`` and ``dL/db = delta``, so every
unit ``i`` with ``delta[i] != 0`` gives ``x = dW[i] / db[i]`` exactly. One SGD step sends
``Δ = -lr * grad``, whose rows have the same ratio: whoever sees a raw single-window
update (the broker, the hub, anyone who reads two consecutive global models of a
one-client round) reads the window back. The attacker here takes the unit with the
largest ``|Δb[i]|`` (a unit a ReLU switched off has ``Δb[i] = 0``).

What is measured, on windows of 6 channels x 128 samples (acc in g, gyro in rad/s):

1. Control, no defence: a dense-first network (flatten, dense 768->32, ReLU, dense 32->6,
   softmax; 24,806 parameters) built from a :class:`~models.spec.ModelSpec` and trained
   by the product path (:func:`models.training.fit`, one SGD step, batch 1), the edge's
   ``Δ = w_local - w_base`` in float32 exactly as ``edge_client.updates.clipped_delta`` forms it. The
   reconstruction's max abs error relative to the window's max abs value is ~1e-7
   (float32 rounding of ``w_base - lr*g - w_base``). A float64 re-implementation of the
   same network from the same initial weights gives ~1e-16: the leak is exact algebra.
2. Under DP-FedAvg (:class:`hub.strategies.dp.DPFedAvg` itself, aggregated the way
   ``hub.rounds`` does it: ``prepare`` clips each update to L2 norm ``dp_clip``, a
   :class:`hub.aggregation.StreamingAverage` sums them with weight 1, ``finalize`` divides
   by ``expected_clients`` and adds Gaussian noise of std ``noise * dp_clip /
   expected_clients`` per coordinate, seeded). The target's update is summed with the
   updates of ``expected_clients - 1`` other clients (one other window each, from the
   same global model) and the attacker applies the same reconstruction to the noised
   aggregate. Reported: mean and max |Pearson correlation| with the true window over
   the trials, and an "oracle" attacker that picks, knowing the answer, the best of the
   32 units. ``noise = 0`` is clipping without noise (``DPFedAvg`` refuses a multiplier
   of 0, so there the hub's scaling is applied without ``finalize``'s noise).
3. Context rows: the same correlation for an *unrelated* window of another client (what
   knowing only what windows look like gives, since Pearson over a flattened window also
   rewards the shared gravity offset), and for the raw update sent through the product's
   int8 codec without DP (quantization is not privacy).
4. The product activity model (Conv1D first, then BatchNorm): the dense formula does not
   apply to its first layer. BatchNorm in training mode removes any per-channel constant,
   so the conv bias gradient is zero (0/0), and the conv weight update (16 x 6 x 5 = 480
   numbers) is a cross-correlation of the window with a back-propagated signal that is
   itself unknown and depends on the window: 480 bilinear measurements of 768 unknowns,
   no closed form. Its dense head leaks exactly what the formula says, though: the 48
   pooled (dropout-masked) features the head saw, to float32 precision. Iterative
   gradient-matching attacks (Zhu et al. 2019, Geiping et al. 2020) are not covered by
   this check; against them the defence is DP's guarantee, which the accountant states.

A low correlation for this one attack is a sanity check, not a privacy guarantee. The
attacked row has 768 coordinates, each with noise std ``z*C/m``, while the target's whole
contribution has norm at most ``C/m``, so the attacker's |corr| is roughly at most
``1 / (z * sqrt(768))`` (~0.036 at z = 1): at ``noise = 0.1`` the mean is already below
0.2 while epsilon is enormous. Only ``wearfl privacy`` (the accountant) says what a
setting protects, and repeated rounds over the same window are not modelled here.

Usage, from the repository root (about 1 s; 2 s with HAPT)::

    python scripts/gradient_inversion.py                 # synthetic windows, or UCI HAPT if WEARFL_HAPT_DIR is set
    python scripts/gradient_inversion.py --data synthetic --trials 50 --seed 0
    python scripts/gradient_inversion.py --data hapt:../shared/data/uci-hapt/RawData

A table goes to stdout, all figures to ``--out`` (default
``bench-results/gradient_inversion.json``); the same seed gives the same numbers.
``tests/test_gradient_inversion.py`` asserts the acceptance thresholds with these functions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
# Run the working tree's code, whether or not the project is pip-installed.
if (REPO_ROOT / "models" / "__init__.py").is_file() and str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from hub.aggregation import StreamingAverage  # noqa: E402
from hub.strategies.dp import DPFedAvg  # noqa: E402
from models.model import Model  # noqa: E402
from models.protocol.codec import CodecConfig, UpdateCodec  # noqa: E402
from models.spec import ACTIVITY_CHANNELS, ACTIVITY_CLASSES, ModelSpec, activity_spec  # noqa: E402
from models.training import TrainConfig, fit  # noqa: E402

__all__ = [
    "HIDDEN",
    "LR",
    "conv_first_facts",
    "dense_first_spec",
    "dp_round",
    "hapt_windows",
    "inversion_experiment",
    "local_update",
    "pearson",
    "reconstruct",
    "reference_update_f64",
    "relative_error",
    "synthetic_windows",
]

F32 = np.float32
CHANNELS, WINDOW, RATE_HZ = len(ACTIVITY_CHANNELS), 128, 50.0
HIDDEN = 32
LR = 0.1
"""One SGD step of this size gives single-window updates of norm about 1 (median 1.2 on the
synthetic windows, 0.94 on HAPT), so with clip 1.0 many are clipped to exactly the bound:
near the attacker's best case (an update below the bound carries less signal against the
same noise). It also keeps the float32 control well under 1e-6: the rounding of
``w_base - lr*g - w_base`` is ulp(w) / (lr * |delta_i|)."""
MODEL_SEED = 1


# -- the model and the edge's update ---------------------------------------------------


def dense_first_spec(hidden: int = HIDDEN) -> ModelSpec:
    """An activity classifier whose first trainable layer is dense: flatten, fc1, ReLU, fc2."""
    features = CHANNELS * WINDOW
    layers = (
        {"type": "flatten", "name": "flatten"},
        {"type": "dense", "name": "fc1", "in_features": features, "out_features": hidden},
        {"type": "relu", "name": "relu1"},
        {"type": "dense", "name": "fc2", "in_features": hidden, "out_features": len(ACTIVITY_CLASSES)},
    )
    spec = ModelSpec("activity", ACTIVITY_CHANNELS, WINDOW, RATE_HZ, ACTIVITY_CLASSES, layers,
                     {"type": "softmax"}, {"bandpass": {}, "normalization": {}})
    spec.validate()
    return spec


def local_update(model: Model, base: Mapping[str, np.ndarray], window: np.ndarray, label: int,
                 lr: float = LR) -> dict[str, np.ndarray]:
    """The edge's Δ = w_local - w_base (float32) after one SGD step on one window, from ``base``."""
    model.network.load_state_dict(base)
    fit(model, window[None], np.asarray([label]),
        TrainConfig(epochs=1, batch_size=1, lr=lr, optimizer="sgd", momentum=0.0))
    return {k: np.asarray(v, F32) - np.asarray(base[k], F32) for k, v in model.network.state_dict().items()}


def reference_update_f64(base: Mapping[str, np.ndarray], window: np.ndarray, label: int,
                         lr: float = LR) -> dict[str, np.ndarray]:
    """The same step in float64 numpy: dense fc1, ReLU, dense fc2, softmax cross-entropy.

    Written out by hand (the engine is float32 only) to show that the leak is exact
    algebra: ``Δ_fc1.weight[i] / Δ_fc1.bias[i]`` is the window up to float64 rounding.
    """
    w = {k: np.asarray(v, np.float64) for k, v in base.items()}
    x = np.asarray(window, np.float64).reshape(-1)
    a = w["fc1.weight"] @ x + w["fc1.bias"]
    h = np.maximum(a, 0.0)
    z = w["fc2.weight"] @ h + w["fc2.bias"]
    p = np.exp(z - z.max())
    p /= p.sum()
    dz = p.copy()
    dz[label] -= 1.0  # d(cross-entropy)/dz for one example
    dh = (w["fc2.weight"].T @ dz) * (a > 0)
    grads = {"fc1.weight": np.outer(dh, x), "fc1.bias": dh, "fc2.weight": np.outer(dz, h), "fc2.bias": dz}
    return {k: (w[k] - lr * g) - w[k] for k, g in grads.items()}


# -- the attack and its scores ----------------------------------------------------------


def reconstruct(update: Mapping[str, np.ndarray], layer: str = "fc1") -> np.ndarray:
    """The attacker's window: ``Δ weight[i] / Δ bias[i]`` for the unit with the largest |Δ bias|."""
    db = np.asarray(update[f"{layer}.bias"], np.float64)
    i = int(np.argmax(np.abs(db)))
    return np.asarray(update[f"{layer}.weight"][i], np.float64) / db[i]


def relative_error(x_hat: np.ndarray, x: np.ndarray) -> float:
    """max |x_hat - x| over max |x|: the control's error relative to the window's scale."""
    x = np.asarray(x, np.float64).reshape(-1)
    return float(np.max(np.abs(np.asarray(x_hat, np.float64).reshape(-1) - x)) / np.max(np.abs(x)))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two flattened arrays (0 when either is constant)."""
    a = np.asarray(a, np.float64).reshape(-1) - np.mean(a)
    b = np.asarray(b, np.float64).reshape(-1) - np.mean(b)
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else 0.0


def _row_correlations(rows: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|Pearson| of every row with ``x`` (the oracle attacker's candidates; scaling a row changes nothing)."""
    r = rows - rows.mean(axis=1, keepdims=True)
    v = x.reshape(-1) - x.mean()
    den = np.sqrt(np.einsum("ij,ij->i", r, r) * float(v @ v))
    return np.abs(np.divide(r @ v, den, out=np.zeros(len(r)), where=den > 0))


# -- the hub's DP aggregation -----------------------------------------------------------


def dp_round(updates: Sequence[Mapping[str, np.ndarray]], noise: float, clip: float, expected_clients: int,
             seed: int) -> dict[str, np.ndarray]:
    """What a DP-FedAvg round releases for ``updates``, computed as ``hub.rounds`` computes it.

    ``noise = 0``: clipping alone; ``DPFedAvg`` refuses a zero multiplier, so the round's
    scaling (sum over ``expected_clients``) is applied without ``finalize``'s noise.
    """
    strategy = DPFedAvg(noise=noise if noise > 0 else 1.0, dp_clip=clip, expected_clients=expected_clients, seed=seed)
    total = StreamingAverage.like(updates[0])
    for update in updates:
        total.add(strategy.prepare(update), strategy.client_weight(1))
    avg = total.mean()
    if noise > 0:
        return strategy.finalize(avg, total.count)
    return {k: (np.asarray(v, np.float64) * total.count / expected_clients).astype(F32) for k, v in avg.items()}


# -- windows ----------------------------------------------------------------------------


def synthetic_windows(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sensor-like windows (n, 6, 128) float32 and labels: each its own wearer and posture.

    Acceleration: gravity (1 g) in a random device orientation, plus for moving windows a
    gait oscillation at a cadence of 0.8-2.4 Hz with its second harmonic; gyroscope: the
    same cadence with random phases; white sensor noise on every channel. Moving windows
    get labels 0-2 (walking classes), still ones 3-5.
    """
    t = np.arange(WINDOW) / RATE_HZ
    gravity = rng.standard_normal((n, 3))
    gravity /= np.linalg.norm(gravity, axis=1, keepdims=True)
    moving = rng.random(n) < 0.6
    cadence = rng.uniform(0.8, 2.4, (n, 1, 1))
    phase = rng.uniform(0.0, 2 * np.pi, (n, 6, 1))
    omega = 2 * np.pi * cadence * t[None, None, :]
    amp = np.concatenate([rng.uniform(0.05, 0.5, (n, 3, 1)), rng.uniform(0.1, 1.0, (n, 3, 1))], axis=1)
    gait = amp * moving[:, None, None] * (np.sin(omega + phase) + 0.3 * np.sin(2 * omega + 2 * phase))
    x = gait + 0.02 * rng.standard_normal((n, 6, WINDOW))
    x[:, :3] += gravity[:, :, None]
    labels = np.where(moving, rng.integers(0, 3, n), rng.integers(3, 6, n))
    return x.astype(F32), labels.astype(np.int64)


def hapt_windows(path: str | Path, trials: int, clients: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """UCI HAPT windows (trials, clients, 6, 128) and labels: per trial, one labelled window of each
    of ``clients`` different training volunteers (the first is the target), via the gateway's own
    preprocessing (``edge_client.pipeline.windows_from_chunks``) with the dense-first spec."""
    from edge_client.pipeline import windows_from_chunks
    from edge_client.sources.hapt import HaptDataset

    dataset, spec = HaptDataset(path), dense_first_spec()
    users = list(dataset.train_clients)
    if len(users) < clients:
        raise SystemExit(f"HAPT has {len(users)} training volunteers; --clients needs at most that many")
    per_user = []
    for user in users:
        source = dataset.source(user)
        w, _ = windows_from_chunks(source.chunks(), spec, source.sampling_rate_hz)
        keep = (w.activity >= 0) & (w.activity < len(ACTIVITY_CLASSES))
        per_user.append((w.x[keep], w.activity[keep].astype(np.int64)))
    x = np.zeros((trials, clients, CHANNELS, WINDOW), F32)
    y = np.zeros((trials, clients), np.int64)
    for t in range(trials):
        for j, u in enumerate(rng.choice(len(users), clients, replace=False)):
            ux, uy = per_user[u]
            k = int(rng.integers(len(ux)))
            x[t, j], y[t, j] = ux[k], uy[k]
    return x, y


# -- the experiments --------------------------------------------------------------------


def inversion_experiment(windows: np.ndarray, labels: np.ndarray, settings: Sequence[tuple[float, int]],
                         clip: float = 1.0, lr: float = LR, seed: int = 0) -> dict[str, Any]:
    """Run the attack on ``windows`` (trials, clients, 6, 128), window [t, 0] the target of trial t.

    ``settings``: (noise multiplier, expected clients m); a round with m expected clients
    sums the clipped updates of windows [t, :m]. Returns the control errors, the
    baselines and, per setting, mean / max |corr| of the attacker and of the oracle.
    """
    trials, clients = labels.shape
    if max(m for _, m in settings) > clients:
        raise ValueError(f"a setting expects more clients than the {clients} windows per trial")
    model = Model(dense_first_spec(), seed=MODEL_SEED)
    base = model.network.state_dict()
    codec = UpdateCodec.for_weights(base, CodecConfig(quantize="int8"))
    corr: dict[tuple[float, int], list[float]] = {s: [] for s in settings}
    oracle: dict[tuple[float, int], list[float]] = {s: [] for s in settings}
    control32, control64, norms, unrelated, int8 = [], [], [], [], []
    for t in range(trials):
        target = windows[t, 0]
        updates = [local_update(model, base, windows[t, j], int(labels[t, j]), lr)
                   for j in range(max(m for _, m in settings))]
        raw = updates[0]
        control32.append(relative_error(reconstruct(raw), target))
        control64.append(relative_error(reconstruct(reference_update_f64(base, target, int(labels[t, 0]), lr)),
                                        target))
        norms.append(math.sqrt(sum(float(np.vdot(v, v)) for v in raw.values())))
        unrelated.append(abs(pearson(windows[(t + 1) % trials, 1 % clients], target)))
        tensors, meta, _ = codec.encode(raw, np.random.default_rng([seed, t]))
        int8.append(abs(pearson(reconstruct(codec.decode(tensors, meta)), target)))
        for k, (z, m) in enumerate(settings):
            released = dp_round(updates[:m], z, clip, m, seed=seed * 1_000_003 + t * 101 + k)
            corr[(z, m)].append(abs(pearson(reconstruct(released), target)))
            oracle[(z, m)].append(float(_row_correlations(np.asarray(released["fc1.weight"], np.float64),
                                                          target.astype(np.float64)).max()))
    return {
        "trials": trials,
        "control_error_float32": float(max(control32)),
        "control_error_float64": float(max(control64)),
        "update_norm_median": float(np.median(norms)),
        "updates_clipped_fraction": float(np.mean(np.asarray(norms) > clip)),
        "unrelated_window_mean_abs_corr": float(np.mean(unrelated)),
        "int8_codec_no_dp_mean_abs_corr": float(np.mean(int8)),
        "grid": [
            {"noise": z, "expected_clients": m, "clip": clip, "noise_std": z * clip / m,
             "mean_abs_corr": float(np.mean(corr[(z, m)])), "max_abs_corr": float(np.max(corr[(z, m)])),
             "oracle_mean_abs_corr": float(np.mean(oracle[(z, m)]))}
            for z, m in settings
        ],
    }


def conv_first_facts(window: np.ndarray, label: int, lr: float = LR, seed: int = MODEL_SEED) -> dict[str, float]:
    """What one single-window SGD step of the product activity CNN gives away analytically.

    Returns ``conv1_bias_to_weight``: ||Δ conv1.bias|| / ||Δ conv1.weight|| (0 up to
    rounding: BatchNorm cancels the bias, so the dense formula is 0/0), and
    ``head_feature_error``: the dense formula on the head ``fc`` against the features the
    head saw in that step (the pooled, dropout-masked 48 activations), relative error.
    """
    spec = activity_spec()
    model, twin = Model(spec, seed=seed), Model(spec, seed=seed)  # same weights, same dropout draws
    base = model.network.state_dict()
    h = window[None].astype(F32)
    for _, layer in twin.network.layers[:-1]:
        h = layer.forward(h, training=True)
    update = local_update(model, base, window, label, lr)
    weight, bias = update["conv1.weight"], update["conv1.bias"]
    return {
        "conv1_weight_numbers": int(weight.size),
        "window_numbers": int(window.size),
        "conv1_bias_to_weight": float(np.linalg.norm(bias) / np.linalg.norm(weight)),
        "head_feature_error": relative_error(reconstruct(update, "fc"), h[0]),
        "head_features": int(h.shape[1]),
    }


# -- command line -----------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="auto",
                        help="synthetic, hapt:DIR, or auto (HAPT when WEARFL_HAPT_DIR is set, else synthetic)")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=_floats, default=[0.0, 0.01, 0.03, 0.1, 0.3, 1.0],
                        help="noise multipliers z, comma-separated")
    parser.add_argument("--clients", type=_ints, default=[1, 20], help="expected clients m, comma-separated")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--out", default=str(REPO_ROOT / "bench-results" / "gradient_inversion.json"))
    args = parser.parse_args(argv)

    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    m_max = max(args.clients)
    data = args.data
    if data == "auto":
        data = f"hapt:{os.environ['WEARFL_HAPT_DIR']}" if os.environ.get("WEARFL_HAPT_DIR") else "synthetic"
    if data == "synthetic":
        x, y = synthetic_windows(args.trials * m_max, rng)
        windows, labels = x.reshape(args.trials, m_max, CHANNELS, WINDOW), y.reshape(args.trials, m_max)
    elif data.startswith("hapt:"):
        windows, labels = hapt_windows(data.removeprefix("hapt:"), args.trials, m_max, rng)
    else:
        parser.error(f"unknown --data {data!r}; use synthetic, hapt:DIR or auto")
    settings = [(z, m) for m in args.clients for z in args.noise]
    result = inversion_experiment(windows, labels, settings, clip=args.clip, lr=args.lr, seed=args.seed)
    conv = conv_first_facts(windows[0, 0], int(labels[0, 0]), lr=args.lr)
    report = {"check": "gradient inversion of a dense first layer (issue 7)", "data": data, "seed": args.seed,
              "lr": args.lr, "hidden_units": HIDDEN, "model_seed": MODEL_SEED, **result, "conv_first": conv}

    print(f"gradient inversion, {data} windows, {args.trials} trials, seed {args.seed}, one SGD step lr {args.lr}")
    print(f"control (raw update, no defence): max relative error {result['control_error_float32']:.2e} float32 "
          f"(engine), {result['control_error_float64']:.2e} float64 (reference)")
    print(f"update norm median {result['update_norm_median']:.2f}; clipped at C={args.clip}: "
          f"{100 * result['updates_clipped_fraction']:.0f}%")
    print(f"context: unrelated window mean |corr| {result['unrelated_window_mean_abs_corr']:.3f}; "
          f"int8 codec without DP mean |corr| {result['int8_codec_no_dp_mean_abs_corr']:.4f}")
    print()
    print(f"{'z':>5} {'m':>3} {'std/coord':>9} {'mean |corr|':>11} {'max |corr|':>10} {'oracle mean':>11}")
    for row in result["grid"]:
        print(f"{row['noise']:>5g} {row['expected_clients']:>3d} {row['noise_std']:>9.4f} "
              f"{row['mean_abs_corr']:>11.4f} {row['max_abs_corr']:>10.4f} {row['oracle_mean_abs_corr']:>11.4f}")
    print()
    print(f"conv-first product model: ||Δ conv1.bias|| / ||Δ conv1.weight|| = {conv['conv1_bias_to_weight']:.1e} "
          f"(BatchNorm cancels it; {conv['conv1_weight_numbers']} conv numbers for {conv['window_numbers']} unknowns); "
          f"dense head recovers its {conv['head_features']} input features, error {conv['head_feature_error']:.1e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
