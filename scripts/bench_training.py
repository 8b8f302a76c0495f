#!/usr/bin/env python
"""Benchmark the numpy training engine against PyTorch, and inference back-ends against each other.

Why: wearfl trains on gateways (a Raspberry Pi class machine: few cores, little
memory) with its own numpy engine in ``models/`` instead of PyTorch. This script
puts numbers on that choice for both models (``activity``, ``heart-rate``):

1. Training: steps/s with Adam (lr 1e-3) at each batch size of ``--batch-sizes``
   (default 32 and 8, a gateway's small buffers) and the process's peak RSS, for
   the numpy engine (``models.fit``, the real code path) and for the same network
   in PyTorch on one CPU thread, when torch is importable; the table and the JSON
   give numpy's step time over torch's per task and batch size.
2. Inference: median latency per ``predict`` call at batch 1 and 64 for the
   numpy, onnxruntime, LiteRT (float and int8) and torch back-ends.

Every configuration runs in a fresh subprocess (this file with ``--worker``) so
its peak RSS is its own; all workers get ``OPENBLAS_NUM_THREADS``,
``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` = 1 so that "single-threaded" means
the same for numpy's BLAS and for torch. The data is synthetic (a fixed set of
2048 random windows), since only speed and memory are measured.

Usage, from the repository root::

    python scripts/bench_training.py                      # full run, a few minutes
    python scripts/bench_training.py --quick              # smoke run
    python scripts/bench_training.py --batch-sizes 32     # training at batch 32 only
    python scripts/bench_training.py --no-inference       # the training table only
    python scripts/bench_training.py --tasks activity --no-torch --out /tmp/b.json
    python scripts/bench_training.py --profile 200        # cProfile of 200 numpy training steps

A readable table goes to stdout, progress to stderr, all figures and machine info
to the JSON file given by ``--out`` (default ``bench-results/training.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from models import Model, ModelSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
# Benchmark the working tree's engine, whether or not the project is pip-installed.
if (REPO_ROOT / "models" / "__init__.py").is_file() and str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TASKS = ("activity", "heart-rate")
BATCH_SIZES = (32, 8)
STEPS_PER_EPOCH = 64  # the training set is 64 batches (2048 windows); longer runs take more epochs
LR = 1e-3
INFER_BATCHES = (1, 64)
INFER_BACKENDS = ("numpy", "onnxruntime", "litert", "litert-int8", "torch")
THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RESULT_MARK = "BENCH_RESULT "
WORKER_TIMEOUT_S = 900
TFLITE_MISSING = "models.tflite_export is not importable yet"

Result = dict[str, Any]


# --------------------------------------------------------------------------- worker side


def _rss_now_mb() -> float:
    """Current resident set size (VmRSS), MB; falls back to the peak off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _peak_rss_mb()


def _peak_rss_mb() -> float:
    """Peak resident set size of this process, MB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _spec(task: str) -> ModelSpec:
    from models import activity_spec, heart_rate_spec

    return activity_spec() if task == "activity" else heart_rate_spec()


def _make_data(spec: ModelSpec, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random windows (n, C, T) float32 and targets: class indices, or BPM in 50..180."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *spec.input_shape), dtype=np.float32)
    n_classes = len(spec.classes)
    y = rng.integers(0, n_classes, n) if spec.is_classifier else rng.uniform(50.0, 180.0, n).astype(np.float32)
    return x, y


def _torch_setup() -> Any:
    """Import torch and pin it to one intra-op and one inter-op thread."""
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    return torch


def _torch_net(spec: ModelSpec, model: Model) -> Any:
    """``spec.architecture`` as a ``torch.nn.Sequential``, with ``model``'s weights copied in."""
    import torch
    from torch import nn

    modules: list[nn.Module] = []
    by_name: dict[str, nn.Module] = {}
    for cfg in spec.architecture:
        kind = cfg["type"]
        if kind == "conv1d":
            left, right = (int(p) for p in cfg.get("padding", (0, 0)))
            if left != right:  # asymmetric (TF "SAME" with stride 2): an explicit pad, as a torch user would
                modules.append(nn.ConstantPad1d((left, right), 0.0))
            layer: nn.Module = nn.Conv1d(
                int(cfg["in_channels"]), int(cfg["out_channels"]), int(cfg["kernel_size"]),
                stride=int(cfg.get("stride", 1)), padding=left if left == right else 0,
                dilation=int(cfg.get("dilation", 1)),
            )
        elif kind == "batchnorm1d":
            layer = nn.BatchNorm1d(
                int(cfg["channels"]), eps=float(cfg.get("eps", 1e-5)), momentum=float(cfg.get("momentum", 0.1))
            )
        elif kind == "relu":
            layer = nn.ReLU()
        elif kind == "global_avg_pool1d":  # mean over time: (N, C, T) -> (N, C)
            modules.append(nn.AdaptiveAvgPool1d(1))
            layer = nn.Flatten()
        elif kind == "flatten":
            layer = nn.Flatten()
        elif kind == "dropout":
            layer = nn.Dropout(float(cfg["rate"]))
        elif kind == "dense":
            layer = nn.Linear(int(cfg["in_features"]), int(cfg["out_features"]))
        else:
            raise ValueError(f"the torch benchmark does not know layer type {kind!r}")
        modules.append(layer)
        by_name[str(cfg["name"])] = layer
    net = nn.Sequential(*modules)
    rename = {"gamma": "weight", "beta": "bias"}
    with torch.no_grad():
        for full, param in model.network.parameters().items():
            layer_name, pname = full.rsplit(".", 1)
            target = getattr(by_name[layer_name], rename.get(pname, pname))
            target.copy_(torch.from_numpy(param.value.copy()))
    return net


def _torch_parity(torch: Any, net: Any, model: Model, x: np.ndarray) -> float:
    """Max |torch - numpy| of the raw network output in eval mode: proof the architectures match."""
    import numpy as np

    net.eval()
    with torch.no_grad():
        out = net(torch.from_numpy(x)).numpy()
    return float(np.max(np.abs(out - model.forward_raw(x, training=False))))


def _time_training(run: Callable[[int], tuple[float, int, float]], steps: int, seconds: float, repeats: int) -> Result:
    """Warm up with one epoch, size the run (``steps`` or about ``seconds``), time ``repeats`` runs.

    ``run(epochs)`` trains for whole epochs and returns (seconds, steps, final loss).
    """
    warm_s, warm_steps, _ = run(1)
    if steps > 0:
        epochs = max(1, round(steps / STEPS_PER_EPOCH))
    else:
        epochs = max(1, round(seconds * warm_steps / warm_s / STEPS_PER_EPOCH))
    runs = [run(epochs) for _ in range(repeats)]
    rates = [n / s for s, n, _ in runs]
    median = statistics.median(rates)
    return {
        "steps_per_repeat": runs[0][1],
        "repeats": repeats,
        "seconds_per_repeat": [round(s, 4) for s, _, _ in runs],
        "steps_per_s_all": [round(r, 2) for r in rates],
        "steps_per_s": round(median, 2),
        "ms_per_step": round(1000.0 / median, 4),
        "warmup_steps": warm_steps,
        "final_loss": round(runs[-1][2], 5),
    }


def worker_train_numpy(task: str, batch: int, steps: int, seconds: float, repeats: int) -> Result:
    """Steps/s of ``models.fit`` (batch ``batch``, Adam) and this process's peak RSS."""
    from models import Model, TrainConfig, fit  # imports numpy too

    rss_imports = _rss_now_mb()
    spec = _spec(task)
    model = Model(spec, seed=0)
    x, y = _make_data(spec, STEPS_PER_EPOCH * batch)
    seed = iter(range(10**6))

    def run(epochs: int) -> tuple[float, int, float]:
        config = TrainConfig(epochs=epochs, batch_size=batch, lr=LR, optimizer="adam", seed=next(seed))
        t0 = time.perf_counter()
        result = fit(model, x, y, config)
        return time.perf_counter() - t0, result.steps, result.epoch_losses[-1]

    timing = _time_training(run, steps, seconds, repeats)
    return {
        "engine": "numpy", "task": task, "batch_size": batch, "params": model.num_parameters(),
        "rss_after_imports_mb": round(rss_imports, 1), **timing, "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


def worker_train_torch(task: str, batch: int, steps: int, seconds: float, repeats: int) -> Result:
    """The same training loop in PyTorch on one thread: permutation per epoch, index a batch, Adam.

    Torch's defaults otherwise (its Adam, its conv kernels), as a PyTorch user would run it.
    """
    import numpy as np

    from models import Model

    torch = _torch_setup()
    import torch.nn.functional as F

    rss_imports = _rss_now_mb()
    spec = _spec(task)
    model = Model(spec, seed=0)
    net = _torch_net(spec, model)
    x, y = _make_data(spec, STEPS_PER_EPOCH * batch)
    parity = _torch_parity(torch, net, model, x[:8])
    xt = torch.from_numpy(x)
    if spec.is_classifier:
        yt = torch.from_numpy(y.astype(np.int64))

        def loss_fn(out: Any, target: Any) -> Any:
            return F.cross_entropy(out, target)
    else:  # what models.Model does: Huber within 5 BPM on (bpm - offset) / scale
        head = spec.head
        yt = torch.from_numpy(((y - np.float32(head["offset"])) / np.float32(head["scale"])).astype(np.float32))
        yt = yt.reshape(-1, 1)
        delta = 5.0 / float(head["scale"])

        def loss_fn(out: Any, target: Any) -> Any:
            return F.huber_loss(out, target, delta=delta)

    opt = torch.optim.Adam(net.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(0)
    n = len(x)

    def run(epochs: int) -> tuple[float, int, float]:
        net.train()
        step, total = 0, 0.0
        t0 = time.perf_counter()
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for start in range(0, n, batch):
                idx = order[start : start + batch]
                opt.zero_grad()
                loss = loss_fn(net(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                step += 1
        return time.perf_counter() - t0, step, total / n

    timing = _time_training(run, steps, seconds, repeats)
    return {
        "engine": "torch", "task": task, "batch_size": batch, "params": sum(p.numel() for p in net.parameters()),
        "parity_max_abs_diff": parity, "torch_threads": [torch.get_num_threads(), torch.get_num_interop_threads()],
        "rss_after_imports_mb": round(rss_imports, 1), **timing, "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


def _torch_predictor(spec: ModelSpec, model: Model) -> Callable[[np.ndarray], np.ndarray]:
    torch = _torch_setup()
    net = _torch_net(spec, model).eval()
    head = spec.head

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = net(torch.from_numpy(x))
            out = torch.softmax(out, dim=1) if spec.is_classifier else out[:, 0] * head["scale"] + head["offset"]
        return out.numpy()

    return predict


def worker_infer(task: str, backend: str, seconds: float) -> Result:
    """Median ms per ``predict`` call at batch 1 and 64 on one back-end, after a short warm-up."""
    import numpy as np

    from models import Model, TrainConfig, fit
    from models.inference import LiteRTPredictor, open_model

    spec = _spec(task)
    model = Model(spec, seed=0)
    x, y = _make_data(spec, 256)
    # A few steps so that batch-norm statistics are not the identity (matters for int8 calibration).
    fit(model, x, y, TrainConfig(epochs=1, batch_size=32, lr=LR, optimizer="adam", seed=0))
    try:
        if backend == "torch":
            predict = _torch_predictor(spec, model)
        elif backend == "litert-int8":
            from models.tflite_export import export_tflite

            predict = LiteRTPredictor(export_tflite(model, int8=True, calibration=x[:256]), model.spec).predict
        else:
            predict = open_model(model, backend).predict
    except ModuleNotFoundError as exc:
        if exc.name == "models.tflite_export":
            return {"task": task, "backend": backend, "status": "skipped", "note": TFLITE_MISSING}
        raise
    reference = model.predict(x[:64])
    out: Result = {"task": task, "backend": backend, "status": "ok"}
    for batch in INFER_BATCHES:
        xb = np.ascontiguousarray(x[:batch])
        for _ in range(10):
            predict(xb)
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(times) < 20 or (time.perf_counter() < deadline and len(times) < 5000):
            t0 = time.perf_counter()
            predict(xb)
            times.append(time.perf_counter() - t0)
        times.sort()
        out[f"batch{batch}"] = {
            "median_ms": round(1000 * statistics.median(times), 4),
            "p90_ms": round(1000 * times[int(0.9 * (len(times) - 1))], 4),
            "calls": len(times),
        }
    out["max_abs_diff_vs_numpy"] = float(np.max(np.abs(np.asarray(predict(x[:64])) - reference)))
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return out


def _openblas_runtime() -> Result:
    """What the OpenBLAS inside numpy reports at run time (core type picked, threads), via ctypes."""
    import numpy as np

    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    info: Result = {}
    for lib_path in sorted(libs.glob("*openblas*.so*")):
        lib = ctypes.CDLL(str(lib_path))
        for key, names in {
            "config": ("scipy_openblas_get_config64_", "openblas_get_config64_", "openblas_get_config"),
            "corename": ("scipy_openblas_get_corename64_", "openblas_get_corename64_", "openblas_get_corename"),
            "num_threads": ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                            "openblas_get_num_threads"),
        }.items():
            for name in names:
                fn = getattr(lib, name, None)
                if fn is None:
                    continue
                fn.restype = ctypes.c_int if key == "num_threads" else ctypes.c_char_p
                value = fn()
                info[key] = value.decode() if isinstance(value, bytes) else value
                break
        info["library"] = lib_path.name
    return info


def worker_info() -> Result:
    """Versions and the BLAS numpy uses, as seen with the workers' environment."""
    import numpy as np

    info: Result = {"numpy": np.__version__}
    with contextlib.suppress(Exception):
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["blas"] = {k: blas.get(k) for k in ("name", "version", "openblas configuration")}
    with contextlib.suppress(Exception):
        info["openblas_runtime"] = _openblas_runtime()
    try:
        from threadpoolctl import threadpool_info

        info["threadpoolctl"] = threadpool_info()
    except ImportError:
        info["threadpoolctl"] = None
    for dist in ("onnxruntime", "ai-edge-litert", "onnx", "scipy"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    try:
        torch = _torch_setup()
        info["torch"] = torch.__version__
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["torch_mkldnn"] = bool(torch.backends.mkldnn.is_available())
    except Exception as exc:  # an absent or broken torch both mean "no torch column"
        info["torch"] = None
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    import models

    info["models_path"] = str(Path(models.__file__).parent)
    return info


def worker_profile(task: str, batch: int, steps: int) -> Result:
    """cProfile of ``fit`` over about ``steps`` numpy training steps: top 10 by cumulative and own time."""
    from models import Model, TrainConfig, fit

    spec = _spec(task)
    model = Model(spec, seed=0)
    x, y = _make_data(spec, STEPS_PER_EPOCH * batch)
    fit(model, x, y, TrainConfig(epochs=1, batch_size=batch, lr=LR, seed=0))  # warm-up
    epochs = max(1, round(steps / STEPS_PER_EPOCH))
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    result = fit(model, x, y, TrainConfig(epochs=epochs, batch_size=batch, lr=LR, seed=1))
    profiler.disable()
    wall = time.perf_counter() - t0
    texts = {}
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        stats = pstats.Stats(profiler, stream=buf)
        stats.strip_dirs().sort_stats(key).print_stats(10)
        texts[key] = buf.getvalue()
    return {"task": task, "batch_size": batch, "steps": result.steps, "wall_s": round(wall, 3),
            "by_cumulative": texts["cumulative"], "by_tottime": texts["tottime"]}


def run_worker(args: argparse.Namespace) -> None:
    if args.worker == "info":
        result = worker_info()
    elif args.worker == "profile":
        result = worker_profile(args.task, args.batch, args.profile)
    elif args.worker == "infer":
        result = worker_infer(args.task, args.backend, args.seconds)
    elif args.engine == "torch":
        result = worker_train_torch(args.task, args.batch, args.steps, args.seconds, args.repeats)
    else:
        result = worker_train_numpy(args.task, args.batch, args.steps, args.seconds, args.repeats)
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")


# --------------------------------------------------------------------------- parent side


def _worker_env() -> dict[str, str]:
    """This environment plus one BLAS/OpenMP thread (OPENBLAS_CORETYPE and the rest are kept)."""
    return {**os.environ, **THREAD_ENV}


def spawn(worker_args: list[str]) -> Result:
    """Run this file as a worker in a fresh interpreter and return its result (or the error)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *worker_args]
    try:
        proc = subprocess.run(cmd, env=_worker_env(), capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {WORKER_TIMEOUT_S} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK) :])
            result.setdefault("status", "ok")
            return result
    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-3:]
    return {"status": "error", "error": f"worker exited {proc.returncode}: " + " | ".join(tail)}


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine_info() -> Result:
    processor = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                processor = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "machine": platform.machine(),
        "processor": processor,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "worker_thread_env": THREAD_ENV,
    }


def engine_fingerprint() -> Result:
    """Which engine code was measured: git commit, whether ``models/`` has local changes, and a hash of its sources.

    ``models/`` changes often; the hash tells two runs of the same code apart from two of different code.
    """
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "models").rglob("*.py")):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    out: Result = {"models_sha256": digest.hexdigest()[:16], "git_commit": None, "models_dirty": None}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(REPO_ROOT)]
        out["git_commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
        status = subprocess.run([*git, "status", "--porcelain", "--", "models"], capture_output=True, text=True,
                                timeout=10).stdout
        out["models_dirty"] = bool(status.strip())
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(rows: list[Result], tasks: list[str], batches: list[int]) -> list[Result]:
    """numpy over torch per task and batch size: step time (the target is <= 0.8) and peak RSS."""
    out: list[Result] = []
    for task in tasks:
        for batch in batches:
            got = {r["engine"]: r for r in rows
                   if r.get("task") == task and r.get("batch_size") == batch and r.get("status") == "ok"}
            if "numpy" not in got or "torch" not in got:
                continue
            np_r, t_r = got["numpy"], got["torch"]
            step = _ratio(np_r["ms_per_step"], t_r["ms_per_step"])
            peak = _ratio(np_r["peak_rss_mb"], t_r["peak_rss_mb"])
            out.append({
                "task": task, "batch_size": batch,
                "numpy_ms_per_step": np_r["ms_per_step"], "torch_ms_per_step": t_r["ms_per_step"],
                "step_time_ratio": None if step is None else round(step, 3),
                "numpy_peak_rss_mb": np_r["peak_rss_mb"], "torch_peak_rss_mb": t_r["peak_rss_mb"],
                "peak_rss_ratio": None if peak is None else round(peak, 3),
            })
    return out


def training_table(rows: list[Result], tasks: list[str], batches: list[int], with_torch: bool) -> str:
    head = (f"{'task':<11} {'batch':>5} {'engine':<12} {'params':>7} {'steps/s':>9} {'min-max':>11} {'ms/step':>8} "
            f"{'RSS after imports MB':>21} {'peak RSS MB':>12} {'peak-base MB':>13}")
    title = (f"Training: Adam lr {LR:g}, one thread; steps/s is the median over every repeat of every process, "
             "peak RSS the worst process; numpy/torch: numpy's step time and memory over torch's")
    lines = [title, head, "-" * len(head)]
    for task in tasks:
        for batch in batches:
            got: dict[str, Result] = {}
            for r in rows:
                if r.get("task") != task or r.get("batch_size") != batch:
                    continue
                if r.get("status") != "ok":
                    why = r.get("error") or r.get("note")
                    lines.append(f"{task:<11} {batch:>5} {r.get('engine', '?'):<12} {r.get('status')}: {why}")
                    continue
                got[r["engine"]] = r
                spread = f"{r['steps_per_s_min']:.0f}-{r['steps_per_s_max']:.0f}"
                lines.append(
                    f"{task:<11} {batch:>5} {r['engine']:<12} {r['params']:>7} {r['steps_per_s']:>9.1f} "
                    f"{spread:>11} {r['ms_per_step']:>8.2f} {r['rss_after_imports_mb']:>21.1f} "
                    f"{r['peak_rss_mb']:>12.1f} {r['peak_rss_mb'] - r['rss_after_imports_mb']:>13.1f}"
                )
            if with_torch and "numpy" in got and "torch" in got:
                np_r, t_r = got["numpy"], got["torch"]
                speed = _ratio(np_r["steps_per_s"], t_r["steps_per_s"])
                step = _ratio(np_r["ms_per_step"], t_r["ms_per_step"])
                base = _ratio(np_r["rss_after_imports_mb"], t_r["rss_after_imports_mb"])
                peak = _ratio(np_r["peak_rss_mb"], t_r["peak_rss_mb"])
                extra = _ratio(np_r["peak_rss_mb"] - np_r["rss_after_imports_mb"],
                               t_r["peak_rss_mb"] - t_r["rss_after_imports_mb"])
                lines.append(
                    f"{task:<11} {batch:>5} {'numpy/torch':<12} {'':>7} {_fmt(speed, '>8.2f')}x {'':>11} "
                    f"{_fmt(step, '>7.2f')}x {_fmt(base, '>20.2f')}x {_fmt(peak, '>11.2f')}x {_fmt(extra, '>12.2f')}x"
                )
    return "\n".join(lines)


def inference_table(rows: list[Result], tasks: list[str]) -> str:
    head = f"{'task':<11} {'backend':<12} " + " ".join(f"{f'batch {b} ms':>11}" for b in INFER_BATCHES) + (
        f" {'ms/window@64':>13} {'max|diff| vs numpy':>19}")
    lines = ["Inference: median ms per predict() call, one thread", head, "-" * len(head)]
    for task in tasks:
        for r in rows:
            if r.get("task") != task:
                continue
            if r.get("status") != "ok":
                lines.append(f"{task:<11} {r['backend']:<12} {r['status']}: {r.get('note') or r.get('error')}")
                continue
            cells = " ".join(f"{r[f'batch{b}']['median_ms']:>11.3f}" for b in INFER_BATCHES)
            per_window = r[f"batch{INFER_BATCHES[-1]}"]["median_ms"] / INFER_BATCHES[-1]
            lines.append(f"{task:<11} {r['backend']:<12} {cells} {per_window:>13.4f} "
                         f"{r['max_abs_diff_vs_numpy']:>19.2e}")
    return "\n".join(lines)


def merge_processes(task: str, batch: int, engine: str, runs: list[Result]) -> Result:
    """One row from several worker processes: median over every repeat of every process, worst peak RSS."""
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        first = runs[0] if runs else {}
        return {"task": task, "batch_size": batch, "engine": engine, "status": "error",
                "error": first.get("error", "no run")}
    rates = [rate for r in ok for rate in r["steps_per_s_all"]]
    median = statistics.median(rates)
    merged: Result = {
        "task": task, "batch_size": batch, "engine": engine, "status": "ok", "params": ok[0]["params"],
        "steps_per_s": round(median, 2),
        "ms_per_step": round(1000.0 / median, 4),
        "steps_per_s_min": min(rates),
        "steps_per_s_max": max(rates),
        "steps_per_s_process_medians": [r["steps_per_s"] for r in ok],
        "steps_per_repeat": [r["steps_per_repeat"] for r in ok],
        "repeats": sum(r["repeats"] for r in ok),
        "rss_after_imports_mb": statistics.median(r["rss_after_imports_mb"] for r in ok),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
        "peak_rss_mb_per_process": [r["peak_rss_mb"] for r in ok],
        "final_loss": ok[-1]["final_loss"],
        "failed_processes": [r.get("error") for r in runs if r.get("status") != "ok"],
        "processes": runs,
    }
    if "parity_max_abs_diff" in ok[0]:
        merged["parity_max_abs_diff"] = max(r["parity_max_abs_diff"] for r in ok)
        merged["torch_threads"] = ok[0]["torch_threads"]
    return merged


def _describe_train(r: Result) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('error') or r.get('note')}"
    return (f"{r['steps_per_s']:.1f} steps/s ({r['steps_per_repeat']} steps x {r['repeats']}), "
            f"peak {r['peak_rss_mb']:.0f} MB")


def _describe_infer(r: Result) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('note') or r.get('error')}"
    return ", ".join(f"batch {b}: {r[f'batch{b}']['median_ms']:.3f} ms" for b in INFER_BATCHES)


def run_profile(args: argparse.Namespace, tasks: list[str]) -> None:
    for task in tasks:
        for batch in args.batch_sizes:
            _progress(f"profiling {args.profile} numpy training steps of {task} at batch {batch} ...")
            r = spawn(["profile", "--task", task, "--batch", str(batch), "--profile", str(args.profile)])
            if r.get("status") != "ok":
                print(f"{task} batch {batch}: {r.get('error')}")
                continue
            print(f"=== {task}, batch {batch}: {r['steps']} steps in {r['wall_s']} s under cProfile ===")
            print("--- top 10 by cumulative time ---")
            print(r["by_cumulative"])
            print("--- top 10 by own time ---")
            print(r["by_tottime"])


def run_bench(args: argparse.Namespace, tasks: list[str]) -> None:
    started = time.perf_counter()
    seconds = args.seconds if args.seconds is not None else (0.5 if args.quick else 3.0)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    processes = args.processes if args.processes is not None else (1 if args.quick else 3)
    infer_seconds = 0.2 if args.quick else 1.5
    train_common = ["--steps", str(args.steps), "--seconds", str(seconds), "--repeats", str(repeats)]

    _progress("collecting versions ...")
    info = spawn(["info"])
    engine_before = engine_fingerprint()
    torch_ok = not args.no_torch and bool(info.get("torch"))
    if not args.no_torch and not torch_ok:
        _progress(f"torch is not importable ({info.get('torch_error')}); leaving its columns out")
    engines = ["numpy", "torch"] if torch_ok else ["numpy"]
    backends = [b for b in INFER_BACKENDS if b != "torch" or torch_ok]

    # Training: `processes` fresh workers per configuration, interleaved (numpy, torch, numpy, ...) so
    # that drift in the machine's state hits both engines alike; torch varies between processes.
    batches = args.batch_sizes
    train_jobs = [(task, b, e, k) for k in range(processes) for task in tasks for b in batches for e in engines]
    infer_jobs = [] if args.no_inference else [(task, b) for task in tasks for b in backends]
    total = len(train_jobs) + len(infer_jobs)
    runs: dict[tuple[str, int, str], list[Result]] = {}
    for i, (task, batch, engine, k) in enumerate(train_jobs, start=1):
        t0 = time.perf_counter()
        r = spawn(["train", "--engine", engine, "--task", task, "--batch", str(batch), *train_common])
        runs.setdefault((task, batch, engine), []).append(r)
        _progress(f"[{i}/{total}] train {task} batch {batch} {engine} (process {k + 1}/{processes}): "
                  f"{_describe_train(r)} ({time.perf_counter() - t0:.1f} s)")
    training = [merge_processes(task, batch, engine, runs[(task, batch, engine)])
                for task in tasks for batch in batches for engine in engines]
    ratios = compare(training, tasks, batches) if torch_ok else []

    inference: list[Result] = []
    for i, (task, backend) in enumerate(infer_jobs, start=len(train_jobs) + 1):
        t0 = time.perf_counter()
        r = spawn(["infer", "--task", task, "--backend", backend, "--seconds", str(infer_seconds)])
        r.setdefault("task", task)
        r.setdefault("backend", backend)
        inference.append(r)
        _progress(f"[{i}/{total}] infer {task} {backend}: {_describe_infer(r)} ({time.perf_counter() - t0:.1f} s)")

    # The LiteRT exporter may have landed while the rest ran: try the skipped rows once more.
    for j, r in enumerate(inference):
        if r.get("note") == TFLITE_MISSING:
            _progress(f"re-checking {r['task']} {r['backend']} (models.tflite_export was missing) ...")
            again = spawn(["infer", "--task", r["task"], "--backend", r["backend"], "--seconds", str(infer_seconds)])
            again.setdefault("task", r["task"])
            again.setdefault("backend", r["backend"])
            inference[j] = again
            _progress(f"    {r['task']} {r['backend']}: {_describe_infer(again)}")

    if engine_fingerprint()["models_sha256"] != engine_before["models_sha256"]:
        engine_before["changed_during_run"] = True
        _progress("warning: models/ changed while the benchmark ran; the rows may mix two versions of the engine")

    print(training_table(training, tasks, batches, torch_ok))
    if inference:
        print()
        print(inference_table(inference, tasks))

    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [Path(sys.executable).name, *sys.argv],
        "settings": {"batch_sizes": batches, "lr": LR, "optimizer": "adam", "steps_per_epoch": STEPS_PER_EPOCH,
                     "target_seconds_per_repeat": seconds, "fixed_steps": args.steps or None, "repeats": repeats,
                     "processes_per_training_config": processes,
                     "inference_seconds_per_batch_size": None if args.no_inference else infer_seconds,
                     "quick": args.quick},
        "machine": machine_info(),
        "versions": info,
        "engine": engine_before,
        "training": training,
        "numpy_over_torch": ratios,
        "inference": inference,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nengine: models/ sha256 {engine_before['models_sha256']}, commit {engine_before['git_commit']}"
          f"{' + local changes' if engine_before['models_dirty'] else ''}")
    print(f"JSON: {out.resolve()}  (total {report['wall_s']} s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: ~0.5 s per configuration, one repeat")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks (default: %(default)s)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES), metavar="N",
                   help="training batch sizes, e.g. --batch-sizes 32 8 (default: %(default)s)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows even if torch is importable")
    p.add_argument("--no-inference", action="store_true", help="measure training only")
    p.add_argument("--out", default="bench-results/training.json", help="JSON output (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=None, help="target seconds per timed repeat (default 3)")
    p.add_argument("--steps", type=int, default=0, help="fixed training steps per repeat instead of --seconds")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per training process (default 3)")
    p.add_argument("--processes", type=int, default=None,
                   help="fresh processes per training configuration, interleaved (default 3)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="only profile STEPS numpy training steps per task with cProfile and print the top 10")
    p.add_argument("--worker", choices=("info", "train", "infer", "profile"), help=argparse.SUPPRESS)
    p.add_argument("--engine", choices=("numpy", "torch"), default="numpy", help=argparse.SUPPRESS)
    p.add_argument("--task", choices=TASKS, default="activity", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=BATCH_SIZES[0], help=argparse.SUPPRESS)
    p.add_argument("--backend", choices=INFER_BACKENDS, default="numpy", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        print(f"unknown tasks {unknown}; use {', '.join(TASKS)}", file=sys.stderr)
        return 2
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        print("--batch-sizes takes one or more positive integers", file=sys.stderr)
        return 2
    args.batch_sizes = list(dict.fromkeys(args.batch_sizes))
    if args.profile > 0:
        run_profile(args, tasks)
    else:
        run_bench(args, tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
