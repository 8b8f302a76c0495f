"""A federation of sites through three real Mosquitto brokers: two site hubs under a consortium hub."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from provisioned import needs_mosquitto

from edge_client.evaluation import task_spec
from edge_client.finetune import FineTunePolicy
from edge_client.runtime import EdgeClient, EdgeConfig, run_edges
from edge_client.sources.simulator import SimulatedDataset
from hub.service import HubConfig, HubService
from models import Model, TrainConfig
from models.protocol.identity import load_or_create_key, public_hex
from models.protocol.messages import Grant, build_model
from models.protocol.topics import Topics
from models.transport.mqtt import BrokerAddress, MqttSession
from wearfl.broker import MosquittoBroker

pytestmark = pytest.mark.slow

DATASET = SimulatedDataset(seed=5, wearers=6, minutes=3, test_wearers=1)
SITES = {"site-a": DATASET.train_clients[:2], "site-b": DATASET.train_clients[2:4]}


def provision(tmp_path: Path, federation: str) -> str:
    """Site keys in the consortium's keyring, each site's grant in its state folder; the consortium's key."""
    consortium = load_or_create_key(tmp_path / "consortium" / "keys" / "hub.key")
    lines = []
    for site in SITES:
        key = load_or_create_key(tmp_path / site / "keys" / "hub.key")
        lines.append(f"{site} {public_hex(key)}\n")
        grant = Grant(federation, site, public_hex(key)).signed(consortium)
        (tmp_path / site / "upstream").mkdir(parents=True)
        (tmp_path / site / "upstream" / "grant.json").write_bytes(grant.to_bytes())
    (tmp_path / "sites.keyring").write_text("".join(lines))
    return public_hex(consortium)


async def forge_a_model(tmp_path: Path, broker: MosquittoBroker, federation: str) -> None:
    """Publish, retained on a site's broker, a newer model that the site hub's own key signed."""
    site_key = load_or_create_key(tmp_path / "site-a" / "keys" / "hub.key")
    forged = build_model(Model(task_spec("activity", DATASET), seed=9, version=99), 99, site_key, None, federation)
    session = MqttSession(BrokerAddress.parse(broker.url), "forger")
    await session.connect()
    await session.publish(Topics(federation).model, forged, qos=1, retain=True)
    await session.disconnect()
    await asyncio.sleep(1.5)


async def federate(tmp_path: Path, brokers: dict[str, MosquittoBroker], rounds: int,
                   forge: bool = False) -> tuple[dict[str, HubService], list[EdgeClient]]:
    federation = f"sites-{uuid.uuid4().hex[:8]}"
    consortium_pub = provision(tmp_path, federation)
    spec = task_spec("activity", DATASET)
    hubs = {"consortium": HubService(
        HubConfig(broker=brokers["consortium"].url, federation=federation, state_dir=tmp_path / "consortium",
                  min_clients=2, clients_per_round=2, round_timeout_s=60, rounds=rounds,
                  keyring=tmp_path / "sites.keyring", task_config={"epochs": 1, "lr": 3e-3}),
        initial_model=Model(spec, seed=0))}
    edges = []
    policy = FineTunePolicy(TrainConfig(), min_new_windows=0)
    for site, clients in SITES.items():
        hubs[site] = HubService(HubConfig(
            broker=brokers[site].url, federation=federation, state_dir=tmp_path / site, min_clients=2,
            round_timeout_s=60, upstream=brokers["consortium"].url, site_id=site))
        for i, client in enumerate(clients):
            edges.append(EdgeClient(EdgeConfig(
                broker=brokers[site].url, federation=federation, client_id=client,
                state_dir=tmp_path / "edges" / client, policy=policy, seed=i, hub_key=consortium_pub),
                DATASET.source(client)))
    stop = asyncio.Event()
    running = [asyncio.create_task(hubs[site].run(stop)) for site in SITES]
    running.append(asyncio.create_task(run_edges(edges, stop)))
    try:
        await asyncio.wait_for(hubs["consortium"].run(), 240)
        await asyncio.sleep(1.0)  # the sites take the final model
        if forge:
            await forge_a_model(tmp_path, brokers["site-a"], federation)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*running), 60)
    return hubs, edges


@pytest.fixture
def brokers(tmp_path):
    needs_mosquitto()
    started = {name: MosquittoBroker(workdir=tmp_path / f"mosquitto-{name}") for name in ("consortium", *SITES)}
    for broker in started.values():
        broker.start()
    yield started
    for broker in started.values():
        broker.stop()


def test_two_sites_run_three_consortium_rounds_and_gateways_refuse_a_model_the_site_forged(tmp_path, brokers):
    hubs, edges = asyncio.run(federate(tmp_path, brokers, rounds=3, forge=True))
    consortium = hubs["consortium"].status()
    assert consortium["rounds_completed"] == 3
    assert consortium["updates_accepted"] == 6 == sum(c["accepted"] for c in consortium["clients"].values())
    assert set(consortium["clients"]) == set(SITES)
    for site in SITES:
        status = hubs[site].status()
        assert status["updates_accepted"] == 6 == sum(c["accepted"] for c in status["clients"].values())
        assert status["upstream"]["consortium_version"] == consortium["model_version"] == 3
        assert status["upstream"]["partial"]["state"] == "acknowledged"
    site_a = [e for e in edges if e.client_id in SITES["site-a"]]
    assert all(e.model_version == 3 and e.counters["models_refused"] >= 1 for e in site_a)  # not v99
