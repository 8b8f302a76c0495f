"""``wearfl simulate``: a whole federation on one machine, through a real MQTT broker.

It starts a broker (Mosquitto on a free loopback port when installed, else the
in-process one) unless ``--broker`` names one, runs a hub and N edges in one event
loop (each edge its own MQTT session and state directory), evaluates every new
global model on held-out data, and writes ``report.json``, ``report.png`` and the
final model as a package, ONNX and TFLite.

A run has two phases, so that a mistake costs nothing:

1. :func:`prepare_simulation` checks every flag and builds the hub and the edges. It starts
   nothing and writes nothing: bad input is one ``error:`` line, exit code 2, no leftovers.
2. :func:`run_simulation` makes the output folder, starts the broker and runs the rounds. The
   broker is stopped on every way out: the end, an error, Ctrl-C, SIGTERM. The first SIGINT or
   SIGTERM (:class:`StopSignals`) stops the hub and the edges through the still-running broker
   within :data:`GRACE_S`; the command then prints ``interrupted`` (``terminated``) and exits
   with 130 (143).

Each closed round is shown on stderr (:class:`RoundProgress`): a progress bar on a terminal,
one line per round otherwise (those lines are what tests and CI read).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Self, TextIO

import numpy as np

from hub.commands import add_strategy_flags
from hub.schedule import LR_SCHEDULES
from models.errors import ConfigError
from models.files import write_atomic
from models.model import Model
from models.protocol.codec import SCHEMES, CodecConfig, UpdateCodec
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.messages import UpdateMeta, build_update
from wearfl.attacks import ATTACKS

if TYPE_CHECKING:
    from edge_client.evaluation import ClientData
    from edge_client.runtime import EdgeClient
    from edge_client.sources.base import Dataset
    from hub.rounds import RoundSummary
    from hub.service import HubService
    from wearfl.attacks import AttackPlan
    from wearfl.broker import EmbeddedBroker, MosquittoBroker
    from wearfl.sites import SimulatedSites
    from wearfl.swarm import SwarmSpec

__all__ = [
    "GRACE_S", "Interrupted", "RoundProgress", "Simulation", "StopSignals", "add_commands", "float32_update_bytes",
    "prepare_simulation", "round_line", "round_postfix", "run_simulation",
]

log = logging.getLogger(__name__)

GRACE_S = 2.0
"""After Ctrl-C or SIGTERM, how long the hub and the edges get to stop (status offline, checkpoint,
disconnect) through the still-running broker before they are cancelled: the whole exit stays within
about 3 s, also when eight edges on two cores are still connecting (measured: they stop in 0.1-1.5 s)."""
EDGES_STOP_S = 60.0
"""After the last round, how long the edges get to stop before they are cancelled."""
CANCEL_S = 0.5
"""How long cancelled tasks get to unwind."""


def float32_update_bytes(model: Model) -> int:
    """The size of one unquantized signed update of ``model``: the yardstick for compression."""
    weights = model.network.state_dict()
    codec = UpdateCodec.for_weights(weights, CodecConfig(quantize="none"))
    tensors, meta, _ = codec.encode({k: np.zeros_like(v) for k, v in weights.items()}, np.random.default_rng(0))
    meta_full = UpdateMeta("client-000", 0, 0, "0" * 64, 1, 0, meta)
    return len(build_update(meta_full, tensors, Ed25519PrivateKey.generate()))


def personalization_report(clients: dict[str, Any], task: str) -> dict[str, Any]:
    """Global vs fine-tuned metrics per client (their own held-out windows) and how many improved."""
    key, better = ("accuracy", 1.0) if task == "activity" else ("mae_bpm", -1.0)
    pairs = {c: (v["global"].get(key), v["personalized"].get(key)) for c, v in clients.items()}
    pairs = {c: p for c, p in pairs.items() if p[0] is not None and p[1] is not None}
    out: dict[str, Any] = {"metric": key, "clients": clients}
    if pairs:
        out["improved"] = sum(1 for g, p in pairs.values() if better * (p - g) > 0)
        out["reported"] = len(pairs)
        out["mean_global"] = float(np.mean([g for g, _ in pairs.values()]))
        out["mean_personalized"] = float(np.mean([p for _, p in pairs.values()]))
    adapted = {c: (v["global"].get(key), v.get("adapted", {}).get(key)) for c, v in clients.items()}
    adapted = {c: p for c, p in adapted.items() if p[0] is not None and p[1] is not None}
    if adapted:  # --adapt: the model each gateway would use after adapting to its wearer without labels
        out["adapted_improved"] = sum(1 for g, a in adapted.values() if better * (a - g) > 0)
        out["adapted_reported"] = len(adapted)
        out["adapted_kept_global"] = sum(1 for c in adapted if clients[c]["adapted"].get("kept_global") == 1.0)
        out["mean_adapted"] = float(np.mean([a for _, a in adapted.values()]))
        out.setdefault("mean_global", float(np.mean([g for g, _ in adapted.values()])))
    return out


def backdoor_success(model: Model, triggered: np.ndarray, target: int = 0) -> float:
    """The share of triggered held-out windows (none of the target class) classified as the target."""
    return float(np.mean(np.argmax(model.predict(triggered), axis=1) == target))


def headline_metric(task: str) -> str:
    """The metric a run is judged by: accuracy for activity, mean absolute error in BPM for heart rate."""
    return "accuracy" if task == "activity" else "mae_bpm"


# -- phase 1: check every flag, start nothing, write nothing ---------------------------------------


@dataclass
class Simulation:
    """A checked federation, ready to run: nothing runs and nothing is written before :func:`run_simulation`.

    ``broker`` is the one the run starts and stops (None: ``--broker`` names a running one, or ``sites``
    brings its own); ``keyring`` is where the run writes the device keys the hub knows its edges by (None:
    full edges without secure rounds, pinned on first sight). ``sites`` (``--sites K``): the site hubs and
    their brokers under ``hub``, the consortium. ``swarms``: light edges (:mod:`wearfl.swarm`) instead of
    ``edges``, one swarm per worker process (or one in this process), their device keys derived from ``secret``.
    """

    args: argparse.Namespace
    dataset_name: str
    out: Path
    url: str
    broker: MosquittoBroker | EmbeddedBroker | None
    model: Model
    clients: list[str]
    held_out: list[ClientData]
    hub: HubService
    edges: list[EdgeClient]
    plan: AttackPlan | None
    keyring: Path | None
    sites: SimulatedSites | None = None
    swarms: list[SwarmSpec] = field(default_factory=list)
    dataset: Dataset | None = None
    secret: bytes = b""
    edge_counters: list[dict[str, Any]] = field(default_factory=list)


def prepare_simulation(args: argparse.Namespace) -> Simulation:
    """Check every flag and build the hub and the edges; :class:`ConfigError` naming the flag on bad input.

    Cheap checks come first, loading the held-out data last. No broker, hub or edge starts and no
    folder is made here, so a mistake leaves nothing behind (a broker started too early was left
    running when a later check failed).
    """
    from edge_client.sources.datasets import open_dataset
    from wearfl.attacks import AttackPlan
    from wearfl.broker import make_broker
    from wearfl.sites import SimulatedSites

    out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    _check_out(out)
    _check_flags(args)
    strategy_args = _strategy_args(args)
    dataset = _grown(args, open_dataset(args.dataset))
    model = _initial_model(args, dataset)
    clients = _clients(args, dataset)
    if args.strategy == "dpfedavg":
        strategy_args.setdefault("population", len(clients))
    sites = SimulatedSites.plan(args.sites, clients, out) if args.sites else None
    _check_round_sizes(args, clients, sites.members if sites is not None else None, strategy_args)
    # not started: only the URLs are needed yet
    broker = None if args.broker or sites is not None else make_broker(workdir=out)
    url = args.broker or (sites.consortium_url if sites is not None else broker.url)
    federation = f"sim-{int(time.time())}"
    light = _light_edges(args, len(clients))
    keyring = out / "keyring" if args.secure_aggregation or light else None
    secret = os.urandom(32) if light else b""
    if sites is not None:  # the consortium: an ordinary hub whose clients are the sites
        hub = _hub(args, url, federation, out, model, len(sites.members), strategy_args, out / "sites.keyring",
                   consortium=True)
        sites.build_hubs(args, federation, out, keyring)
    else:
        hub = _hub(args, url, federation, out, model, len(clients), strategy_args, keyring)
    plan = None
    if args.attack:
        plan = AttackPlan.choose(args.attack, args.malicious, clients, args.seed, args.attack_scale)
    if light:
        swarms = _swarms(args, url, federation, out, secret, clients)
        return Simulation(args, dataset.name, out, url, broker, model, clients, _held_out(dataset, model), hub, [],
                          None, keyring, None, swarms, dataset, secret)
    edges = _edges(args, url, federation, out, dataset, clients, plan, keyring,
                   sites.url_of if sites is not None else None)
    return Simulation(args, dataset.name, out, url, broker, model, clients, _held_out(dataset, model), hub, edges,
                      plan, keyring, sites)


LIGHT_FROM = 51
"""``--edges auto`` runs light edges from this many clients on (full edges, which evaluate and personalize, below)."""
FULL_ONLY = (("secure_aggregation", "--secure-aggregation"), ("attack", "--attack"), ("sites", "--sites"),
             ("edge_delay", "--edge-delay"), ("explain", "--explain"), ("adapt", "--adapt"))
"""What only full edges do: secure rounds, attacks (poisoned sources, hooked weights), sites, random delays,
federated evaluation and so explanations."""


def _light_edges(args: argparse.Namespace, clients: int) -> bool:
    """Whether the run's edges are light (:mod:`wearfl.swarm`); ConfigError when a flag needs full edges."""
    light = args.edges == "light" or (args.edges == "auto" and (clients >= LIGHT_FROM or bool(args.processes)))
    if args.processes and not light:
        raise ConfigError("--processes spreads light edges over worker processes; leave out --edges full.")
    if light:
        for attr, flag in FULL_ONLY:
            if getattr(args, attr):
                why = f"--clients {clients} runs light edges" if args.edges == "auto" else "--edges light"
                raise ConfigError(f"{flag} needs full edges and {why}; give --edges full (every edge a whole "
                                  f"gateway, practical up to about {LIGHT_FROM - 1} edges) or leave out {flag}.")
    return light


def _processes(args: argparse.Namespace, clients: int) -> int:
    """Worker processes for light edges: ``--processes``, or by default one per core (at most 4) from 100 edges
    on (0: the edges share the hub's process)."""
    if args.processes is not None:
        return args.processes
    return 0 if clients < 100 else max(1, min(4, (os.cpu_count() or 2)))


def _swarms(args: argparse.Namespace, url: str, federation: str, out: Path, secret: bytes,
            clients: list[str]) -> list[SwarmSpec]:
    """The light edges, split into one swarm per worker process (one in the hub's process with 0 processes)."""
    from wearfl.swarm import SwarmSpec

    if args.processes is not None and args.processes < 0:
        raise ConfigError(f"--processes {args.processes}: give a number of worker processes (0: none).")
    k = max(1, _processes(args, len(clients)))
    share = math.ceil(len(clients) / k)
    return [SwarmSpec(broker=url, federation=federation, dataset=args.dataset, clients=tuple(clients[i:i + share]),
                      outbox=str(out / "edges" / f"outbox-{n}.sqlite3"), secret=secret.hex(), seed=args.seed,
                      first_index=i, hop_fraction=args.window_hop, connect_spread_s=min(10.0, len(clients) / 500),
                      grow=args.clients or 0)
            for n, i in enumerate(range(0, len(clients), share))]


def _check_out(out: Path) -> None:
    """``--out`` is a folder, or can be made one: a file in the way is found before anything starts."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == out else f"is inside {existing}, which is a file"
        raise ConfigError(f"--out {out} {where}; give a folder for the run's files (a new one, or an existing "
                          "folder).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot write in {existing}; give a folder you can write to.")


def _check_flags(args: argparse.Namespace) -> None:
    """The flags no part checks when it is built (the hub, the edges and the attack plan check the others)."""
    from models.transport.mqtt import BrokerAddress

    if not (math.isfinite(args.malicious) and 0.0 < args.malicious < 1.0):
        raise ConfigError(f"--malicious {args.malicious:g} is not a fraction of the edges in (0, 1); "
                          "give e.g. --malicious 0.2.")
    if not 1 <= args.batch_size <= 65536:
        raise ConfigError(f"--batch-size {args.batch_size}: give 1 .. 65536 windows per step.")
    if args.broker:
        BrokerAddress.parse(args.broker)
    if args.sites and args.broker:
        raise ConfigError("--sites starts a broker for each site and one for the consortium; leave out --broker.")
    if args.sites < 0:
        raise ConfigError(f"--sites {args.sites}: give a number of sites (0: one flat federation).")


def _check_round_sizes(args: argparse.Namespace, clients: list[str], sites: Mapping[str, list[str]] | None,
                       strategy_args: Mapping[str, Any]) -> None:
    """Enough edges in each round for secure rounds (3) and for the rule, named by simulate's own flags (the hub's
    message would name --min-clients, which simulate sets from --clients and --fraction)."""
    per_round = [len(m) for m in sites.values()] if sites is not None else [len(clients)]
    fewest = min(per_round) if args.fraction >= 1 else min(max(1, math.ceil(args.fraction * n)) for n in per_round)
    where = "each site" if sites is not None else "a round"
    more = "fewer --sites or more --clients" if sites is not None else "more --clients or a larger --fraction"
    if args.secure_aggregation and fewest < 3:
        raise ConfigError(f"--secure-aggregation needs at least 3 edges in {where}, this run has {fewest}; give "
                          f"{more}.")
    from hub.strategies import make_strategy

    try:
        need = make_strategy(args.strategy, dict(strategy_args)).min_updates()
    except (ValueError, TypeError, ConfigError):
        return  # a bad argument: the hub's config names it
    top = len(sites) if sites is not None else fewest  # the rule runs where the run's --strategy runs
    if need > top:
        counted = f"{len(sites)} sites" if sites is not None else f"{top} edges a round"
        raise ConfigError(f"strategy {args.strategy} as configured needs at least {need} updates a round, this run "
                          f"gives it {counted}; give {'more --sites' if sites is not None else more}.")


def _strategy_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--strategy-arg`` settings; ``--dp-noise`` runs DP-FedAvg and adds its settings."""
    from hub.strategies import parse_strategy_args

    strategy_args: dict[str, Any] = dict(parse_strategy_args(args.strategy_arg))
    if args.dp_noise is not None:
        if args.strategy not in ("fedavg", "dpfedavg"):
            raise ConfigError(f"--dp-noise runs DP-FedAvg; it does not combine with --strategy {args.strategy}.")
        args.strategy = "dpfedavg"
        strategy_args.update({"noise": args.dp_noise, "dp_clip": args.dp_clip, "delta": args.dp_delta,
                              "budget": args.dp_budget or 0.0, "seed": args.seed,
                              "distributed": int(args.dp_distributed)})
    return strategy_args


def _initial_model(args: argparse.Namespace, dataset: Dataset) -> Model:
    """``--model``'s package (of ``--task``), or a fresh model shaped by the dataset."""
    from edge_client.evaluation import task_spec
    from models.package import load_package

    if not args.model:
        return Model(task_spec(args.task, dataset, args.window_s), seed=args.seed)
    model = load_package(args.model)
    if model.spec.task != args.task:
        raise ConfigError(f"{args.model} is a {model.spec.task} model, not {args.task}; give --task "
                          f"{model.spec.task} or another --model.")
    return model


def _grown(args: argparse.Namespace, dataset: Dataset) -> Dataset:
    """``sim`` makes as many training wearers as ``--clients`` asks for (its held-out wearers stay the same)."""
    grown = getattr(dataset, "grown", None)
    return grown(args.clients) if grown is not None and args.clients is not None else dataset


def _holdout_fraction(dataset: Dataset) -> float:
    """The share of every client's windows held out (0: the dataset holds out whole clients instead)."""
    return float(getattr(dataset, "holdout_fraction", 0.0) or 0.0)


def _clients(args: argparse.Namespace, dataset: Dataset) -> list[str]:
    """The first ``--clients`` training clients (default 8), one edge each."""
    pool = dataset.clients if _holdout_fraction(dataset) > 0 else dataset.train_clients
    n = args.clients if args.clients is not None else min(8, len(pool))
    if not 1 <= n <= len(pool):
        raise ConfigError(f"--clients {n}: {dataset.name} has {len(pool)} training clients; give 1 to {len(pool)}.")
    return list(pool[:n])


def _held_out(dataset: Dataset, model: Model) -> list[ClientData]:
    """The windows every new global model is scored on: the test clients', or each client's held-out share."""
    from edge_client.evaluation import load_clients

    holdout = _holdout_fraction(dataset)
    held_out = load_clients(dataset, dataset.clients if holdout > 0 else dataset.test_clients, model.spec)
    return [c.split(1.0 - holdout)[1] for c in held_out] if holdout > 0 else held_out


def _hub(args: argparse.Namespace, url: str, federation: str, out: Path, model: Model, n: int,
         strategy_args: dict[str, Any], keyring: Path | None, consortium: bool = False) -> HubService:
    """The hub, its config checked: the strategy and its args, the rounds, timeouts and the edges' task.

    ``consortium``: its ``n`` clients are sites, every one in every round (selection and secure rounds
    happen inside the sites).
    """
    from hub.service import HubConfig, HubService

    fraction = 1.0 if consortium else args.fraction
    task_config = {"quantize": args.quantize, "epochs": args.local_epochs, "batch_size": args.batch_size, "lr": args.lr,
                   "lr_schedule": args.lr_schedule, "rotation_deg": args.rotation}
    if args.local_steps is not None:
        task_config["local_steps"] = args.local_steps
    if args.explain:
        task_config["explain"] = True
    if args.adapt:
        task_config["adapt"] = True
    config = HubConfig(
        broker=url, federation=federation, state_dir=out / "hub",
        min_clients=n if fraction >= 1 else max(1, math.ceil(fraction * n)),
        clients_per_round=n if fraction >= 1 else None, fraction=fraction,
        round_timeout_s=args.round_timeout, rounds=args.rounds, task_config=task_config, strategy=args.strategy,
        strategy_args=strategy_args, evaluate_every=args.eval_every,
        server_lr=args.server_lr, keyring=keyring, secure_aggregation=args.secure_aggregation and not consortium,
        http=args.http, http_token=args.http_token,
    )
    return HubService(config, initial_model=model)


def _edges(args: argparse.Namespace, url: str, federation: str, out: Path, dataset: Dataset, clients: list[str],
           plan: AttackPlan | None, keyring: Path | None,
           broker_of: Callable[[str], str] | None = None) -> list[EdgeClient]:
    """One edge per client, each with its own state folder and seed; ``plan``'s hostile ones poisoned or hooked.

    ``broker_of``: the broker of each client's site (default: ``url`` for every edge)."""
    from edge_client.finetune import FineTunePolicy
    from edge_client.runtime import EdgeClient, EdgeConfig
    from wearfl.attacks import Collusion, PoisonedSource, weights_hook

    policy = FineTunePolicy(min_new_windows=0)
    collusion = Collusion(plan.malicious, len(clients)) if plan and plan.kind == "alie" else None
    edges = []
    for i, client in enumerate(clients):
        broker = broker_of(client) if broker_of is not None else url
        config = EdgeConfig(broker=broker, federation=federation, client_id=client, state_dir=out / "edges" / client,
                            policy=replace(policy, train=replace(policy.train, seed=args.seed + i)),
                            seed=args.seed + i, window_hop_fraction=args.window_hop,
                            train_delay_s=args.edge_delay, peer_keyring=keyring)
        hostile = plan is not None and client in plan.malicious
        source = dataset.source(client)
        if hostile and plan.kind in ("label-flip", "backdoor"):
            source = PoisonedSource(source, plan.kind)
        edge = EdgeClient(config, source)
        if hostile:
            edge.weights_hook = weights_hook(plan, client, collusion)
        edges.append(edge)
    return edges


# -- phase 2: run, and stop the broker on every way out -----------------------------------------


class Interrupted(KeyboardInterrupt):
    """A signal that ends ``simulate`` at once: one outside the rounds, or a second one."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGINT and SIGTERM while ``simulate`` runs: a context manager around the whole command.

    While the rounds run (:meth:`stopping`), the first signal sets the federation's stop event:
    the hub and the edges stop through the still-running broker, and then the broker is stopped.
    Any other time, and at a second signal, it raises :class:`Interrupted` at once, and the
    ``finally`` blocks stop the broker. ``signum`` is the first signal received (None: none).
    Signals are the main thread's: elsewhere (a test's thread) this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._raise) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    @contextlib.contextmanager
    def stopping(self, stop: asyncio.Event) -> Iterator[None]:
        """In the running loop: a signal sets ``stop``.

        The loop's own handlers, because they wake it at once even when the signal lands in one of the
        training threads, whereas a plain handler would wait for the loop's next timer.
        """
        if not self._previous:
            yield
            return
        loop = asyncio.get_running_loop()
        for s in self.SIGNALS:
            loop.add_signal_handler(s, self._stop, s, stop)
        try:
            yield
        finally:
            for s in self.SIGNALS:
                loop.remove_signal_handler(s)  # which restores the default handler, not ours
                signal.signal(s, self._raise)

    def _stop(self, signum: int, stop: asyncio.Event) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        log.info("%s: stopping the hub and the edges", signal.Signals(signum).name)
        stop.set()

    def _raise(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum
        raise Interrupted(signum)


def round_line(summary: RoundSummary, rounds: int, metrics: Mapping[str, float], elapsed_s: float) -> str:
    """A closed round as one line, the format tests and CI parse: round, updates, bytes up, metrics, time."""
    shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    return (f"round {summary.round:>3}/{rounds}  {summary.participants:>3} updates  "
            f"{summary.bytes_up / 1024:8.1f} KiB up  {shown}  ({elapsed_s:.0f} s)")


def round_postfix(metrics: Mapping[str, float], metric: str) -> str:
    """What the progress bar shows after its ETA: the latest global model's ``metric`` (e.g. ``accuracy 0.9152``)."""
    return f"{metric} {metrics[metric]:.4f}" if metric in metrics else ""


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _sized(stream: TextIO) -> bool:
    """Whether the terminal tells its size: tqdm draws nothing at all on one that says 0 x 0 (an unsized pty)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return size.columns > 0 and size.lines > 0


class RoundProgress:
    """Shows each closed round on ``stream`` (stderr): a progress bar on a terminal, one line per round otherwise.

    The bar (tqdm) carries the headline metric of the latest model and an ETA; log records are
    written above it meanwhile. The lines are what tests and CI parse, so whenever ``stream`` is
    not a terminal they are printed as they always were. ``bar`` forces either way.
    """

    def __init__(self, rounds: int, metric: str, stream: TextIO | None = None, *, bar: bool | None = None) -> None:
        self.rounds, self.metric = rounds, metric
        self.stream = stream if stream is not None else sys.stderr
        self.shows_bar = _is_terminal(self.stream) if bar is None else bar
        self.start = time.monotonic()
        self._bar: Any = None
        self._exit = contextlib.ExitStack()

    def __enter__(self) -> Self:
        if self.shows_bar:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            sized = _sized(self.stream)
            self._bar = self._exit.enter_context(tqdm(
                total=self.rounds, unit="round", file=self.stream, desc="rounds", dynamic_ncols=sized,
                ncols=None if sized else 80, nrows=None if sized else 24,
            ))
            self._exit.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._exit.close()
        self._bar = None

    def round_closed(self, summary: RoundSummary, metrics: Mapping[str, float]) -> None:
        """Show a closed round and the metrics of its new global model on the held-out windows."""
        if self._bar is None:
            print(round_line(summary, self.rounds, metrics, time.monotonic() - self.start), file=self.stream)
            return
        self._bar.set_postfix_str(round_postfix(metrics, self.metric), refresh=False)
        self._bar.update(1)


class RoundRecorder:
    """The hub's ``on_round_closed``: scores each new global model on the held-out windows, adds the round to
    the report and shows it."""

    def __init__(self, sim: Simulation, report: dict[str, Any], progress: RoundProgress) -> None:
        from wearfl.attacks import BACKDOOR_TARGET, add_trigger

        self.held_out, self.report, self.progress = sim.held_out, report, progress
        self.backdoor_probe: np.ndarray | None = None
        if sim.plan is not None and sim.plan.kind == "backdoor" and sim.model.spec.is_classifier:
            self.backdoor_probe = add_trigger(np.concatenate([c.x[c.y != BACKDOOR_TARGET] for c in sim.held_out]))

    def metrics(self, model: Model) -> dict[str, float]:
        """``model``'s metrics on the held-out windows (and the backdoor's success under attack)."""
        from edge_client.evaluation import summarize

        metrics: dict[str, float] = summarize(model, self.held_out)["metrics"]
        if self.backdoor_probe is not None:
            metrics["backdoor_success"] = backdoor_success(model, self.backdoor_probe)
        return metrics

    def __call__(self, summary: RoundSummary) -> None:
        metrics = self.metrics(summary.model)
        self.report["rounds"].append({
            "round": summary.round, "model_version": summary.model_version, "participants": summary.participants,
            "updates_accepted": summary.updates_accepted, "updates_rejected": summary.updates_rejected,
            "bytes_up": summary.bytes_up, "bytes_down": summary.bytes_down,
            "duration_s": round(summary.duration_s, 3), "closed_at": round(time.time(), 3), "metrics": metrics,
            "federated_metrics": summary.metrics,
        })
        if summary.explanation is not None and "explanations" in self.report:
            self.report["explanations"].append(summary.explanation)
        self.progress.round_closed(summary, metrics)


def run_simulation(sim: Simulation, signals: StopSignals) -> dict[str, Any] | None:
    """Run ``sim``: make its folder, start its broker, run the rounds, write the report and the model files.

    Returns the report, or None when a signal stopped the rounds (the hub's state folder keeps the
    rounds done). The broker is stopped on every way out: the end, an error, a signal.
    """
    _make_out(sim.out)
    if sim.swarms:
        from wearfl.swarm import write_keyring

        assert sim.keyring is not None
        write_keyring(sim.keyring, sim.secret, sim.clients)
    elif sim.keyring is not None:
        _write_keyring(sim.keyring, sim.out, sim.clients)
    if sim.sites is not None:
        sim.sites.provision(sim.out, sim.hub.config.federation)
    report = _new_report(sim)
    try:
        if sim.broker is not None:
            sim.broker.start()
        if sim.sites is not None:
            sim.sites.start()
        _announce(sim)
        with RoundProgress(sim.args.rounds, headline_metric(sim.args.task)) as progress:
            recorder = sim.hub.on_round_closed = RoundRecorder(sim, report, progress)
            asyncio.run(_federate(sim, signals))
    finally:
        if sim.broker is not None:
            sim.broker.stop()
        if sim.sites is not None:
            sim.sites.stop()
    if signals.signum is not None:
        _keep_rounds_done(sim, report, signals.signum)
        return None
    _finish_report(sim, report, recorder)
    return report


def _keep_rounds_done(sim: Simulation, report: dict[str, Any], signum: int) -> None:
    """An interrupted run's rounds so far, in ``report.json`` with ``interrupted`` (no picture, no model files:
    a signal should end the run within seconds)."""
    if not report["rounds"]:
        return
    report["interrupted"] = signal.Signals(signum).name
    write_atomic(sim.out / "report.json", json.dumps(report, indent=2, sort_keys=True).encode())
    print(f"the {len(report['rounds'])} round(s) done are in {sim.out / 'report.json'}", file=sys.stderr)


def _make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make the output folder {out} ({exc.strerror}); give another --out.") from exc


def _write_keyring(keyring: Path, out: Path, clients: list[str]) -> None:
    """The operator's directory of device keys, which secure aggregation needs (each edge's key made here)."""
    from models.protocol.identity import load_or_create_key, public_hex

    keyring.write_text("".join(f"{c} {public_hex(load_or_create_key(out / 'edges' / c / 'device.key'))}\n"
                               for c in clients))


def _new_report(sim: Simulation) -> dict[str, Any]:
    from edge_client.evaluation import summarize

    args = sim.args
    report: dict[str, Any] = {
        "task": args.task, "dataset": args.dataset, "clients": len(sim.clients), "sites": args.sites,
        "strategy": args.strategy,
        "secure_aggregation": args.secure_aggregation, "strategy_args": dict(sim.hub.config.strategy_args),
        "quantization": args.quantize, "float32_update_bytes": float32_update_bytes(sim.model), "rounds": [],
        "initial_metrics": summarize(sim.model, sim.held_out)["metrics"],
        "strategy_config": sim.hub.strategy.describe(),
        "edges": "light" if sim.swarms else "full",
    }
    if sim.swarms:
        report["processes"] = _processes(args, len(sim.clients))
    if sim.plan is not None:
        report["attack"] = sim.plan.describe()
    if args.explain:
        report["explanations"] = []
    return report


def _announce(sim: Simulation) -> None:
    args, n = sim.args, len(sim.clients)
    where = sim.url if sim.sites is None else (f"{len(sim.sites.members)} site brokers under the consortium's "
                                               f"{sim.url}")
    print(f"simulating {n} edges x {args.rounds} rounds of {args.task} on {sim.dataset_name} "
          f"({args.quantize} updates) through {where}", file=sys.stderr)
    if args.http:
        print(f"dashboard: http://{args.http}/ (while the simulation runs)", file=sys.stderr)
    if sim.plan is not None:
        print(f"attack: {sim.plan.kind} by {len(sim.plan.malicious)} of {n} edges ({', '.join(sim.plan.malicious)})",
              file=sys.stderr)


async def _federate(sim: Simulation, signals: StopSignals) -> None:
    """Run the hub and the edges until the last round closes, the hub fails or a signal sets ``stop``.

    Then every part gets time to stop (status offline, checkpoint, disconnect) while the broker still
    runs: :data:`EDGES_STOP_S` after the last round, :data:`GRACE_S` after a signal; what is left is
    cancelled. The hub's error, if any, is raised once the edges have stopped.
    """
    from edge_client.runtime import run_edges

    stop = asyncio.Event()
    with signals.stopping(stop):
        hub = asyncio.create_task(sim.hub.run(stop), name="the hub")
        edges = asyncio.create_task(_run_swarms(sim, stop) if sim.swarms else run_edges(sim.edges, stop),
                                    name="the edges")
        sites = [asyncio.create_task(site.run(stop), name=f"the hub of {name}")
                 for name, site in (sim.sites.hubs.items() if sim.sites is not None else ())]
        stopped = asyncio.create_task(stop.wait())
        try:
            # the edges end early only when every one failed (a worker process died): the rounds cannot go on
            await asyncio.wait([hub, edges, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            stop.set()
            await _settle([hub, edges, *sites], GRACE_S if signals.signum is not None else EDGES_STOP_S)
    for task in (hub, edges, *sites):
        if task.done() and not task.cancelled():
            task.result()  # the error that ended it, if any


async def _run_swarms(sim: Simulation, stop: asyncio.Event) -> None:
    """The light edges: one swarm in this process (``--processes 0``), or one worker process per swarm."""
    from wearfl.swarm import Swarm
    from wearfl.swarm_worker import run_workers

    if _processes(sim.args, len(sim.clients)) == 0:
        swarm = Swarm(sim.swarms[0], sim.dataset)
        await swarm.run(stop)
        sim.edge_counters = [swarm.status()]
        return
    level = "INFO" if sim.args.verbose else "WARNING"
    sim.edge_counters = await run_workers(sim.swarms, stop, log_level=level)


async def _settle(tasks: list[asyncio.Task[Any]], timeout: float) -> None:
    """Wait up to ``timeout`` s for ``tasks`` to end; cancel the others and give them :data:`CANCEL_S` to unwind."""
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        log.warning("%s did not stop within %g s; cancelled", task.get_name(), timeout)
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=CANCEL_S)


def _finish_report(sim: Simulation, report: dict[str, Any], recorder: RoundRecorder) -> None:
    """Complete the report with the final model's metrics, write it, and the final model as package, ONNX, TFLite."""
    from models.onnx_export import export_onnx
    from models.package import save_package
    from models.tflite_export import export_tflite
    from wearfl.report import write_report

    final = sim.hub.current_model
    status = sim.hub.status()
    personal = status.get("personalization", {})
    if sim.sites is not None:  # each gateway's own figures are at its site (the consortium sees sites)
        personal = {c: v for site in sim.sites.hubs.values() for c, v in site.status()["personalization"].items()}
    report["personalization"] = personalization_report(personal, sim.args.task)
    if status.get("privacy"):
        report["privacy"] = status["privacy"]
    report["final_metrics"] = recorder.metrics(final)
    per_update = [r["bytes_up"] / r["updates_accepted"] for r in report["rounds"] if r["updates_accepted"]]
    # The median round: a round where an edge re-sent an unreceipted update carries its bytes twice.
    report["update_bytes"] = float(np.median(per_update)) if per_update else None
    if per_update:
        report["update_bytes_ratio"] = report["update_bytes"] / report["float32_update_bytes"]
    if sim.sites is not None:
        report["tiers"] = sim.sites.tiers(report["rounds"])
    if sim.edge_counters:
        report["edge_counters"] = {k: sum(c.get(k, 0) for c in sim.edge_counters)
                                   for k in sorted({k for c in sim.edge_counters for k in c})}
    save_package(final, sim.out / "model.safetensors")
    write_atomic(sim.out / "model.onnx", export_onnx(final))
    write_atomic(sim.out / "model.tflite", export_tflite(final))
    write_report(sim.out, report)
    report["out"] = str(sim.out)


def _interrupted(signum: int | None) -> int:
    """One short line, and the shell's exit code of a run ended by a signal: 130 for Ctrl-C, 143 for SIGTERM."""
    signum = signum or signal.SIGINT
    print("interrupted" if signum == signal.SIGINT else "terminated", file=sys.stderr)
    return 128 + int(signum)


def print_summary(task: str, report: dict[str, Any]) -> None:
    """The rounds as a table on stdout, the final metric and update size, the privacy spent, the files written."""
    key = headline_metric(task)
    print(f"{'round':>5} {'updates':>8} {'KiB up':>9} {key:>9}")
    print(f"{0:>5} {'':>8} {'':>9} {report['initial_metrics'][key]:>9.4f}  (initial model)")
    for r in report["rounds"]:
        print(f"{r['round']:>5} {r['updates_accepted']:>8} {r['bytes_up'] / 1024:>9.1f} {r['metrics'][key]:>9.4f}")
    ratio = ""
    if report.get("update_bytes"):
        ratio = f", {report['update_bytes']:.0f} bytes per update = {report['update_bytes_ratio']:.3f}x float32"
    print(f"final {key}: {report['final_metrics'][key]:.4f}{ratio}")
    if report.get("privacy"):
        p = report["privacy"]
        print(f"privacy: epsilon {p['epsilon']:.3g} at delta {p['delta']:g} after {p['rounds']} rounds "
              f"(noise {p['noise_multiplier']:g}, {p['accountant']}); {p['sampling']}")
    print(f"wrote {report['out']}/report.json, report.png, model.safetensors, model.onnx, model.tflite")


def cmd_simulate(args: argparse.Namespace) -> int:
    """``wearfl simulate``: check, run, summarize; 130 (143) with one line when Ctrl-C (SIGTERM) stopped it."""
    from threadpoolctl import threadpool_limits

    signals = StopSignals()
    store_log = logging.getLogger("hub.store")
    level = store_log.level
    if not args.verbose:
        store_log.setLevel(logging.ERROR)  # one "pinned key" line per simulated edge
    try:
        # Every edge trains in its own thread; a multi-threaded BLAS under each of them
        # oversubscribes the cores (a 2-core laptop ran twice as slow).
        with signals, threadpool_limits(limits=1, user_api="blas"):
            report = run_simulation(prepare_simulation(args), signals)
    except Interrupted as exc:
        return _interrupted(exc.signum)
    finally:
        store_log.setLevel(level)  # whoever runs a simulation in-process gets the store's lines back
    if report is None:
        return _interrupted(signals.signum)
    print_summary(args.task, report)
    return 0


class _DefaultsFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless it has none or its help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or "(default:" in text or action.default in (None, argparse.SUPPRESS):
            return text
        shown = ("on" if action.default else "off") if isinstance(action.default, bool) else "%(default)s"
        return f"{text} (default: {shown})"


def add_commands(sub: Any) -> None:
    p = sub.add_parser("simulate", help="run a whole federation on this machine", formatter_class=_DefaultsFormatter)
    p.add_argument("--task", choices=("activity", "heart-rate"), default="activity", help="what the model learns")
    p.add_argument("--dataset", default=None, help="sim[:SEED], hapt:DIR or recordings:DIR (default: sim:SEED)")
    p.add_argument("--clients", type=int,
                   help="number of edges (default: 8, or as many as the dataset has training clients if fewer)")
    p.add_argument("--rounds", type=int, default=5, help="rounds to run")
    p.add_argument("--quantize", choices=SCHEMES, default="int8", help="how the edges encode their updates")
    add_strategy_flags(p)
    p.add_argument("--broker", help="use this broker (mqtt://host:port) instead of starting one "
                                    "(default: start Mosquitto, or the embedded broker without it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the edges")
    p.add_argument("--model", help="start from this package instead of a fresh model")
    p.add_argument("--window-s", type=float, help="window length in seconds (default: the task's)")
    p.add_argument("--round-timeout", type=float, default=120.0, help="seconds the hub waits for a round's updates")
    p.add_argument("--local-epochs", type=int, default=2, help="epochs each edge trains per round")
    p.add_argument("--local-steps", type=int, metavar="S",
                   help="a fixed amount of local work instead: S optimizer steps per edge and round (default: epochs)")
    p.add_argument("--batch-size", type=int, default=32, help="windows per optimizer step on the edges")
    p.add_argument("--lr", type=float, default=3e-3, help="the edges' learning rate in the first round")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine",
                   help="how the edges' learning rate changes over the rounds (cosine: decays to 5%% of --lr)")
    p.add_argument("--rotation", type=float, default=10.0,
                   help="std (degrees) of the random rotation of three-axis sensors in training (0: off)")
    p.add_argument("--server-lr", type=float, default=1.0, help="the hub's step along the averaged update")
    p.add_argument("--window-hop", type=float, default=0.25,
                   help="hop between the edges' training windows, as a fraction of a window")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="the fraction of edges the hub selects for each round (1: all)")
    p.add_argument("--eval-every", type=int, default=1, metavar="K",
                   help="edges evaluate the global and their fine-tuned model every K rounds")
    p.add_argument("--edge-delay", type=float, default=0.0, metavar="S",
                   help="mean of a random (exponential) wait before each edge's training in a round: "
                        "gateways that come and go")
    p.add_argument("--dp-noise", type=float, metavar="Z",
                   help="differential privacy (DP-FedAvg): Gaussian noise multiplier on the clipped sum "
                        "(default: no DP)")
    p.add_argument("--dp-clip", type=float, default=1.0, metavar="C",
                   help="with --dp-noise: the L2 bound each update is clipped to")
    p.add_argument("--dp-delta", type=float, default=1e-5, metavar="D", help="with --dp-noise: delta")
    p.add_argument("--dp-budget", type=float, metavar="EPS",
                   help="with --dp-noise: stop releasing models before epsilon would exceed this (default: no budget)")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="SecAgg+ over MQTT: the hub learns only the sum of the edges' updates")
    p.add_argument("--dp-distributed", action="store_true",
                   help="with --dp-noise and --secure-aggregation: the edges add the noise in shares, not the hub")
    p.add_argument("--attack", choices=ATTACKS, help="make some edges hostile with this attack (default: none)")
    p.add_argument("--malicious", type=float, default=0.2, metavar="FRACTION",
                   help="the fraction of edges that attack, in (0, 1) (with --attack)")
    p.add_argument("--attack-scale", type=float, default=10.0,
                   help="s of the scale (s * delta) and sign-flip (-s * delta) attacks")
    p.add_argument("--explain", action="store_true",
                   help="the edges also send, with their federated evaluation, where the global model looks "
                        "(attribution maps per class, channel and time segment; docs/explanations.md); the report "
                        "shows the federation's map")
    p.add_argument("--adapt", action="store_true",
                   help="the edges also evaluate the model they would use after adapting to their wearer without "
                        "labels (docs/adaptation.md); report.json's personalization shows global, adapted and "
                        "personalized figures per edge")
    p.add_argument("--edges", choices=("auto", "full", "light"), default="auto",
                   help="full: every edge a whole gateway (streams, replay buffer, evaluation, personalization); "
                        f"light: the same protocol, data made when an edge trains (for thousands); auto: light from "
                        f"{LIGHT_FROM} edges on")
    p.add_argument("--processes", type=int, metavar="K",
                   help="spread light edges over K worker processes, each one event loop of MQTT sessions "
                        "(default: 0 below 100 edges, else one per core up to 4)")
    p.add_argument("--sites", type=int, default=0, metavar="K",
                   help="split the edges over K site hubs, each with its own broker, under a consortium hub "
                        "(0: one flat federation; docs/sites.md)")
    p.add_argument("--out", help="output folder (default: a new folder under ./runs/)")
    p.add_argument("--http", metavar="HOST:PORT",
                   help="serve the hub's live dashboard, /metrics and /api/status while the simulation runs "
                        "(default: off)")
    p.add_argument("--http-token", metavar="TOKEN", help="required for --http beyond loopback")
    p.set_defaults(func=_with_default_dataset)


def _with_default_dataset(args: argparse.Namespace) -> int:
    if args.dataset is None:
        args.dataset = f"sim:{args.seed}"
    args.strategy = args.strategy or "fedavg"
    if args.rounds < 1:
        raise ConfigError(f"--rounds {args.rounds}: give at least 1 round.")
    return cmd_simulate(args)
