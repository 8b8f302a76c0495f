"""The simulation report: ``report.json`` (the contract) and ``report.png`` (the picture to show).

``report.png`` has four panels: the held-out metric from round 0 (the initial model) on an
honest axis (accuracy from 0 to 1; an error from 0), each edge's latest evaluation of the
global model against its own fine-tuned weights, bytes per update against the float32 size,
and how long each round took. A run with ``--explain`` adds a fifth, the federation's explanation map
of the last round: per class, the share of the model's attribution in each channel and stretch of the
window.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from models.files import write_atomic

__all__ = ["write_report"]

BOUNDED = {"accuracy", "macro_f1"}
"""Metrics that live in [0, 1]: their axis shows all of it."""


def _metric_key(report: dict[str, Any]) -> str:
    return "accuracy" if report["task"] == "activity" else "mae_bpm"


def _draw_metric(axis: Any, report: dict[str, Any], key: str) -> None:
    rounds = [0, *(r["round"] for r in report["rounds"])]
    initial = (report.get("initial_metrics") or {}).get(key, math.nan)
    values = [initial, *(r["metrics"].get(key, math.nan) for r in report["rounds"])]
    axis.plot(rounds, values, marker="o", color="C0")
    axis.annotate(f"{values[-1]:.3g}", (rounds[-1], values[-1]), textcoords="offset points", xytext=(0, 6),
                  ha="center", fontsize=8)
    finite = [v for v in values if math.isfinite(v)]
    axis.set_ylim(0, 1 if key in BOUNDED else max(finite, default=1) * 1.15)
    axis.set_xlabel("round (0: the initial model)")
    axis.set_ylabel(f"held-out {key} ({'higher' if key in BOUNDED else 'lower'} is better)")
    sites = f" in {report['sites']} sites" if report.get("sites") else ""
    kind, _, where = str(report["dataset"]).partition(":")
    dataset = f"{kind}:…{where[-18:]}" if len(where) > 20 else report["dataset"]  # a folder: its end says which
    axis.set_title(f"{report['task']} on {dataset}, {report['clients']} edges{sites}")


def _draw_spread(axis: Any, report: dict[str, Any], key: str) -> None:
    clients = (report.get("personalization") or {}).get("clients") or {}
    rows = [(c, p["global"].get(key), (p.get("personalized") or {}).get(key), (p.get("adapted") or {}).get(key))
            for c, p in sorted(clients.items()) if p.get("global")]
    kept = {c for c, p in clients.items() if (p.get("adapted") or {}).get("kept_global") == 1.0}
    rows = [r for r in rows if r[1] is not None and (r[2] is not None or r[3] is not None)]
    adapted = any(r[3] is not None for r in rows)
    axis.set_title("each edge: global, adapted (no labels), fine-tuned" if adapted
                   else "each edge: global model vs its own fine-tuning")
    if not rows:
        why = ("light edges do not evaluate\n(simulate --edges full: every edge a whole gateway)"
               if report.get("edges") == "light" else "no edge evaluated its own weights")
        axis.text(0.5, 0.5, why, ha="center", va="center", transform=axis.transAxes)
        axis.set_xticks([])
        return
    xs = range(len(rows))
    for x, (_, g, p, a) in zip(xs, rows, strict=True):
        values = [v for v in (g, p, a) if v is not None]
        axis.plot([x, x], [min(values), max(values)], color="0.7", zorder=1)
    axis.scatter(xs, [g for _, g, _, _ in rows], color="C0", label="global", zorder=2)
    if any(p is not None for _, _, p, _ in rows):
        axis.scatter([x for x, r in zip(xs, rows, strict=True) if r[2] is not None],
                     [r[2] for r in rows if r[2] is not None], color="C1", label="personalized", zorder=2)
    if adapted:  # where the gateway's checks kept the global model, its "adapted" figure is the global one
        for label, style, chosen in (("adapted", {"color": "C2", "marker": "x"}, False),
                                     ("not adapted (checks kept global)", {"color": "0.35", "marker": "+"}, True)):
            at = [(x, r[3]) for x, r in zip(xs, rows, strict=True) if r[3] is not None and (r[0] in kept) == chosen]
            if at:
                axis.scatter([x for x, _ in at], [v for _, v in at], label=label, zorder=3, s=60, **style)
    values = [v for r in rows for v in r[1:] if v is not None]
    axis.set_ylim(0, 1.05 if key in BOUNDED else max(values) * 1.15)
    axis.set_xticks(list(xs), [r[0] for r in rows], rotation=45, ha="right", fontsize=7)
    axis.set_ylabel(key)
    axis.legend(fontsize=8)


def _draw_bytes(axis: Any, report: dict[str, Any]) -> None:
    rounds = [r["round"] for r in report["rounds"]]
    per_update = [r["bytes_up"] / max(r["updates_accepted"] + r["updates_rejected"], 1) / 1024
                  for r in report["rounds"]]
    axis.bar(rounds, per_update, color="C0", label=f"{report['quantization']} update")
    f32 = report.get("float32_update_bytes")
    if f32:
        axis.axhline(f32 / 1024, color="C1", linestyle="--", label="float32 update")
    axis.set_ylim(0, max([*per_update, (f32 or 0) / 1024]) * 1.15 or 1)
    axis.set_xlabel("round")
    axis.set_ylabel("KiB per update")
    ratio = report.get("update_bytes_ratio")
    axis.set_title("bytes up per update" + (f": {ratio:.3g}x float32" if ratio else ""))
    axis.legend(fontsize=8)


def _draw_durations(axis: Any, report: dict[str, Any]) -> None:
    rounds = [r["round"] for r in report["rounds"]]
    axis.bar(rounds, [r["duration_s"] for r in report["rounds"]], color="C2")
    axis.set_xlabel("round")
    axis.set_ylabel("seconds")
    axis.set_title("round duration (open to close)")


def _draw_explanation(fig: Any, axis: Any, explanation: dict[str, Any]) -> None:
    """Rows: classes; columns: each channel's stretches of the window, left to right in time; colour: the share
    of the class's attribution (each row sums to 1), so rows compare where the model looks, not how much."""
    import numpy as np

    grid = np.asarray(explanation["map"], dtype=float)  # (classes, channels, segments)
    classes, channels, segments = grid.shape
    rows = grid.reshape(classes, channels * segments)
    totals = np.abs(rows).sum(axis=1, keepdims=True)
    shares = np.divide(rows, totals, out=np.zeros_like(rows), where=totals > 0)
    image = axis.imshow(shares, aspect="auto", cmap="magma", interpolation="nearest", vmin=0)
    axis.set_yticks(range(classes))
    counted = explanation.get("windows")
    unit = "windows" if counted is not None else "edges"
    counted = counted if counted is not None else explanation.get("edges") or [0] * classes
    axis.set_yticklabels([f"{name} ({int(n)})" for name, n in zip(explanation["classes"], counted, strict=False)],
                         fontsize=8)
    axis.set_xticks([c * segments + (segments - 1) / 2 for c in range(channels)])
    axis.set_xticklabels(explanation["channels"], fontsize=8)
    for c in range(1, channels):
        axis.axvline(c * segments - 0.5, color="white", linewidth=1.5)
    dp = "; DP noise added, edges weigh equally" if explanation.get("dp") else ""
    axis.set_title(f"where the model looks: share of each class's attribution by channel and stretch of the window "
                   f"(round {explanation['round']}, model v{explanation.get('model_version', '?')}, "
                   f"{explanation['clients']} edges{dp})", fontsize=9)
    axis.set_xlabel(f"channel, its window in {segments} stretches (time runs left to right in each)")
    axis.set_ylabel(f"class ({unit})")
    fig.colorbar(image, ax=axis, fraction=0.025, pad=0.01, label="share")


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Write ``report.json`` and ``report.png`` (four panels, a fifth with explanations)."""
    write_atomic(out / "report.json", json.dumps(report, indent=2, sort_keys=True).encode())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    key = _metric_key(report)
    explanations = report.get("explanations") or []
    if explanations:
        fig = plt.figure(figsize=(11, 11.5), dpi=100)
        grid = fig.add_gridspec(3, 2, height_ratios=(1, 1, 1.05))
        axes = [[fig.add_subplot(grid[r, c]) for c in range(2)] for r in range(2)]
        _draw_explanation(fig, fig.add_subplot(grid[2, :]), explanations[-1])
    else:
        fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=100)
    _draw_metric(axes[0][0], report, key)
    _draw_spread(axes[0][1], report, key)
    _draw_bytes(axes[1][0], report)
    _draw_durations(axes[1][1], report)
    for axis in (axes[0][0], axes[1][0], axes[1][1]):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in (*axes[0], *axes[1]):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "report.png")
    plt.close(fig)
