#!/usr/bin/env python
"""Benchmark wearfl's simulation against Flower's, side by side, with the same per-client work.

What it measures, for each client count N (default 100, 1000 and 3000) and each framework:

- **seconds per round**: the median of the differences between consecutive round-close times
  (rounds 1..R, so ``--rounds`` >= 2). Start-up (wearfl: connecting N MQTT sessions; Flower: starting
  Ray and its actors) and the first round's one-off costs fall before round 1 closes, so they are
  not in it;
- **wall seconds**: the whole run, start-up and shut-down included;
- **peak memory of the whole process tree**: every 0.2 s the benchmark's child process and all its
  descendants (``psutil`` ``children(recursive=True)``) are summed; the headline is the peak sum of
  PSS (proportional set size, Linux: a shared page is split between the processes that map it, so
  Ray's shared-memory object store, forked workers and shared libraries are counted once), the
  second column the peak sum of RSS (which counts shared pages in every process). Processes that
  vanish between listing and reading are skipped;
- whether every round got N updates.

How. Each run is its own subprocess, so both are measured alike:

- wearfl: ``python -m wearfl simulate --clients N --rounds R --local-steps S --quantize int8
  --edges light --lr-schedule constant --round-timeout 3600 --out DIR [--processes K]``. Its tree is
  the hub process, the Mosquitto broker it starts and, from 200 clients on, its swarm worker
  processes. Round times are ``closed_at`` of ``DIR/report.json``; updates are ``updates_accepted``.
- Flower (1.42, Message API): this script re-invoked with a hidden ``--flower-child`` flag runs
  ``flwr.simulation.run_simulation`` with a ``ServerApp`` whose ``main`` runs
  ``flwr.serverapp.strategy.FedAvg`` (``fraction_train=1``, ``min_train_nodes = min_available_nodes
  = N``, ``fraction_evaluate=0``: no federated evaluation) for R rounds, and a ``ClientApp`` with a
  ``train`` function. The round-close time is taken by a centralized ``evaluate_fn`` that only
  records ``time.time()`` (Flower calls it right after each round's aggregation); updates are the
  replies without error that ``aggregate_train`` received. Ray backend with Flower's defaults
  (``init_args``: Ray sees every core of the machine; no dashboard) except ``client_resources``:
  ``num_cpus=1`` per ClientApp, i.e. one Ray actor per core. Flower's own default is 2 CPUs per
  client, which on a 2-core machine would leave a single actor, half the machine idle. The Ray
  session gets its own temporary folder (``_temp_dir``), only so that its processes can be found.
  In Ray 2.55 every Ray process (GCS server, raylet, log monitor, dashboard and runtime-env agents,
  the actors) is a descendant of the driver; the sampler nevertheless also adds any process whose
  command line names the run's Ray folder, and their descendants, in case one was reparented.
  At the end ``ray.shutdown()`` runs in the child, and the parent ends any process of the run that
  outlived its child (by pid, only processes it saw in the run's tree).

Why it is a fair comparison:

- the same model (wearfl's activity model from ``task_spec("activity", sim:0 grown to N)``, about
  11.5k parameters, the same initial weights), the same data (each client trains in round r on the
  windows ``wearfl.swarm.round_windows`` makes, exactly what wearfl's light edge trains on), and the
  same local training (``models.training.fit``: Adam, lr 3e-3 in every round, batch 32, S steps,
  10 degree rotation, seed client index + round), every client in every round, FedAvg;
- wearfl runs with ``--edges light`` (the edge that trains on those windows; below 51 clients
  ``auto`` would run full gateways, which also evaluate and personalize) and a constant learning rate
  (its default cosine schedule would only change the value of lr);
- what each framework adds on top is its own cost and is measured: wearfl's MQTT sessions, int8
  encoding, signatures, the edges' SQLite outbox, the hub's checks; Flower's Ray scheduling,
  serialization of float32 arrays and its in-memory link state;
- the same server-side work: wearfl's hub scores every new global model on the held-out wearers
  (about 8.4k windows of ``sim:0``, roughly 0.8 s a round on one core of a 2-core EPYC VM), inside its
  round time, and Flower's ``evaluate_fn`` scores the same windows the same way
  (``edge_client.evaluation.summarize``). ``--no-flower-eval`` makes Flower's ``evaluate_fn`` only take
  the time (a Flower run without central evaluation: the comparison is then tilted toward Flower);
- both children get ``OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=MKL_NUM_THREADS=1``, and both may use
  every core (wearfl: its worker processes, ``--processes``; Flower: one actor per core);
- the same process set-up for the fits: each Flower actor, like each wearfl process, tunes its
  allocator (``wearfl.process_tuning.tune_simulation_process``) and trains every client it runs in one
  model of its own, whose training buffers it keeps from one fit to the next (``fit(...,
  keep_buffers=True)``), loading the round's global weights into it first.

Usage, from the repository root::

    python scripts/bench_simulation.py                                # 100, 1000, 3000 clients, 3 rounds
    python scripts/bench_simulation.py --clients 20 --rounds 2 --json /tmp/bench.json
    python scripts/bench_simulation.py --only flower --clients 50 --rounds 2
    python scripts/bench_simulation.py --clients 100 --no-flower-eval  # Flower without central evaluation

Flower is optional (``pip install -e '.[bench]'``): without it only wearfl runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

SCRIPT_DIR = Path(__file__).resolve().parent
REPO_ROOT = SCRIPT_DIR.parent
MODULE = Path(__file__).stem
SAMPLE_S = 0.2
LINGER_S = 5.0
MB = 1024 * 1024
LR = 3e-3
ROTATION_DEG = 10.0
HOP_FRACTION = 0.25
WEARFL_BATCH = 32
"""The batch size of wearfl simulate's task (fixed): the Flower side must train with the same."""
ROUND_TIMEOUT_S = 3600.0
"""How long a round may wait for its updates: Flower's default ``Strategy.start`` timeout, and wearfl's too here."""
FLOWER_CLIENT_RESOURCES = {"num_cpus": 1, "num_gpus": 0.0}
"""Ray resources per ClientApp: one actor per core (Flower's default, 2 CPUs, would halve the actors)."""
CHILD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
             "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
             "PYTHONUNBUFFERED": "1"}


# -- the result of one run ---------------------------------------------------------------------------


@dataclass
class RunResult:
    """One framework at one client count."""

    framework: str
    clients: int
    rounds: int
    s_per_round: float | None = None
    round_seconds: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    peak_pss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    processes_at_peak: int = 0
    updates_per_round: list[int] = field(default_factory=list)
    returncode: int | None = None
    error: str | None = None

    @property
    def updates_ok(self) -> bool:
        return len(self.updates_per_round) == self.rounds and all(u == self.clients for u in self.updates_per_round)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "updates_ok": self.updates_ok}


def per_round(closed_at: list[float]) -> tuple[float | None, list[float]]:
    """The median of consecutive differences of round-close times, and the differences."""
    diffs = [round(b - a, 3) for a, b in itertools.pairwise(closed_at)]
    return (statistics.median(diffs) if diffs else None), diffs


# -- memory of a process tree ------------------------------------------------------------------------


class TreeSampler(threading.Thread):
    """Every :data:`SAMPLE_S` s: the PSS and RSS sums of ``root`` and its descendants (and of any process whose
    command line contains ``marker``, with its descendants); keeps the peaks and every process seen."""

    def __init__(self, root: int, marker: str | None = None) -> None:
        super().__init__(name="tree-sampler", daemon=True)
        self.root = psutil.Process(root)
        self.marker = marker
        self.stop = threading.Event()
        self.peak_pss = self.peak_rss = 0
        self.processes_at_peak = 0
        self.seen: dict[int, psutil.Process] = {}

    def run(self) -> None:
        while True:
            self.sample()
            if self.stop.wait(SAMPLE_S):
                return

    def tree(self) -> dict[int, psutil.Process]:
        procs: dict[int, psutil.Process] = {}
        tops = [self.root]
        if self.marker:
            for p in psutil.process_iter(["cmdline"]):
                if self.marker in " ".join(p.info.get("cmdline") or ()):
                    tops.append(p)
        for top in tops:
            with contextlib.suppress(psutil.Error):
                procs[top.pid] = top
                procs.update((c.pid, c) for c in top.children(recursive=True))
        return procs

    def sample(self) -> None:
        pss = rss = counted = 0
        for pid, p in self.tree().items():
            try:
                info = p.memory_full_info()
            except psutil.Error:  # gone, a zombie, or not ours
                continue
            pss, rss, counted = pss + info.pss, rss + info.rss, counted + 1
            self.seen.setdefault(pid, p)
        if pss > self.peak_pss:
            self.peak_pss, self.processes_at_peak = pss, counted
        self.peak_rss = max(self.peak_rss, rss)

    def end_leftovers(self) -> list[str]:
        """Terminate (then kill) the processes of the run still alive :data:`LINGER_S` after its child exited (Ray's
        workers take a second or two to notice that their raylet is gone); their names."""
        _, left = psutil.wait_procs([p for p in self.seen.values() if p.pid != self.root.pid], timeout=LINGER_S)
        names = []
        for p in left:
            with contextlib.suppress(psutil.Error):
                names.append(f"{p.name()}({p.pid})")
                p.terminate()
        _, alive = psutil.wait_procs(left, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        return names


def run_measured(cmd: list[str], log: Path, marker: str | None = None) -> tuple[int, float, TreeSampler]:
    """Run ``cmd`` (output to ``log``) while sampling its tree's memory: exit code, wall seconds, the sampler."""
    env = {**os.environ, **CHILD_ENV}
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        sampler = TreeSampler(proc.pid, marker)
        sampler.start()
        try:
            code = proc.wait()
        except BaseException:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            raise
        finally:
            wall = time.perf_counter() - started
            sampler.stop.set()
            sampler.join()
            left = sampler.end_leftovers()
            if left:
                print(f"  ended processes left behind: {', '.join(left)}", file=sys.stderr)
    return code, wall, sampler


def _fill(result: RunResult, code: int, wall: float, sampler: TreeSampler, log: Path) -> None:
    result.returncode, result.wall_s = code, round(wall, 3)
    result.peak_pss_mb, result.peak_rss_mb = round(sampler.peak_pss / MB, 1), round(sampler.peak_rss / MB, 1)
    result.processes_at_peak = sampler.processes_at_peak
    if code != 0 and result.error is None:
        result.error = f"exit code {code}; see the log's end:\n" + _tail(log)


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- wearfl ------------------------------------------------------------------------------------------


def wearfl_command() -> list[str]:
    """``python -m wearfl``, or the ``wearfl`` console script next to this Python."""
    if importlib.util.find_spec("wearfl.__main__") is not None:
        return [sys.executable, "-m", "wearfl"]
    script = Path(sys.executable).with_name("wearfl")
    if script.exists():
        return [str(script)]
    raise SystemExit("error: wearfl is not importable and there is no wearfl script next to this Python; "
                     "pip install -e . first.")


def run_wearfl(n: int, args: argparse.Namespace, work: Path) -> RunResult:
    out = work / f"wearfl-{n}"
    cmd = [*wearfl_command(), "simulate", "--clients", str(n), "--rounds", str(args.rounds),
           "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size), "--quantize", "int8",
           "--edges", "light",
           "--lr", str(LR), "--lr-schedule", "constant", "--rotation", str(ROTATION_DEG),
           "--window-hop", str(HOP_FRACTION), "--round-timeout", str(ROUND_TIMEOUT_S), "--out", str(out)]
    if args.processes is not None:
        cmd += ["--processes", str(args.processes)]
    result = RunResult("wearfl", n, args.rounds)
    log = work / f"wearfl-{n}.log"
    code, wall, sampler = run_measured(cmd, log)
    try:
        rounds = json.loads((out / "report.json").read_text())["rounds"]
        result.updates_per_round = [int(r["updates_accepted"]) for r in rounds]
        result.s_per_round, result.round_seconds = per_round([float(r["closed_at"]) for r in rounds])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        result.error = f"no usable report.json ({exc}); see the log's end:\n" + _tail(log)
    _fill(result, code, wall, sampler, log)
    return result


# -- Flower: the parent's side -----------------------------------------------------------------------


def run_flower(n: int, args: argparse.Namespace, work: Path) -> RunResult:
    ray_dir = tempfile.mkdtemp(prefix="rb-", dir="/tmp")  # short: Ray's socket paths live under it
    result_file = work / f"flower-{n}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--flower-child", "--clients", str(n),
           "--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size),
           "--child-result", str(result_file), "--ray-dir", ray_dir,
           "--flower-eval" if args.flower_eval else "--no-flower-eval"]
    result = RunResult("flower", n, args.rounds)
    log = work / f"flower-{n}.log"
    try:
        code, wall, sampler = run_measured(cmd, log, marker=ray_dir)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    try:
        body = json.loads(result_file.read_text())
        result.updates_per_round = [int(u) for u in body["updates"]]
        result.s_per_round, result.round_seconds = per_round([float(t) for t in body["closed_at"]])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        result.error = f"no usable result ({exc}); see the log's end:\n" + _tail(log)
    _fill(result, code, wall, sampler, log)
    return result


# -- Flower: the child (also what the Ray actors import) ---------------------------------------------

_WORK: dict[int, tuple[Any, Any, list[str]]] = {}
"""Per process (the child, each Ray actor): N -> (the grown dataset, the model spec, the sorted weight names)."""
_MODEL: dict[int, Any] = {}
"""Per Ray actor: N -> the one model it trains every client in (as a wearfl process does)."""
_ROUNDS: dict[str, dict[int, Any]] = {"closed_at": {}, "updates": {}}


def client_work(n: int) -> tuple[Any, Any, list[str]]:
    """wearfl simulate's dataset with ``n`` training wearers, its activity model spec, and one fixed weight order."""
    if n not in _WORK:
        from edge_client.evaluation import task_spec
        from edge_client.sources.datasets import open_dataset
        from models.model import Model

        dataset = open_dataset("sim:0").grown(n)
        spec = task_spec("activity", dataset)
        _WORK[n] = (dataset, spec, sorted(Model(spec, version=0).network.state_dict()))
    return _WORK[n]


def flower_train(msg: Any, context: Any) -> Any:
    """The ClientApp's train: exactly a wearfl light edge's fit (see the module docstring)."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from models.model import Model
    from models.training import TrainConfig, fit
    from wearfl.swarm import round_windows

    i, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    config = msg.content["config"]
    r, steps, batch = int(config["server-round"]), int(config["local-steps"]), int(config["batch-size"])
    dataset, spec, names = client_work(n)
    if n not in _MODEL:
        from wearfl.process_tuning import tune_simulation_process

        tune_simulation_process()
        _MODEL[n] = Model(spec, version=0)
    model = _MODEL[n]
    model.network.load_state_dict(dict(zip(names, msg.content["arrays"].to_numpy_ndarrays(), strict=True)))
    x, y = round_windows(dataset, dataset.train_clients[i], r, model, HOP_FRACTION, steps * batch)
    result = fit(model, x, y, TrainConfig(batch_size=batch, lr=LR, local_steps=steps, seed=i + r,
                                          rotation_deg=ROTATION_DEG), keep_buffers=True)
    state = model.network.state_dict()
    content = RecordDict({"arrays": ArrayRecord(numpy_ndarrays=[state[k] for k in names]),
                          "metrics": MetricRecord({"num-examples": result.examples})})
    return Message(content=content, reply_to=msg)


def flower_child(args: argparse.Namespace) -> int:
    """Run one Flower simulation; write the round-close times and updates per round to ``--child-result``."""
    import ray
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from models.model import Model
    from wearfl.process_tuning import tune_simulation_process

    tune_simulation_process()  # as wearfl simulate's hub process does: it evaluates every round here
    n, rounds = args.clients[0], args.rounds
    dataset, spec, names = client_work(n)
    held_out = None
    if args.flower_eval:  # the windows wearfl's hub scores every new global model on
        from wearfl.simulate import _held_out

        held_out = _held_out(dataset, Model(spec, version=0))

    class TimedFedAvg(FedAvg):  # type: ignore[misc]
        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            _ROUNDS["updates"][server_round] = sum(1 for m in replies if not m.has_error())
            return super().aggregate_train(server_round, replies)

    def closed(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        metrics = None
        if held_out is not None:
            from edge_client.evaluation import summarize

            model = Model(spec, version=server_round)
            model.network.load_state_dict(dict(zip(names, arrays.to_numpy_ndarrays(), strict=True)))
            metrics = MetricRecord({k: float(v) for k, v in summarize(model, held_out)["metrics"].items()})
        if server_round > 0:  # 0: before the first round
            _ROUNDS["closed_at"][server_round] = time.time()
        return metrics

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_evaluate_nodes=0,
                               min_available_nodes=n)
        state = Model(spec, version=0).network.state_dict()
        strategy.start(grid=grid, initial_arrays=ArrayRecord(numpy_ndarrays=[state[k] for k in names]),
                       num_rounds=rounds, timeout=ROUND_TIMEOUT_S,
                       train_config=ConfigRecord({"local-steps": args.local_steps, "batch-size": args.batch_size}),
                       evaluate_fn=closed)

    client = ClientApp()
    client.train()(flower_train)
    backend: dict[str, Any] = {"client_resources": dict(FLOWER_CLIENT_RESOURCES)}
    if args.ray_dir:
        backend["init_args"] = {"_temp_dir": args.ray_dir}
    try:
        run_simulation(server_app=server, client_app=client, num_supernodes=n, backend_config=backend)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    done = sorted(_ROUNDS["closed_at"])
    body = {"closed_at": [_ROUNDS["closed_at"][r] for r in done],
            "updates": [_ROUNDS["updates"].get(r, 0) for r in done]}
    Path(args.child_result).write_text(json.dumps(body))
    return 0


# -- the report ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model,
            "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1), "python": sys.version.split()[0]}


def versions() -> dict[str, str]:
    found = {}
    for name in ("wearfl", "flwr", "ray"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: list[RunResult]) -> str:
    head = f"{'clients':>7}  {'framework':<9}  {'s/round':>8}  {'wall s':>8}  {'peak PSS MB':>11}  " \
           f"{'peak RSS MB':>11}  {'updates ok':>10}"
    rows = [head, "-" * len(head)]
    for r in results:
        ok = "yes" if r.updates_ok else "no"
        if r.error:
            ok += " (failed)"
        rows.append(f"{r.clients:>7}  {r.framework:<9}  {_num(r.s_per_round, 3):>8}  {r.wall_s:>8.1f}  "
                    f"{r.peak_pss_mb:>11.1f}  {r.peak_rss_mb:>11.1f}  {ok:>10}")
    return "\n".join(rows)


def ratios(results: list[RunResult]) -> dict[int, float | None]:
    by = {(r.clients, r.framework): r.s_per_round for r in results}
    out: dict[int, float | None] = {}
    for n in sorted({r.clients for r in results}):
        w, f = by.get((n, "wearfl")), by.get((n, "flower"))
        if (n, "wearfl") in by and (n, "flower") in by:
            out[n] = round(f / w, 3) if w and f else None
    return out


# -- main --------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 3000], help="client counts to run")
    p.add_argument("--rounds", type=int, default=3, help="rounds per run (at least 2)")
    p.add_argument("--local-steps", type=int, default=1, help="optimizer steps per client and round")
    p.add_argument("--batch-size", type=int, default=WEARFL_BATCH,
                   help="batch size of each local step, on both sides (wearfl: simulate --batch-size)")
    p.add_argument("--processes", type=int, help="wearfl's --processes K (default: wearfl's own)")
    p.add_argument("--only", choices=("wearfl", "flower"), help="run one framework only")
    p.add_argument("--flower-eval", action=argparse.BooleanOptionalAction, default=True,
                   help="Flower's evaluate_fn also scores every new global model on wearfl's held-out wearers, as "
                        "wearfl's hub does every round (--no-flower-eval: it only takes the time)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--flower-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-result", help=argparse.SUPPRESS)
    p.add_argument("--ray-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be at least 2: seconds per round are differences between round-close times")
    if args.local_steps < 1 or args.batch_size < 1 or min(args.clients) < 1:
        p.error("--clients, --local-steps and --batch-size must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.flower_child:
        for path in (str(REPO_ROOT), str(SCRIPT_DIR)):  # the Ray actors get this sys.path as their PYTHONPATH
            if path not in sys.path:
                sys.path.insert(0, path)
        # This module under its own name, not __main__: Ray then pickles flower_train by reference and every actor
        # imports this file once, keeping its dataset cache (_WORK) across the clients it runs.
        return int(importlib.import_module(MODULE).flower_child(args))

    frameworks = ["wearfl", "flower"] if args.only is None else [args.only]
    if "flower" in frameworks:
        try:
            import flwr  # noqa: F401
            import ray  # noqa: F401
        except ImportError:
            if args.only == "flower":
                print("error: Flower is not installed (pip install -e '.[bench]')", file=sys.stderr)
                return 2
            print("Flower is not installed (pip install -e '.[bench]'): running wearfl only")
            frameworks = ["wearfl"]

    info, vers = machine(), versions()
    print(f"machine: {info['cpus']} CPUs, {info['cpu_model']}, {info['memory_gb']} GB; Python {info['python']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"settings: {args.rounds} rounds, {args.local_steps} local step(s) of batch {args.batch_size}, "
          f"int8 updates (wearfl), wearfl --processes {'default' if args.processes is None else args.processes}, "
          f"Flower: one Ray actor per core, central evaluation {'on' if args.flower_eval else 'off'} "
          "(wearfl's hub: on)")
    sys.stdout.flush()

    results: list[RunResult] = []
    work = Path(tempfile.mkdtemp(prefix="bench-simulation-"))
    failed = False
    try:
        for n in args.clients:
            for fw in frameworks:
                print(f"running {fw} with {n} clients x {args.rounds} rounds ...", file=sys.stderr, flush=True)
                result = (run_wearfl if fw == "wearfl" else run_flower)(n, args, work)
                results.append(result)
                print(f"  {_num(result.s_per_round, 3)} s/round, {result.wall_s:.1f} s wall, peak PSS "
                      f"{result.peak_pss_mb:.1f} MB, updates per round {result.updates_per_round}",
                      file=sys.stderr, flush=True)
                if result.error:
                    failed = True
                    print(f"  {fw} failed: {result.error}", file=sys.stderr, flush=True)
    finally:
        if failed:
            print(f"logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(table(results))
    rel = ratios(results)
    if rel:
        print()
        for n, ratio in rel.items():
            print(f"{n:>7} clients: flower s/round / wearfl s/round = {_num(ratio, 2)}")
    if args.json:
        body = {"machine": info, "versions": vers,
                "settings": {"rounds": args.rounds, "local_steps": args.local_steps, "batch_size": args.batch_size,
                             "processes": args.processes, "quantize": "int8", "sample_interval_s": SAMPLE_S,
                             "flower_central_evaluation": args.flower_eval,
                             "flower_client_resources": FLOWER_CLIENT_RESOURCES},
                "runs": [r.to_json() for r in results],
                "flower_over_wearfl_s_per_round": {str(n): v for n, v in rel.items()}}
        Path(args.json).write_text(json.dumps(body, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
