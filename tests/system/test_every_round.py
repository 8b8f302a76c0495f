"""A gateway answers every round with the default settings, whatever its source.

Replayed sources (the simulator, a recording) are read to their end in seconds; after the
first round no new windows can come. With the default ``min_new_windows`` (16) an edge used
to wait for them forever and the federation stopped after round 1. Now it waits for fresh
data part of the way to the round's deadline, then trains on its replay buffer; an edge that
cannot take part declines, the hub counts it and does not wait for it.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from federating import run_until_hub_ends
from waiting import until

from edge_client.evaluation import task_spec
from edge_client.finetune import FineTunePolicy
from edge_client.runtime import EdgeClient, EdgeConfig, run_edges
from edge_client.sources.recorder import record_source
from edge_client.sources.recordings import RecordingsDataset
from edge_client.sources.simulator import SimulatedDataset
from hub.service import HubConfig, HubService
from models import Model
from models.protocol.identity import load_or_create_key, public_hex

pytestmark = pytest.mark.slow  # the quick loop is `pytest -m "not slow"`

DATASET = SimulatedDataset(seed=5, wearers=3, minutes=3, test_wearers=0)


def recording_of(client: str, folder) -> RecordingsDataset:
    """The simulated wearer's stream written in the recording format (`wearfl record`): a ``recordings:`` source."""
    record_source(DATASET.source(client), folder)
    return RecordingsDataset(folder)


async def _federate(broker, tmp_path, decline_one: bool) -> tuple[HubService, list[EdgeClient]]:
    federation = f"every-{uuid.uuid4().hex[:10]}"
    prefix = f"wearfl-test/{uuid.uuid4().hex[:8]}"
    spec = task_spec("activity", DATASET)
    a, b, c = DATASET.train_clients[:3]
    # enrolled devices: a decliner never sends an update, so only a keyring makes it a member the hub expects
    keyring = tmp_path / "keyring"
    keyring.write_text("".join(f"{client} {public_hex(load_or_create_key(tmp_path / client / 'device.key'))}\n"
                               for client in (a, b, c)))
    hub = HubService(HubConfig(broker=broker.url, federation=federation, state_dir=tmp_path / "hub",
                               min_clients=2, round_timeout_s=8, rounds=3, protocol=broker.protocol,
                               topic_prefix=prefix, keyring=keyring), initial_model=Model(spec, seed=0))
    sources = {a: DATASET.source(a), b: recording_of(b, tmp_path / "rec").source(b)}
    if decline_one:
        sources[c] = DATASET.source(c)

    def config(client: str) -> EdgeConfig:
        hooks = (lambda: "battery at 12% (< 30%) and not charging",) if client == c else ()
        return EdgeConfig(broker=broker.url, federation=federation, client_id=client, protocol=broker.protocol,
                          state_dir=tmp_path / client, topic_prefix=prefix, policy=FineTunePolicy(), hooks=hooks)

    edges = [EdgeClient(config(client), source) for client, source in sources.items()]
    await run_until_hub_ends(hub, edges, 180)
    return hub, edges


def test_replayed_sources_take_part_in_every_round_with_the_default_settings(mqtt_broker, tmp_path):
    hub, edges = asyncio.run(_federate(mqtt_broker, tmp_path, decline_one=False))

    status = hub.status()
    assert status["rounds_completed"] == 3
    assert {c: s["accepted"] for c, s in status["clients"].items()} == {e.client_id: 3 for e in edges}
    assert status["updates_accepted"] == 6
    assert all(e.counters["receipts_accepted"] == 3 for e in edges)


def test_an_edge_that_cannot_train_declines_and_the_hub_counts_it_without_waiting(mqtt_broker, tmp_path):
    hub, edges = asyncio.run(_federate(mqtt_broker, tmp_path, decline_one=True))

    status = hub.status()
    decliner = edges[-1]
    assert status["rounds_completed"] == 3
    assert status["declined"] == {"resources": 3}
    assert status["clients"][decliner.client_id] == {"accepted": 0, "last_sequence": None, "last_seen": None,
                                                     "rejected": 0, "declined": 3}
    assert decliner.counters["rounds_declined"] == 3
    assert all(s["accepted"] == 3 for c, s in status["clients"].items() if c != decliner.client_id)


def test_six_edges_with_default_settings_go_on_after_the_broker_is_killed_mid_round(tmp_path):
    from wearfl.broker import MosquittoBroker, mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("needs the mosquitto binary (apt-get install mosquitto)")
    broker = MosquittoBroker(workdir=tmp_path / "mosquitto", persistence=True)
    broker.start()
    try:
        asyncio.run(_six_edges_through_a_broker_kill(broker, tmp_path))
    finally:
        broker.stop()


async def _six_edges_through_a_broker_kill(broker, tmp_path) -> None:
    dataset = SimulatedDataset(seed=7, wearers=6, minutes=3, test_wearers=0)
    federation, prefix = f"kill-{uuid.uuid4().hex[:10]}", f"wearfl-test/{uuid.uuid4().hex[:8]}"
    hub = HubService(HubConfig(broker=broker.url, federation=federation, state_dir=tmp_path / "hub", min_clients=6,
                               round_timeout_s=10, rounds=3, topic_prefix=prefix),
                     initial_model=Model(task_spec("activity", dataset), seed=0))
    edges = [EdgeClient(EdgeConfig(broker=broker.url, federation=federation, client_id=c, state_dir=tmp_path / c,
                                   topic_prefix=prefix, resend_interval_s=5.0), dataset.source(c))
             for c in dataset.train_clients]
    stop = asyncio.Event()
    running = asyncio.create_task(run_edges(edges, stop))
    hub_run = asyncio.create_task(hub.run())
    try:
        # round 1 closed: round 2 is open, its edges waiting for fresh windows or training
        await until(lambda: hub.summaries or hub_run.done(), "round 1 to close", 120)
        await asyncio.to_thread(broker.kill)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(broker.restart)
        await asyncio.wait_for(hub_run, 240)
    finally:
        stop.set()
        errors = await asyncio.wait_for(running, 60)
    assert not errors

    status = hub.status()
    assert status["rounds_completed"] == 3
    assert status["updates_accepted"] == 18 == sum(c["accepted"] for c in status["clients"].values())
    assert all(c["accepted"] == 3 for c in status["clients"].values())
