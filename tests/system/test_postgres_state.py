"""A hub whose whole state is in PostgreSQL (a real server): rounds, registry, ledger, key; restart resumes."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from federating import run_until_hub_ends

from edge_client.evaluation import task_spec
from edge_client.finetune import FineTunePolicy
from edge_client.runtime import EdgeClient, EdgeConfig
from edge_client.sources.simulator import SimulatedDataset
from hub.blobs import TableBlobs
from hub.ledger import verify
from hub.registry import ModelRegistry
from hub.service import HubConfig, HubService
from models import Model, TrainConfig
from wearfl.cli import main

pytestmark = pytest.mark.slow

DATASET = SimulatedDataset(seed=4, wearers=4, minutes=3, test_wearers=0)
CLIENTS = DATASET.clients[:3]


async def federate(broker, state: str, federation: str, rounds: int, tmp_path) -> HubService:
    hub = HubService(HubConfig(broker=broker.url, federation=federation, state_dir=state, min_clients=3,
                               round_timeout_s=60, rounds=rounds, protocol=broker.protocol,
                               task_config={"epochs": 1, "lr": 3e-3}),
                     initial_model=Model(task_spec("activity", DATASET), seed=0))
    policy = FineTunePolicy(TrainConfig(), min_new_windows=0)
    edges = [EdgeClient(EdgeConfig(broker=broker.url, federation=federation, client_id=c,
                                   state_dir=tmp_path / "edges" / c, policy=policy, seed=i, protocol=broker.protocol),
                        DATASET.source(c)) for i, c in enumerate(CLIENTS)]
    await run_until_hub_ends(hub, edges, 180)
    return hub


def test_a_hub_on_postgresql_runs_rounds_and_a_restart_resumes_from_the_database(mqtt_broker, postgres_url,
                                                                                  tmp_path, capsys):
    federation = f"pg-{uuid.uuid4().hex[:8]}"
    first = asyncio.run(federate(mqtt_broker, postgres_url, federation, 2, tmp_path))
    key = first.config.signing_key()
    second = asyncio.run(federate(mqtt_broker, postgres_url, federation, 3, tmp_path))
    assert second.config.signing_key().public_key().public_bytes_raw() == key.public_key().public_bytes_raw()

    status = second.status()
    assert status["rounds_completed"] == 3 and status["model_version"] == 3
    assert status["updates_accepted"] == 9 == sum(c["accepted"] for c in status["clients"].values())
    registry = ModelRegistry(TableBlobs(postgres_url, "models"))
    assert registry.versions() == [0, 1, 2, 3] and registry.latest().load().version == 3
    assert registry.latest().path is None  # nothing on disk
    ledger = verify(postgres_url)
    assert (ledger.entries, ledger.last_version) == (4, 3)

    assert main(["status", "--state", postgres_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["updates_accepted"] == 9
    assert main(["ledger", "verify", "--state", postgres_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "entries": 4, "head": ledger.head, "last_version": 3}
    assert not any((tmp_path / name).exists() for name in ("hub.db", "models", "ledger.jsonl", "keys"))


def test_a_hub_of_another_federation_is_refused_by_the_database(postgres_url, capsys):
    from hub.store import HubStore

    with HubStore(postgres_url) as store:
        store.claim("ward-7")
    code = main(["hub", "--broker", "mqtt://127.0.0.1:1", "--federation", "ward-8", "--state", postgres_url,
                 "--task", "activity"])
    err = capsys.readouterr().err
    assert code == 2 and "belongs to federation 'ward-7', not 'ward-8'" in err and "Traceback" not in err
