"""The gateway's commands of the ``wearfl`` CLI: evaluate, record."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from models.errors import ConfigError

__all__ = ["add_commands"]


class _Progress:
    """One progress bar per stage on stderr (quiet when stderr is not a terminal)."""

    def __init__(self) -> None:
        self._bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, leave=False,
                                           disable=not sys.stderr.isatty(), mininterval=0.5)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    print(f"{title:<22}" + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from edge_client.adaptation import KEPT_GLOBAL_REASONS
    from edge_client.evaluation import (
        CENTRAL_TRAINING,
        adapt,
        load_clients,
        personalize,
        summarize,
        task_spec,
        train_central,
    )
    from edge_client.sources.datasets import open_dataset
    from models.package import load_package, save_package

    if args.train == bool(args.model):
        raise ConfigError("evaluate needs either --train (train centrally) or --model PKG (evaluate that model).")
    if args.save and not args.train:
        raise ConfigError("--save writes the model trained by --train; add --train.")
    dataset = open_dataset(args.dataset)
    progress = _Progress()
    result: dict[str, Any] = {"task": args.task, "dataset": args.dataset}
    holdout = float(getattr(dataset, "holdout_fraction", 0.0) or 0.0)
    try:
        if args.train:
            spec = task_spec(args.task, dataset, args.window_s)
            hop = max(1, int(spec.window * CENTRAL_TRAINING[spec.task]["hop_fraction"]))
            if holdout > 0:
                clients = load_clients(dataset, dataset.clients, spec, progress=progress)
                split = [c.split(1.0 - holdout) for c in clients]
                train, test = [a for a, _ in split], [b for _, b in split]
            else:
                train = load_clients(dataset, dataset.train_clients, spec, hop=hop, progress=progress)
                test = load_clients(dataset, dataset.test_clients, spec, progress=progress)
            model = train_central(spec, train, seed=args.seed, progress=progress)
            if args.save:
                save_package(model, args.save)
                result["saved"] = args.save
        else:
            model = load_package(args.model)
            if model.spec.task != args.task:
                raise ConfigError(f"{args.model} is a {model.spec.task} model, not {args.task}.")
            ids = dataset.clients if holdout > 0 else dataset.test_clients
            test = load_clients(dataset, ids, model.spec, progress=progress)
        if args.adapt_fraction is not None:
            report = adapt(model, test, args.adapt_fraction, args.personalize_fraction, progress=progress)
            result.update(report)
            result["metrics"] = report["metrics_after"]
        elif args.personalize_fraction is not None:
            report = personalize(model, test, args.personalize_fraction, progress=progress)
            result.update(report)
            result["metrics"] = report["metrics_after"]
        else:
            result.update(summarize(model, test))
    finally:
        progress.close()
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.task} on {args.dataset}: {len(test)} held-out clients")
    if "metrics_adapted" in result:
        _print_metrics("global model", result["metrics_before"])
        _print_metrics("adapted", result["metrics_adapted"])
        if args.personalize_fraction is not None:
            _print_metrics("adapted, personalized", result["metrics_after"])
        clients = result["clients"]
        print(f"improved clients      {result['improved_clients']} of {len(clients)} ({result['kept_global_clients']} "
              "kept the global model)")
        key = "accuracy" if args.task == "activity" else "mae_bpm"
        for client, c in clients.items():
            reason = c.get("reason") or ""
            why = KEPT_GLOBAL_REASONS.get(reason, reason)
            kept = f"  (kept global: {why})" if c["kept_global"] else ""
            print(f"  {client:<14} {key} {c['before'][key]:.4f} -> {c['adapted'][key]:.4f}"
                  + (f" -> {c['after'][key]:.4f}" if args.personalize_fraction is not None else "") + kept)
    elif "metrics_before" in result:
        _print_metrics("before fine-tuning", result["metrics_before"])
        _print_metrics("after fine-tuning", result["metrics_after"])
        print(f"improved clients      {result['improved_clients']} of {result['personalized_clients']}")
    else:
        _print_metrics("model", result["metrics"])
        for name, metrics in result.get("baseline", {}).items():
            _print_metrics(f"baseline {name}", metrics)
    if args.save:
        print(f"wrote {args.save}")
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from edge_client.edge_command import resolve_source
    from edge_client.sources.datasets import is_live
    from edge_client.sources.recorder import record_source

    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        raise ConfigError(f"--minutes must be a positive number, got {args.minutes}.")
    if is_live(args.source) and args.minutes is None:
        raise ConfigError(f"{args.source} is a live stream that never ends; give --minutes to say how much to record.")
    source = resolve_source(args.source, args.client_id)
    limit = None if args.minutes is None else args.minutes * 60.0
    from tqdm import tqdm

    with tqdm(total=limit, desc=f"recording {source.client_id}", unit="s", file=sys.stderr, leave=False,
              disable=not sys.stderr.isatty(), mininterval=0.5, bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s"
              if limit else "{desc}: {n:.0f} s") as bar:
        done = record_source(source, args.out, max_seconds=limit, progress=lambda s: bar.update(s - bar.n))
    print(f"wrote {done.path}: {done.samples:,} samples ({done.seconds / 60:.1f} min at {done.sampling_rate_hz:g} Hz; "
          f"columns {', '.join(done.columns)})")
    print(f"use it as --source recordings:{done.path.parent}/{done.path.stem}")
    return 0


def add_commands(sub: Any) -> None:
    """Register the gateway's commands on an argparse sub-parser set."""
    p = sub.add_parser("evaluate", help="train centrally and/or evaluate a model on a dataset's clients")
    p.add_argument("--task", required=True, choices=("activity", "heart-rate"))
    p.add_argument("--dataset", required=True, help="sim[:SEED], hapt:DIR or recordings:DIR")
    p.add_argument("--model", help="model package to evaluate (without --train)")
    p.add_argument("--train", action="store_true", help="train a fresh model centrally on the training clients")
    p.add_argument("--save", help="where to write the model trained by --train")
    p.add_argument("--window-s", type=float, help="window length in seconds (default 2.56 activity, 8 heart-rate)")
    p.add_argument("--personalize-fraction", type=float,
                   help="fine-tune per client on this first fraction of its windows, evaluate on the rest")
    p.add_argument("--adapt-fraction", type=float,
                   help="adapt per client to this first fraction of its windows without their labels (BatchNorm "
                        "statistics, checked label-free), evaluate on the rest; with --personalize-fraction: adapt, "
                        "then personalize (docs/adaptation.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("record", help="write a source's stream as a recording (docs/recordings.md)",
                       description="Write a source's stream in the recording format, as DIR/CLIENT.csv plus "
                                   "DIR/dataset.toml, for a `recordings:DIR/CLIENT` source.")
    p.add_argument("--source", required=True, metavar="SPEC",
                   help="what to record, as `wearfl edge --source`: sim:0/wearer-02, hapt:DIR/user-05, lsl:NAME, ...")
    p.add_argument("--out", required=True, metavar="DIR", help="the recordings folder to write into")
    p.add_argument("--client-id", metavar="ID", help="the client, when SPEC does not name one")
    p.add_argument("--minutes", type=float, help="stop after this much stream time (required for live sources)")
    p.set_defaults(func=cmd_record)
