"""Secure aggregation over MQTT: a real hub and real edges run SecAgg+ through Mosquitto.

The hub must end the round with the mean of the edges' deltas (to the fixed-point step)
while it never holds one of them: nothing reaches ``update/``, nothing is stored.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_client.evaluation import task_spec
from edge_client.finetune import FineTunePolicy
from edge_client.runtime import EdgeClient, EdgeConfig
from edge_client.secure_aggregation import round_config_of
from edge_client.sources.simulator import SimulatedDataset
from hub.registry import ModelRegistry
from hub.service import HubConfig, HubService
from hub.store import HubStore
from models import Model, TrainConfig
from models.errors import ConfigError
from models.protocol.identity import load_keyring, load_or_create_key, public_hex
from models.protocol.messages import Task
from models.protocol.secagg import ClientStage, KeyBundle, SecAggClient
from models.protocol.topics import Topics
from models.transport.mqtt import BrokerAddress, MqttSession

DATASET = SimulatedDataset(seed=0, wearers=4, minutes=3, test_wearers=0)
CLIENTS = ("wearer-00", "wearer-01", "wearer-02", "wearer-03")
DROPOUT = "wearer-99"  # shares its keys, then never sends its masked input
WAIT_S = 60.0


def keyring_for(tmp_path: Path) -> Path:
    lines = [f"{c} {public_hex(load_or_create_key(tmp_path / c / 'device.key'))}" for c in (*CLIENTS, DROPOUT)]
    ring = tmp_path / "keyring"
    ring.write_text("\n".join(lines) + "\n")
    return ring


class DroppingClient:
    """A device that is online, advertises and shares its keys, then goes silent (a dropout after key sharing)."""

    def __init__(self, broker: Any, topics: Topics, ring: Path, key_path: Path) -> None:
        self.topics, self.ring, self.key = topics, ring, load_or_create_key(key_path)
        self.session = MqttSession(BrokerAddress.parse(broker.url), f"dropout-{topics.federation}", clean_start=True,
                                   protocol="5")
        self.shared = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        await self.session.connect()
        await self.session.subscribe(self.topics.task)
        await self.session.subscribe(self.topics.secagg_down(DROPOUT))
        await self.session.publish(self.topics.status(DROPOUT), json.dumps({"state": "online", "client": DROPOUT})
                                   .encode(), retain=True)
        reader = asyncio.create_task(self._read())
        await stop.wait()
        reader.cancel()
        await self.session.publish(self.topics.status(DROPOUT), b"", retain=True)
        await self.session.disconnect()

    async def _read(self) -> None:
        client = None
        async for message in self.session.messages():
            if message.topic == self.topics.task and message.payload:
                config = round_config_of(Task.from_bytes(message.payload).config)
                if config is not None and DROPOUT in config.roster and client is None:
                    client = SecAggClient(DROPOUT, config, self.key, load_keyring(self.ring))
                    await self.session.publish(self.topics.secagg_up(DROPOUT), client.advertise_keys().to_bytes())
            elif client is not None and client.stage is ClientStage.ADVERTISED:
                reply = client.share_keys(KeyBundle.from_bytes(message.payload)).to_bytes()
                await self.session.publish(self.topics.secagg_up(DROPOUT), reply)
                self.shared.set()  # and nothing more: its masked input never comes


def known_deltas(w0: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return {c: {k: (0.002 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in w0.items()}
            for c in CLIENTS}


def run_secure_round(broker: Any, topic_prefix: str, tmp_path: Path, deltas: Any, dropout: bool = False,
                     **hub_options: Any) -> tuple[HubService, list[EdgeClient], DroppingClient]:
    """One secure round: a real hub, four real edges sending ``deltas``, maybe a client that drops out."""
    ring = keyring_for(tmp_path)
    federation = "secure-" + topic_prefix.split("/")[1]
    config = HubConfig(broker=broker.url, federation=federation, state_dir=tmp_path / "hub",
                       topic_prefix=topic_prefix, min_clients=5 if dropout else 4, round_timeout_s=30, rounds=1,
                       keyring=ring, secure_aggregation=True, secagg_stage_timeout_s=8 if dropout else 20,
                       task_config={"quantize": "none", "epochs": 1}, **hub_options)
    hub = HubService(config, Model(task_spec("activity", DATASET), seed=0))

    def hook_for(client: str) -> Any:
        async def send_known_delta(round_number: int, base: dict[str, np.ndarray], trained: Any) -> Any:
            return {k: base[k] + deltas[client][k] for k in base}
        return send_known_delta

    policy = FineTunePolicy(train=TrainConfig(epochs=1, batch_size=32))
    edges = []
    for c in CLIENTS:
        edge = EdgeClient(EdgeConfig(broker=broker.url, federation=federation, client_id=c,
                                     state_dir=tmp_path / c, policy=policy, topic_prefix=topic_prefix,
                                     peer_keyring=ring, protocol="5"), DATASET.source(c))
        edge.weights_hook = hook_for(c)
        edges.append(edge)
    dropping = DroppingClient(broker, Topics(federation, topic_prefix), ring, tmp_path / DROPOUT / "device.key")

    async def scenario() -> None:
        stop = asyncio.Event()
        hub_task = asyncio.create_task(hub.run())
        await asyncio.wait_for(hub.ready.wait(), WAIT_S)
        runs = [asyncio.create_task(e.run(stop)) for e in edges]
        if dropout:
            runs.append(asyncio.create_task(dropping.run(stop)))
        try:
            await asyncio.wait_for(hub_task, WAIT_S)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), WAIT_S)

    asyncio.run(asyncio.wait_for(scenario(), 150))
    return hub, edges, dropping


def needs_mosquitto(broker: Any) -> None:
    if broker.kind != "mosquitto":
        pytest.skip("needs MQTT 5 Mosquitto (shared subscriptions)")


@pytest.mark.parametrize("dropout", [False, True])
def test_a_secure_round_over_mqtt_gives_the_mean_and_stores_no_update(mqtt_broker, topic_prefix, tmp_path, dropout):
    needs_mosquitto(mqtt_broker)
    w0 = Model(task_spec("activity", DATASET), seed=0).network.state_dict()
    deltas = known_deltas(w0)
    hub, edges, dropping = run_secure_round(mqtt_broker, topic_prefix, tmp_path, deltas, dropout,
                                            secagg_range=1.0, secagg_value_bits=16)

    latest = ModelRegistry(tmp_path / "hub" / "models").latest()
    assert latest is not None and latest.version == 1
    got = latest.load().network.state_dict()
    step = 1.0 / (2 ** 15 - 1)  # the common fixed-point grid at range 1.0, 16 value bits
    for k in w0:
        want = w0[k] + np.mean([deltas[c][k] for c in CLIENTS], axis=0)
        np.testing.assert_allclose(got[k], want, atol=step)
    assert hub.summaries[0].participants == 4  # with a dropout: the four that sent masked inputs
    assert dropping.shared.is_set() == dropout
    with HubStore(tmp_path / "hub", create=False) as store:
        status = store.status()
        assert status["updates_accepted"] == 0  # the hub never held an individual update
    assert all(e.counters.get("secure_rounds") == 1 for e in edges)


@pytest.mark.parametrize("distributed", [0, 1])
def test_dp_noise_comes_from_the_hub_or_from_the_clients_shares(mqtt_broker, topic_prefix, tmp_path, distributed):
    needs_mosquitto(mqtt_broker)
    w0 = Model(task_spec("activity", DATASET), seed=0).network.state_dict()
    deltas = known_deltas(w0)
    z, c = 0.5, 1.0
    hub, _, _ = run_secure_round(mqtt_broker, topic_prefix, tmp_path, deltas, strategy="dpfedavg",
                                 strategy_args={"noise": z, "dp_clip": c, "distributed": distributed, "seed": 1})
    got = ModelRegistry(tmp_path / "hub" / "models").latest().load().network.state_dict()
    keys = [k for k in w0 if not k.endswith("running_var")]  # variances are kept >= 0, which biases them
    residual = np.concatenate([(got[k] - w0[k] - np.mean([deltas[u][k] for u in CLIENTS], axis=0)).ravel()
                               for k in keys])
    m = len(CLIENTS)
    # distributed: 4 clients all-to-all, 3 neighbours each, threshold 2, so each adds std z*c/sqrt(2) to the sum;
    # central: the hub's own noise on the average
    want = math.sqrt(m) * z * c / math.sqrt(2) / m if distributed else z * c / m
    assert abs(float(residual.std()) / want - 1) < 0.05, (float(residual.std()), want)
    assert hub.privacy is not None and hub.status()["privacy"]["rounds"] == 1


def test_secure_aggregation_needs_a_keyring_and_a_mean_based_rule(tmp_path):
    with pytest.raises(ConfigError, match="keyring"):
        HubConfig("mqtt://127.0.0.1:1883", "fed", tmp_path, secure_aggregation=True)
    with pytest.raises(ConfigError, match="only a sum"):
        HubConfig("mqtt://127.0.0.1:1883", "fed", tmp_path, secure_aggregation=True, keyring=tmp_path / "k",
                  strategy="fedmedian")


def test_a_secure_round_of_fewer_than_three_clients_is_refused_at_start(tmp_path):
    """Pairwise masks hide each client among at least two others: a hub that could close a secure round with
    two would wait for a round that never starts."""
    with pytest.raises(ConfigError, match="at least 3 clients"):
        HubConfig("mqtt://127.0.0.1:1883", "fed", tmp_path, secure_aggregation=True, keyring=tmp_path / "k",
                  min_clients=2)
