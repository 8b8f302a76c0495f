"""Fault injection with real processes: a SIGKILLed broker, a SIGKILLed hub, an edge offline for rounds, replays.

Every test starts its own Mosquitto (persistence on, a free loopback port) so it can kill it
with SIGKILL and start it again on the same port, and stops it by PID at the end. The hub runs
in this event loop or, where it is the hub that dies, as a ``python -m wearfl hub`` child
process. Edges are real :class:`~edge_client.runtime.EdgeClient` runtimes on small simulated
wearers. Each edge's update passes a gate (its ``weights_hook``) that the test opens, so a kill
lands at a known point of the round: before any update arrived, after some were stored, after
all were stored but before the round closed, or while the new model is released. An edge or
the hub is taken off the network by cutting the TCP relay (:class:`Link`) it connects through.
Kill points are found by watching state (the hub's database, the registry, a marker file the
paused hub writes, the edges' counters), never by sleeping. Nothing asserts on timing: every
wait is bounded, and a timeout is a failure.

What every scenario checks: each update the edges built is stored exactly once (the hub's
``updates_accepted`` and each client's count and last sequence), copies are dropped and counted
apart (``duplicates_dropped``, or ``replayed`` for a copy from a closed round), the round
completes with all its participants, the edges adopt the new model, and the registry and the
ledger hold versions 0..N without a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as paho
import pytest
import waiting
from hub_process import HubProcess

import edge_client.runtime as edge_runtime
from edge_client.evaluation import task_spec
from edge_client.finetune import FineTunePolicy
from edge_client.runtime import EdgeClient, EdgeConfig
from edge_client.sources.simulator import SimulatedDataset
from hub.ledger import verify
from hub.registry import ModelRegistry
from hub.service import HubConfig, HubService
from hub.store import HubStore
from models import Model, TrainConfig
from models.package import save_package
from models.protocol.messages import REJECT_REASONS, Receipt, Task
from models.protocol.topics import Topics
from models.transport.mqtt import BrokerAddress, Message, MqttSession
from wearfl.broker import MosquittoBroker, free_port, mosquitto_binary

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 40.0
DATASET = SimulatedDataset(seed=6, wearers=4, minutes=3, test_wearers=0)
SPEC = task_spec("activity", DATASET)
CLIENTS = tuple(DATASET.clients)
TASK_CONFIG = {"quantize": "int8", "epochs": 1, "batch_size": 32, "lr": 1e-3, "min_new_windows": 0}
POLICY = FineTunePolicy(TrainConfig(epochs=1, batch_size=32), min_new_windows=0)

pytestmark = [
    pytest.mark.slow,  # the quick loop is `pytest -m "not slow"`
    pytest.mark.skipif(
        mosquitto_binary() is None and os.environ.get("CI", "").lower() != "true",
        reason="fault injection needs the mosquitto binary (apt-get install mosquitto)",
    ),
]


def run(coro: Coroutine[Any, Any, T], timeout: float = 150.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


until = functools.partial(waiting.until, timeout=WAIT_S)


def federation() -> str:
    return f"fi-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def broker(tmp_path):
    """A Mosquitto of this test's own, with persistence, stopped by PID at the end whatever happened."""
    mosquitto = MosquittoBroker(workdir=tmp_path / "mosquitto", persistence=True)
    mosquitto.start()
    try:
        yield mosquitto
    finally:
        mosquitto.stop()


async def kill_broker(broker: MosquittoBroker) -> None:
    await asyncio.to_thread(broker.kill)


async def restart_broker(broker: MosquittoBroker) -> None:
    await asyncio.to_thread(broker.restart)


class Link:
    """A TCP relay in front of the broker: cutting it takes whoever connects through it off the network."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.broker = broker
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for transport in self._transports:
            transport.abort()
        self._transports.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.broker.host, self.broker.port)
        except OSError:
            writer.transport.abort()
            return
        self._transports |= {writer.transport, up_writer.transport}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))



# -- edges -----------------------------------------------------------------------------------------


class Fleet:
    """Real edges in this event loop; each round's update waits at a gate the test opens.

    ``held[client, round]`` is set once the edge has trained that round and waits at the gate;
    ``gates[client, round]`` lets it store and send the update.
    """

    def __init__(self, url: str, fed: str, root: Path) -> None:
        self.url, self.fed, self.root = url, fed, root
        self.edges: dict[str, EdgeClient] = {}
        self._runs: dict[str, tuple[asyncio.Event, asyncio.Task[None]]] = {}
        self.gates: defaultdict[tuple[str, int], asyncio.Event] = defaultdict(asyncio.Event)
        self.held: defaultdict[tuple[str, int], asyncio.Event] = defaultdict(asyncio.Event)

    def start(self, client: str, url: str | None = None, **overrides: Any) -> EdgeClient:
        config = EdgeConfig(broker=url or self.url, federation=self.fed, client_id=client,
                            state_dir=self.root / client, policy=POLICY, seed=CLIENTS.index(client), protocol="5",
                            **overrides)
        edge = EdgeClient(config, DATASET.source(client))

        async def gate(round_number: int, base: Any, weights: Any) -> Any:
            self.held[client, round_number].set()
            await self.gates[client, round_number].wait()
            return weights

        edge.weights_hook = gate
        stop = asyncio.Event()
        self.edges[client] = edge
        self._runs[client] = (stop, asyncio.create_task(edge.run(stop), name=f"edge-{client}"))
        return edge

    def open(self, round_number: int, *clients: str) -> None:
        for client in clients or tuple(self.edges):
            self.gates[client, round_number].set()

    async def trained(self, round_number: int, *clients: str) -> None:
        for client in clients or tuple(self.edges):
            self._check(client)
            await asyncio.wait_for(self.held[client, round_number].wait(), WAIT_S)

    def _check(self, client: str) -> None:
        task = self._runs[client][1]
        if task.done():
            task.result()
            raise AssertionError(f"edge {client} stopped by itself")

    def built(self, client: str) -> int:
        self._check(client)
        return self.edges[client].counters["updates_built"]

    def pending(self, client: str) -> int:
        stats = self.edges[client].outbox_stats
        return -1 if stats is None else stats.entries

    async def stop(self, client: str) -> None:
        stop, task = self._runs.pop(client)
        stop.set()
        await asyncio.wait_for(task, WAIT_S)

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """Stop every edge; an edge that failed fails the test (unless it is failing already)."""
        failures: dict[str, BaseException] = {}
        for client in list(self._runs):
            try:
                await self.stop(client)
            except Exception as error:
                failures[client] = error
        if failures and exc_type is None:
            raise AssertionError(f"edges failed: {failures}") from next(iter(failures.values()))


# -- the hub ---------------------------------------------------------------------------------------


def hub_config(url: str, fed: str, state: Path, **kw: Any) -> HubConfig:
    kw.setdefault("min_clients", 3)
    kw.setdefault("round_timeout_s", 300.0)
    return HubConfig(broker=url, federation=fed, state_dir=state, protocol="5", task_config=dict(TASK_CONFIG), **kw)


class LocalHub:
    """A HubService in this event loop (stopped cleanly, never killed: kill the broker instead)."""

    def __init__(self, config: HubConfig) -> None:
        self.service = HubService(config, Model(SPEC, seed=0))
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> HubService:
        self._task = asyncio.create_task(self.service.run(self._stop), name="hub")
        ready = asyncio.create_task(self.service.ready.wait())
        await asyncio.wait([ready, self._task], timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self._task.done():
            self._task.result()
        assert self.service.ready.is_set(), "the hub did not get ready"
        return self.service

    def status(self) -> dict[str, Any]:
        assert self._task is not None
        if self._task.done():
            self._task.result()
        return self.service.status()

    async def stop(self) -> None:
        if self._task is not None:
            self._stop.set()
            await asyncio.wait_for(self._task, WAIT_S)


class Observer:
    """A plain MQTT client of the test: watches topics, publishes raw bytes."""

    def __init__(self, url: str, fed: str, *topics: str) -> None:
        self.session = MqttSession(BrokerAddress.parse(url), f"observer-{fed}", clean_start=True, protocol="5")
        self.topics = topics
        self.messages: list[Message] = []
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Observer:
        await self.session.connect(timeout=WAIT_S)
        for topic in self.topics:
            await self.session.subscribe(topic, qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for message in self.session.messages():
            self.messages.append(message)

    async def __aexit__(self, *exc: object) -> None:
        await self.session.disconnect()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, WAIT_S)

    def on(self, topic: str) -> list[Message]:
        return [m for m in self.messages if m.topic == topic]

    async def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        await self.session.publish(topic, payload, qos=1, retain=retain, timeout=WAIT_S)


def status_json(state: str, client: str) -> bytes:
    return json.dumps({"state": state, "client": client}).encode()


def stored_status(state: Path) -> dict[str, Any]:
    with HubStore(state, create=False) as store:
        return {**store.status(), "rounds": store.rounds()}


def only_replays_refused(status: dict[str, Any]) -> bool:
    """No update was refused, except re-sends of stored updates whose round had closed (``replayed``)."""
    return not {k: v for k, v in status["updates_rejected"].items() if v and k != "replayed"}


def check_versions_and_ledger(state: Path, last: int) -> None:
    assert ModelRegistry(state / "models").versions() == list(range(last + 1))
    ledger = verify(state / "ledger.jsonl")
    assert (ledger.entries, ledger.last_version) == (last + 1, last)


# -- 1: the broker is SIGKILLed mid-round ------------------------------------------------------------


async def save_broker_state(broker: MosquittoBroker) -> None:
    """Have Mosquitto write its persistence file now (SIGUSR1) and wait until it did."""
    db = broker.persistence_dir / "mosquitto.db"

    def stamp() -> tuple[int, int] | None:
        with contextlib.suppress(FileNotFoundError):
            st = db.stat()
            return st.st_ino, st.st_mtime_ns
        return None

    before = stamp()
    os.kill(broker.pid, signal.SIGUSR1)
    await until(lambda: stamp() not in (None, before), "mosquitto to save its state")


async def retained_task(url: str, topic: str) -> Task | None:
    """The task a client subscribing now gets as a retained message (None when the broker holds none)."""
    session = MqttSession(BrokerAddress.parse(url), f"late-{uuid.uuid4().hex[:8]}", clean_start=True, protocol="5")
    await session.connect(timeout=WAIT_S)
    try:
        await session.subscribe(topic, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                async for message in session.messages():
                    if message.retain:
                        return Task.from_bytes(message.payload)
        return None
    finally:
        await session.disconnect()


@pytest.mark.parametrize("broker_state", ["saved", "lost"])
@pytest.mark.parametrize("kill_at", ["before_updates", "some_stored", "all_stored", "release"])
def test_a_broker_killed_mid_round_loses_and_repeats_no_update(broker, tmp_path, kill_at, broker_state):
    """``saved``: Mosquitto wrote its state just before the kill. ``lost``: it had not (its default
    autosave is every 30 minutes): sessions, subscriptions, queued and retained messages are gone.
    The hub reaches the broker through a link that comes back only after the edges have re-sent
    what they hold, the order in which a lost hub subscription drops updates."""
    fed, clients = federation(), CLIENTS[:3]
    topics = Topics(fed)
    link = Link(broker)
    hub = LocalHub(hub_config(link.url, fed, tmp_path / "hub"))

    async def crash() -> None:
        if broker_state == "saved":
            await save_broker_state(broker)
        await kill_broker(broker)
        await link.cut()
        if broker_state == "lost":
            (broker.persistence_dir / "mosquitto.db").unlink(missing_ok=True)

    async def recover(fleet: Fleet) -> None:
        holding = {c: fleet.edges[c].counters["updates_published"] for c in clients if fleet.pending(c)}
        await restart_broker(broker)
        await until(lambda: all(fleet.edges[c].counters["updates_published"] > n or not fleet.pending(c)
                                for c, n in holding.items()), "the edges to re-send their pending updates")
        await link.up()

    entered, release = threading.Event(), threading.Event()

    async def scenario() -> None:
        await link.up()
        service = await hub.start()
        try:
            async with (
                Fleet(broker.url, fed, tmp_path / "edges") as fleet,
                Observer(broker.url, fed) as observer,
            ):
                if kill_at == "all_stored":  # one more edge online keeps the round open once all three are in
                    await observer.publish(topics.status("phantom"), status_json("online", "phantom"), retain=True)
                    await until(lambda: "phantom" in service.online, "the hub to count the phantom edge online")
                for client in clients:
                    fleet.start(client)
                await fleet.trained(1)
                if kill_at == "release":
                    rounds = service._rounds
                    build = rounds.build_next_model

                    def gated_build(*args: Any) -> Model:
                        entered.set()
                        assert release.wait(WAIT_S)
                        return build(*args)

                    rounds.build_next_model = gated_build

                if kill_at == "before_updates":
                    await crash()
                    fleet.open(1)
                    await until(lambda: all(fleet.built(c) == 1 for c in clients), "updates stored while down")
                elif kill_at == "some_stored":
                    fleet.open(1, clients[0])
                    await until(lambda: hub.status()["updates_accepted"] == 1, "the first update to be stored")
                    await crash()
                    fleet.open(1)
                    await until(lambda: all(fleet.built(c) == 1 for c in clients), "updates stored while down")
                elif kill_at == "all_stored":
                    fleet.open(1)
                    await until(lambda: hub.status()["updates_accepted"] == 3, "all updates to be stored")
                    await crash()
                else:
                    fleet.open(1)
                    await until(entered.is_set, "the hub to start building model v1")
                    await crash()
                    release.set()
                    await until(lambda: hub.status()["rounds_completed"] == 1, "round 1 recorded while down")
                await recover(fleet)
                if kill_at == "all_stored":
                    await until(lambda: all(fleet.pending(c) == 0 for c in clients), "every receipt")
                    for _ in range(int(WAIT_S)):  # what an edge that starts now gets: the open round's task
                        late = await retained_task(broker.url, topics.task)
                        if late is not None and late.round == 1:
                            break
                    else:
                        raise AssertionError("no retained task for round 1 after the restart")
                    await observer.publish(topics.status("phantom"), status_json("offline", "phantom"), retain=True)

                await until(lambda: all(fleet.edges[c].model_version == 1 for c in clients), "edges to adopt v1")
                await until(lambda: all(fleet.pending(c) == 0 for c in clients), "every update's receipt")
                assert [fleet.built(c) for c in clients] == [1, 1, 1]
        finally:
            release.set()
            await hub.stop()
            await link.cut()

    run(scenario())

    status = stored_status(tmp_path / "hub")
    assert status["updates_accepted"] == 3
    assert {c: (v["accepted"], v["last_sequence"]) for c, v in status["clients"].items()} == {
        c: (1, 1) for c in clients}
    assert only_replays_refused(status)
    assert status["rounds_completed"] == 1 and status["model_version"] == 1
    assert [(r.round, r.participants, r.model_version) for r in status["rounds"]] == [(1, 3, 1)]
    check_versions_and_ledger(tmp_path / "hub", 1)


def test_an_edge_notices_a_broker_restart_quicker_than_its_connection_poll(broker, tmp_path, monkeypatch):
    """Each time, the broker comes back with nothing of its state in less than one poll of the edge's
    connection loop: the edge must still see a new connection and publish its presence again."""
    monkeypatch.setattr(edge_runtime, "CONNECTION_POLL_S", 1.0)
    fed, client = federation(), CLIENTS[0]
    topics = Topics(fed)

    async def scenario() -> None:
        async with (
            Fleet(broker.url, fed, tmp_path / "edges") as fleet,
            Observer(broker.url, fed, topics.status(client)) as observer,
        ):

            def online() -> int:
                return sum(json.loads(m.payload).get("state") == "online"
                           for m in observer.on(topics.status(client)) if m.payload)

            fleet.start(client, status_interval_s=3600.0)
            await until(lambda: online() == 1, "the edge's presence")
            for restart in range(1, 6):
                seen = online()
                await kill_broker(broker)
                (broker.persistence_dir / "mosquitto.db").unlink(missing_ok=True)
                await restart_broker(broker)
                await until(lambda seen=seen: online() > seen, f"the edge's presence after restart {restart}")

    run(scenario())


# -- 2: the hub process is SIGKILLed mid-round ---------------------------------------------------------

def stored_counts(state: Path) -> tuple[int, int]:
    """(updates stored, rounds recorded) read from a hub's database while it runs (read-only)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{state / 'hub.db'}?mode=ro", uri=True, timeout=5)) as db:
            updates = db.execute("SELECT COUNT(*) FROM updates").fetchone()[0]
            rounds = db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
    except sqlite3.Error:
        return 0, 0
    return int(updates), int(rounds)


def wearfl(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wearfl", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=WAIT_S, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("kill_at", ["before_updates", "some_stored", "all_stored", "registered", "recorded"])
def test_a_hub_killed_mid_round_resumes_without_losing_or_repeating_an_update(broker, tmp_path, kill_at):
    """``registered``: v1 is in the registry, the round not yet recorded (nor v1 in the ledger).
    ``recorded``: the round is recorded, model v1 not yet published. Updates sent while no hub
    runs wait in the broker for its persistent session; the restarted hub (``--rounds 1``)
    finishes the round, publishes v1 and exits."""
    fed, clients = federation(), CLIENTS[:3]
    topics = Topics(fed)
    state = tmp_path / "hub" / "state"
    state.parent.mkdir()
    save_package(Model(SPEC, seed=0), tmp_path / "initial.safetensors")
    hub = HubProcess(state, ["--broker", broker.url, "--federation", fed, "--model",
                             str(tmp_path / "initial.safetensors"), "--min-clients", "3", "--round-timeout", "300",
                             "--rounds", "1", "--quantize", "int8"])
    pause_at = kill_at if kill_at in ("registered", "recorded") else None

    async def scenario() -> None:
        try:
            async with (
                Fleet(broker.url, fed, tmp_path / "edges") as fleet,
                Observer(broker.url, fed, topics.task) as observer,
            ):
                if kill_at == "all_stored":  # one more edge online keeps the round open once all three are in
                    await observer.publish(topics.status("phantom"), status_json("online", "phantom"), retain=True)
                hub.start(pause_at)
                await until(lambda: hub.alive() and bool(observer.on(topics.task)), "the hub's task for round 1")
                for client in clients:
                    fleet.start(client)
                await fleet.trained(1)

                if kill_at == "before_updates":
                    hub.kill()
                    fleet.open(1)
                elif kill_at == "some_stored":
                    fleet.open(1, clients[0])
                    await until(lambda: hub.alive() and stored_counts(state)[0] == 1, "the first update stored")
                    hub.kill()
                    fleet.open(1)
                elif kill_at == "all_stored":
                    fleet.open(1)
                    await until(lambda: hub.alive() and stored_counts(state)[0] == 3, "all updates stored")
                    hub.kill()
                    await observer.publish(topics.status("phantom"), status_json("offline", "phantom"), retain=True)
                else:
                    fleet.open(1)
                    await until(lambda: hub.alive() and hub.mark.exists(), f"the hub to pause at {kill_at}")
                    hub.kill()
                await until(lambda: all(fleet.edges[c].counters["updates_published"] >= 1 for c in clients),
                            "every edge's update to reach the broker")
                closing = kill_at in ("registered", "recorded")
                assert ModelRegistry(state / "models").versions() == ([0, 1] if closing else [0])
                assert stored_counts(state)[1] == (1 if kill_at == "recorded" else 0)

                hub.start()
                assert await hub.exited() == 0, hub.log_tail()
                await until(lambda: all(fleet.edges[c].model_version == 1 for c in clients), "edges to adopt v1")
                assert [fleet.built(c) for c in clients] == [1, 1, 1]
        finally:
            hub.stop()

    run(scenario())

    result = wearfl("status", "--state", str(state), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["updates_accepted"] == 3
    assert {c: (v["accepted"], v["last_sequence"]) for c, v in status["clients"].items()} == {
        c: (1, 1) for c in clients}
    assert only_replays_refused(status)
    assert status["rounds_completed"] == 1 and status["model_version"] == 1
    assert [(r.round, r.participants, r.model_version) for r in stored_status(state)["rounds"]] == [(1, 3, 1)]
    ledger = wearfl("ledger", "verify", "--state", str(state))
    assert ledger.returncode == 0, ledger.stderr
    check_versions_and_ledger(state, 1)


# -- 3: an edge offline for rounds, its update waiting in its outbox ---------------------------------


@pytest.mark.parametrize("strategy, offline_rounds, comeback, expected", [
    ("fedavg", 2, "restart", "stale"),
    ("fedavg", 1, "relink", "stale"),
    ("fedbuff", 2, "restart", "accepted"),
    ("fedbuff", 2, "relink", "stale"),
])
def test_an_edge_offline_for_rounds_delivers_its_outbox_and_staleness_decides(broker, tmp_path, strategy,
                                                                                 offline_rounds, comeback, expected):
    """The edge's link is cut after it trained round 1, so its update is stored but cannot be sent.
    ``restart``: the edge is stopped (state directory kept) and started again against the broker
    once the others finished ``offline_rounds`` rounds; ``relink``: it keeps running and its link
    comes back. The hub answers the old update by its staleness rule, once."""
    fed, (a, b, late) = federation(), CLIENTS[:3]
    # fedbuff: max_staleness 3 takes the update two versions behind; max_staleness 1 refuses it
    args = {"buffer_size": 2, "max_staleness": 3 if expected == "accepted" else 1} if strategy == "fedbuff" else {}
    hub = LocalHub(hub_config(broker.url, fed, tmp_path / "hub", min_clients=2, clients_per_round=2,
                              strategy=strategy, strategy_args=args))
    link = Link(broker)

    async def scenario() -> None:
        await hub.start()
        await link.up()
        try:
            async with Fleet(broker.url, fed, tmp_path / "edges") as fleet:
                for client in (a, b):
                    fleet.start(client)
                fleet.start(late, url=link.url)
                await fleet.trained(1)
                await link.cut()
                fleet.open(1, late)  # stored in the outbox with the link down: it cannot be sent
                await until(lambda: fleet.built(late) == 1, "the offline edge to store its update")
                assert fleet.pending(late) == 1
                if comeback == "restart":
                    await fleet.stop(late)
                for r in range(1, offline_rounds + 1):
                    fleet.open(r, a, b)
                await until(lambda: hub.status()["rounds_completed"] == offline_rounds, f"{offline_rounds} rounds")
                await fleet.trained(offline_rounds + 1, a, b)  # held: the next round stays open
                assert hub.status()["clients"].get(late, {}).get("accepted", 0) == 0

                if comeback == "restart":
                    fleet.start(late)
                else:
                    await link.up()
                await until(lambda: fleet.pending(late) == 0, "the offline edge's outbox to empty", timeout=60.0)
                await until(lambda: fleet.edges[late].model_version == offline_rounds, "the edge to catch up")
                counters = fleet.edges[late].counters
                assert (counters["receipts_accepted"], counters["receipts_rejected"]) == (
                    (1, 0) if expected == "accepted" else (0, 1))
        finally:
            await hub.stop()
            await link.cut()

    run(scenario())

    status = stored_status(tmp_path / "hub")
    taken = int(expected == "accepted")
    assert status["updates_rejected"]["stale"] == 1 - taken
    assert sum(status["updates_rejected"].values()) == 1 - taken
    assert status["clients"].get(late, {"accepted": 0})["accepted"] == taken  # a stale update pins no key
    assert (status["clients"][a]["accepted"], status["clients"][b]["accepted"]) == (offline_rounds, offline_rounds)
    assert status["updates_accepted"] == 2 * offline_rounds + taken
    assert status["rounds_completed"] == offline_rounds
    check_versions_and_ledger(tmp_path / "hub", offline_rounds)


# -- 4: duplicated and replayed publishes ------------------------------------------------------------

CLOSED_ROUND_COPY = ("rejected", "replayed") if "replayed" in REJECT_REASONS else ("duplicate", None)
"""What a copy of an update from a closed round gets: ``replayed`` since the intake knows the reason."""


def replay(broker: MosquittoBroker, topic: str, payload: bytes, times: int) -> None:
    """Publish the exact bytes ``times`` times from a plain paho client (QoS 1, each acknowledged)."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"replayer-{uuid.uuid4().hex[:8]}",
                         protocol=paho.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        sent = [client.publish(topic, payload, qos=1) for _ in range(times)]
        for info in sent:
            info.wait_for_publish(WAIT_S)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize("when", ["burst_in_round", "round_closed", "after_next_update", "hub_down"])
def test_duplicated_and_replayed_updates_are_never_counted_twice(broker, tmp_path, when):
    """Edge A's update, exactly as it went over the wire, is published again from a plain paho client:
    while its round is open, after the round closed, after A's next update was stored, and while the
    hub was stopped (the copies wait in the broker for it)."""
    fed, (a, b) = federation(), CLIENTS[:2]
    topics = Topics(fed)
    config = hub_config(broker.url, fed, tmp_path / "hub", min_clients=2, clients_per_round=2)
    hubs = [LocalHub(config)]

    async def scenario() -> dict[int, list[tuple[str, str | None]]]:
        await hubs[0].start()
        try:
            async with (
                Fleet(broker.url, fed, tmp_path / "edges") as fleet,
                Observer(broker.url, fed, topics.update(a), topics.receipt(a)) as observer,
            ):

                def receipts() -> dict[int, list[tuple[str, str | None]]]:
                    out: dict[int, list[tuple[str, str | None]]] = defaultdict(list)
                    for m in observer.on(topics.receipt(a)):
                        r = Receipt.from_bytes(m.payload)
                        out[r.sequence].append((r.status, r.reason))
                    return out

                def copies(n: int) -> Callable[[], bool]:
                    return lambda: sum(map(len, receipts().values())) >= n

                for client in (a, b):
                    fleet.start(client)
                await fleet.trained(1)
                fleet.open(1, a)
                await until(lambda: bool(observer.on(topics.update(a))), "edge A's update on the wire")
                first = observer.on(topics.update(a))[0].payload
                if when == "burst_in_round":  # while the original is being stored, and the round is open
                    await asyncio.to_thread(replay, broker, topics.update(a), first, 5)
                    await until(copies(6), "a receipt for every copy")
                    assert hubs[0].status()["updates_accepted"] == 1
                fleet.open(1, b)
                await until(lambda: hubs[0].status()["rounds_completed"] == 1, "round 1 to close")
                if when == "round_closed":
                    await asyncio.to_thread(replay, broker, topics.update(a), first, 3)
                    await until(copies(4), "a receipt for every copy")
                elif when == "after_next_update":
                    await fleet.trained(2, a, b)
                    fleet.open(2, a)
                    await until(lambda: hubs[0].status()["updates_accepted"] == 3, "edge A's round-2 update")
                    second = observer.on(topics.update(a))[-1].payload
                    await asyncio.to_thread(replay, broker, topics.update(a), first, 2)
                    await asyncio.to_thread(replay, broker, topics.update(a), second, 2)
                    await until(copies(6), "a receipt for every copy")
                elif when == "hub_down":
                    await hubs[0].stop()
                    await asyncio.to_thread(replay, broker, topics.update(a), first, 3)  # queued for the hub
                    hubs.append(LocalHub(config))
                    await hubs[1].start()
                    await until(copies(4), "a receipt for every copy")
                await until(lambda: fleet.pending(a) == 0 and fleet.pending(b) == 0, "the edges' receipts")
                assert hubs[-1].status()["updates_accepted"] == fleet.built(a) + fleet.built(b)
                return receipts()
        finally:
            for hub in hubs:
                await hub.stop()

    got = run(scenario())

    status = stored_status(tmp_path / "hub")
    built = {a: 2 if when == "after_next_update" else 1, b: 1}
    assert status["updates_accepted"] == sum(built.values())
    assert {c: v["accepted"] for c, v in status["clients"].items()} == built
    if when == "burst_in_round":
        assert sorted(got[1]) == [("accepted", None)] + [("duplicate", None)] * 5
        assert status["duplicates_dropped"] == 5
    elif when == "after_next_update":
        assert got[1] == [("accepted", None)] + [CLOSED_ROUND_COPY] * 2
        assert got[2] == [("accepted", None)] + [("duplicate", None)] * 2
        assert status["duplicates_dropped"] == 2 + 2 * (CLOSED_ROUND_COPY[0] == "duplicate")
    else:
        assert got[1] == [("accepted", None)] + [CLOSED_ROUND_COPY] * 3
        assert status["duplicates_dropped"] == 3 * (CLOSED_ROUND_COPY[0] == "duplicate")
    assert status["updates_rejected"]["replayed"] == sum(
        s == ("rejected", "replayed") for statuses in got.values() for s in statuses)
    assert only_replays_refused(status)
