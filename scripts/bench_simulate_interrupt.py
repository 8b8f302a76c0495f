"""How long `wearfl simulate` takes to end after Ctrl-C (issue 14: within 5 s, exit 130, no broker left).

Starts a small simulation in its own process group (as a terminal's foreground job), waits for its first
round line, sends SIGINT to the whole group (what Ctrl-C does) and times the exit. Repeats and prints the
seconds (min / median / max) and the exit codes.

    python scripts/bench_simulate_interrupt.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUND_LINE = re.compile(r"^round +\d+/\d+ ")
ARGV = ("simulate", "--clients", "2", "--local-epochs", "1", "--rounds", "50")


def one_run(out: Path) -> tuple[float, int]:
    """(seconds from SIGINT to exit, exit code) of one interrupted run."""
    proc = subprocess.Popen([sys.executable, "-m", "wearfl", *ARGV, "--out", str(out)], cwd=ROOT, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if ROUND_LINE.match(line):
            break
    else:
        raise SystemExit(f"the simulation ended before its first round (exit {proc.wait()})")
    started = time.perf_counter()
    os.killpg(proc.pid, signal.SIGINT)
    proc.stderr.read()
    code = proc.wait(timeout=300)
    return time.perf_counter() - started, code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    times, codes = [], []
    with tempfile.TemporaryDirectory(prefix="wearfl-interrupt-") as tmp:
        for i in range(args.runs):
            seconds, code = one_run(Path(tmp) / f"run-{i}")
            times.append(seconds)
            codes.append(code)
            print(f"run {i + 1}: {seconds:.2f} s, exit {code}", flush=True)
    print(f"Ctrl-C to exit: min {min(times):.2f} s, median {statistics.median(times):.2f} s, max {max(times):.2f} s; "
          f"exit codes {sorted(set(codes))}")
    return 0 if set(codes) == {130} else 1


if __name__ == "__main__":
    sys.exit(main())
