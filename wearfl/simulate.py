"""``wearfl simulate``: a whole federation on one machine, through a real MQTT broker.

It starts a broker (Mosquitto on a free loopback port when installed, else the
in-process one) unless ``--broker`` names one, runs a hub and N edges in one event
loop (each edge its own MQTT session and state directory), evaluates every new
global model on held-out data, and writes ``report.json``, ``report.png`` and the
final model as a package, ONNX and TFLite.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

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

__all__ = ["add_commands", "float32_update_bytes"]

log = logging.getLogger(__name__)


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
    return out


def backdoor_success(model: Model, triggered: np.ndarray, target: int = 0) -> float:
    """The share of triggered held-out windows (none of the target class) classified as the target."""
    return float(np.mean(np.argmax(model.predict(triggered), axis=1) == target))


def _out_dir(path: str | None) -> Path:
    if path:
        return Path(path)
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


async def _simulate(args: argparse.Namespace) -> dict[str, Any]:
    from edge_client.evaluation import load_clients, summarize, task_spec
    from edge_client.finetune import FineTunePolicy
    from edge_client.runtime import EdgeClient, EdgeConfig, run_edges
    from edge_client.sources.datasets import open_dataset
    from hub.service import HubConfig, HubService
    from hub.strategies import parse_strategy_args
    from models.package import load_package
    from wearfl.attacks import BACKDOOR_TARGET, AttackPlan, Collusion, PoisonedSource, add_trigger, weights_hook
    from wearfl.broker import start_broker

    if not args.verbose:
        logging.getLogger("hub.store").setLevel(logging.ERROR)  # one "pinned key" line per simulated edge
    strategy_args = parse_strategy_args(args.strategy_arg)
    if args.dp_noise is not None:
        if args.strategy not in ("fedavg", "dpfedavg"):
            raise ConfigError(f"--dp-noise runs DP-FedAvg; it does not combine with --strategy {args.strategy}.")
        args.strategy = "dpfedavg"
        strategy_args.update({"noise": args.dp_noise, "dp_clip": args.dp_clip, "delta": args.dp_delta,
                              "budget": args.dp_budget or 0.0, "seed": args.seed,
                              "distributed": int(args.dp_distributed)})
    dataset = open_dataset(args.dataset)
    holdout = float(getattr(dataset, "holdout_fraction", 0.0) or 0.0)
    if args.model:
        model = load_package(args.model)
        if model.spec.task != args.task:
            raise ConfigError(f"{args.model} is a {model.spec.task} model, not {args.task}.")
    else:
        model = Model(task_spec(args.task, dataset, args.window_s), seed=args.seed)
    pool = dataset.clients if holdout > 0 else dataset.train_clients
    n = args.clients if args.clients is not None else min(8, len(pool))
    if not 1 <= n <= len(pool):
        raise ConfigError(f"--clients {n}: {dataset.name} has {len(pool)} training clients.")
    clients = pool[:n]
    if args.strategy == "dpfedavg":
        strategy_args.setdefault("population", n)
    held_out = load_clients(dataset, dataset.clients if holdout > 0 else dataset.test_clients, model.spec)
    if holdout > 0:
        held_out = [c.split(1.0 - holdout)[1] for c in held_out]

    out = _out_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    broker = None if args.broker else start_broker(workdir=out)
    url = args.broker or broker.url
    federation = f"sim-{int(time.time())}"
    report: dict[str, Any] = {
        "task": args.task, "dataset": args.dataset, "clients": n, "strategy": args.strategy,
        "secure_aggregation": args.secure_aggregation,
        "strategy_args": strategy_args,
        "quantization": args.quantize, "float32_update_bytes": float32_update_bytes(model), "rounds": [],
    }
    report["initial_metrics"] = summarize(model, held_out)["metrics"]
    backdoor_probe = None
    if args.attack == "backdoor" and model.spec.is_classifier:
        x = np.concatenate([c.x[c.y != BACKDOOR_TARGET] for c in held_out])
        backdoor_probe = add_trigger(x)
    print(f"simulating {n} edges x {args.rounds} rounds of {args.task} on {dataset.name} "
          f"({args.quantize} updates) through {url}", file=sys.stderr)
    start = time.monotonic()

    def on_round(summary: Any) -> None:
        metrics = summarize(summary.model, held_out)["metrics"]
        if backdoor_probe is not None:
            metrics["backdoor_success"] = backdoor_success(summary.model, backdoor_probe)
        row = {"round": summary.round, "model_version": summary.model_version, "participants": summary.participants,
               "updates_accepted": summary.updates_accepted, "updates_rejected": summary.updates_rejected,
               "bytes_up": summary.bytes_up, "bytes_down": summary.bytes_down,
               "duration_s": round(summary.duration_s, 3), "metrics": metrics,
               "federated_metrics": summary.metrics}
        report["rounds"].append(row)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"round {summary.round:>3}/{args.rounds}  {summary.participants:>3} updates  "
              f"{summary.bytes_up / 1024:8.1f} KiB up  {shown}  ({time.monotonic() - start:.0f} s)", file=sys.stderr)

    task_config = {"quantize": args.quantize, "epochs": args.local_epochs, "batch_size": 32, "lr": args.lr,
                   "lr_schedule": args.lr_schedule, "rotation_deg": args.rotation}
    keyring = None
    if args.secure_aggregation:  # the operator's directory of device keys, which secure aggregation needs
        from models.protocol.identity import load_or_create_key, public_hex

        keyring = out / "keyring"
        keyring.write_text("".join(f"{c} {public_hex(load_or_create_key(out / 'edges' / c / 'device.key'))}\n"
                                   for c in clients))
    hub_config = HubConfig(
        broker=url, federation=federation, state_dir=out / "hub",
        min_clients=n if args.fraction >= 1 else max(1, math.ceil(args.fraction * n)),
        clients_per_round=n if args.fraction >= 1 else None, fraction=args.fraction,
        round_timeout_s=args.round_timeout, rounds=args.rounds, task_config=task_config, strategy=args.strategy,
        strategy_args=strategy_args, evaluate_every=args.eval_every,
        server_lr=args.server_lr, keyring=keyring, secure_aggregation=args.secure_aggregation,
    )
    hub = HubService(hub_config, initial_model=model)
    report["strategy_config"] = hub.strategy.describe()
    hub.on_round_closed = on_round
    policy = FineTunePolicy(min_new_windows=0)
    plan = None
    if args.attack:
        plan = AttackPlan.choose(args.attack, args.malicious, clients, args.seed, args.attack_scale)
    collusion = Collusion(plan.malicious, n) if plan and plan.kind == "alie" else None
    if plan:
        report["attack"] = plan.describe()
        print(f"attack: {plan.kind} by {len(plan.malicious)} of {n} edges ({', '.join(plan.malicious)})",
              file=sys.stderr)
    edge_clients = []
    for i, client in enumerate(clients):
        config = EdgeConfig(broker=url, federation=federation, client_id=client, state_dir=out / "edges" / client,
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
        edge_clients.append(edge)
    stop = asyncio.Event()
    try:
        edge_task = asyncio.create_task(run_edges(edge_clients, stop))
        await hub.run()
        stop.set()
        await asyncio.wait_for(edge_task, 60)
    finally:
        stop.set()
        if broker is not None:
            broker.stop()
    final = hub.current_model
    status = hub.status()
    report["personalization"] = personalization_report(status.get("personalization", {}), args.task)
    if status.get("privacy"):
        report["privacy"] = status["privacy"]
    report["final_metrics"] = summarize(final, held_out)["metrics"]
    if backdoor_probe is not None:
        report["final_metrics"]["backdoor_success"] = backdoor_success(final, backdoor_probe)
    per_update = [r["bytes_up"] / r["updates_accepted"] for r in report["rounds"] if r["updates_accepted"]]
    # The median round: a round where an edge re-sent an unreceipted update carries its bytes twice.
    report["update_bytes"] = float(np.median(per_update)) if per_update else None
    if per_update:
        report["update_bytes_ratio"] = report["update_bytes"] / report["float32_update_bytes"]
    from models.onnx_export import export_onnx
    from models.package import save_package
    from models.tflite_export import export_tflite

    save_package(final, out / "model.safetensors")
    write_atomic(out / "model.onnx", export_onnx(final))
    write_atomic(out / "model.tflite", export_tflite(final))
    from wearfl.report import write_report

    write_report(out, report)
    report["out"] = str(out)
    return report


def cmd_simulate(args: argparse.Namespace) -> int:
    from threadpoolctl import threadpool_limits

    # Every edge trains in its own thread; a multi-threaded BLAS under each of them
    # oversubscribes the cores (a 2-core laptop ran twice as slow).
    with threadpool_limits(limits=1, user_api="blas"):
        report = asyncio.run(_simulate(args))
    key = "accuracy" if args.task == "activity" else "mae_bpm"
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
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("simulate", help="run a whole federation on this machine")
    p.add_argument("--task", choices=("activity", "heart-rate"), default="activity")
    p.add_argument("--dataset", default=None, help="sim[:SEED] (default sim:SEED), hapt:DIR or recordings:DIR")
    p.add_argument("--clients", type=int, help="number of edges (default 8, at most the training clients)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quantize", choices=SCHEMES, default="int8")
    add_strategy_flags(p)
    p.add_argument("--broker", help="use this broker (mqtt://host:port) instead of starting one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="start from this package instead of a fresh model")
    p.add_argument("--window-s", type=float)
    p.add_argument("--round-timeout", type=float, default=120.0)
    p.add_argument("--local-epochs", type=int, default=2, help="epochs each edge trains per round")
    p.add_argument("--lr", type=float, default=3e-3, help="the edges' learning rate in the first round")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine",
                   help="how the edges' learning rate changes over the rounds (default cosine decay to 5%%)")
    p.add_argument("--rotation", type=float, default=10.0,
                   help="std (degrees) of the random rotation of three-axis sensors in training (0: off)")
    p.add_argument("--server-lr", type=float, default=1.0, help="the hub's step along the averaged update")
    p.add_argument("--window-hop", type=float, default=0.25,
                   help="hop between the edges' training windows, as a fraction of a window (default 0.25)")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="the fraction of edges the hub selects for each round (default 1: all)")
    p.add_argument("--eval-every", type=int, default=1, metavar="K",
                   help="edges evaluate the global and their fine-tuned model every K rounds (default 1)")
    p.add_argument("--edge-delay", type=float, default=0.0, metavar="S",
                   help="mean of a random (exponential) wait before each edge's training in a round: "
                        "gateways that come and go (default 0)")
    p.add_argument("--dp-noise", type=float, metavar="Z",
                   help="differential privacy (DP-FedAvg): Gaussian noise multiplier on the clipped sum")
    p.add_argument("--dp-clip", type=float, default=1.0, metavar="C",
                   help="with --dp-noise: the L2 bound each update is clipped to (default 1.0)")
    p.add_argument("--dp-delta", type=float, default=1e-5, metavar="D", help="with --dp-noise: delta (default 1e-5)")
    p.add_argument("--dp-budget", type=float, metavar="EPS",
                   help="with --dp-noise: stop releasing models before epsilon would exceed this")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="SecAgg+ over MQTT: the hub learns only the sum of the edges' updates")
    p.add_argument("--dp-distributed", action="store_true",
                   help="with --dp-noise and --secure-aggregation: the edges add the noise in shares, not the hub")
    p.add_argument("--attack", choices=ATTACKS, help="make some edges hostile with this attack")
    p.add_argument("--malicious", type=float, default=0.2, metavar="FRACTION",
                   help="the fraction of edges that attack (default 0.2; with --attack)")
    p.add_argument("--attack-scale", type=float, default=10.0,
                   help="s of the scale (s * delta) and sign-flip (-s * delta) attacks (default 10)")
    p.add_argument("--out", help="output folder (default: a new folder under ./runs/)")
    p.set_defaults(func=_with_default_dataset)


def _with_default_dataset(args: argparse.Namespace) -> int:
    if args.dataset is None:
        args.dataset = f"sim:{args.seed}"
    args.strategy = args.strategy or "fedavg"
    if args.rounds < 1:
        raise ConfigError("--rounds must be >= 1.")
    return cmd_simulate(args)
