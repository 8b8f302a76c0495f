"""An edge waits part way to a round's deadline for fresh windows, but only while its source can bring them."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from edge_client.config import EdgeConfig
from edge_client.ingest import StreamView
from edge_client.shared import Wakes
from edge_client.sources.simulator import SimulatedWearer
from edge_client.training import RoundTrainer
from models import Model, heart_rate_spec
from models.protocol.messages import ModelMessage, Task


@pytest.mark.parametrize("source_ended", [False, True])
def test_a_source_that_may_bring_windows_is_waited_for_and_an_ended_one_is_not(tmp_path, source_ended):
    spec = heart_rate_spec()
    config = EdgeConfig("mqtt://127.0.0.1:1", "f", "wearer-01", tmp_path)
    view = StreamView(spec, SimulatedWearer("wearer-01", 0, minutes=1.0), config)
    x = np.random.default_rng(0).standard_normal((40, *spec.input_shape)).astype(np.float32)
    view.replay.add(x, np.full(40, 70.0, np.float32), "reference")
    view.replay.mark_trained()  # the last round took them: no fresh windows now
    ingest = SimpleNamespace(catching_up=False, source_ended=source_ended)
    trainer = RoundTrainer(config, ingest, None, SimpleNamespace(stats=None), None, None, Wakes(), {})
    model = Model(spec)
    task = Task(round=2, model_version=model.version, deadline=time.time() + 600)
    reason = trainer.why_not(task, ModelMessage(model, 1, b"", ""), view)
    if source_ended:
        assert reason is None  # trains now, on the replay buffer as it is
    else:
        assert reason is not None and reason.startswith("waiting: 0 new windows (< 16) until ")
