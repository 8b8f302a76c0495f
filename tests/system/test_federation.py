"""End-to-end federation through a real Mosquitto: a hub and 8 edges in one event loop."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
from federating import run_until_hub_ends
from safetensors.numpy import load as st_load

from edge_client.evaluation import load_clients, summarize, task_spec
from edge_client.finetune import FineTunePolicy
from edge_client.runtime import EdgeClient, EdgeConfig
from edge_client.sources.simulator import SimulatedDataset
from hub.service import HubConfig, HubService
from models import Model, TrainConfig

pytestmark = pytest.mark.slow  # the quick loop is `pytest -m "not slow"`

DATASET = SimulatedDataset(seed=3, wearers=10, minutes=4, test_wearers=2)


async def _federate(broker, tmp_path, quantize: str, rounds: int = 3) -> tuple[HubService, list[dict]]:
    spec = task_spec("activity", DATASET)
    federation = f"e2e-{uuid.uuid4().hex[:10]}"
    prefix = f"wearfl-test/{uuid.uuid4().hex[:8]}"
    hub = HubService(
        HubConfig(broker=broker.url, federation=federation, state_dir=tmp_path / "hub", min_clients=8,
                  clients_per_round=8, round_timeout_s=120, rounds=rounds, protocol=broker.protocol,
                  topic_prefix=prefix, task_config={"quantize": quantize, "epochs": 2, "lr": 3e-3}),
        initial_model=Model(spec, seed=0),
    )
    summaries: list = []
    hub.on_round_closed = summaries.append
    policy = FineTunePolicy(TrainConfig(), min_new_windows=0)
    edges = [
        EdgeClient(EdgeConfig(broker=broker.url, federation=federation, client_id=client,
                              state_dir=tmp_path / "edges" / client, policy=policy, seed=i,
                              protocol=broker.protocol, topic_prefix=prefix), DATASET.source(client))
        for i, client in enumerate(DATASET.train_clients)
    ]
    await run_until_hub_ends(hub, edges, 240)
    return hub, summaries


@pytest.fixture(scope="module")
def held_out():
    return load_clients(DATASET, DATASET.test_clients, task_spec("activity", DATASET))


def test_eight_edges_learn_over_three_rounds_and_int8_matches_float32(mqtt_broker, tmp_path, held_out):
    results = {}
    for quantize in ("int8", "none"):
        hub, summaries = asyncio.run(_federate(mqtt_broker, tmp_path / quantize, quantize))
        assert [s.round for s in summaries] == [1, 2, 3]
        assert all(s.updates_accepted == 8 and s.participants == 8 for s in summaries)
        status = hub.status()
        assert status["updates_accepted"] == 24 == sum(c["accepted"] for c in status["clients"].values())
        assert status["model_version"] == 3
        results[quantize] = summarize(hub.current_model, held_out)["metrics"]["accuracy"]
        if quantize == "int8":
            bytes_per_update = np.median([s.bytes_up / s.updates_accepted for s in summaries])
        else:
            float_bytes = np.median([s.bytes_up / s.updates_accepted for s in summaries])
    initial = summarize(Model(task_spec("activity", DATASET), seed=0), held_out)["metrics"]["accuracy"]
    assert results["int8"] > initial + 0.2  # learned something
    assert abs(results["int8"] - results["none"]) <= 0.05
    assert bytes_per_update <= 0.27 * float_bytes


def test_the_registry_holds_every_version_as_plain_safetensors(mqtt_broker, tmp_path):
    hub, _ = asyncio.run(_federate(mqtt_broker, tmp_path, "int4", rounds=1))
    package = tmp_path / "hub" / "models" / "v00001" / "model.safetensors"
    tensors = st_load(package.read_bytes())
    np.testing.assert_array_equal(tensors["fc.weight"], hub.current_model.network.state_dict()["fc.weight"])
