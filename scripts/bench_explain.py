#!/usr/bin/env python
"""Check wearfl's attributions (``models/attribution.py``) against Captum's, and time both, on trained models.

What it measures, for each task (``activity``, ``heart-rate``) and each method of :data:`models.attribution.METHODS`:

- **max |diff|**: the largest absolute difference between wearfl's attribution and Captum's, over every sample of
  every window, and the same relative to the largest absolute attribution (Captum's). Both explain the same output
  of the same windows: the target class's softmax probability (the class the model predicts for the window) for
  the activity classifier, the BPM (``raw * scale + offset``) for the heart-rate regressor;
- **ms per window**: the wall time of one call over all ``--windows`` windows divided by their count, the best of
  ``--repeats`` calls, for wearfl's function and for Captum's ``attribute``;
- **completeness** (integrated gradients only): max over windows of |sum of attributions - (output - baseline
  output)| relative to |output - baseline output|, for wearfl's attributions (and for Captum's, with the same
  outputs); the quadrature error of ``--steps`` Gauss-Legendre nodes.

How:

- the models are wearfl's :class:`models.Model` (``task_spec`` of the data set), trained briefly with
  ``models.training.fit`` (Adam, a few epochs on a few training clients' windows; a few seconds) so that the
  attributions are not those of random weights: activity on UCI HAPT (``hapt:DIR``, DIR from ``WEARFL_HAPT_DIR``,
  default ``../shared/data/uci-hapt/RawData`` beside the repository) when it is there, else on ``sim:0``; heart rate
  on ``sim:0``. The explained windows are ``--windows`` windows spread evenly over the held-out clients' windows;
- Captum explains a ``torch.nn.Module`` built from the model's layers (``model.network.layers``) with its weights
  copied in, in eval mode (BatchNorm on its running statistics, no dropout) with wearfl's head on top (softmax, or
  the affine BPM map); its forward is checked against ``model.predict`` on the explained windows and the zero
  baseline, and the largest difference printed;
- integrated gradients: wearfl's ``integrated_gradients(steps=S, refine=False)`` against
  ``IntegratedGradients.attribute(baselines=0, n_steps=S, method="gausslegendre", internal_batch_size=512)``, the
  same quadrature. wearfl's default (``refine=True``: a window whose attributions miss completeness by more than
  1 % is integrated again with twice the steps up to 256, then with the path split where it bends) has a row of
  its own, ``integrated-gradients+refine``,
  wearfl's side only: its time, its completeness and how many windows it integrated again (``--no-refine`` drops
  it); Captum has no such refinement, so its time compares with the fixed-step row; gradient: ``gradient_times_input``
  against ``InputXGradient``; occlusion: ``occlusion(span=P)`` against ``Occlusion.attribute(
  sliding_window_shapes=(1, P), strides=(1, P), baselines=0)``, P = ``default_span(window)`` (a sixteenth of the
  window, which divides both windows here) unless ``--span``.

Why the timings are fair:

- one thread on both sides: ``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` = 1 are set before
  numpy is imported, and torch runs with ``set_num_threads(1)`` and ``set_num_interop_threads(1)``;
- the same batching: wearfl runs at most 512 rows (window x step, or window x occluded patch) per pass
  (``models.attribution.PASS_ROWS``); Captum gets ``internal_batch_size=512`` for integrated gradients and
  ``perturbations_per_eval = 512 // windows`` for occlusion (its default, 1, would run one pass per patch);
- both sides do their whole job inside the timed call: wearfl's functions also compute the outputs on the window
  and on the baseline (the ``Explanation`` carries them), Captum's only the attributions; the windows are already
  float32 arrays or tensors before the clock starts, and Captum's result is turned into a numpy array inside it.

Usage, from the repository root::

    python scripts/bench_explain.py                              # both tasks, all methods, 64 windows
    python scripts/bench_explain.py --windows 16 --repeats 1     # a quick run
    python scripts/bench_explain.py --tasks heart-rate --methods occlusion --json /tmp/explain.json

torch and Captum are not dependencies of wearfl: without them only wearfl's side runs (its timings and
completeness); ``pip install torch captum`` (a CPU-only torch is enough) adds the comparison.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # run as a script (not imported by a test): one BLAS thread, set before numpy's import
    for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_name] = "1"

import argparse
import contextlib
import importlib.metadata
import inspect
import json
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# Benchmark the working tree's code, whether or not the project is pip-installed.
if (REPO_ROOT / "models" / "__init__.py").is_file() and str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from edge_client.evaluation import client_windows, task_spec  # noqa: E402
from edge_client.sources.datasets import open_dataset  # noqa: E402
from models import Model  # noqa: E402
from models.attribution import (  # noqa: E402
    METHODS,
    PASS_ROWS,
    Explanation,
    default_span,
    gradient_times_input,
    integrated_gradients,
    occlusion,
)
from models.engine.layers import BatchNorm1D, Conv1D, Dense, Dropout, Flatten, GlobalAveragePool1D, ReLU  # noqa: E402
from models.training import TrainConfig, fit  # noqa: E402

TASKS = ("activity", "heart-rate")
HAPT_DEFAULT = REPO_ROOT.parent / "shared" / "data" / "uci-hapt" / "RawData"
HELD_OUT_CLIENTS = 3
"""Held-out clients whose windows (one per window length, no overlap) the explained windows are spread over."""
CAPTUM_HINT = "pip install torch captum (a CPU-only torch is enough; neither is a dependency of wearfl)"
CAPTUM_CLASS = {"integrated-gradients": "IntegratedGradients", "gradient": "InputXGradient",
                "occlusion": "Occlusion"}


# -- the models and their windows --------------------------------------------------------------------


@dataclass
class Task:
    """A trained model and the held-out windows to explain."""

    name: str
    dataset: str
    model: Model
    x: np.ndarray  # (windows, channels, samples) float32
    targets: np.ndarray  # (windows,) the explained class (the predicted one), zeros for the regressor
    train: dict[str, Any] = field(default_factory=dict)


def activity_data() -> str:
    """``hapt:DIR`` when the HAPT raw data is there (``WEARFL_HAPT_DIR``, else beside the repository), else sim:0."""
    folder = Path(os.environ.get("WEARFL_HAPT_DIR") or HAPT_DEFAULT)
    return f"hapt:{folder}" if folder.is_dir() else "sim:0"


def _pool(dataset: Any, clients: tuple[str, ...], spec: Any, hop: int | None) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for client in clients:
        data = client_windows(dataset.source(client), spec, hop=hop)
        if len(data.x):
            xs.append(data.x)
            ys.append(data.y)
    if not xs:
        raise SystemExit(f"error: no labelled windows in the clients {', '.join(clients)} of {dataset.name}")
    return np.concatenate(xs), np.concatenate(ys)


def make_task(name: str, data: str, args: argparse.Namespace) -> Task:
    """Train ``name``'s model briefly on ``data``'s training clients; pick the windows to explain."""
    dataset = open_dataset(data)
    spec = task_spec(name, dataset)
    start = time.perf_counter()
    x, y = _pool(dataset, dataset.train_clients[: args.train_clients], spec, spec.window // 2)
    held_x, held_y = _pool(dataset, (dataset.test_clients or dataset.clients)[:HELD_OUT_CLIENTS], spec, None)
    model = Model(spec, seed=args.seed)
    config = TrainConfig(epochs=args.train_epochs, batch_size=64, lr=3e-3, seed=args.seed)
    fit(model, x, y, config)
    seconds = time.perf_counter() - start
    predicted = model.predict(held_x)
    if spec.is_classifier:
        quality = {"held_out_accuracy": round(float((predicted.argmax(axis=1) == held_y).mean()), 4)}
    else:
        quality = {"held_out_mae_bpm": round(float(np.abs(predicted - held_y).mean()), 2)}
    pick = np.unique(np.linspace(0, len(held_x) - 1, min(args.windows, len(held_x))).round().astype(int))
    windows = np.ascontiguousarray(held_x[pick], dtype=np.float32)
    out = model.predict(windows)
    targets = out.argmax(axis=1).astype(np.int64) if spec.is_classifier else np.zeros(len(windows), np.int64)
    train = {"windows": len(x), "clients": min(args.train_clients, len(dataset.train_clients)),
             "epochs": args.train_epochs, "seconds": round(seconds, 2), "held_out_windows": len(held_x), **quality}
    return Task(name, data, model, windows, targets, train)


# -- the torch twin ------------------------------------------------------------------------------------


def torch_module(model: Model) -> Any:
    """The model as a ``torch.nn.Module`` in eval mode, its weights copied in, with wearfl's head on top: its
    output is ``model.predict``'s (probabilities (n, classes), or BPM (n,))."""
    import torch
    from torch import nn

    class Mean(nn.Module):  # GlobalAveragePool1D: (n, c, t) -> (n, c)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=2)

    class Head(nn.Module):
        def __init__(self, spec: Any) -> None:
            super().__init__()
            self.classifier = spec.is_classifier
            self.scale = float(spec.head.get("scale", 1.0))
            self.offset = float(spec.head.get("offset", 0.0))

        def forward(self, raw: torch.Tensor) -> torch.Tensor:
            return torch.softmax(raw, dim=1) if self.classifier else raw[:, 0] * self.scale + self.offset

    def tensor(value: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(value, dtype=np.float32))

    modules: list[nn.Module] = []
    for name, layer in model.network.layers:
        p = {k: v.value for k, v in layer.params.items()}
        if isinstance(layer, Conv1D):
            out_c, in_c, k = p["weight"].shape
            left, right = layer.padding
            modules.append(nn.ConstantPad1d((int(left), int(right)), 0.0))
            conv = nn.Conv1d(in_c, out_c, k, stride=layer.stride, dilation=layer.dilation)
            conv.weight.data, conv.bias.data = tensor(p["weight"]), tensor(p["bias"])
            modules.append(conv)
        elif isinstance(layer, BatchNorm1D):
            bn = nn.BatchNorm1d(len(p["gamma"]), eps=float(layer.eps))
            bn.weight.data, bn.bias.data = tensor(p["gamma"]), tensor(p["beta"])
            bn.running_mean.data, bn.running_var.data = tensor(p["running_mean"]), tensor(p["running_var"])
            modules.append(bn)
        elif isinstance(layer, ReLU):
            modules.append(nn.ReLU())
        elif isinstance(layer, Dropout):
            modules.append(nn.Dropout(layer.rate))
        elif isinstance(layer, GlobalAveragePool1D):
            modules.append(Mean())
        elif isinstance(layer, Flatten):
            modules.append(nn.Flatten())
        elif isinstance(layer, Dense):
            out_f, in_f = p["weight"].shape
            dense = nn.Linear(in_f, out_f)
            dense.weight.data, dense.bias.data = tensor(p["weight"]), tensor(p["bias"])
            modules.append(dense)
        else:
            raise SystemExit(f"error: the torch twin does not know layer {name!r} ({type(layer).__name__})")
    return nn.Sequential(*modules, Head(model.spec)).eval()


def load_captum() -> tuple[Any, Any] | str:
    """(torch, captum.attr) pinned to one thread, or why they cannot be used."""
    try:
        import torch
        from captum import attr
    except Exception as exc:  # absent or broken: both mean "wearfl's side only"
        return f"{type(exc).__name__}: {exc}"
    # InputXGradient marks the windows as requiring gradients itself, and says so at every call
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # only settable before torch's first parallel work
        torch.set_num_interop_threads(1)
    return torch, attr


# -- the runs ------------------------------------------------------------------------------------------


def best_time(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(the fastest of ``repeats`` calls in seconds, the last call's result)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


REFINED = "integrated-gradients+refine"
"""wearfl's default integrated gradients: windows that miss completeness are integrated again with more steps."""
CAN_REFINE = "refine" in inspect.signature(integrated_gradients).parameters


def wearfl_call(task: Task, method: str, steps: int, span: int) -> Callable[[], Explanation]:
    target = task.targets if task.model.spec.is_classifier else None
    if method == REFINED:
        return lambda: integrated_gradients(task.model, task.x, target, steps)
    if method == "integrated-gradients":  # a fixed number of steps, as Captum's
        fixed = {"refine": False} if CAN_REFINE else {}
        return lambda: integrated_gradients(task.model, task.x, target, steps, **fixed)
    if method == "gradient":
        return lambda: gradient_times_input(task.model, task.x, target)
    return lambda: occlusion(task.model, task.x, target, span)


def captum_call(torch: Any, attr: Any, net: Any, task: Task, method: str, steps: int,
                span: int) -> Callable[[], np.ndarray]:
    xt = torch.from_numpy(task.x)
    target = torch.from_numpy(task.targets) if task.model.spec.is_classifier else None
    if method == "integrated-gradients":
        explainer = attr.IntegratedGradients(net)

        def run() -> np.ndarray:
            return explainer.attribute(xt, baselines=0.0, target=target, n_steps=steps, method="gausslegendre",
                                       internal_batch_size=PASS_ROWS).detach().numpy()
    elif method == "gradient":
        explainer = attr.InputXGradient(net)

        def run() -> np.ndarray:
            return explainer.attribute(xt, target=target).detach().numpy()
    else:
        explainer = attr.Occlusion(net)
        per_eval = max(1, PASS_ROWS // len(task.x))

        def run() -> np.ndarray:
            with torch.no_grad():
                return explainer.attribute(xt, sliding_window_shapes=(1, span), strides=(1, span), baselines=0.0,
                                           target=target, perturbations_per_eval=per_eval).detach().numpy()
    return run


def completeness(attributions: np.ndarray, outputs: np.ndarray, baseline_outputs: np.ndarray) -> dict[str, float]:
    """max |sum(attr) - (out - baseline out)|, absolute and relative to each window's |out - baseline out|."""
    delta = outputs.astype(np.float64) - baseline_outputs
    gap = np.abs(attributions.sum(axis=(1, 2), dtype=np.float64) - delta)
    moved = np.abs(delta) > 1e-6  # a window whose output did not move has no relative gap
    rel = gap[moved] / np.abs(delta[moved])
    return {"max_abs_gap": float(gap.max()), "max_rel_gap": float(rel.max()) if rel.size else 0.0,
            "median_rel_gap": float(np.median(rel)) if rel.size else 0.0}


def forward_check(torch: Any, net: Any, task: Task) -> float:
    """Max |torch twin - model.predict| on the windows and on the zero baseline."""
    x = np.concatenate([task.x, np.zeros_like(task.x[:1])])
    with torch.no_grad():
        twin = net(torch.from_numpy(x)).numpy()
    return float(np.abs(twin - task.model.predict(x)).max())


def rows(args: argparse.Namespace) -> list[str]:
    """The methods to run, with wearfl's refined integrated gradients after the fixed-step ones."""
    out = []
    for method in args.methods:
        out.append(method)
        if method == "integrated-gradients" and CAN_REFINE and args.refine:
            out.append(REFINED)
    return out


def run_task(task: Task, args: argparse.Namespace, captum: tuple[Any, Any] | None) -> dict[str, Any]:
    span = args.span or default_span(task.x.shape[2])
    n = len(task.x)
    result: dict[str, Any] = {"task": task.name, "dataset": task.dataset, "windows": n,
                              "input_shape": list(task.x.shape[1:]), "span": span, "training": task.train,
                              "parameters": task.model.num_parameters(), "methods": {}}
    net = None
    if captum is not None:
        torch, attr = captum
        net = torch_module(task.model)
        result["torch_forward_max_abs_diff"] = forward_check(torch, net, task)
        print(f"{task.name}: torch twin vs model.predict, max |diff| = {result['torch_forward_max_abs_diff']:.3g} "
              f"({'probability' if task.model.spec.is_classifier else 'BPM'})", file=sys.stderr, flush=True)
    fixed_ig = None
    for method in rows(args):
        seconds, explanation = best_time(wearfl_call(task, method, args.steps, span), args.repeats)
        row: dict[str, Any] = {"wearfl_ms_per_window": 1000 * seconds / n,
                               "max_abs_attribution": float(np.abs(explanation.attributions).max())}
        if method in ("integrated-gradients", REFINED):
            row["steps"] = args.steps
            row["wearfl_completeness"] = completeness(explanation.attributions, explanation.outputs,
                                                      explanation.baseline_outputs)
        if method == "integrated-gradients":
            fixed_ig = explanation.attributions
        if method == REFINED and fixed_ig is not None:  # the windows refinement integrated again
            changed = np.abs(explanation.attributions - fixed_ig).max(axis=(1, 2)) > 0
            row["refined_windows"] = int(changed.sum())
            row["max_abs_change_from_fixed_steps"] = float(np.abs(explanation.attributions - fixed_ig).max())
        if captum is not None and method != REFINED:
            torch, attr = captum
            c_seconds, theirs = best_time(captum_call(torch, attr, net, task, method, args.steps, span),
                                          args.repeats)
            diff = np.abs(explanation.attributions - theirs)
            scale = float(np.abs(theirs).max())
            row.update({"captum": CAPTUM_CLASS[method], "captum_ms_per_window": 1000 * c_seconds / n,
                        "max_abs_diff": float(diff.max()),
                        "max_rel_diff": float(diff.max() / scale) if scale > 0 else 0.0,
                        "captum_max_abs_attribution": scale})
            if method == "integrated-gradients":
                row["captum_completeness"] = completeness(theirs, explanation.outputs, explanation.baseline_outputs)
        result["methods"][method] = row
        print(f"  {task.name} {method}: wearfl {row['wearfl_ms_per_window']:.2f} ms/window"
              + (f", captum {row['captum_ms_per_window']:.2f} ms/window, max |diff| {row['max_abs_diff']:.3g}"
                 if "captum" in row else ""), file=sys.stderr, flush=True)
    return result


# -- the report ----------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu, memory = platform.processor() or platform.machine(), None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 1024**2, 1)
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "memory_gb": memory, "platform": platform.platform(),
            "python": platform.python_version()}


def versions() -> dict[str, str]:
    found = {}
    for name in ("wearfl", "numpy", "torch", "captum"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(results: list[dict[str, Any]]) -> str:
    head = (f"{'task':<10}  {'method':<27}  {'wearfl ms/win':>13}  {'captum ms/win':>13}  {'max |diff|':>10}  "
            f"{'rel diff':>9}  {'max |attr|':>10}  {'IG gap wearfl':>17}  {'IG gap captum':>13}")
    lines = [head, "-" * len(head)]
    for r in results:
        for method, m in r["methods"].items():
            gap = m.get("wearfl_completeness")
            gap_w = "-" if gap is None else f"{gap['max_rel_gap']:.1e} ({gap['median_rel_gap']:.0e})"
            gap_c = m.get("captum_completeness", {}).get("max_rel_gap")
            lines.append(f"{r['task']:<10}  {method:<27}  {m['wearfl_ms_per_window']:>13.2f}  "
                        f"{_num(m.get('captum_ms_per_window'), '.2f'):>13}  {_num(m.get('max_abs_diff'), '.2e'):>10}  "
                        f"{_num(m.get('max_rel_diff'), '.1e'):>9}  {m['max_abs_attribution']:>10.3g}  "
                        f"{gap_w:>17}  {_num(gap_c, '.1e'):>13}")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="the models to explain")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="the attribution methods")
    p.add_argument("--windows", type=int, default=64, help="held-out windows explained per task")
    p.add_argument("--steps", type=int, default=32, help="integrated-gradients steps (Gauss-Legendre nodes)")
    p.add_argument("--span", type=int, help="occlusion patch length in samples (default: a sixteenth of the window)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method and side; the fastest counts")
    p.add_argument("--activity-data", default=activity_data(),
                   help="data set of the activity model (hapt:DIR when WEARFL_HAPT_DIR or the shared copy exists)")
    p.add_argument("--heart-rate-data", default="sim:0", help="data set of the heart-rate model")
    p.add_argument("--train-clients", type=int, default=6, help="training clients whose windows train each model")
    p.add_argument("--train-epochs", type=int, default=3, help="epochs of the brief training")
    p.add_argument("--seed", type=int, default=0, help="model initialization and training seed")
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True,
                   help="also time wearfl's default integrated gradients, which integrate the windows that miss "
                        "completeness again with more steps (wearfl-only row; the Captum comparison uses "
                        "refine=False, a fixed number of steps like Captum's)")
    p.add_argument("--no-captum", action="store_true", help="run wearfl's side only, even when Captum is installed")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    if min(args.windows, args.steps, args.repeats, args.train_clients, args.train_epochs) < 1:
        p.error("--windows, --steps, --repeats, --train-clients and --train-epochs must be positive")
    if args.span is not None and args.span < 1:
        p.error("--span must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    captum: tuple[Any, Any] | None = None
    missing = "--no-captum" if args.no_captum else None
    if not args.no_captum:
        loaded = load_captum()
        if isinstance(loaded, str):
            missing = loaded
        else:
            captum = loaded
    info, vers = machine(), versions()
    print(f"machine: {info['cpus']} CPUs, {info['cpu_model']}, {info['memory_gb']} GB; Python {info['python']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"settings: {args.windows} windows per task, {args.steps} integrated-gradients steps, best of "
          f"{args.repeats} calls, one thread (OPENBLAS_NUM_THREADS=1"
          + (f", torch {captum[0].get_num_threads()} intra-op thread" if captum else "") + ")")
    if captum is None:
        print(f"Captum not used ({missing}): wearfl's side only; for the comparison: {CAPTUM_HINT}")
    sys.stdout.flush()

    results = []
    for name in args.tasks:
        data = args.activity_data if name == "activity" else args.heart_rate_data
        print(f"training the {name} model on {data} ...", file=sys.stderr, flush=True)
        task = make_task(name, data, args)
        print(f"  {task.train}", file=sys.stderr, flush=True)
        results.append(run_task(task, args, captum))

    print()
    for r in results:
        quality = ", ".join(f"{k} {v}" for k, v in r["training"].items() if k.startswith("held_out_"))
        forward = r.get("torch_forward_max_abs_diff")
        print(f"{r['task']}: {r['dataset']}, input {tuple(r['input_shape'])}, {r['parameters']} parameters, trained "
              f"{r['training']['seconds']} s on {r['training']['windows']} windows ({quality}); "
              f"{r['windows']} windows explained, occlusion span {r['span']}"
              + ("" if forward is None else f"; torch twin vs model.predict max |diff| {forward:.2e}"))
    print()
    print(table(results))
    for r in results:
        refined = r["methods"].get(REFINED, {})
        if "refined_windows" in refined:
            print(f"{r['task']}: {REFINED} integrated {refined['refined_windows']} of {r['windows']} windows again "
                  f"(attributions moved by at most {refined['max_abs_change_from_fixed_steps']:.3g} from "
                  f"{refined['steps']} steps)")
    print("\nrel diff: max |wearfl - captum| / max |captum attribution|; max |attr|: wearfl's largest attribution "
          "(probability or BPM);\nIG gap: completeness, max over windows of |sum(attr) - (out - baseline out)| / "
          "|out - baseline out| (wearfl: max (median))")
    if args.json:
        body = {"machine": info, "versions": vers,
                "settings": {"windows": args.windows, "steps": args.steps, "repeats": args.repeats,
                             "span": args.span, "pass_rows": PASS_ROWS, "threads": 1,
                             "captum": None if captum else missing},
                "tasks": results}
        Path(args.json).write_text(json.dumps(body, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
