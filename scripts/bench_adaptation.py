#!/usr/bin/env python
"""How far label-free adaptation to a wearer can go: the figures behind docs/adaptation.md (issue 19).

``hapt MODEL``: for each HAPT test user, the windows are split as ``wearfl evaluate --adapt-fraction F`` splits them
(the first F of the user's labelled windows to adapt on, the rest to evaluate on) and the accuracy on the rest is
printed for

- **global**: the model as the federation made it;
- **adapted**: the shipped method (``edge_client.adaptation.adapt_for_wearer``: BatchNorm statistics re-estimated on
  the first F, kept only when its checks pass), what ``wearfl evaluate --adapt-fraction F`` reports;
- **bound**: BatchNorm statistics re-estimated on the evaluated windows themselves, one recording at a time, no
  check: what statistics learnt from earlier windows should not beat (it sees the windows it is scored on);
- **per recording**: the same split inside each recording (HAPT records each user twice, with the phone put on
  again): adapt on the first F of the recording's windows, evaluate on the rest of that recording.

``heart-rate MODEL``: on ``sim:SEED:arm-ir`` (a device the model never saw) for each seed, the MAE on the rest of each
held-out wearer's windows of the global model, of the model with all its BatchNorm statistics re-estimated on the
first F, and of the **still-window reference**: windows without gait (summed per-axis std of the acceleration
< 0.1 g) take the PPG's spectral peak, the others the model; then (``--factors``) the same three on the first
seed's wearers recorded with each of arm-ir's changes alone. ``still_peak_mae_bpm_first`` is the spectral
peak's own error on the still windows of the first F (labels read for this figure only): how far a gateway could
trust it as a reference.

Windows are cut as ``wearfl evaluate`` cuts them (the model's window, a hop of half a window). Run from the
repository root:

    .venv/bin/python scripts/bench_adaptation.py hapt MODEL.safetensors [--dir DIR] [--fraction 0.5] [--json]
    .venv/bin/python scripts/bench_adaptation.py heart-rate HR.safetensors [--seeds 0 1 2] [--factors] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_client.adaptation import adapt_for_wearer
from edge_client.evaluation import _remap_classes, load_clients, spectral_peak_bpm
from edge_client.pipeline import windows_from_chunks
from edge_client.sources import simulator
from edge_client.sources.datasets import open_dataset
from models.adaptation import adapt_statistics
from models.model import Model
from models.package import load_package

STILL_G = 0.1
"""Summed per-axis std (g) of a window's centred acceleration below which it has no gait."""
RECORDING_GAP_S = 5.0


def _hapt_users(model: Model, path: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per test user: labelled windows, labels, and the recording each window comes from."""
    dataset = open_dataset(f"hapt:{path}")
    out = {}
    for client in dataset.test_clients:
        source = dataset.source(client)
        windows, _ = windows_from_chunks(source.chunks(), model.spec, source.sampling_rate_hz)
        if tuple(source.classes) != model.spec.classes:
            windows = _remap_classes(windows, source.classes, model.spec.classes)
        # consecutive windows are half a window apart inside a recording; the next recording starts after a gap
        recording = np.concatenate([[0], np.cumsum(np.diff(windows.t_end) > RECORDING_GAP_S)])
        keep = windows.activity >= 0
        out[client] = (windows.x[keep], windows.activity[keep].astype(np.int64), recording[keep])
    return out


def _correct(model: Model, x: np.ndarray, y: np.ndarray) -> int:
    return int((model.predict(x).argmax(axis=1) == y).sum()) if len(x) else 0


def bench_hapt(model: Model, path: str, fraction: float) -> dict[str, Any]:
    rows, totals = {}, {"global": 0, "adapted": 0, "bound": 0, "recording_global": 0, "recording_adapted": 0}
    counts = {"rest": 0, "recording_rest": 0}
    for client, (x, y, recording) in _hapt_users(model, path).items():
        cut = round(len(x) * fraction)
        rest_x, rest_y, rest_rec = x[cut:], y[cut:], recording[cut:]
        adapted, report = adapt_for_wearer(model, x[:cut])
        row = {"windows": len(rest_y), "global": _correct(model, rest_x, rest_y),
               "adapted": _correct(adapted, rest_x, rest_y), "kept_global": report["kept_global"], "bound": 0,
               "recording_global": 0, "recording_adapted": 0, "recording_windows": 0}
        for r in np.unique(recording):
            here = rest_rec == r
            if here.any():
                row["bound"] += _correct(adapt_statistics(model, rest_x[here]), rest_x[here], rest_y[here])
            rx, ry = x[recording == r], y[recording == r]
            rcut = round(len(rx) * fraction)
            if rcut < 2 or rcut == len(rx):
                continue
            local, _ = adapt_for_wearer(model, rx[:rcut])
            row["recording_global"] += _correct(model, rx[rcut:], ry[rcut:])
            row["recording_adapted"] += _correct(local, rx[rcut:], ry[rcut:])
            row["recording_windows"] += len(ry) - rcut
        for key in totals:
            totals[key] += row[key]
        counts["rest"] += row["windows"]
        counts["recording_rest"] += row["recording_windows"]
        rows[client] = {key: (round(row[key] / row["recording_windows" if key.startswith("recording_") else
                                                    "windows"], 4) if key in totals else row[key]) for key in row}
        print(f"  {client}: " + "  ".join(f"{k} {v}" for k, v in rows[client].items()), file=sys.stderr)
    pooled = {key: round(value / counts["recording_rest" if key.startswith("recording_") else "rest"], 4)
              for key, value in totals.items()}
    return {"fraction": fraction, "pooled": pooled, "users": rows}


def _still(model: Model, x: np.ndarray) -> np.ndarray:
    acc = [model.spec.channels.index(c) for c in ("acc_x", "acc_y", "acc_z")]
    return x[:, acc].std(axis=2).sum(axis=1) < STILL_G


def _peak(model: Model, x: np.ndarray) -> np.ndarray:
    return spectral_peak_bpm(x[:, [model.spec.channels.index("ppg")]], model.spec.sampling_rate_hz)


def _still_reference(model: Model, x: np.ndarray) -> np.ndarray:
    """Model BPM, with windows without gait taking the PPG's spectral peak instead."""
    return np.where(_still(model, x), _peak(model, x), model.predict(x).ravel())


def _mae(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    errors = np.concatenate([np.abs(pred - truth) for pred, truth in pairs])
    return round(float(errors.mean()), 3)


def _heart_rate_rows(model: Model, dataset: Any, fraction: float) -> dict[str, Any]:
    """MAE on the rest of each held-out wearer's windows: global, all statistics re-estimated, still reference."""
    kinds: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"global": [], "statistics": [], "still_reference": []}
    first_still: list[tuple[np.ndarray, np.ndarray]] = []
    per_wearer = {}
    for client in load_clients(dataset, dataset.test_clients, model.spec):
        cut = round(len(client.x) * fraction)
        x, y = client.x[cut:], client.y[cut:]
        still = _still(model, client.x[:cut])  # the peak's own error where adapting would trust it (labels read)
        first_still.append((_peak(model, client.x[:cut][still]), client.y[:cut][still]))
        preds = {"global": model.predict(x).ravel(),
                 "statistics": adapt_statistics(model, client.x[:cut]).predict(x).ravel(),
                 "still_reference": _still_reference(model, x)}
        for kind, pred in preds.items():
            kinds[kind].append((pred, y))
        per_wearer[client.client_id] = {k: round(float(np.abs(p - y).mean()), 2) for k, p in preds.items()}
    return {"mae_bpm": {k: _mae(v) for k, v in kinds.items()}, "still_peak_mae_bpm_first": _mae(first_still),
            "wearers": per_wearer}


def bench_heart_rate(model: Model, seeds: list[int], fraction: float, factors: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"fraction": fraction, "shifted": {}}
    for seed in seeds:
        name = f"sim:{seed}:arm-ir"
        out["shifted"][name] = _heart_rate_rows(model, open_dataset(name), fraction)
        print(f"  {name}: MAE {out['shifted'][name]['mae_bpm']}", file=sys.stderr)
    if factors:
        arm = simulator.DEVICES["arm-ir"]
        single = {"ppg_gain": {"ppg_gain": arm.ppg_gain}, "ppg_noise": {"ppg_noise": arm.ppg_noise},
                  "motion_coupling": {"motion_coupling": arm.motion_coupling},
                  "swing_share": {"swing_share": arm.swing_share}, "rotation_deg": {"rotation_deg": arm.rotation_deg}}
        out["factors"] = {}
        for name, kw in {"none (wrist)": {}, **single}.items():
            device = simulator.Device(f"bench-{name}", **kw)
            simulator.DEVICES.setdefault(device.name, device)  # a bench-only device, looked up by name
            dataset = simulator.SimulatedDataset(seed=seeds[0], device=device.name)
            out["factors"][name] = _heart_rate_rows(model, dataset, fraction)["mae_bpm"]
            print(f"  sim:{seeds[0]} with {name} alone: MAE {out['factors'][name]}", file=sys.stderr)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="task", required=True)
    h = sub.add_parser("hapt")
    h.add_argument("model")
    beside = Path(__file__).resolve().parents[2] / "shared/data/uci-hapt/RawData"
    h.add_argument("--dir", default=os.environ.get("WEARFL_HAPT_DIR", str(beside)))
    r = sub.add_parser("heart-rate")
    r.add_argument("model")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--factors", action="store_true", help="also the MAE under each of arm-ir's changes alone")
    for q in (h, r):
        q.add_argument("--fraction", type=float, default=0.5)
        q.add_argument("--json", action="store_true")
    args = p.parse_args()
    model = load_package(args.model)
    if args.task == "hapt":
        if not Path(args.dir).is_dir():
            print(f"error: no HAPT RawData folder at {args.dir}; pass --dir or set WEARFL_HAPT_DIR.", file=sys.stderr)
            return 2
        result = bench_hapt(model, args.dir, args.fraction)
    else:
        result = bench_heart_rate(model, args.seeds, args.fraction, args.factors)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            if key not in ("users", "wearers"):
                print(f"{key}: {json.dumps(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
