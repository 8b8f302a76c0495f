"""The hub end to end through a real broker: fake edges, two rounds, retained model and task, restart.

The edges here are written with the protocol alone (MqttSession + build_update), so these
tests check the hub against the wire format, not against the edge runtime. Every wait has
a timeout; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import json
import queue
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np
import paho.mqtt.client as paho
import pytest
from hub_helpers import delta_of, make_update
from safetensors.numpy import load as st_load

from hub.ledger import verify
from hub.registry import ModelRegistry
from hub.rounds import RoundSummary
from hub.service import HubConfig, HubService
from hub.store import HubStore
from models import Model, activity_spec
from models.errors import ConfigError
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.messages import Receipt, Task, parse_model
from models.protocol.topics import Topics
from models.transport.mqtt import BrokerAddress, MqttSession

T = TypeVar("T")
WAIT_S = 20.0


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def federation_of(topic_prefix: str) -> str:
    return "t-" + topic_prefix.split("/")[1]


class FakeEdge:
    """An edge reduced to the protocol: it reads task, model and receipts and sends given deltas."""

    def __init__(self, broker: Any, topics: Topics, client: str) -> None:
        self.topics, self.client, self.key = topics, client, Ed25519PrivateKey.generate()
        self.session = MqttSession(BrokerAddress.parse(broker.url), f"{client}-{topics.federation}",
                                   protocol=getattr(broker, "protocol", "auto"))
        self.tasks: asyncio.Queue[Task] = asyncio.Queue()
        self.receipts: asyncio.Queue[Receipt] = asyncio.Queue()
        self.models: list[bytes] = []

    async def start(self, online: bool = True) -> None:
        await self.session.connect(timeout=WAIT_S)
        for topic in (self.topics.task, self.topics.model, self.topics.receipt(self.client)):
            await self.session.subscribe(topic, qos=1)
        self._pump = asyncio.create_task(self._read())
        if online:
            await self.session.publish(self.topics.status(self.client), json.dumps({"state": "online"}).encode(),
                                       qos=1, retain=True)

    async def _read(self) -> None:
        async for m in self.session.messages():
            if m.topic == self.topics.task:
                self.tasks.put_nowait(Task.from_bytes(m.payload))
            elif m.topic == self.topics.model:
                self.models.append(m.payload)
            elif m.topic == self.topics.receipt(self.client):
                self.receipts.put_nowait(Receipt.from_bytes(m.payload))
            # anything else is a broker quirk (the amqtt fallback delivers a few stray messages): ignored

    async def task_for(self, round_number: int) -> Task:
        while True:
            task = await asyncio.wait_for(self.tasks.get(), WAIT_S)
            if task.round >= round_number:
                return task

    async def send(self, payload: bytes) -> Receipt:
        await self.session.publish(self.topics.update(self.client), payload, qos=1)
        return await asyncio.wait_for(self.receipts.get(), WAIT_S)

    async def report(self, round_number: int, version: int, n: int, accuracy: float) -> None:
        body = {"round": round_number, "model_version": version, "num_examples": n, "metrics": {"accuracy": accuracy}}
        await self.session.publish(self.topics.metrics(self.client), json.dumps(body).encode(), qos=1)

    async def stop(self) -> None:
        await self.session.publish(self.topics.status(self.client), b"", qos=1, retain=True)
        await self.session.disconnect()
        self._pump.cancel()


async def start_federation(service: HubService, broker: Any, topics: Topics, n: int) -> tuple[Any, list[FakeEdge]]:
    """The hub running and ready, and ``n`` fake edges (``edge-0``...) online."""
    hub_task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.ready.wait(), WAIT_S)
    edges = [FakeEdge(broker, topics, f"edge-{i}") for i in range(n)]
    for edge in edges:
        await edge.start()
    return hub_task, edges


def retained_model(broker: Any, topic: str) -> bytes:
    """The retained model as any MQTT client sees it: plain paho, no wearfl code."""
    received: queue.Queue[bytes] = queue.Queue()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                         protocol=paho.MQTTv5 if broker.kind == "mosquitto" else paho.MQTTv311)
    client.on_message = lambda c, u, msg: received.put(msg.payload) if msg.topic == topic else None
    client.on_connect = lambda c, u, flags, rc, props=None: c.subscribe(topic, qos=1)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        return received.get(timeout=WAIT_S)
    finally:
        client.loop_stop()
        client.disconnect()


def hub_config(broker: Any, topic_prefix: str, state_dir: Any, **kw: Any) -> HubConfig:
    kw["task_config"] = {"quantize": "none", **kw.get("task_config", {})}
    return HubConfig(broker=broker.url, federation=federation_of(topic_prefix), state_dir=state_dir,
                     topic_prefix=topic_prefix, **kw)


def test_two_rounds_through_the_broker_publish_retained_models(mqtt_broker, topic_prefix, tmp_path):
    initial = Model(activity_spec(), seed=0)
    w0 = initial.network.state_dict()
    shapes = {k: v.shape for k, v in w0.items()}
    # clients_per_round unset: the round waits for every edge online (3), at least min_clients (2)
    config = hub_config(mqtt_broker, topic_prefix, tmp_path / "hub", min_clients=2, round_timeout_s=30, rounds=2,
                        task_config={"lr": 0.004, "lr_schedule": "cosine"})
    topics = Topics(config.federation, topic_prefix)
    service = HubService(config, initial)
    closed: list[RoundSummary] = []
    service.on_round_closed = closed.append
    expected = {k: v.astype(np.float64) for k, v in w0.items()}

    async def scenario() -> tuple[list[list[Receipt]], list[Receipt], list[Task]]:
        hub_task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), WAIT_S)
        edges = [FakeEdge(mqtt_broker, topics, f"edge-{i}") for i in range(3)]
        for edge in edges:
            await edge.start()
        receipts: list[list[Receipt]] = []
        extra: list[Receipt] = []
        tasks: list[Task] = []
        for r in (1, 2):
            round_tasks = [await edge.task_for(r) for edge in edges]
            tasks.append(round_tasks[0])
            deltas = [delta_of(shapes, seed=10 * r + i, scale=0.01) for i in range(3)]
            weights = [10.0 * (i + 1) for i in range(3)]
            for i, edge in enumerate(edges):
                await edge.report(r, round_tasks[i].model_version, n=int(weights[i]), accuracy=0.1 * (i + 1))
            payloads = [make_update(edge.key, edge.client, sequence=r, round_number=round_tasks[i].round,
                                    base_version=round_tasks[i].model_version, num_examples=int(weights[i]),
                                    delta=deltas[i], shapes=shapes) for i, edge in enumerate(edges)]
            first = await edges[0].send(payloads[0])
            if r == 1:  # junk from a client the hub knows (pinned by its first update) is answered
                extra.append(await edges[0].send(b"\x00not an update" * 16))
                extra.append(await edges[0].send(payloads[0]))  # the outbox re-sends in the open round: a duplicate
            receipts.append([first] + [await edge.send(p) for edge, p in zip(edges[1:], payloads[1:], strict=True)])
            if r == 1:
                extra.append(await edges[0].send(payloads[0]))  # the same copy once the round closed: a replay
            for k in expected:
                expected[k] += sum(w * d[k] for w, d in zip(weights, deltas, strict=True)) / sum(weights)
        await asyncio.wait_for(hub_task, WAIT_S)  # rounds=2: the hub stops by itself
        for edge in edges:
            await edge.stop()
        return receipts, extra, tasks

    receipts, extra, tasks = run(scenario())

    assert [[(x.status, x.sequence) for x in rs] for rs in receipts] == [[("accepted", 1)] * 3, [("accepted", 2)] * 3]
    assert (extra[0].status, extra[0].reason, extra[0].sequence) == ("rejected", "malformed", -1)
    assert (extra[1].status, extra[1].sequence) == ("duplicate", 1)
    assert (extra[2].status, extra[2].reason, extra[2].sequence) == ("rejected", "replayed", 1)
    assert [(t.round, t.model_version, t.config["quantize"]) for t in tasks] == [(1, 0, "none"), (2, 1, "none")]
    # cosine over 2 rounds with the default 5% floor: round 2 is halfway, 0.05 + 0.95 / 2 of the rate
    assert [t.config["lr"] for t in tasks] == pytest.approx([0.004, 0.004 * 0.525])
    assert [(s.round, s.model_version, s.participants, s.updates_accepted) for s in closed] == [(1, 1, 3, 3),
                                                                                              (2, 2, 3, 3)]
    assert closed[0].updates_rejected == 1 and closed[0].bytes_up > 0 and closed[0].bytes_down > 0
    assert closed[0].metrics["accuracy"] == pytest.approx(np.average([0.1, 0.2, 0.3], weights=[10, 20, 30]))
    assert closed[0].metrics["eval_clients"] == 3

    message = retained_model(mqtt_broker, topics.model)
    tensors = st_load(message)  # plain safetensors: no wearfl code needed to read the weights
    assert set(tensors) == set(w0) | {"~signature"}
    for k in w0:
        np.testing.assert_allclose(tensors[k], expected[k], rtol=1e-5, atol=1e-6)
    parsed = parse_model(message)
    assert parsed.model.version == 2 and parsed.round == 3

    status = service.status()
    assert status["model_version"] == 2 and status["rounds_completed"] == 2
    assert status["updates_accepted"] == 6 == sum(c["accepted"] for c in status["clients"].values())
    assert status["duplicates_dropped"] == 1 and status["updates_rejected"]["malformed"] == 1
    assert status["updates_rejected"]["replayed"] == 1
    latest = ModelRegistry(tmp_path / "hub" / "models").latest()
    assert latest is not None and latest.version == 2
    assert set(latest.manifest["files"]) == {"model.safetensors", "model.onnx", "model.tflite"}
    # the ledger holds v0, v1, v2, each with its files' and its updates' digests
    ledger = verify(tmp_path / "hub" / "ledger.jsonl")
    assert (ledger.entries, ledger.last_version) == (3, 2)
    entries = [json.loads(line) for line in (tmp_path / "hub" / "ledger.jsonl").read_text().splitlines()]
    assert [len(e["updates"]) for e in entries] == [0, 3, 3]
    assert entries[2]["files"]["model.safetensors"] == latest.manifest["files"]["model.safetensors"]["sha256"]


def test_a_restarted_hub_resumes_the_open_round_from_its_state(mqtt_broker, topic_prefix, tmp_path):
    initial = Model(activity_spec(), seed=1)
    w0 = initial.network.state_dict()
    shapes = {k: v.shape for k, v in w0.items()}
    config = hub_config(mqtt_broker, topic_prefix, tmp_path / "hub", min_clients=2, clients_per_round=2,
                        round_timeout_s=30, rounds=1)
    topics = Topics(config.federation, topic_prefix)
    deltas = [delta_of(shapes, seed=s, scale=0.02) for s in (1, 2)]

    async def scenario() -> tuple[Receipt, Receipt, RoundSummary]:
        edges = [FakeEdge(mqtt_broker, topics, f"edge-{i}") for i in range(2)]
        first, stop = HubService(config, initial), asyncio.Event()
        first_run = asyncio.create_task(first.run(stop))
        await asyncio.wait_for(first.ready.wait(), WAIT_S)
        for edge in edges:
            await edge.start(online=False)
        task = await edges[0].task_for(1)
        a = await edges[0].send(make_update(edges[0].key, "edge-0", sequence=0, base_version=task.model_version,
                                            num_examples=30, delta=deltas[0], shapes=shapes))
        stop.set()
        await asyncio.wait_for(first_run, WAIT_S)
        late = make_update(edges[1].key, "edge-1", sequence=0, base_version=task.model_version, num_examples=10,
                           delta=deltas[1], shapes=shapes)
        queued = mqtt_broker.kind == "mosquitto"  # the amqtt fallback keeps no offline sessions
        if queued:  # sent while no hub runs: the broker keeps it for the hub's persistent session
            await edges[1].session.publish(topics.update("edge-1"), late, qos=1)

        second = HubService(config)  # no initial model: everything comes from the state directory
        closed: list[RoundSummary] = []
        second.on_round_closed = closed.append
        second_run = asyncio.create_task(second.run())
        await asyncio.wait_for(second.ready.wait(), WAIT_S)
        if not queued:
            await edges[1].session.publish(topics.update("edge-1"), late, qos=1)
        b = await asyncio.wait_for(edges[1].receipts.get(), WAIT_S)
        await asyncio.wait_for(second_run, WAIT_S)
        for edge in edges:
            await edge.stop()
        return a, b, closed[0]

    a, b, summary = run(scenario())

    assert a.status == b.status == "accepted"
    assert (summary.round, summary.model_version, summary.participants) == (1, 1, 2)
    assert summary.model is not None
    for k in w0:
        np.testing.assert_allclose(summary.model.network.state_dict()[k], w0[k] + (30 * deltas[0][k] +
                                   10 * deltas[1][k]) / 40, rtol=1e-5, atol=1e-6)
    with HubStore(tmp_path / "hub", create=False) as store:
        status = store.status()
    assert status["updates_accepted"] == 2 and status["model_version"] == 1
    assert ModelRegistry(tmp_path / "hub" / "models").versions() == [0, 1]


def test_a_round_short_of_min_clients_at_the_deadline_waits_and_closes_later(mqtt_broker, topic_prefix, tmp_path):
    initial = Model(activity_spec(), seed=2)
    shapes = {k: v.shape for k, v in initial.network.state_dict().items()}
    config = hub_config(mqtt_broker, topic_prefix, tmp_path / "hub", min_clients=2, clients_per_round=5,
                        round_timeout_s=0.5, rounds=1)
    topics = Topics(config.federation, topic_prefix)

    async def scenario() -> tuple[Task, Task, RoundSummary]:
        service = HubService(config, initial)
        run_task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), WAIT_S)
        edges = [FakeEdge(mqtt_broker, topics, f"edge-{i}") for i in range(2)]
        for edge in edges:
            await edge.start(online=False)
        first = await edges[0].task_for(1)
        await edges[0].send(make_update(edges[0].key, "edge-0", shapes=shapes))
        extended = first
        while extended.deadline == first.deadline:  # the deadline passes with one client: a new task
            extended = await edges[1].task_for(1)
        await edges[1].send(make_update(edges[1].key, "edge-1", shapes=shapes))
        await asyncio.wait_for(run_task, WAIT_S)  # closes at the next deadline with min_clients
        for edge in edges:
            await edge.stop()
        return first, extended, service.summaries[0]

    first, extended, summary = run(scenario())

    assert extended.round == first.round == 1 and extended.deadline > first.deadline
    assert (summary.round, summary.participants, summary.model_version) == (1, 2, 1)


@pytest.mark.parametrize("strategy, args", [("fedmedian", {}), ("fedavgm", {"server_lr": "1.0", "momentum": "0.5"})])
def test_buffered_and_stateful_rules_run_in_the_hub(mqtt_broker, topic_prefix, tmp_path, strategy, args):
    initial = Model(activity_spec(), seed=3)
    w0 = initial.network.state_dict()
    shapes = {k: v.shape for k, v in w0.items()}
    config = hub_config(mqtt_broker, topic_prefix, tmp_path / "hub", min_clients=3, clients_per_round=3,
                        round_timeout_s=30, rounds=1, strategy=strategy, strategy_args=args)
    topics = Topics(config.federation, topic_prefix)
    service = HubService(config, initial)
    deltas = [delta_of(shapes, seed=40 + i, scale=0.01) for i in range(3)]

    async def scenario() -> list[Receipt]:
        hub_task, edges = await start_federation(service, mqtt_broker, topics, 3)
        tasks = [await edge.task_for(1) for edge in edges]
        receipts = [await edge.send(make_update(edge.key, edge.client, sequence=1, round_number=1,
                                                base_version=task.model_version, num_examples=10 * (i + 1),
                                                delta=deltas[i], shapes=shapes))
                    for i, (edge, task) in enumerate(zip(edges, tasks, strict=True))]
        await asyncio.wait_for(hub_task, WAIT_S)
        for edge in edges:
            await edge.stop()
        return receipts

    receipts = run(scenario())
    assert [r.status for r in receipts] == ["accepted"] * 3
    latest = ModelRegistry(tmp_path / "hub" / "models").latest()
    assert latest is not None and latest.version == 1
    got = latest.load().network.state_dict()
    for k in w0:
        stacked = np.stack([d[k] for d in deltas])
        if strategy == "fedmedian":
            want = w0[k] + np.median(stacked, axis=0)
        else:  # the first momentum step is the weighted mean
            want = w0[k] + np.average(stacked, axis=0, weights=[10, 20, 30])
        np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-6)
    saved = sorted(p.name for p in (tmp_path / "hub" / "strategy").glob("*")) if strategy == "fedavgm" else []
    assert saved == (["v1.safetensors"] if strategy == "fedavgm" else [])


def test_a_rule_that_needs_more_updates_than_min_clients_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="needs at least 7 updates"):
        HubConfig("mqtt://127.0.0.1:1883", "fed", tmp_path, min_clients=5, strategy="krum", strategy_args={"f": 2})


def test_fedbuff_releases_every_k_updates_and_discounts_stale_ones(mqtt_broker, topic_prefix, tmp_path):
    initial = Model(activity_spec(), seed=5)
    w0 = initial.network.state_dict()
    shapes = {k: v.shape for k, v in w0.items()}
    config = hub_config(mqtt_broker, topic_prefix, tmp_path / "hub", min_clients=2, round_timeout_s=60, rounds=2,
                        strategy="fedbuff", strategy_args={"buffer_size": 2, "max_staleness": 1})
    topics = Topics(config.federation, topic_prefix)
    service = HubService(config, initial)
    deltas = [delta_of(shapes, seed=60 + i, scale=0.01) for i in range(5)]

    async def scenario() -> list[Receipt]:
        hub_task, edges = await start_federation(service, mqtt_broker, topics, 3)
        for edge in edges:
            await edge.task_for(1)

        def update(i: int, edge: FakeEdge, seq: int, round_number: int, base: int) -> bytes:
            return make_update(edge.key, edge.client, sequence=seq, round_number=round_number, base_version=base,
                               num_examples=10 * (i + 1), delta=deltas[i], shapes=shapes)

        receipts = [await edges[0].send(update(0, edges[0], 1, 1, 0)),
                    await edges[1].send(update(1, edges[1], 1, 1, 0))]  # two updates: v1 is released
        await edges[2].task_for(2)
        receipts.append(await edges[2].send(update(2, edges[2], 1, 1, 0)))  # trained on v0: one version stale
        receipts.append(await edges[0].send(update(3, edges[0], 2, 2, 1)))  # fresh: v2 is released
        await asyncio.wait_for(hub_task, WAIT_S)
        for edge in edges:
            await edge.stop()
        return receipts

    receipts = run(scenario())
    assert [r.status for r in receipts] == ["accepted"] * 4
    registry = ModelRegistry(tmp_path / "hub" / "models")
    v1, v2 = registry.get(1).load().network.state_dict(), registry.get(2).load().network.state_dict()
    discount = 1 / np.sqrt(2)
    for k in w0:
        want1 = w0[k] + (10 * deltas[0][k] + 20 * deltas[1][k]) / 30
        np.testing.assert_allclose(v1[k], want1, rtol=1e-5, atol=1e-6)
        if k.endswith(("running_mean", "running_var")):  # re-based on v1, not discounted
            stale = deltas[2][k] + w0[k] - v1[k]
            want2 = v1[k] + (30 * stale + 40 * deltas[3][k]) / 70
        else:
            want2 = v1[k] + (30 * discount * deltas[2][k] + 40 * deltas[3][k]) / 70
        np.testing.assert_allclose(v2[k], np.maximum(want2, 0) if k.endswith("running_var") else want2,
                                   rtol=1e-5, atol=1e-6)


def test_a_fraction_of_the_online_edges_is_selected_and_closes_the_round(mqtt_broker, topic_prefix, tmp_path):
    initial = Model(activity_spec(), seed=7)
    shapes = {k: v.shape for k, v in initial.network.state_dict().items()}
    config = hub_config(mqtt_broker, topic_prefix, tmp_path / "hub", min_clients=2, round_timeout_s=60, rounds=1,
                        fraction=0.5)
    topics = Topics(config.federation, topic_prefix)
    service = HubService(config, initial)

    async def scenario() -> tuple[Task, list[Receipt]]:
        hub_task, started = await start_federation(service, mqtt_broker, topics, 4)
        edges = {edge.client: edge for edge in started}
        task = await edges["edge-0"].task_for(1)
        while not task.clients:  # published as "nobody yet" until min_clients are online
            task = await asyncio.wait_for(edges["edge-0"].tasks.get(), WAIT_S)
        outsider = next(c for c in sorted(edges) if c not in task.clients)
        refused = await edges[outsider].send(make_update(edges[outsider].key, outsider, sequence=1, round_number=1,
                                                         base_version=0, num_examples=5, shapes=shapes))
        receipts = [await edges[c].send(make_update(edges[c].key, c, sequence=1, round_number=1, base_version=0,
                                                    num_examples=5, delta=delta_of(shapes, seed=i, scale=0.01),
                                                    shapes=shapes))
                    for i, c in enumerate(task.clients)]
        await asyncio.wait_for(hub_task, WAIT_S)  # the selected edges' updates close the round
        for edge in edges.values():
            await edge.stop()
        return task, [refused, *receipts]

    task, (refused, *receipts) = run(scenario())
    assert len(task.clients) >= 2 and set(task.clients) <= {f"edge-{i}" for i in range(4)}
    assert (refused.status, refused.reason) == ("rejected", "not_selected")  # the hub enforces its selection too
    assert [r.status for r in receipts] == ["accepted"] * len(task.clients)
    assert service.summaries[0].participants == len(task.clients)


@pytest.mark.parametrize("stragglers", ["drop", "next-round"])
def test_a_late_update_is_dropped_or_counted_into_the_next_round(mqtt_broker, topic_prefix, tmp_path, stragglers):
    initial = Model(activity_spec(), seed=8)
    shapes = {k: v.shape for k, v in initial.network.state_dict().items()}
    config = hub_config(mqtt_broker, topic_prefix, tmp_path / "hub", min_clients=2, clients_per_round=2,
                        round_timeout_s=60, rounds=2, stragglers=stragglers)
    topics = Topics(config.federation, topic_prefix)
    service = HubService(config, initial)

    def update(edge: FakeEdge, seq: int, round_number: int, base: int, seed: int) -> bytes:
        return make_update(edge.key, edge.client, sequence=seq, round_number=round_number, base_version=base,
                           num_examples=5, delta=delta_of(shapes, seed=seed, scale=0.01), shapes=shapes)

    async def scenario() -> Receipt:
        hub_task, (a, b, late) = await start_federation(service, mqtt_broker, topics, 3)
        await a.send(update(a, 1, 1, 0, 1))
        await b.send(update(b, 1, 1, 0, 2))  # round 1 closes with two updates
        await late.task_for(2)
        straggler = await late.send(update(late, 1, 1, 0, 3))  # still trained on v0 for round 1
        if stragglers == "drop":
            await late.send(update(late, 2, 2, 1, 4))
        await a.send(update(a, 2, 2, 1, 5))
        await asyncio.wait_for(hub_task, WAIT_S)
        for edge in (a, b, late):
            await edge.stop()
        return straggler

    straggler = run(scenario())
    if stragglers == "drop":
        assert (straggler.status, straggler.reason) == ("rejected", "stale")
    else:
        assert straggler.status == "accepted"
        assert service.summaries[1].participants == 2 and service.summaries[1].updates_accepted == 2


def test_a_dp_hub_stops_releasing_before_its_privacy_budget_is_exceeded(mqtt_broker, topic_prefix, tmp_path):
    initial = Model(activity_spec(), seed=6)
    shapes = {k: v.shape for k, v in initial.network.state_dict().items()}
    # noise 1, every client every round (q = 1): epsilon 4.73 after one round, 7.08 after two, 9.01 after three
    args = {"noise": 1.0, "clip": 0.5, "budget": 8.0, "population": 2, "seed": 0}
    config = hub_config(mqtt_broker, topic_prefix, tmp_path / "hub", min_clients=2, clients_per_round=2,
                        round_timeout_s=30, strategy="dpfedavg", strategy_args=args)  # no round limit
    topics = Topics(config.federation, topic_prefix)
    service = HubService(config, initial)
    assert service.privacy is not None
    allowed = service.privacy.max_rounds()

    async def scenario() -> list[Task]:
        hub_task, edges = await start_federation(service, mqtt_broker, topics, 2)
        tasks = []
        for r in range(1, allowed + 1):
            round_tasks = [await edge.task_for(r) for edge in edges]
            tasks.append(round_tasks[0])
            for i, (edge, task) in enumerate(zip(edges, round_tasks, strict=True)):
                await edge.send(make_update(edge.key, edge.client, sequence=r, round_number=r,
                                            base_version=task.model_version, num_examples=10,
                                            delta=delta_of(shapes, seed=10 * r + i, scale=0.01), shapes=shapes))
        await asyncio.wait_for(hub_task, WAIT_S)  # stops by itself: one more round would pass the budget
        for edge in edges:
            await edge.stop()
        return tasks

    tasks = run(scenario())
    status = service.status()
    privacy = status["privacy"]
    assert allowed == 2 and status["rounds_completed"] == allowed == status["model_version"]
    assert all(t.config["update_clip"] == 0.5 for t in tasks)  # the edges clip to the DP bound
    assert privacy["budget_reached"] and privacy["epsilon"] <= 8.0 and privacy["budget_epsilon"] == 8.0
    assert [r["round"] for r in privacy["per_round"]] == [1, 2]
    assert privacy["per_round"][0]["epsilon"] < privacy["per_round"][1]["epsilon"] == privacy["epsilon"]
    assert "Poisson sampling" in privacy["sampling"] and privacy["delta"] == 1e-5


def test_the_selection_of_a_later_round_is_enforced_too(mqtt_broker, topic_prefix, tmp_path):
    initial = Model(activity_spec(), seed=9)
    shapes = {k: v.shape for k, v in initial.network.state_dict().items()}
    config = hub_config(mqtt_broker, topic_prefix, tmp_path / "hub", min_clients=2, round_timeout_s=60, rounds=2,
                        fraction=0.5)
    topics = Topics(config.federation, topic_prefix)
    service = HubService(config, initial)

    async def round_of(edges: dict[str, FakeEdge], r: int) -> tuple[Task, Receipt]:
        task = await edges["edge-0"].task_for(r)
        while not task.clients:
            task = await asyncio.wait_for(edges["edge-0"].tasks.get(), WAIT_S)
        outsider = next(c for c in sorted(edges) if c not in task.clients)
        refused = await edges[outsider].send(make_update(edges[outsider].key, outsider, sequence=r, round_number=r,
                                                         base_version=task.model_version, num_examples=5,
                                                         shapes=shapes))
        for i, c in enumerate(task.clients):
            await edges[c].send(make_update(edges[c].key, c, sequence=r, round_number=r,
                                            base_version=task.model_version, num_examples=5,
                                            delta=delta_of(shapes, seed=10 * r + i, scale=0.01), shapes=shapes))
        return task, refused

    async def scenario() -> list[tuple[Task, Receipt]]:
        hub_task, started = await start_federation(service, mqtt_broker, topics, 4)
        edges = {edge.client: edge for edge in started}
        results = [await round_of(edges, 1), await round_of(edges, 2)]
        await asyncio.wait_for(hub_task, WAIT_S)
        for edge in edges.values():
            await edge.stop()
        return results

    results = run(scenario())
    assert [(t.round, r.reason) for t, r in results] == [(1, "not_selected"), (2, "not_selected")]
    assert [s.participants for s in service.summaries] == [len(t.clients) for t, _ in results]


def test_the_hub_restores_its_retained_model_and_task_when_someone_overwrites_them(mqtt_broker, topic_prefix,
                                                                                     tmp_path, monkeypatch):
    monkeypatch.setattr("hub.publisher.RESTORE_SPACING_S", 1.0)
    config = hub_config(mqtt_broker, topic_prefix, tmp_path / "hub", min_clients=2, round_timeout_s=60)
    topics = Topics(config.federation, topic_prefix)
    service = HubService(config, Model(activity_spec(), seed=1))

    async def scenario() -> tuple[bytes, bytes, bytes, bytes]:
        stop = asyncio.Event()
        hub_task = asyncio.create_task(service.run(stop))
        await asyncio.wait_for(service.ready.wait(), WAIT_S)
        model = await asyncio.to_thread(retained_model, mqtt_broker, topics.model)
        task = await asyncio.to_thread(retained_model, mqtt_broker, topics.task)
        attacker = FakeEdge(mqtt_broker, topics, "mallory")
        await attacker.start(online=False)
        await attacker.session.publish(topics.task, b'{"round": 1000000000000, "model_version": 0}', retain=True)
        await attacker.session.publish(topics.model, b"not a model", retain=True)
        for _ in range(100):  # a new subscriber gets the retained copies: the hub's again once it noticed both
            restored = await asyncio.to_thread(retained_model, mqtt_broker, topics.model)
            if restored == model and await asyncio.to_thread(retained_model, mqtt_broker, topics.task) == task:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(hub_task, WAIT_S)
        await attacker.stop()
        final_task = await asyncio.to_thread(retained_model, mqtt_broker, topics.task)
        return model, task, restored, final_task

    model, task, restored, final_task = run(scenario())
    assert restored == model and final_task == task and Task.from_bytes(task).signature  # the hub's own, signed
