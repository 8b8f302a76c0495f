"""The simulation report: ``report.json`` (the contract) and ``report.png`` (metrics and bytes per round)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.files import write_atomic

__all__ = ["write_report"]


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Write ``report.json`` and a two-panel ``report.png``: held-out metric and bytes per round."""
    write_atomic(out / "report.json", json.dumps(report, indent=2, sort_keys=True).encode())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r["round"] for r in report["rounds"]]
    key = "accuracy" if report["task"] == "activity" else "mae_bpm"
    values = [r["metrics"].get(key, float("nan")) for r in report["rounds"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    left.plot(rounds, values, marker="o")
    left.set_xlabel("round")
    left.set_ylabel(f"held-out {key}")
    left.set_title(f"{report['task']} on {report['dataset']}")
    left.grid(alpha=0.3)
    right.bar(rounds, [r["bytes_up"] / 1024 for r in report["rounds"]], label="up (updates)")
    right.plot(rounds, [r["bytes_down"] / 1024 for r in report["rounds"]], color="C1", marker=".", label="down (model)")
    right.set_xlabel("round")
    right.set_ylabel("KiB")
    right.set_title(f"traffic, {report['quantization']} updates")
    right.legend()
    right.grid(alpha=0.3)
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out / "report.png")
    plt.close(fig)
