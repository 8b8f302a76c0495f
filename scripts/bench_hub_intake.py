#!/usr/bin/env python
"""Benchmark hub intake: N edges' signed int8 updates through a real Mosquitto into one hub, or into replicas.

Why: the hub must keep up with the broker (DESIGN.md: 1000 updates of ~25k parameters
in about a second on a laptop), since a slow intake leaves updates queued in the broker
and rounds late. This measures the whole path an update takes: publish, broker, hub
session, size bound, signature check, decode, SQLite commit, ack, receipt back.

How:

1. Start Mosquitto on a free loopback port (:mod:`wearfl.broker`).
2. Pre-build N signed updates of the heart-rate model (18k parameters, int8, one Ed25519
   key per edge), so building them is not timed.
3. Start the hub in a child process (this file with ``--hub-worker``), so its peak RSS
   is its own, with ``clients_per_round = N`` and ``rounds = 1``.
4. In this process, ``--publishers`` MQTT sessions (default 4) publish the N updates
   concurrently on the N edges' ``update/<client>`` topics (the hub only sees topics and
   signatures, so a few sockets stand in for N edges), and one session subscribed to
   ``receipt/+`` counts receipts.
5. Wall time runs from the first publish to the last receipt. The hub worker reports its
   peak RSS (``ru_maxrss``) and its RSS when ready (before intake).

With ``--state-backend postgresql`` (implied by ``--replicas`` > 1) the script starts a
PostgreSQL of its own (Debian's ``initdb``/``pg_ctl``, as ``tests/postgres.py`` does; as root
the cluster runs as the ``postgres`` account), makes a database, and starts ``--replicas``
hub workers on it with replica ids r1..rN (r1 first, so it leads; the others once it is
ready). They take the updates from the broker's MQTT 5 shared subscription; publishing starts
once every replica wrote its ready file. r1 closes the round once all N updates are stored and
exits; the others do not stop on their own: the script SIGTERMs them by PID (each then writes
its figures), and stops PostgreSQL, in a ``finally``. Each worker counts the receipts its own
intake gave (wrapping ``Intake.process_batch`` in that process), so the report says how many
updates each replica stored, and its peak RSS. Updates/s per core is updates/s divided by
min(replicas, ``os.cpu_count()``): the broker, the publishers and PostgreSQL share those cores
and are not counted.

Usage, from the repository root::

    python scripts/bench_hub_intake.py                 # 1000 edges
    python scripts/bench_hub_intake.py --edges 200 --publishers 2
    python scripts/bench_hub_intake.py --profile       # cProfile of the hub worker, to stderr
    python scripts/bench_hub_intake.py --state-backend postgresql          # one hub on PostgreSQL
    python scripts/bench_hub_intake.py --replicas 2    # two replicas sharing PostgreSQL

A summary goes to stdout, the figures to ``--out`` (default ``bench-results/hub_intake.json``;
on PostgreSQL ``bench-results/hub_intake_postgresql_<N>r.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if (REPO_ROOT / "hub" / "__init__.py").is_file() and str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

FEDERATION = "bench-intake"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- the hub, in its own process ---------------------------------------------------------------


def hub_worker(args: argparse.Namespace) -> None:
    import logging
    import signal
    from collections import Counter

    logging.basicConfig(level=logging.ERROR, format="%(relativeCreated)d %(name)s %(message)s")
    if args.verbose:
        logging.getLogger("hub.service").setLevel(logging.DEBUG)
    from hub.intake import Intake
    from hub.service import HubConfig, HubService
    from models import Model, heart_rate_spec

    # what this process's intake answered (its share of the shared subscription): the store is shared
    # between replicas, so its counts are everyone's
    receipts: Counter[str] = Counter()
    process_batch = Intake.process_batch

    def counted(self: Intake, messages: Any, current: Any, received_at: float | None = None) -> Any:
        results = process_batch(self, messages, current, received_at)
        receipts.update(receipt.status for receipt, _ in results)
        return results

    Intake.process_batch = counted  # type: ignore[method-assign]

    shared = args.state.startswith("postgresql://")
    replica: dict[str, Any] = {"replica_id": args.replica_id, "protocol": "5"} if shared else {}
    config = HubConfig(broker=args.broker, federation=FEDERATION, state_dir=args.state if shared else Path(args.state),
                       min_clients=args.edges, clients_per_round=args.edges, round_timeout_s=600, rounds=1,
                       task_config={"quantize": "int8"}, synchronous=args.synchronous, max_batch=args.max_batch,
                       **replica)
    service = HubService(config, Model(heart_rate_spec(), seed=0))
    result: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()  # SIGTERM: a replica that does not lead, stopped by the script once the round closed
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        run = asyncio.create_task(service.run(stop))
        ready = asyncio.create_task(service.ready.wait())
        await asyncio.wait({run, ready}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            if run.done():
                run.result()  # the hub's error
            raise RuntimeError("the hub was not ready within 120 s")
        result["rss_ready_mb"] = _rss_mb()
        if args.ready:
            Path(args.ready).write_text("ready\n")
        await asyncio.wait_for(run, 600)

    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    asyncio.run(main())
    if profiler:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(35)
        print(out.getvalue(), file=sys.stderr)
    summary = service.summaries[0] if service.summaries else None  # only the leader closes the round
    status = service.status()
    result.update(
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        updates_accepted=status["updates_accepted"],
        updates_rejected=sum(status["updates_rejected"].values()),
        round_duration_s=None if summary is None else summary.duration_s,
        bytes_up=None if summary is None else summary.bytes_up,
        closed_round=summary is not None,
        receipts=dict(receipts),
        stored=receipts["accepted"],
    )
    Path(args.result).write_text(json.dumps(result))


# -- the edges, in this process ----------------------------------------------------------------


def build_updates(n: int) -> tuple[list[tuple[str, bytes]], int]:
    """N (client, signed int8 update) pairs for round 1 on model v0, and the model's parameter count."""
    import numpy as np

    from models import Model, heart_rate_spec
    from models.protocol.codec import CodecConfig, UpdateCodec
    from models.protocol.ed25519 import Ed25519PrivateKey
    from models.protocol.messages import UpdateMeta, build_update

    weights = Model(heart_rate_spec(), seed=0).network.state_dict()
    codec = UpdateCodec.for_weights(weights, CodecConfig(quantize="int8"))
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        client = f"edge-{i:04d}"
        delta = {k: (0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in weights.items()}
        tensors, meta, _ = codec.encode(delta, rng)
        update = UpdateMeta(client=client, round=1, base_version=0, base_hash="0" * 64,
                            num_examples=int(rng.integers(16, 256)), sequence=0, codec=meta)
        out.append((client, build_update(update, tensors, Ed25519PrivateKey.generate())))
    return out, codec.size


async def drive(url: str, updates: list[tuple[str, bytes]], publishers: int, timeout: float) -> dict[str, float]:
    from models.protocol.messages import Receipt
    from models.protocol.topics import Topics
    from models.transport.mqtt import BrokerAddress, MqttSession

    topics = Topics(FEDERATION)
    address = BrokerAddress.parse(url)
    watcher = MqttSession(address, "bench-receipts", clean_start=True, session_expiry_s=0)
    await watcher.connect()
    await watcher.subscribe(topics.task)
    await watcher.subscribe(topics.all_of("receipt"))
    senders = [MqttSession(address, f"bench-edges-{i}", clean_start=True, session_expiry_s=0, max_inflight=100)
               for i in range(publishers)]
    for s in senders:
        await s.connect()

    messages = watcher.messages()
    deadline = time.monotonic() + 120
    while True:  # the retained task says the hub is subscribed and ready
        m = await asyncio.wait_for(anext(messages), max(0.1, deadline - time.monotonic()))
        if m.topic == topics.task:
            break

    statuses: dict[str, int] = {}
    done = asyncio.get_running_loop().create_future()
    last = [0.0]

    async def count() -> None:
        seen = 0
        async for m in messages:
            if m.topic == topics.task:
                continue
            receipt = Receipt.from_bytes(m.payload)
            statuses[receipt.status] = statuses.get(receipt.status, 0) + 1
            seen += 1
            last[0] = time.perf_counter()
            if seen == len(updates) and not done.done():
                done.set_result(None)

    counter = asyncio.create_task(count())
    shares = [updates[i::publishers] for i in range(publishers)]
    t0 = time.perf_counter()
    pubacks = await asyncio.gather(*(
        asyncio.gather(*(s.publish(topics.update(client), payload, qos=1) for client, payload in share))
        for s, share in zip(senders, shares, strict=True)
    ))
    t_published = time.perf_counter()
    await asyncio.wait_for(done, timeout)
    counter.cancel()
    for s in [*senders, watcher]:
        await s.disconnect()
    del pubacks
    return {"wall_s": last[0] - t0, "publish_s": t_published - t0, **{f"receipts_{k}": v for k, v in statuses.items()}}


# -- the hubs and their state ------------------------------------------------------------------


@contextlib.contextmanager
def hub_state(backend: str, tmp: Path) -> Iterator[str]:
    """Where the hubs keep their state: a folder (SQLite), or a database of a PostgreSQL of this run's own."""
    if backend == "sqlite":
        yield str(tmp / "hub")
        return
    sys.path.append(str(REPO_ROOT / "tests"))  # last: tests/postgres.py, the tests' helper, shadows nothing
    from postgres import PostgresServer, postgres_bin

    bindir = postgres_bin()
    if bindir is None:
        raise SystemExit("--state-backend postgresql needs PostgreSQL's initdb and pg_ctl (apt-get install postgresql)")
    print(f"starting PostgreSQL from {bindir} ...", file=sys.stderr)
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server.database("bench")
    finally:
        server.stop()  # pg_ctl stop (by its data folder's postmaster.pid), then its folder goes


def wait_ready(hubs: dict[str, subprocess.Popen[bytes]], folder: Path, timeout: float = 180.0) -> None:
    """Until every hub worker wrote its ready file (subscribed; the leader published model and task)."""
    deadline = time.monotonic() + timeout
    while not all((folder / f"{name}.ready").exists() for name in hubs):
        for name, hub in hubs.items():
            if hub.poll() is not None:
                raise RuntimeError(f"hub worker {name} exited with code {hub.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the hub workers were not all ready within {timeout:.0f} s")
        time.sleep(0.05)


def run_hubs(args: argparse.Namespace, backend: str, broker_url: str, state: str, tmp: Path,
             updates: list[tuple[str, bytes]]) -> tuple[dict[str, float], dict[str, dict[str, Any]]] | None:
    """Start the hub worker(s), drive the updates through them, stop them; (edge figures, {replica: figures}).

    r1 starts first and so leads (it takes the lead's advisory lock); it closes the round and exits. The
    others follow and do not stop on their own: they are SIGTERMed by PID once r1 is done (and, whatever
    happens, in the ``finally``); each writes its figures on the way out. None when a worker failed.
    """

    def start(name: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, __file__, "--hub-worker", "--broker", broker_url, "--state", state,
               "--result", str(tmp / f"{name}.json"), "--ready", str(tmp / f"{name}.ready"),
               "--edges", str(args.edges), "--synchronous", args.synchronous, "--max-batch", str(args.max_batch)]
        cmd += ["--replica-id", name] if backend == "postgresql" else []
        cmd += ["--profile"] if args.profile else []
        cmd += ["--verbose"] if args.verbose else []
        return subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})

    hubs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        hubs["r1"] = start("r1")
        wait_ready(hubs, tmp)
        hubs.update({f"r{i}": start(f"r{i}") for i in range(2, args.replicas + 1)})
        wait_ready(hubs, tmp)
        edge = asyncio.run(drive(broker_url, updates, args.publishers, args.timeout))
        hubs["r1"].wait(timeout=120)  # the leader closes the round (rounds = 1) and exits
        followers = [hub for name, hub in hubs.items() if name != "r1"]
        for hub in followers:
            hub.terminate()  # SIGTERM to its PID: it stops serving and writes its figures
        for hub in followers:
            hub.wait(timeout=30)
    finally:
        for hub in hubs.values():
            if hub.poll() is None:
                hub.terminate()
                try:
                    hub.wait(10)
                except subprocess.TimeoutExpired:
                    hub.kill()
                    hub.wait()
    failed = {name: hub.returncode for name, hub in hubs.items() if hub.returncode != 0}
    if failed:
        for name, code in failed.items():
            print(f"the hub worker {name} failed with exit code {code}" if args.replicas > 1
                  else f"the hub worker failed with exit code {code}", file=sys.stderr)
        return None
    return edge, {name: json.loads((tmp / f"{name}.json").read_text()) for name in hubs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", type=int, default=1000)
    parser.add_argument("--publishers", type=int, default=4, help="MQTT sessions that publish the updates")
    parser.add_argument("--replicas", type=int, default=1,
                        help="hub replicas sharing one PostgreSQL (more than 1 implies --state-backend postgresql)")
    parser.add_argument("--state-backend", choices=("sqlite", "postgresql"),
                        help="the hubs' state: SQLite in a folder (default for one hub), or a PostgreSQL this "
                             "script starts")
    parser.add_argument("--synchronous", default="FULL", choices=("FULL", "NORMAL"), help="hub SQLite durability")
    parser.add_argument("--max-batch", type=int, default=256, help="hub: messages per intake transaction")
    parser.add_argument("--profile", action="store_true", help="cProfile the hub worker (to stderr)")
    parser.add_argument("--out", help="the figures, as JSON (default bench-results/hub_intake.json; on PostgreSQL "
                                      "bench-results/hub_intake_postgresql_<N>r.json)")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--verbose", action="store_true", help="log each intake batch of the hub (to stderr)")
    parser.add_argument("--hub-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--ready", help=argparse.SUPPRESS)
    parser.add_argument("--replica-id", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hub_worker:
        hub_worker(args)
        return 0
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    backend = args.state_backend or ("postgresql" if args.replicas > 1 else "sqlite")
    if backend == "sqlite" and args.replicas > 1:
        parser.error("replicas share a PostgreSQL state: --replicas > 1 needs --state-backend postgresql")

    from wearfl.broker import MosquittoBroker

    print(f"building {args.edges} signed int8 updates ...", file=sys.stderr)
    updates, parameters = build_updates(args.edges)
    sizes = [len(p) for _, p in updates]
    with (tempfile.TemporaryDirectory(prefix="wearfl-bench-hub-") as tmp, MosquittoBroker(workdir=tmp) as broker,
          hub_state(backend, Path(tmp)) as state):
        outcome = run_hubs(args, backend, broker.url, state, Path(tmp), updates)
    if outcome is None:
        return 1
    edge, hubs = outcome
    hub_result = hubs["r1"]  # the only hub, or the leader (its store's counts are every replica's)

    cpus = os.cpu_count() or 1
    cores = min(args.replicas, cpus)
    per_replica = [{"replica": name, "leader": result["closed_round"], "stored": result["stored"],
                    "receipts": result["receipts"], "peak_rss_mb": round(result["peak_rss_mb"], 1),
                    "rss_ready_mb": round(result["rss_ready_mb"], 1)} for name, result in hubs.items()]
    report = {
        "benchmark": "hub_intake",
        "backend": backend,
        "replicas": args.replicas,
        "edges": args.edges,
        "publishers": args.publishers,
        "model": "heart-rate",
        "parameters": parameters,
        "quantize": "int8",
        "update_bytes": sum(sizes) // len(sizes),
        **({"sqlite_synchronous": args.synchronous} if backend == "sqlite" else {}),
        "hub_max_batch": args.max_batch,
        "wall_s_first_publish_to_last_receipt": round(edge["wall_s"], 4),
        "publish_s_until_last_puback": round(edge["publish_s"], 4),
        "updates_per_s": round(args.edges / edge["wall_s"], 1),
        "updates_per_s_per_core": round(args.edges / edge["wall_s"] / cores, 1),
        "cores_counted": f"min(replicas, os.cpu_count()) = {cores}: the hub processes only; the broker, the "
                         "publishers and PostgreSQL run on the same cores",
        "receipts": {k[len("receipts_"):]: v for k, v in edge.items() if k.startswith("receipts_")},
        "hub_updates_accepted": hub_result["updates_accepted"],
        "hub_peak_rss_mb": round(hub_result["peak_rss_mb"], 1),
        "hub_rss_ready_mb": round(hub_result["rss_ready_mb"], 1),
        "hub_round_duration_s": round(hub_result["round_duration_s"], 3),
        **({"hub_figures_of": "r1, the leader"} if args.replicas > 1 else {}),
        "per_replica": per_replica,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    default_out = "hub_intake.json" if backend == "sqlite" else f"hub_intake_postgresql_{args.replicas}r.json"
    out = Path(args.out or REPO_ROOT / "bench-results" / default_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    ok = hub_result["updates_accepted"] == args.edges == sum(r["stored"] for r in per_replica)
    if backend == "sqlite":
        print(f"{args.edges} updates ({report['update_bytes']} B, int8, {parameters} parameters) from "
              f"{args.publishers} sessions: {report['wall_s_first_publish_to_last_receipt']:.3f} s first publish -> "
              f"last receipt ({report['updates_per_s']:.0f}/s); all accepted: {ok}; hub peak RSS "
              f"{report['hub_peak_rss_mb']:.0f} MB ({report['hub_rss_ready_mb']:.0f} MB when ready); wrote {out}")
        return 0 if ok else 1
    print(f"{args.edges} updates ({report['update_bytes']} B, int8, {parameters} parameters) from "
          f"{args.publishers} sessions into {args.replicas} replica(s) on PostgreSQL: "
          f"{report['wall_s_first_publish_to_last_receipt']:.3f} s first publish -> last receipt "
          f"({report['updates_per_s']:.0f}/s; {report['updates_per_s_per_core']:.0f}/s per core, over "
          f"min({args.replicas} replicas, {cpus} cores) = {cores}); all accepted: {ok}; wrote {out}")
    for r in per_replica:
        others = {k: v for k, v in r["receipts"].items() if k != "accepted"}
        print(f"  {r['replica']}{' (leader)' if r['leader'] else ''}: stored {r['stored']} updates"
              f"{f' (other receipts: {others})' if others else ''}; peak RSS {r['peak_rss_mb']:.0f} MB "
              f"({r['rss_ready_mb']:.0f} MB when ready)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
