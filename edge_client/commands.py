"""The gateway's commands of the ``wearfl`` CLI: evaluate."""

from __future__ import annotations

import argparse
import json
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
    from edge_client.evaluation import (
        CENTRAL_TRAINING,
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
        if args.personalize_fraction is not None:
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
    if "metrics_before" in result:
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)
