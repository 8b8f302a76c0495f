#!/usr/bin/env python
"""Benchmark the edge's footprint: a real ``wearfl edge`` process's peak RSS over R heart-rate rounds.

Why: issue 13 ("Small and fast") holds a gateway to 60 MB peak resident over 10 heart-rate
rounds with live inference, on ``sim:`` and ``recordings:`` sources (and ``lsl:`` where
that source exists), and keeps scipy and matplotlib off the edge path (onnxruntime only
when the inference back-end needs it).

How, for each source of ``--sources``:

1. One Mosquitto for all runs (:class:`wearfl.broker.MosquittoBroker`, a free loopback port).
2. A ``wearfl hub --task heart-rate --rounds R --min-clients 1 --clients-per-round 1``
   child with a fresh state and a federation of its own: a round closes as soon as the
   one edge's update arrives.
3. The edge under test: ``python -X importtime -m wearfl edge --source SPEC
   --min-new-windows 0`` with a fresh state directory. ``--min-new-windows 0`` makes the
   edge train every round even once a finite stream is used up (the default, 16 new
   windows a round, stalls a 30-minute stream after a few rounds; on the ``lsl:`` feed it is
   ``--live-new-windows``, 2, so that rounds follow the live data); ``-X importtime``
   writes one line per module the process imports, at start or later, to its stderr:
   that is the heavy-module list below (a few kB of overhead, nothing resident).
4. ``/proc/PID/status`` of the edge is sampled every ``--interval`` seconds until the
   hub exits (R rounds closed): ``VmHWM`` is the kernel's own peak, so no spike is missed
   between samples. Then the edge gets SIGTERM and is sampled until it exits (its stop
   checkpoints the buffers): the peak over its whole life is reported too.

Sources: ``sim:0/wearer-01`` (the simulator's 30-minute stream: PPG, accelerometer,
gyroscope at 50 Hz with heart-rate labels) and ``recordings:`` with no folder, which writes
a recordings folder (docs/recordings.md) of ``--recording-minutes`` of the simulator's
wearer-01 into a temporary directory (the same channels and labels, read from CSV).
``lsl:`` with no name starts a feeder process (this script with ``--lsl-feed``) that
publishes simulated wearer-01 as a Lab Streaming Layer stream at wall-clock pace (a live
device: the edge trains on what has arrived by each round), with liblsl's discovery kept
on this machine. Any other spec is passed as it is (e.g. ``recordings:/data/ward-3/subject1``).

Usage, from the repository root (about a minute a source on 2 cores)::

    python scripts/bench_edge_footprint.py
    python scripts/bench_edge_footprint.py --rounds 3 --sources sim:0/wearer-01
    python scripts/bench_edge_footprint.py --untuned --env MALLOC_ARENA_MAX=1   # one allocator setting alone

A table goes to stdout (peak RSS in MiB, as the kernel counts it, and in MB: the 60 MB target is
57.2 MiB); the results are written as JSON to ``--out`` (default ``bench-results/edge_footprint.json``).
``--recording-minutes 180`` measures a gateway whose replay buffer and holdout are full (their
bound, not the stream, then sets the resident size). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if (REPO_ROOT / "edge_client" / "__init__.py").is_file() and str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TASK = "heart-rate"
CLIENT = "wearer-01"
HEAVY = ("scipy", "matplotlib", "onnxruntime", "onnx", "torch", "pandas", "ai_edge_litert", "tflite_runtime",
         "tensorflow", "PIL", "tqdm", "dp_accounting", "amqtt", "flatbuffers", "cryptography")
"""Top-level packages the edge should not need (onnxruntime only for its back-end)."""
NEEDED = ("numpy", "nacl", "safetensors", "paho")
DEFAULT_SOURCES = f"sim:0/{CLIENT},recordings:,lsl:"
_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|(\s*)(\S+)\s*$")


def proc_status(pid: int) -> dict[str, int] | None:
    """``VmHWM``, ``VmRSS`` (kB) and ``Threads`` of a live process, or None once it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "Threads"):
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return out if "VmRSS" in out else None  # a zombie has no memory lines


def resident_by_mapping(pid: int, top: int = 15) -> list[tuple[str, float]]:
    """The process's resident MiB by mapping (a library's path, ``[heap]``, ``[anon]``, ``[stack]``), largest first."""
    totals: dict[str, int] = {}
    name = "[anon]"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(None, 6)
                if re.match(r"^[0-9a-f]+-[0-9a-f]+$", head[0]):
                    name = head[5].strip() if len(head) > 5 else "[anon]"
                    name = "[stack]" if name.startswith("[stack") else name
                elif head[0] == "Rss:":
                    totals[name] = totals.get(name, 0) + int(head[1])
    except (FileNotFoundError, ProcessLookupError):
        return []
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    return [(Path(k).name if k.startswith("/") else k, round(v / 1024, 2)) for k, v in ranked[:top]]


def write_sim_recording(folder: Path, minutes: float) -> str:
    """A recordings folder with ``minutes`` of simulated wearer-01 (as `wearfl record` writes it); its spec."""
    from edge_client.sources.recorder import record_source
    from edge_client.sources.simulator import SimulatedWearer

    record_source(SimulatedWearer(CLIENT, 0, minutes=minutes), folder)
    return f"recordings:{folder}/{CLIENT}"


LSL_CONFIG = "[ports]\nIPv6 = disable\n[multicast]\nResolveScope = machine\n[log]\nlevel = -2\n"
"""liblsl settings for the bench: streams are found on this machine only."""


def lsl_feed(name: str) -> None:
    """Publish simulated wearer-01 as the LSL stream ``name`` (acc, gyro, ppg, hr_bpm at 50 Hz), in real time."""
    import math

    import numpy as np
    import pylsl

    from edge_client.sources.simulator import SimulatedWearer

    wearer = SimulatedWearer(CLIENT, 0, minutes=math.inf, realtime=True)
    labels = [*wearer.channels, "hr_bpm"]
    info = pylsl.StreamInfo(name, "wearable", len(labels), wearer.sampling_rate_hz, "float32", name)
    channels = info.desc().append_child("channels")
    for label in labels:
        channels.append_child("channel").append_child_value("label", label)
    outlet = pylsl.StreamOutlet(info)
    print("feeding", flush=True)
    for chunk in wearer.chunks(25):  # paced: half a second a chunk
        outlet.push_chunk(np.column_stack([chunk.data, chunk.hr_bpm]).astype(np.float32))


def start_lsl_feeder(work: Path, env: dict[str, str]) -> tuple[str, subprocess.Popen[bytes]]:
    """A feeder process for a fresh stream name; returns the edge's ``lsl:`` spec and the process."""
    name = f"wearfl-footprint-{os.getpid()}"
    feeder = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--lsl-feed", name], cwd=REPO_ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    line = feeder.stdout.readline() if feeder.stdout else b""
    if b"feeding" not in line:
        feeder.kill()
        raise RuntimeError(f"the LSL feeder did not start: {line.decode(errors='replace')}")
    return f"lsl:{name}", feeder


def heavy_imports(stderr_text: str) -> tuple[list[str], list[str]]:
    """(heavy top-level packages, all top-level packages) that ``-X importtime`` saw imported."""
    tops = set()
    for line in stderr_text.splitlines():
        m = _IMPORT_LINE.match(line)
        if m:
            tops.add(m.group(2).split(".")[0])
    return sorted(tops & set(HEAVY)), sorted(tops)


def _pump(stream: Any, sink: list[str], echo: bool, prefix: str) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        sink.append(line)
        if echo and not line.startswith("import time:"):
            sys.stderr.write(prefix + line)


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_source(
    spec: str, url: str, rounds: int, args: argparse.Namespace, env: dict[str, str], index: int
) -> dict[str, Any]:
    """One hub and one edge on ``spec``; the edge's memory over the run."""
    work = Path(tempfile.mkdtemp(prefix="wearfl-edge-footprint-"))
    federation = f"footprint-{os.getpid()}-{index}"
    child_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}
    feeder: subprocess.Popen[bytes] | None = None
    if spec == "lsl:":
        (work / "lsl_api.cfg").write_text(LSL_CONFIG)
        child_env["LSLAPICFG"] = str(work / "lsl_api.cfg")
        spec, feeder = start_lsl_feeder(work, child_env)
    hub_cmd = [sys.executable, "-m", "wearfl", "hub", "--broker", url, "--federation", federation,
               "--state", str(work / "hub"), "--task", TASK, "--rounds", str(rounds), "--min-clients", "1",
               "--clients-per-round", "1", "--round-timeout", str(args.round_timeout)]
    # --untuned: the CLI called with explicit arguments, which skips wearfl.cli.tune_gateway_process
    entry = (["-c", "import sys; from wearfl.cli import main; sys.exit(main(sys.argv[1:]))"] if args.untuned
             else ["-m", "wearfl"])
    edge_cmd = [sys.executable, *([] if args.no_importtime else ["-X", "importtime"]), *entry, "edge",
                "--broker", url, "--federation", federation, "--source", spec, "--state", str(work / "edge"),
                "--client-id", CLIENT, "--min-new-windows", str(args.live_new_windows if feeder else 0),
                *args.edge_arg]
    hub_out: list[str] = []
    edge_err: list[str] = []
    hub = subprocess.Popen(hub_cmd, cwd=REPO_ROOT, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    threading.Thread(target=_pump, args=(hub.stdout, hub_out, args.verbose, "hub: "), daemon=True).start()
    edge: subprocess.Popen[bytes] | None = None
    samples: list[tuple[float, int]] = []
    mappings: list[tuple[str, float]] = []
    last: dict[str, int] = {}
    at_hub_exit: dict[str, int] = {}
    threads = 0
    t0 = time.monotonic()
    try:
        while not any(line.startswith("hub for federation") for line in hub_out):
            if hub.poll() is not None or time.monotonic() - t0 > 60:
                raise RuntimeError(f"the hub did not start:\n{''.join(hub_out)[-2000:]}")
            time.sleep(0.05)
        edge = subprocess.Popen(edge_cmd, cwd=REPO_ROOT, env=child_env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        threading.Thread(target=_pump, args=(edge.stderr, edge_err, args.verbose, "edge: "), daemon=True).start()
        t_edge = time.monotonic()
        while hub.poll() is None:
            status = proc_status(edge.pid)
            if status is None or edge.poll() is not None:
                raise RuntimeError(f"the edge exited early (code {edge.poll()}):\n"
                                   + "".join(x for x in edge_err if not x.startswith("import time:"))[-3000:])
            last = status
            threads = max(threads, status.get("Threads", 0))
            samples.append((round(time.monotonic() - t_edge, 2), status["VmRSS"]))
            if time.monotonic() - t_edge > args.timeout:
                raise TimeoutError(f"{rounds} rounds did not close in {args.timeout:g} s:\n{''.join(hub_out)[-2000:]}")
            time.sleep(args.interval)
        at_hub_exit = proc_status(edge.pid) or last
        mappings = resident_by_mapping(edge.pid)
        duration = time.monotonic() - t_edge
        # Stop the edge as Ctrl-C would, and follow its peak through the checkpoint at stop.
        edge.send_signal(signal.SIGTERM)
        final = at_hub_exit
        deadline = time.monotonic() + 30
        while edge.poll() is None and time.monotonic() < deadline:
            final = proc_status(edge.pid) or final
            time.sleep(0.05)
        _stop(edge, 5)
    finally:
        if edge is not None:
            _stop(edge, 10)
        _stop(hub, 10)
        if feeder is not None:
            _stop(feeder, 10)
    time.sleep(0.2)  # let the pumps drain
    closed = [line for line in hub_out if re.match(r"round \d+ closed", line)]
    participated = sum(1 for line in closed if re.search(r"\b[1-9]\d* updates accepted", line))
    heavy, tops = heavy_imports("".join(edge_err))
    result = {
        "source": spec,
        "rounds_closed": len(closed),
        "rounds_with_update": participated,
        "peak_rss_mib": round(at_hub_exit["VmHWM"] / 1024, 1),
        "peak_rss_mb": round(at_hub_exit["VmHWM"] * 1024 / 1e6, 1),
        "peak_rss_with_stop_mib": round(final["VmHWM"] / 1024, 1),
        "end_rss_mib": round(at_hub_exit["VmRSS"] / 1024, 1),
        "max_threads": threads,
        "duration_s": round(duration, 1),
        "resident_by_mapping_mib": mappings,
        "heavy_modules": heavy if not args.no_importtime else None,
        "top_level_modules": tops if not args.no_importtime else None,
        "rss_samples": samples[:: max(1, len(samples) // 200)],
        "edge_command": edge_cmd,
        "hub_command": hub_cmd,
    }
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        result["work_dir"] = str(work)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="heart-rate rounds per source (default 10)")
    parser.add_argument("--sources", default=DEFAULT_SOURCES,
                        help=f"comma-separated source specs; 'recordings:' alone writes one "
                             f"(default {DEFAULT_SOURCES})")
    parser.add_argument("--recording-minutes", type=float, default=30.0,
                        help="length of the written recording (default 30, as the simulator's stream)")
    parser.add_argument("--edge-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `wearfl edge` (repeat; e.g. --edge-arg=--realtime)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the hub and edge (repeat)")
    parser.add_argument("--label", default="", help="a name for this run in the JSON (e.g. the variant measured)")
    parser.add_argument("--round-timeout", type=float, default=120.0, help="hub's round deadline in seconds")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up on a source after this many seconds")
    parser.add_argument("--interval", type=float, default=0.1, help="RSS sampling period in seconds")
    parser.add_argument("--no-importtime", action="store_true", help="run the edge without -X importtime")
    parser.add_argument("--untuned", action="store_true",
                        help="start the edge without wearfl.cli.tune_gateway_process (to measure what it saves; "
                             "combine with --env MALLOC_ARENA_MAX=1 etc. to measure one setting)")
    parser.add_argument("--keep", action="store_true", help="keep the state directories")
    parser.add_argument("--verbose", action="store_true", help="echo the hub's and edge's output")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench-results" / "edge_footprint.json"))
    parser.add_argument("--live-new-windows", type=int, default=2, metavar="N",
                        help="--min-new-windows of the edge on the lsl: feed (default 2: a round every ~8 s of "
                             "stream, so 10 rounds see ~90 s of data instead of the first window)")
    parser.add_argument("--lsl-feed", metavar="NAME", help=argparse.SUPPRESS)  # the feeder process of lsl:
    args = parser.parse_args()
    if args.lsl_feed:
        lsl_feed(args.lsl_feed)
        return 0
    env = dict(item.split("=", 1) for item in args.env)

    from wearfl.broker import MosquittoBroker, free_port, mosquitto_binary

    if mosquitto_binary() is None:
        sys.exit("mosquitto is not installed (apt-get install mosquitto)")
    results = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wearfl-footprint-rec-")))
        broker = stack.enter_context(MosquittoBroker(free_port()))
        for i, spec in enumerate(s.strip() for s in args.sources.split(",") if s.strip()):
            if spec == "recordings:":
                spec = write_sim_recording(tmp / "recordings", args.recording_minutes)
            print(f"measuring {spec} ...", file=sys.stderr, flush=True)
            results.append(run_source(spec, broker.url, args.rounds, args, env, i))

    width = max(len(r["source"]) for r in results)
    print(f"\n{'source':<{width}}  {'peak RSS':>9}  {'(MB)':>8}  {'+stop':>7}  {'end RSS':>8}  {'rounds':>6}  "
          f"{'thr':>3}  heavy modules")
    for r in results:
        heavy = "n/a" if r["heavy_modules"] is None else (", ".join(r["heavy_modules"]) or "none")
        print(f"{r['source']:<{width}}  {r['peak_rss_mib']:>5.1f} MiB  {r['peak_rss_mb']:>5.1f} MB  "
              f"{r['peak_rss_with_stop_mib']:>7.1f}  {r['end_rss_mib']:>4.1f} MiB  "
              f"{r['rounds_with_update']:>2}/{r['rounds_closed']:<3}  {r['max_threads']:>3}  {heavy}")
    print(f"(the target, 60 MB, is {60e6 / 2**20:.1f} MiB)")
    report = {"label": args.label, "task": TASK, "rounds": args.rounds, "env": env, "edge_args": args.edge_arg,
              "tuned": not args.untuned,
              "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}
    save_report(report, Path(args.out))
    return 0


def save_report(report: dict[str, Any], path: Path) -> None:
    """The results as JSON (one sample list a source, the rest as printed), in ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
