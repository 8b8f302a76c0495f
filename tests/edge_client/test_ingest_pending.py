"""While a fit holds the buffers, a replayed stream reads ahead by at most a share of the replay buffer."""

from __future__ import annotations

import asyncio

from edge_client.config import EdgeConfig
from edge_client.evaluation import task_spec
from edge_client.ingest import PENDING_SHARE, Ingest
from edge_client.shared import Wakes
from edge_client.sources.simulator import SimulatedDataset
from models.model import Model

DATASET = SimulatedDataset(seed=0, wearers=1, minutes=10, test_wearers=0)
CLIENT = DATASET.clients[0]


def test_reading_waits_for_the_fit_once_a_share_of_the_replay_buffer_is_pending(tmp_path):
    config = EdgeConfig(broker="mqtt://127.0.0.1:1", federation="f", client_id=CLIENT, state_dir=tmp_path,
                        replay_max_windows=128, chunk_samples=250)
    ingest = Ingest(config, DATASET.source(CLIENT), Wakes(), lambda view: False)
    model = Model(task_spec("activity", DATASET), seed=0)
    ingest.install(model, ingest.prepare(model.spec))
    cap = ingest.view.replay.capacity // PENDING_SHARE
    seen: list[int] = []
    commit = ingest.commit

    async def watched_commit() -> None:
        seen.append(ingest.view.pending_windows)
        await commit()

    ingest.commit = watched_commit

    async def scenario() -> tuple[int, int]:
        async with ingest.lock:  # a fit holds the buffers
            reading = asyncio.create_task(ingest.run())
            while not seen:  # the reader gives up reading ahead and waits for the lock
                await asyncio.sleep(0.01)
            waiting_with = seen[0]
        await asyncio.wait_for(reading, 60)  # released: it commits and reads the rest of the stream
        return waiting_with, ingest.view.samples

    waiting_with, samples = asyncio.run(asyncio.wait_for(scenario(), 120))
    per_chunk = -(-config.chunk_samples // (model.spec.input_shape[1] // 2)) + 1
    assert cap <= waiting_with <= cap + per_chunk  # it waited once the share was pending, not a buffer later
    assert ingest.view.pending == [] and samples == ingest.source.n_samples
