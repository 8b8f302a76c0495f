#!/usr/bin/env python
"""Benchmark the simulated-wearers source: hours of 50 Hz 7-channel data per CPU second.

Why: a laptop federation streams many simulated wearers at once, and tests and training
runs read hours of their data, so the simulator has to be far faster than real time.
This script streams ``--wearers`` wearers of ``--minutes`` each (``sim:SEED``) through
``SimulatedWearer.chunks`` in chunks of ``--chunk`` samples, and divides the simulated
hours by the process CPU time (``time.process_time``) spent doing it.

Usage, from the repository root::

    python scripts/bench_simulator.py                          # 8 wearers x 60 min
    python scripts/bench_simulator.py --wearers 2 --minutes 30 --out /tmp/sim.json

One line goes to stdout; the figures and machine info go to the JSON file given by
``--out`` (default ``bench-results/simulator.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Benchmark the working tree's simulator, whether or not the project is pip-installed.
if (REPO_ROOT / "edge_client").is_dir() and str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import scipy  # noqa: E402

from edge_client.sources.simulator import SimulatedDataset  # noqa: E402


def run(seed: int, wearers: int, minutes: float, chunk: int) -> dict:
    """Stream every wearer once; return samples, CPU and wall seconds, and the derived rates."""
    dataset = SimulatedDataset(seed=seed, wearers=wearers, minutes=minutes, test_wearers=0)
    samples, checksum = 0, 0.0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for client in dataset.clients:
        for c in dataset.source(client).chunks(chunk):
            samples += len(c)
            checksum += float(c.data[-1, 6])  # touch the output so nothing is skipped
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    hours = samples / dataset.sampling_rate_hz / 3600
    return {
        "dataset": dataset.name, "wearers": wearers, "minutes_per_wearer": minutes, "chunk_samples": chunk,
        "channels": len(dataset.channels), "sampling_rate_hz": dataset.sampling_rate_hz, "samples": samples,
        "simulated_hours": hours, "cpu_s": cpu, "wall_s": wall,
        "hours_per_cpu_s": hours / cpu, "samples_per_cpu_s": samples / cpu, "realtime_factor_cpu": hours * 3600 / cpu,
        "checksum": checksum,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default: %(default)s)")
    p.add_argument("--wearers", type=int, default=8, help="wearers to stream (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=60.0, help="minutes per wearer (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=4096, help="max_samples per chunk (default: %(default)s)")
    p.add_argument("--out", default="bench-results/simulator.json", help="JSON output (default: %(default)s)")
    args = p.parse_args(argv)

    result = run(args.seed, args.wearers, args.minutes, args.chunk)
    result["machine"] = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
    }
    result["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"simulator: {result['hours_per_cpu_s']:.1f} h of 50 Hz 7-channel data per CPU second "
        f"({result['simulated_hours']:.1f} h in {result['cpu_s']:.2f} CPU s, "
        f"{result['realtime_factor_cpu']:.0f}x real time, chunks of {args.chunk}) -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
