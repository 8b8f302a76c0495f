"""Two hub replicas sharing one PostgreSQL (a real server) through a real Mosquitto; the leader is SIGKILLed.

Both replicas run as ``wearfl hub --state postgresql://... --replica-id`` child processes; six
heart-rate edges run in this event loop, each round's update behind a gate the test opens, so the
kill lands at a known point: with half of round 2's updates stored (``mid_round``), or right after
the leader registered model v1, before it recorded round 1 (``registered``). The other replica
takes the lead and the three rounds complete with every update counted once, model versions
0..3 without a gap or a repeat, and a ledger that verifies. ``postgres``: PostgreSQL itself is
SIGKILLed with half of round 2 stored, the other half sent meanwhile, and started again; the
replicas wait (acknowledging nothing) and carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections import defaultdict
from typing import Any

import psycopg
import pytest
import waiting
from hub_process import WAIT_S, HubProcess

from edge_client.finetune import FineTunePolicy
from edge_client.runtime import EdgeClient, EdgeConfig, run_edges
from edge_client.sources.simulator import SimulatedDataset
from hub.blobs import TableBlobs
from hub.ledger import verify
from hub.registry import ModelRegistry
from hub.store import HubStore
from models import TrainConfig

pytestmark = pytest.mark.slow

DATASET = SimulatedDataset(seed=8, wearers=7, minutes=3, test_wearers=1)
CLIENTS = DATASET.train_clients[:6]


def stored(url: str, what: str) -> Any:
    """A value of the shared store read while the replicas run: ``updates``, ``rounds_done`` (counts) or a kv key."""
    with contextlib.suppress(psycopg.Error), psycopg.connect(url, autocommit=True, connect_timeout=2) as db:
        if what in ("updates", "rounds_done"):
            table = "updates" if what == "updates" else "rounds"
            return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        row = db.execute("SELECT value FROM kv WHERE key = %s", (what,)).fetchone()
        return None if row is None else row[0].strip('"')
    return None


@pytest.fixture
def own_postgres():
    """A PostgreSQL of this test's own, which it may kill."""
    from postgres import running_postgres

    with running_postgres() as server:
        yield server


@pytest.mark.parametrize("kill_at", ["mid_round", "registered", "postgres"])
def test_the_replicas_go_on_when_the_leader_or_the_database_is_killed(request, mqtt_broker, tmp_path, kill_at):
    server = request.getfixturevalue("own_postgres") if kill_at == "postgres" else None
    postgres_url = server.database() if server is not None else request.getfixturevalue("postgres_url")
    federation = f"rep-{uuid.uuid4().hex[:8]}"
    until = functools.partial(waiting.until, timeout=WAIT_S)

    def replica(name: str) -> HubProcess:
        (tmp_path / name).mkdir()
        return HubProcess(postgres_url, [
            "--broker", mqtt_broker.url, "--federation", federation, "--task", "heart-rate", "--replica-id", name,
            "--min-clients", "6", "--clients-per-round", "6", "--round-timeout", "300", "--rounds", "3",
            "--quantize", "int8"], workdir=tmp_path / name)

    first, second = replica("r1"), replica("r2")
    gates: defaultdict[tuple[str, int], asyncio.Event] = defaultdict(asyncio.Event)
    held: defaultdict[tuple[str, int], asyncio.Event] = defaultdict(asyncio.Event)
    gated = 0 if kill_at == "registered" else 2  # the round whose updates wait at the gate

    def edge(i: int, client: str) -> EdgeClient:
        made = EdgeClient(EdgeConfig(
            broker=mqtt_broker.url, federation=federation, client_id=client, state_dir=tmp_path / "edges" / client,
            policy=FineTunePolicy(TrainConfig(), min_new_windows=0), seed=i, protocol=mqtt_broker.protocol,
            resend_interval_s=20.0), DATASET.source(client))

        async def gate(round_number: int, base: Any, weights: Any) -> Any:
            held[client, round_number].set()
            if round_number == gated:
                await gates[client, round_number].wait()
            return weights

        made.weights_hook = gate
        return made

    async def scenario() -> list[EdgeClient]:
        edges = [edge(i, c) for i, c in enumerate(CLIENTS)]
        stop = asyncio.Event()
        running = asyncio.create_task(run_edges(edges, stop))
        try:
            first.start("registered" if kill_at == "registered" else None)
            await until(lambda: first.alive() and stored(postgres_url, "leader") == "r1", "r1 to lead")
            second.start()
            await until(lambda: second.alive() and "follows r1" in second.log.read_text(errors="replace"),
                        "r2 to follow")
            if kill_at == "registered":
                await until(lambda: first.mark.exists(), "r1 to register model v1 and pause")
            else:
                await until(lambda: all(held[c, 2].is_set() for c in CLIENTS), "round 2's updates at the gate")
                for client in CLIENTS[:3]:
                    gates[client, 2].set()
                await until(lambda: stored(postgres_url, "updates") == 9, "half of round 2 stored")
            if server is None:
                first.kill()
            else:
                await asyncio.to_thread(server.kill)
            for client in CLIENTS:
                gates[client, 2].set()
            if server is not None:  # the rest of round 2 reaches the replicas; none can store it, none acknowledges
                await until(lambda: all(e.counters["updates_published"] >= 2 for e in edges[3:]), "round 2 sent")
                await until(lambda: "unreachable" in first.log.read_text(errors="replace")
                            and "unreachable" in second.log.read_text(errors="replace"), "both replicas to wait")
                assert first.alive() and second.alive()
                assert all(e.outbox_stats.entries == 1 for e in edges[3:])  # no receipt without a commit
                await asyncio.to_thread(server.start)
                await until(lambda: stored(postgres_url, "rounds_done") == 3, "three rounds")
            else:
                assert await second.exited() == 0, second.log_tail()
            await until(lambda: all(e.model_version == 3 for e in edges), "every edge to adopt v3")
        finally:
            stop.set()
            first.stop()
            second.stop()
            await asyncio.wait_for(running, 60)
        return edges

    edges = asyncio.run(scenario())
    with HubStore(postgres_url, create=False) as store:
        status = store.status()
    assert status["leader"] in ({"r1", "r2"} if kill_at == "postgres" else {"r2"})
    assert set(status["replicas"]) == {"r1", "r2"}
    assert status["rounds_completed"] == 3 and status["model_version"] == 3
    assert status["updates_accepted"] == 18 == sum(c["accepted"] for c in status["clients"].values())
    assert {c: v["accepted"] for c, v in status["clients"].items()} == dict.fromkeys(CLIENTS, 3)
    assert all(e.counters["updates_built"] == 3 for e in edges)
    assert ModelRegistry(TableBlobs(postgres_url, "models")).versions() == [0, 1, 2, 3]
    ledger = verify(postgres_url)
    assert (ledger.entries, ledger.last_version) == (4, 3)
