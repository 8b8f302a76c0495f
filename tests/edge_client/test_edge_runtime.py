"""The edge runtime against a real broker and a scripted hub: updates, receipts, restarts, bad models.

The fake hub below speaks the hub's side of the protocol with the shared code (signed model,
retained task, receipts) and checks what the edge sends with the same parsers the real hub
uses. Sources are three simulated minutes, so a round trains in well under a second. No test
asserts on timing: every wait is bounded, and a timeout is a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import waiting
from safetensors.numpy import load as st_load

from edge_client.edge_command import add_edge_command, resolve_source
from edge_client.evaluation import task_spec
from edge_client.finetune import FineTunePolicy
from edge_client.runtime import EdgeClient, EdgeConfig, run_edges
from edge_client.sources.simulator import SimulatedDataset
from hub.ledger import Ledger
from models.errors import BrokerUnavailable, ConfigError
from models.model import Model
from models.package import package_bytes
from models.protocol.codec import CodecConfig, UpdateCodec
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.identity import load_or_create_key, public_hex
from models.protocol.ledger import entry_hash
from models.protocol.messages import (
    MAX_MODEL_BYTES,
    Receipt,
    Task,
    UpdateMeta,
    build_model,
    model_hash,
    parse_update_meta,
)
from models.protocol.signed import SignedMessage, verify_and_parse
from models.protocol.topics import Topics
from models.training import TrainConfig
from models.transport.mqtt import BrokerAddress, Message, MqttSession
from models.transport.outbox import Outbox
from wearfl.broker import free_port

T = TypeVar("T")
WAIT_S = 20.0
TASK_CONFIG = {"quantize": "int8", "epochs": 1, "batch_size": 32, "lr": 1e-3}
DATASET = SimulatedDataset(seed=0, wearers=2, minutes=3, test_wearers=0)
ROOT = Path(__file__).resolve().parents[2]


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def url_of(broker: Any) -> str:
    return f"mqtt://{broker.host}:{broker.port}"


def protocol_of(broker: Any) -> str:
    """The MQTT version the test broker speaks (no probing: the amqtt fallback speaks 3.1.1 only)."""
    return "5" if broker.kind == "mosquitto" else "3.1.1"


def federation() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def global_model(version: int = 1, seed: int = 0) -> Model:
    return Model(task_spec("activity", DATASET), version=version, seed=seed)


def edge_config(broker: Any, fed: str, state_dir: Path, client: str = "wearer-00", **overrides: Any) -> EdgeConfig:
    policy = overrides.pop("policy", FineTunePolicy(train=TrainConfig(epochs=1, batch_size=32)))
    return EdgeConfig(broker=url_of(broker), federation=fed, client_id=client, state_dir=state_dir, policy=policy,
                      protocol=protocol_of(broker), **overrides)


until = functools.partial(waiting.until, timeout=WAIT_S)


class FakeHub:
    """The hub's side of the protocol, scripted by a test."""

    def __init__(self, broker: Any, fed: str) -> None:
        self.topics = Topics(fed)
        self.key = Ed25519PrivateKey.generate()
        self.session = MqttSession(BrokerAddress.parse(url_of(broker)), f"fake-hub-{fed}", clean_start=True,
                                   protocol=protocol_of(broker))
        self.inbox: dict[str, asyncio.Queue[Message]] = {k: asyncio.Queue() for k in ("update", "status", "metrics")}
        self._reader: asyncio.Task[None] | None = None
        self.digests: dict[tuple[str, int], str] = {}  # (client, sequence) -> SHA-256 of the update received

    async def __aenter__(self) -> FakeHub:
        await self.session.connect()
        for kind in self.inbox:
            await self.session.subscribe(self.topics.all_of(kind))
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.disconnect()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, WAIT_S)

    async def _read(self) -> None:
        async for message in self.session.messages():
            for kind, queue in self.inbox.items():
                if self.topics.client_from(message.topic, kind) is not None:
                    queue.put_nowait(message)  # (amqtt has delivered retained messages of other topics)

    async def publish_model(self, model: Model, round_number: int = 0, key: Ed25519PrivateKey | None = None) -> bytes:
        data = build_model(model, round_number, key or self.key, federation=self.topics.federation)
        await self.session.publish(self.topics.model, data, retain=True)
        return data

    async def publish_raw_model(self, data: bytes) -> None:
        await self.session.publish(self.topics.model, data, retain=True)

    async def publish_task(self, task: Task) -> None:
        """``task`` for this federation, signed with the hub's key (as a real hub publishes it)."""
        signed = replace(task, federation=self.topics.federation).signed(self.key)
        await self.session.publish(self.topics.task, signed.to_bytes(), retain=True)

    async def next(self, kind: str, where: Callable[[Message], bool] = lambda m: True) -> Message:
        async def wait() -> Message:
            while True:
                message = await self.inbox[kind].get()
                if where(message):
                    return message

        return await asyncio.wait_for(wait(), WAIT_S)

    async def next_update(self) -> tuple[SignedMessage, UpdateMeta, bytes]:
        message = await self.next("update")
        signed = verify_and_parse(message.payload, MAX_MODEL_BYTES)
        meta = parse_update_meta(signed)
        self.digests[(meta.client, meta.sequence)] = hashlib.sha256(message.payload).hexdigest()
        return signed, meta, message.payload

    async def receipt(self, meta: UpdateMeta, status: str = "accepted", reason: str | None = None) -> None:
        digest = self.digests.get((meta.client, meta.sequence))
        receipt = Receipt(meta.client, meta.sequence, status, reason, round=meta.round, digest=digest,
                          federation=self.topics.federation).signed(self.key)
        await self.session.publish(self.topics.receipt(meta.client), receipt.to_bytes())

    async def status_where(self, state: str, client: str = "wearer-00") -> dict[str, Any]:
        def matches(m: Message) -> bool:
            body = json.loads(m.payload) if m.payload else {}
            return body.get("state") == state and body.get("client") == client

        return json.loads((await self.next("status", matches)).payload)


class RunningEdge:
    """An EdgeClient running in the background of a test, stopped (and awaited) on exit."""

    def __init__(self, config: EdgeConfig, client: str = "wearer-00") -> None:
        self.edge = EdgeClient(config, DATASET.source(client))
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EdgeClient:
        self.task = asyncio.create_task(self.edge.run(self.stop))
        return self.edge

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, WAIT_S)


# -- one round ---------------------------------------------------------------------------------


def test_edge_sends_a_signed_update_and_keeps_it_until_the_receipt(mqtt_broker, tmp_path):
    fed, state = federation(), tmp_path / "edge"
    model = global_model(version=1)

    async def scenario() -> dict[str, Any]:
        async with FakeHub(mqtt_broker, fed) as hub:
            model_bytes = await hub.publish_model(model, round_number=0)
            await hub.publish_task(Task(round=1, model_version=1, config=TASK_CONFIG))
            async with RunningEdge(edge_config(mqtt_broker, fed, state)) as edge:
                signed, meta, _ = await hub.next_update()
                pending_before = [e.sequence for e in edge.outbox.pending()]
                replay_windows = edge.replay_windows
                await hub.receipt(meta)
                await until(lambda: edge.outbox_stats.entries == 0, "the outbox to empty after the receipt")
                metrics = json.loads((await hub.next("metrics")).payload)
                live = await hub.next("status", lambda m: json.loads(m.payload).get("prediction") is not None)
            offline = await hub.status_where("offline")
        return locals()

    r = run(scenario())

    signed, meta = r["signed"], r["meta"]
    assert (meta.client, meta.round, meta.base_version) == ("wearer-00", 1, 1)
    assert meta.base_hash == model_hash(r["model_bytes"])
    assert meta.codec["scheme"] == "int8"
    assert meta.num_examples == r["replay_windows"] > 100  # one epoch over the whole replayed stream, not its start
    assert signed.public_key.hex() == public_hex(load_or_create_key(state / "device.key"))
    delta = UpdateCodec.for_weights(model.network.state_dict(), CodecConfig("int8")).decode(signed.tensors, meta.codec)
    assert any(np.abs(v).max() > 0 for v in delta.values())
    assert r["pending_before"] == [meta.sequence]
    assert r["metrics"]["model_version"] == 1 and r["metrics"]["num_examples"] > 0
    assert "accuracy" in r["metrics"]["metrics"]
    assert json.loads(r["live"].payload)["prediction"]["activity"] in DATASET.classes
    assert r["offline"]["outbox"]["entries"] == 0
    with Outbox(state) as outbox:
        assert outbox.pending() == []
        assert outbox.get("last_round") == b"1"


def test_a_receipt_the_hub_did_not_sign_leaves_the_update_in_the_outbox(mqtt_broker, tmp_path):
    fed, state = federation(), tmp_path / "edge"

    async def scenario() -> tuple[list[int], list[int]]:
        async with FakeHub(mqtt_broker, fed) as hub:
            await hub.publish_model(global_model(version=1), round_number=0)
            await hub.publish_task(Task(round=1, model_version=1, config=TASK_CONFIG))
            async with RunningEdge(edge_config(mqtt_broker, fed, state)) as edge:
                _, meta, _ = await hub.next_update()
                topic = hub.topics.receipt(meta.client)
                forged = [Receipt(meta.client, meta.sequence, "accepted", round=meta.round),  # unsigned
                          Receipt(meta.client, meta.sequence, "accepted", round=meta.round)
                          .signed(Ed25519PrivateKey.generate()),  # signed by someone else
                          replace(Receipt(meta.client, meta.sequence, "rejected", "stale", round=meta.round)
                                  .signed(hub.key), status="accepted"),  # the hub's, altered
                          Receipt(meta.client, meta.sequence, "accepted", round=meta.round, digest="0" * 64,
                                  federation=fed).signed(hub.key),  # the hub's, for other bytes
                          Receipt(meta.client, meta.sequence, "accepted", round=meta.round,
                                  digest=hub.digests[(meta.client, meta.sequence)],
                                  federation="another").signed(hub.key)]  # the hub's, of another federation
                for receipt in forged:
                    await hub.session.publish(topic, receipt.to_bytes())
                marker = Task(round=1, model_version=1, config=TASK_CONFIG, deadline=12345.0)
                await hub.publish_task(marker)  # after them on the same connection: handled after them
                await until(lambda: edge.task is not None and edge.task.deadline == marker.deadline, "the marker task")
                kept = [e.sequence for e in edge.outbox.pending()]
                await hub.receipt(meta)
                await until(lambda: edge.outbox_stats.entries == 0, "the outbox to empty after the hub's receipt")
                return kept, [e.sequence for e in edge.outbox.pending()]

    kept, after = run(scenario())
    assert kept != [] and after == []


def test_a_rejected_update_also_leaves_the_outbox_and_its_reason_is_logged(mqtt_broker, tmp_path, caplog):
    fed = federation()

    async def scenario() -> None:
        async with FakeHub(mqtt_broker, fed) as hub:
            await hub.publish_model(global_model(version=1))
            await hub.publish_task(Task(round=1, model_version=1, config=TASK_CONFIG))
            async with RunningEdge(edge_config(mqtt_broker, fed, tmp_path / "edge")) as edge:
                _, meta, _ = await hub.next_update()
                await hub.receipt(meta, status="rejected", reason="stale")
                await until(lambda: edge.outbox_stats.entries == 0, "the rejected update to leave the outbox")
                assert edge.counters["receipts_rejected"] == 1

    with caplog.at_level(logging.WARNING, logger="models.transport.sender"):
        run(scenario())

    assert any("rejected update" in r.getMessage() and "stale" in r.getMessage() for r in caplog.records)


def test_top_k_updates_keep_their_residual_for_error_feedback(mqtt_broker, tmp_path):
    fed, state = federation(), tmp_path / "edge"
    model = global_model(version=1)
    config = {**TASK_CONFIG, "quantize": "topk", "topk_fraction": 0.05}

    async def scenario() -> dict[str, Any]:
        async with FakeHub(mqtt_broker, fed) as hub:
            await hub.publish_model(model)
            await hub.publish_task(Task(round=1, model_version=1, config=config))
            async with RunningEdge(edge_config(mqtt_broker, fed, state)):
                signed, meta, _ = await hub.next_update()
        return locals()

    r = run(scenario())

    codec = UpdateCodec.for_weights(model.network.state_dict(), CodecConfig("topk", topk_fraction=0.05))
    delta = codec.decode(r["signed"].tensors, r["meta"].codec)
    assert sum(int(np.count_nonzero(v)) for v in delta.values()) <= r["meta"].codec["k"] == round(0.05 * codec.size)
    with Outbox(state) as outbox:
        residual = st_load(outbox.get("residual"))["residual"]
    assert residual.shape == (codec.size,) and np.abs(residual).max() > 0


def test_a_full_outbox_pauses_training_until_a_receipt_frees_it(mqtt_broker, tmp_path):
    fed = federation()

    async def scenario() -> dict[str, Any]:
        async with FakeHub(mqtt_broker, fed) as hub:
            await hub.publish_model(global_model(version=1))
            await hub.publish_task(Task(round=1, model_version=1, config=TASK_CONFIG))
            config = edge_config(mqtt_broker, fed, tmp_path / "edge", outbox_max_entries=1)
            async with RunningEdge(config) as edge:
                _, first, _ = await hub.next_update()
                await hub.publish_task(Task(round=2, model_version=1, config={**TASK_CONFIG, "min_new_windows": 0}))
                await until(lambda: edge.training_state == "paused: outbox full", "training to pause")
                await hub.receipt(first)
                _, second, _ = await hub.next_update()
        return locals()

    r = run(scenario())

    assert (r["first"].round, r["second"].round) == (1, 2)
    assert r["second"].sequence == r["first"].sequence + 1


# -- restarts ----------------------------------------------------------------------------------


def test_a_restarted_edge_redelivers_its_pending_update_and_does_not_train_that_round_again(mqtt_broker, tmp_path):
    fed, state = federation(), tmp_path / "edge"

    async def scenario() -> dict[str, Any]:
        async with FakeHub(mqtt_broker, fed) as hub:
            await hub.publish_model(global_model(version=1))
            await hub.publish_task(Task(round=1, model_version=1, config=TASK_CONFIG))
            async with RunningEdge(edge_config(mqtt_broker, fed, state)):
                _, first, first_bytes = await hub.next_update()
            await hub.status_where("offline")  # stopped after publishing, before any receipt

            async with RunningEdge(edge_config(mqtt_broker, fed, state)) as restarted:
                _, again, again_bytes = await hub.next_update()
                await hub.publish_task(Task(round=2, model_version=1, config={**TASK_CONFIG, "min_new_windows": 0}))
                later = []
                while not later or later[-1].round != 2:
                    later.append((await hub.next_update())[1])
                trained_windows = restarted.replay_windows
        return locals()

    r = run(scenario())

    first, again = r["first"], r["again"]
    assert (again.sequence, again.round) == (first.sequence, 1)
    assert r["again_bytes"] == r["first_bytes"]
    round_one = [m for m in r["later"] if m.round == 1]
    assert all(m.sequence == first.sequence for m in round_one)  # redeliveries only, never a new round-1 update
    assert r["later"][-1].sequence == first.sequence + 1
    assert r["trained_windows"] > 0  # the replay buffer came back from the checkpoint


def test_an_edge_stopped_during_a_fit_publishes_nothing_and_trains_that_round_after_restart(mqtt_broker, tmp_path):
    fed, state = federation(), tmp_path / "edge"
    slow = {**TASK_CONFIG, "epochs": 1000, "cpu_seconds": 1.0}  # a fit that runs for its whole CPU budget

    async def scenario() -> dict[str, Any]:
        async with FakeHub(mqtt_broker, fed) as hub:
            await hub.publish_model(global_model(version=1))
            await hub.publish_task(Task(round=1, model_version=1, config=slow))
            async with RunningEdge(edge_config(mqtt_broker, fed, state)) as edge:
                await until(lambda: edge.training_state == "training round 1", "the fit to start")
            with Outbox(state) as outbox:
                pending_after_stop, last_round = outbox.pending(), outbox.get("last_round")
            async with RunningEdge(edge_config(mqtt_broker, fed, state)):
                _, meta, _ = await hub.next_update()
        return locals()

    r = run(scenario())

    assert r["pending_after_stop"] == [] and r["last_round"] is None
    assert (r["meta"].round, r["meta"].sequence) == (1, 1)


# -- models -----------------------------------------------------------------------------------


def test_a_tampered_or_foreign_model_is_refused_and_the_previous_one_kept(mqtt_broker, tmp_path):
    fed, state = federation(), tmp_path / "edge"

    async def scenario() -> dict[str, Any]:
        async with FakeHub(mqtt_broker, fed) as hub:
            v1 = await hub.publish_model(global_model(version=1), round_number=0)
            async with RunningEdge(edge_config(mqtt_broker, fed, state)) as edge:
                await until(lambda: edge.model_version == 1, "model v1 to be accepted")
                tampered = bytearray(build_model(global_model(version=2, seed=1), 1, hub.key))
                tampered[len(tampered) // 2] ^= 0xFF
                await hub.publish_raw_model(bytes(tampered))
                await until(lambda: edge.counters["models_refused"] == 1, "the tampered model to be refused")
                await hub.publish_model(global_model(version=2, seed=1), 1, key=Ed25519PrivateKey.generate())
                await until(lambda: edge.counters["models_refused"] == 2, "the foreign model to be refused")
                await hub.publish_raw_model(build_model(global_model(version=2, seed=1), 1, hub.key,
                                                        federation="another-ward"))
                await until(lambda: edge.counters["models_refused"] == 3, "another federation's model to be refused")
                kept = edge.model_version
                stored_after_refusals = (state / "model.msg").read_bytes()
                v2 = await hub.publish_model(global_model(version=2, seed=1), round_number=1)
                await until(lambda: edge.model_version == 2, "the genuine model v2 to be accepted")
            pinned = (state / "hub.pub").read_text().strip()
            hub_key = public_hex(hub.key)
        return locals()

    r = run(scenario())

    assert r["kept"] == 1
    assert r["stored_after_refusals"] == r["v1"]
    assert (state / "model.msg").read_bytes() == r["v2"]
    assert r["pinned"] == r["hub_key"]


# -- many edges in one loop ----------------------------------------------------------------------


def test_run_edges_hosts_several_edges_in_one_loop_and_stops_them_cleanly(mqtt_broker, tmp_path):
    fed = federation()
    clients = DATASET.clients

    async def scenario() -> dict[str, Any]:
        async with FakeHub(mqtt_broker, fed) as hub:
            await hub.publish_model(global_model(version=1))
            await hub.publish_task(Task(round=1, model_version=1, config=TASK_CONFIG))
            stop = asyncio.Event()
            edges = [(edge_config(mqtt_broker, fed, tmp_path / c, client=c), DATASET.source(c)) for c in clients]
            running = asyncio.create_task(run_edges(edges, stop))
            senders: set[str] = set()
            while senders != set(clients):
                senders.add((await hub.next_update())[1].client)
            stop.set()
            failures = await asyncio.wait_for(running, WAIT_S)
            offline: set[str] = set()
            while offline != set(clients):
                body = json.loads((await hub.next("status")).payload)
                if body.get("state") == "offline":
                    offline.add(body["client"])
        return locals()

    r = run(scenario())

    assert r["senders"] == set(clients) == r["offline"]
    assert r["failures"] == {}


# -- the command -------------------------------------------------------------------------------


def edge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wearfl")
    add_edge_command(parser.add_subparsers(dest="command", required=True))
    return parser


def test_source_spec_names_the_client_after_the_last_slash_or_takes_the_client_id():
    assert resolve_source("sim:0/wearer-03", "gateway-7").client_id == "wearer-03"
    assert resolve_source("sim:0", "wearer-05").client_id == "wearer-05"
    with pytest.raises(ConfigError, match="no client 'nobody'"):
        resolve_source("sim:0/nobody", "gateway-7")
    with pytest.raises(ConfigError, match="names no client"):
        resolve_source("sim:0", "gateway-7")
    with pytest.raises(ConfigError):
        resolve_source("tape:0/wearer-03", "wearer-03")


def test_recordings_spec_with_a_folder_path(tmp_path):
    from edge_client.sources.recordings import write_recording

    folder = tmp_path / "ward"
    folder.mkdir()
    (folder / "dataset.toml").write_text("sampling_rate_hz = 50\n")
    t = np.arange(100) / 50.0
    write_recording(folder / "subject1.csv", t, acc_x=np.zeros(100), acc_y=np.zeros(100), acc_z=np.ones(100))

    assert resolve_source(f"recordings:{folder}/subject1", "gw").client_id == "subject1"
    assert resolve_source(f"recordings:{folder}", "subject1").client_id == "subject1"


def test_edge_command_fails_with_broker_unavailable_when_no_broker_listens(tmp_path):
    args = edge_parser().parse_args([
        "edge", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--federation", "f1", "--client-id", "wearer-00",
        "--source", "sim:0/wearer-00", "--state", str(tmp_path / "edge"), "--connect-timeout", "1",
    ])

    with pytest.raises(BrokerUnavailable):
        args.func(args)


def test_edge_command_rejects_a_bad_client_id_before_connecting(tmp_path):
    args = edge_parser().parse_args([
        "edge", "--broker", "mqtt://127.0.0.1:1", "--federation", "f1", "--client-id", "a/b",
        "--source", "sim:0/wearer-00", "--state", str(tmp_path / "edge"),
    ])

    with pytest.raises(ConfigError):
        args.func(args)


EDGE_MAIN = """
import argparse, sys
from edge_client.edge_command import add_edge_command
parser = argparse.ArgumentParser(prog="wearfl")
add_edge_command(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def test_sigterm_stops_the_edge_process_cleanly_with_its_outbox_intact(mqtt_broker, tmp_path):
    fed, state = federation(), tmp_path / "edge"

    async def scenario() -> dict[str, Any]:
        async with FakeHub(mqtt_broker, fed) as hub:
            await hub.publish_model(global_model(version=1))
            await hub.publish_task(Task(round=1, model_version=1, config=TASK_CONFIG))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", EDGE_MAIN, "edge", "--broker", url_of(mqtt_broker), "--federation", fed,
                "--client-id", "wearer-00", "--source", "sim:0/wearer-00", "--state", str(state),
                cwd=ROOT, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            try:
                _, meta, _ = await hub.next_update()
                proc.send_signal(signal.SIGTERM)
                _, stderr = await asyncio.wait_for(proc.communicate(), WAIT_S)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            offline = await hub.status_where("offline")
        return {"meta": meta, "code": proc.returncode, "stderr": stderr.decode(), "offline": offline}

    r = run(scenario())

    assert r["code"] == 0, r["stderr"]
    assert r["offline"]["reason"] == "stopped"
    with Outbox(state) as outbox:
        assert [e.sequence for e in outbox.pending()] == [r["meta"].sequence]


def test_a_model_whose_ledger_entry_rewrites_history_is_refused(mqtt_broker, tmp_path):
    fed, state = federation(), tmp_path / "edge"
    ledger = Ledger(tmp_path / "ledger.jsonl")
    models = {v: global_model(version=v, seed=v) for v in (1, 2)}
    digest = {v: hashlib.sha256(package_bytes(m)).hexdigest() for v, m in models.items()}
    e1 = ledger.append(1, 0, {"model.safetensors": digest[1]}, [], time=1.0)
    honest = ledger.append(2, 1, {"model.safetensors": digest[2]}, ["a" * 64], time=2.0)
    forged = {**honest, "prev": "f" * 64}  # a hub rewriting v1's entry after this edge adopted it
    forged["hash"] = entry_hash(forged)

    async def scenario() -> dict[str, Any]:
        async with FakeHub(mqtt_broker, fed) as hub:
            await hub.publish_raw_model(build_model(models[1], 0, hub.key, e1, fed))
            async with RunningEdge(edge_config(mqtt_broker, fed, state)) as edge:
                await until(lambda: edge.model_version == 1, "model v1 to be accepted")
                await hub.publish_raw_model(build_model(models[2], 1, hub.key, forged, fed))
                await until(lambda: edge.counters["models_refused"] == 1, "the forged history to be refused")
                kept = edge.model_version
                await hub.publish_raw_model(build_model(models[2], 1, hub.key, honest, fed))
                await until(lambda: edge.model_version == 2, "the model with the true entry to be accepted")
            head = json.loads((state / "ledger.head").read_text())
        return locals()

    r = run(scenario())
    assert r["kept"] == 1
    assert r["head"] == {"version": 2, "hash": honest["hash"]}


def test_an_edge_acts_only_on_tasks_its_hub_signed_for_its_federation_within_bounds(mqtt_broker, tmp_path):
    fed, state = federation(), tmp_path / "edge"

    async def scenario() -> tuple[int, UpdateMeta, dict[str, int]]:
        async with FakeHub(mqtt_broker, fed) as hub:
            await hub.publish_model(global_model(version=1), round_number=0)
            async with RunningEdge(edge_config(mqtt_broker, fed, state)) as edge:
                await until(lambda: edge.model_version == 1, "model v1")
                other = Ed25519PrivateKey.generate()
                forged = [
                    Task(10 ** 12, 1, TASK_CONFIG).to_bytes(),  # unsigned
                    Task(5, 1, TASK_CONFIG, federation=fed).signed(other).to_bytes(),  # another key
                    Task(5, 1, TASK_CONFIG, federation="elsewhere").signed(hub.key).to_bytes(),  # another federation
                    Task(5, 1, {**TASK_CONFIG, "lr": -1.0}, federation=fed).signed(hub.key).to_bytes(),  # ascent
                    Task(5, 1, {**TASK_CONFIG, "seed": -1}, federation=fed).signed(hub.key).to_bytes(),
                    Task(5, 0, TASK_CONFIG, federation=fed).signed(hub.key).to_bytes(),  # an older model
                    b'{"round": 1180591620717411303424, "model_version": 1}',
                ]
                for payload in forged:
                    await hub.session.publish(hub.topics.task, payload, retain=True)
                await until(lambda: edge.counters.get("tasks_refused", 0) == len(forged), "every forged task refused")
                refused_while_idle = edge.task
                await hub.publish_task(Task(round=1, model_version=1, config=TASK_CONFIG))
                _, meta, _ = await hub.next_update()
                return refused_while_idle, meta, dict(edge.counters)

    task, meta, counters = run(scenario())
    assert task is None and (meta.round, meta.sequence) == (1, 1) and counters["tasks_refused"] == 7


def test_a_stop_interrupts_a_long_fit_instead_of_waiting_for_its_cpu_budget(mqtt_broker, tmp_path):
    fed, state = federation(), tmp_path / "edge"
    # a fit allowed ten minutes of CPU: the stop must not wait for it (RunningEdge gives the stop WAIT_S)
    policy = FineTunePolicy(train=TrainConfig(epochs=1000, batch_size=8), cpu_seconds=600.0)

    async def scenario() -> tuple[str, list[Any]]:
        async with FakeHub(mqtt_broker, fed) as hub:
            await hub.publish_model(global_model(version=1))
            await hub.publish_task(Task(round=1, model_version=1, config={"quantize": "int8"}))
            async with RunningEdge(edge_config(mqtt_broker, fed, state, policy=policy)) as edge:
                await until(lambda: edge.training_state == "training round 1", "the fit to start")
                state_then = edge.training_state
        with Outbox(state) as outbox:
            return state_then, outbox.pending()

    training, pending = run(scenario())
    assert training == "training round 1" and pending == []


def test_a_site_hub_granted_by_the_hub_signs_tasks_and_receipts_while_models_stay_the_hubs(mqtt_broker, tmp_path):
    """A federation of sites: the edge pins the consortium's key (models), and believes tasks and receipts
    signed by a site hub's key once the consortium's grant for that key arrives, in whichever order."""
    from models.protocol.messages import Grant

    fed, state = federation(), tmp_path / "edge"
    site = Ed25519PrivateKey.generate()

    async def scenario() -> tuple[Any, ...]:
        async with FakeHub(mqtt_broker, fed) as hub:
            await hub.publish_model(global_model(version=1), round_number=0)
            async with RunningEdge(edge_config(mqtt_broker, fed, state)) as edge:
                await until(lambda: edge.model_version == 1, "model v1")
                hub_task = Task(1, 1, TASK_CONFIG, clients=("site-a",), federation=fed).signed(hub.key)
                task = Task(1, 1, TASK_CONFIG, federation=fed, upstream=hub_task.to_bytes().decode()).signed(site)
                await hub.session.publish(hub.topics.task, task.to_bytes(), retain=True)
                await until(lambda: edge.counters.get("tasks_awaiting_grant", 0) == 1, "the site's task held")
                before = edge.task
                grant = Grant(fed, "site-a", site.public_key().public_bytes_raw().hex()).signed(hub.key)
                await hub.session.publish(hub.topics.grant, grant.to_bytes(), retain=True)
                _, meta, payload = await hub.next_update()  # the task, now believed, is trained
                receipt = Receipt(meta.client, meta.sequence, "accepted", round=1,
                                  digest=hashlib.sha256(payload).hexdigest(), federation=fed).signed(site)
                await hub.session.publish(hub.topics.receipt(meta.client), receipt.to_bytes())
                await until(lambda: edge.counters["receipts_accepted"] == 1, "the site's receipt")
                await hub.session.publish(hub.topics.grant, b"", retain=True)  # tidy the shared broker
                return before, meta, edge.outbox_stats.entries, edge.counters.get("tasks_refused", 0)

    before, meta, pending, refused = run(scenario())
    assert before is None and (meta.round, pending) == (1, 0)
    assert refused == 0  # a site's task before its grant is held, not refused


def test_only_a_grant_the_pinned_key_signed_for_this_federation_is_believed(tmp_path):
    from edge_client.adoption import ModelAdoption
    from edge_client.shared import Wakes
    from models.protocol.messages import Grant
    from models.transport.mqtt import Message

    hub, site, stranger = (Ed25519PrivateKey.generate() for _ in range(3))
    config = EdgeConfig("mqtt://127.0.0.1:1", "ward-7", "gw-1", tmp_path)
    adoption = ModelAdoption(config, None, Wakes(), {})
    key = site.public_key().public_bytes_raw()

    def offer(payload: bytes) -> list[bytes]:
        asyncio.run(adoption.on_grant(Message("wearfl/v1/ward-7/grant", payload, 1, True, 1)))
        return adoption.signers()

    good = Grant("ward-7", "site-a", key.hex()).signed(hub).to_bytes()
    assert offer(good) == []  # nothing is believed before a hub key is pinned
    adoption.pinned = hub.public_key().public_bytes_raw()
    adoption._check_grant()  # as on pinning
    assert adoption.signers() == [adoption.pinned, key]
    assert offer(Grant("ward-7", "site-a", key.hex()).signed(stranger).to_bytes()) == [adoption.pinned]
    assert offer(Grant("ward-9", "site-a", key.hex()).signed(hub).to_bytes()) == [adoption.pinned]
    assert offer(b'{"federation": "ward-7", "site": "a", "key": "00"}') == [adoption.pinned]
    assert offer(good) == [adoption.pinned, key]
    assert offer(b"") == [adoption.pinned]  # a withdrawn grant


@pytest.mark.parametrize(("change", "refused"), [
    ({}, None),
    ({"upstream": None}, "carries no task of the hub's"),
    ({"config": {**TASK_CONFIG, "lr": 0.5}}, "changes the hub's round, model or settings"),
    ({"round": 2}, "changes the hub's round"),
    ({"deadline": 2e9}, "deadline is later"),
    ({"hub_clients": ("site-b",)}, "did not select site 'site-a'"),
    ({"hub_signer": "site"}, "not the hub's for this federation"),
])
def test_a_site_task_must_run_the_hubs_task_unchanged(tmp_path, caplog, change, refused):
    from types import SimpleNamespace

    from edge_client.shared import Wakes
    from edge_client.training import RoundTrainer
    from models.protocol.messages import Grant

    hub, site = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    hub_pub, site_pub = (k.public_key().public_bytes_raw() for k in (hub, site))
    grant = Grant("ward-7", "site-a", site_pub.hex()).signed(hub)
    hub_task = Task(3, 1, TASK_CONFIG, deadline=1e9, clients=change.pop("hub_clients", ("site-a", "site-b")),
                    federation="ward-7").signed(site if change.pop("hub_signer", None) else hub)
    fields = {"round": 3, "model_version": 1, "config": TASK_CONFIG, "deadline": 1e9 - 60, "clients": ("gw-1",),
              "federation": "ward-7", "upstream": hub_task.to_bytes().decode(), **change}
    task = Task(**fields).signed(site)
    models = SimpleNamespace(pinned=hub_pub, granted=grant, model=None, signers=lambda: [hub_pub, site_pub])
    counters: dict[str, int] = {}
    trainer = RoundTrainer(EdgeConfig("mqtt://127.0.0.1:1", "ward-7", "gw-1", tmp_path), None, models, None, None,
                           None, Wakes(), counters)
    with caplog.at_level(logging.WARNING, logger="edge_client.training"):
        accepted = trainer._accepted_task(task.to_bytes(), models.signers())
    if refused is None:
        assert accepted == task and not counters
    else:
        assert accepted is None and counters["tasks_refused"] == 1 and refused in caplog.text
