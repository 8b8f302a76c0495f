#!/usr/bin/env python
"""Benchmark hub memory: a real ``wearfl hub`` process's peak RSS for one round of 10, 100, 1000 clients.

Why: DESIGN.md promises a hub that aggregates in one model-sized buffer, O(model) memory
whatever the number of clients (issue 6: "Hub memory stays O(model) with 1000 clients").
``tests/hub/test_hub_memory.py`` shows it for the Python heap with tracemalloc; this
measures the whole hub process (interpreter, NumPy, SQLite page cache, MQTT buffers,
model export at the close) as the operating system sees it.

How, for each N of ``--clients``:

1. One Mosquitto for all runs, on a free loopback port (:mod:`wearfl.broker`).
2. N signed int8 updates of the ``--task`` model (default activity), one Ed25519 key per
   client, built before anything is measured.
3. A ``wearfl hub`` subprocess with a fresh state directory and a federation of its own,
   ``--min-clients N --clients-per-round N``: the round closes once all N clients have
   sent, and the deadline (``--round-timeout``, generous) cannot close it with fewer.
4. Once its retained task is out (the hub is ready), the hub's ``VmHWM`` and ``VmRSS``
   are read from ``/proc/<pid>/status``; then one MQTT session publishes the N updates on
   ``update/<client>`` (the hub only sees topics and signatures, and pins each client's
   key on first use) and another counts the receipts. ``--window W`` keeps at most W
   updates awaiting their receipt (edges taking turns); the default, 0, sends all N at
   once (a burst).
5. When the hub has published the next round's task and ``wearfl status --state DIR
   --json`` reports the round closed, ``VmHWM`` (peak RSS over the hub's whole life) and
   ``VmRSS`` are read again, and the hub is stopped by its PID (SIGTERM, then SIGKILL).

The growth of the peak from ready to after the round is what N clients cost. The
aggregate is one model-sized buffer, but in a burst the figure also holds the hub's
receive backlog: every update the broker has pushed and the hub not yet acknowledged
sits in the hub's memory, and Mosquitto (2.0.11 at least) does not hold a session to
``max_inflight_messages`` once acknowledgements flow, so that backlog grows with N. With
``--window`` the backlog is bounded and what is left is the intake batch and the model.

Usage, from the repository root::

    python scripts/bench_hub_memory.py                      # 10, 100 and 1000 clients, a burst
    python scripts/bench_hub_memory.py --clients 1000 --window 100
    python scripts/bench_hub_memory.py --clients 10,100,1000,3000 --task heart-rate

A table goes to stdout, then one JSON line with every figure (also written to ``--out``).
Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if (REPO_ROOT / "hub" / "__init__.py").is_file() and str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

FEDERATION = "bench-memory"
SEED = 6


def proc_memory_kb(pid: int) -> dict[str, int]:
    """``VmHWM`` (peak resident) and ``VmRSS`` (resident now) of a running process, in kB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def wearfl_command() -> list[str]:
    """The ``wearfl`` console script of this interpreter's environment (the module if none is installed)."""
    script = Path(sys.executable).with_name("wearfl")
    if script.is_file():
        return [str(script)]
    found = shutil.which("wearfl")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from wearfl.cli import main; sys.exit(main())"]


def build_updates(task: str, n: int) -> tuple[list[tuple[str, bytes]], int]:
    """N (client, signed int8 update) pairs for round 1 on model v0, and the model's parameter count."""
    import numpy as np

    from models import Model
    from models.protocol.codec import CodecConfig, UpdateCodec
    from models.protocol.ed25519 import Ed25519PrivateKey
    from models.protocol.messages import UpdateMeta, build_update
    from models.spec import default_spec

    weights = Model(default_spec(task), seed=0).network.state_dict()  # what `wearfl hub --task` starts from
    codec = UpdateCodec.for_weights(weights, CodecConfig(quantize="int8"))
    out = []
    for i in range(n):
        rng = np.random.default_rng([SEED, i])
        client = f"edge-{i:04d}"
        delta = {k: (0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in weights.items()}
        tensors, meta, _ = codec.encode(delta, rng)
        update = UpdateMeta(
            client=client,
            round=1,
            base_version=0,
            base_hash="0" * 64,
            num_examples=int(rng.integers(8, 512)),
            sequence=0,
            codec=meta,
        )
        key = Ed25519PrivateKey.from_private_bytes(rng.bytes(32))
        out.append((client, build_update(update, tensors, key)))
    return out, codec.size


async def hub_status(state: Path) -> dict[str, Any] | None:
    """``wearfl status --state DIR --json``, or None while the hub has not created its database."""
    result = await asyncio.to_thread(
        subprocess.run,
        [*wearfl_command(), "status", "--state", str(state), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)


async def run_round(
    url: str,
    hub: subprocess.Popen[bytes],
    state: Path,
    federation: str,
    updates: list[tuple[str, bytes]],
    window: int,
    timeout: float,
) -> dict[str, Any]:
    """Drive one round of ``updates`` through the running hub; the hub's memory before and after.

    ``window`` > 0 keeps at most that many updates published but not yet answered by a
    receipt (edges that take turns); 0 publishes all of them at once (a burst).
    """
    from models.protocol.messages import Receipt, Task
    from models.protocol.topics import Topics
    from models.transport.mqtt import BrokerAddress, MqttSession

    topics = Topics(federation)
    address = BrokerAddress.parse(url)
    deadline = time.monotonic() + timeout
    watcher = MqttSession(address, f"{federation}-watcher", clean_start=True, session_expiry_s=0)
    sender = MqttSession(address, f"{federation}-edges", clean_start=True, session_expiry_s=0, max_inflight=100)
    tasks: asyncio.Queue[int] = asyncio.Queue()
    receipts: dict[str, int] = {}
    slots = asyncio.Semaphore(window or len(updates))

    async def pump() -> None:
        async for m in watcher.messages():
            if m.topic == topics.task:
                if m.payload:
                    tasks.put_nowait(Task.from_bytes(m.payload).round)
                continue
            status = Receipt.from_bytes(m.payload).status
            receipts[status] = receipts.get(status, 0) + 1
            slots.release()

    async def wait_until(done: Any, what: str) -> None:
        """Poll ``done()`` (and that the hub lives) until it is true or the run times out."""
        while not done():
            if hub.poll() is not None:
                raise RuntimeError(f"the hub exited with code {hub.returncode} while {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g} s while {what}")
            await asyncio.sleep(0.05)

    rounds_seen: set[int] = set()

    def task_for(round_number: int) -> Any:
        def seen() -> bool:
            while not tasks.empty():
                rounds_seen.add(tasks.get_nowait())
            return round_number in rounds_seen

        return seen

    async def send(client: str, payload: bytes) -> None:
        await slots.acquire()
        await sender.publish(topics.update(client), payload, qos=1)

    await watcher.connect()
    await sender.connect()
    reader = asyncio.create_task(pump())
    try:
        await watcher.subscribe(topics.all_of("receipt"))
        await watcher.subscribe(topics.task)
        await wait_until(task_for(1), "waiting for the hub to be ready")  # retained: it serves round 1
        ready = proc_memory_kb(hub.pid)

        t0 = time.perf_counter()
        await asyncio.gather(*(send(client, payload) for client, payload in updates))
        await wait_until(task_for(2), "waiting for the round to close")  # out once the round is recorded
        round_s = time.perf_counter() - t0
        after = proc_memory_kb(hub.pid)
        status: dict[str, Any] | None = None
        while status is None or status["rounds_completed"] < 1:  # and what `wearfl status` says
            if time.monotonic() > deadline:
                raise TimeoutError("the hub's status never showed the round closed")
            status = await hub_status(state)
            if status is None or status["rounds_completed"] < 1:
                await asyncio.sleep(0.5)
        await wait_until(lambda: sum(receipts.values()) >= len(updates), "counting receipts")
    finally:
        reader.cancel()
        for session in (sender, watcher):
            await session.disconnect()
    return {"ready": ready, "after": after, "round_s": round_s, "status": status, "receipts": receipts}


def measure(
    url: str, workdir: Path, task: str, updates: list[tuple[str, bytes]], window: int, timeout: float
) -> dict[str, Any]:
    """Start a hub for ``len(updates)`` clients, run one round through it, stop it; its figures."""
    n = len(updates)
    federation = f"{FEDERATION}-{n}"
    state = workdir / f"hub-{n}"
    debug_dir = os.environ.get("BENCH_HUB_DEBUG")  # a folder: the hub logs at DEBUG there, and the log stays
    debug = ["-vv"] if debug_dir else []
    log_path = Path(debug_dir or workdir) / f"hub-{n}.log"
    cmd = [
        *wearfl_command(), *debug, "hub", "--broker", url, "--federation", federation, "--state", str(state),
        "--task", task, "--quantize", "int8", "--min-clients", str(n), "--clients-per-round", str(n),
        "--round-timeout", str(timeout),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        hub = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            result = asyncio.run(run_round(url, hub, state, federation, updates, window, timeout))
        except BaseException:
            tail = log_path.read_bytes()[-2000:].decode(errors="replace")
            print(f"hub for {n} clients failed; its log ends:\n{tail}", file=sys.stderr)
            raise
        finally:
            if hub.poll() is None:
                hub.terminate()  # SIGTERM to this PID: the hub stops cleanly
                try:
                    hub.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    hub.kill()
                    hub.wait()
    status = result["status"]
    ready, after = result["ready"], result["after"]
    return {
        "clients": n,
        "accepted": status["updates_accepted"],
        "receipts": result["receipts"],
        "rounds_completed": status["rounds_completed"],
        "hub_vmhwm_ready_kb": ready["VmHWM"],
        "hub_vmrss_ready_kb": ready["VmRSS"],
        "hub_vmhwm_kb": after["VmHWM"],
        "hub_vmrss_after_kb": after["VmRSS"],
        "hub_peak_growth_kb": after["VmHWM"] - ready["VmHWM"],
        "round_s": round(result["round_s"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="10,100,1000", help="comma-separated client counts, one hub run each")
    parser.add_argument("--task", default="activity", choices=("activity", "heart-rate"), help="the hub's model")
    parser.add_argument(
        "--window",
        type=int,
        default=0,
        help="at most this many updates awaiting their receipt (edges taking turns); 0: all at once (a burst)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take (also the deadline)")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench-results" / "hub_memory.json"))
    args = parser.parse_args(argv)
    try:
        counts = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--clients must be comma-separated integers, got {args.clients!r}")
    if not counts or min(counts) < 1:
        parser.error("--clients needs at least one count, each at least 1")
    if args.window < 0:
        parser.error("--window must be 0 (a burst) or a positive number of updates")
    if not Path("/proc/self/status").is_file():
        print("this benchmark reads /proc/<pid>/status: Linux only", file=sys.stderr)
        return 2

    from wearfl.broker import MosquittoBroker

    print(f"building {max(counts)} signed int8 updates of the {args.task} model ...", file=sys.stderr)
    updates, parameters = build_updates(args.task, max(counts))
    update_bytes = max(len(p) for _, p in updates)
    runs = []
    with tempfile.TemporaryDirectory(prefix="wearfl-bench-hub-memory-") as tmp, MosquittoBroker(workdir=tmp) as broker:
        for n in counts:
            print(f"hub round with {n} clients ...", file=sys.stderr)
            runs.append(measure(broker.url, Path(tmp), args.task, updates[:n], args.window, args.timeout))

    model_bytes = 4 * parameters
    print(
        f"\nhub memory, {args.task} model: {parameters:,} parameters = {model_bytes:,} B as float32; "
        f"int8 update {update_bytes:,} B; " + (f"window {args.window} updates" if args.window else "a burst")
    )
    header = (
        "clients",
        "accepted",
        "VmHWM ready MB",
        "VmHWM peak MB",
        "peak growth MB",
        "growth / model",
        "VmRSS after MB",
        "round s",
    )
    print("  ".join(f"{h:>14}" for h in header))
    for r in runs:
        row = (
            r["clients"],
            r["accepted"],
            f"{r['hub_vmhwm_ready_kb'] / 1024:.1f}",
            f"{r['hub_vmhwm_kb'] / 1024:.1f}",
            f"{r['hub_peak_growth_kb'] / 1024:.1f}",
            f"{r['hub_peak_growth_kb'] * 1024 / model_bytes:.1f}",
            f"{r['hub_vmrss_after_kb'] / 1024:.1f}",
            f"{r['round_s']:.2f}",
        )
        print("  ".join(f"{v:>14}" for v in row))
    report = {
        "benchmark": "hub_memory",
        "task": args.task,
        "parameters": parameters,
        "model_f32_bytes": model_bytes,
        "update_bytes": update_bytes,
        "quantize": "int8",
        "strategy": "fedavg",
        "window": args.window,
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    print(json.dumps(report, separators=(",", ":")))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    ok = all(r["accepted"] == r["clients"] and r["rounds_completed"] == 1 for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
