"""Write a few synthetic sensor windows (.npy) to try ``wearfl predict`` on.

Heart-rate windows carry a PPG pulse at a known BPM (printed) plus wrist motion;
activity windows carry gravity, gait-like oscillation and noise. They are for a
first look, not for judging accuracy: the real data path is ``edge_client``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def heart_rate_windows(n: int, rng: np.random.Generator, rate: float = 32.0, length: int = 256) -> tuple:
    bpm = rng.uniform(60, 160, n)
    t = np.arange(length) / rate
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    beat = 2 * np.pi * (bpm[:, None] / 60.0) * t[None] + phase
    ppg = np.sin(beat) + 0.3 * np.sin(2 * beat + 0.5)
    acc = 0.1 * rng.standard_normal((n, 3, length))
    acc[:, 2] += 1.0
    x = np.concatenate([ppg[:, None], acc], axis=1) + 0.05 * rng.standard_normal((n, 4, length))
    return x.astype(np.float32), bpm


def activity_windows(n: int, rng: np.random.Generator, rate: float = 50.0, length: int = 128) -> tuple:
    t = np.arange(length) / rate
    cadence = rng.uniform(0.0, 2.2, (n, 1, 1))
    x = 0.05 * rng.standard_normal((n, 6, length))
    x[:, :3] += np.array([1.0, 0.0, 0.0])[None, :, None]
    x[:, :3] += 0.3 * np.sin(2 * np.pi * cadence * t[None, None])
    x[:, 3:] += 0.5 * np.sin(2 * np.pi * cadence * t[None, None] + 1.0)
    return x.astype(np.float32), cadence[:, 0, 0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", choices=("activity", "heart-rate"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    make = heart_rate_windows if args.task == "heart-rate" else activity_windows
    x, truth = make(args.n, rng)
    np.save(args.out, x)
    what = "BPM" if args.task == "heart-rate" else "gait cadence Hz"
    print(f"wrote {args.n} {args.task} windows of shape {x.shape[1:]} to {args.out} "
          f"({what}: {', '.join(f'{v:.1f}' for v in truth)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
