"""RoundManager across restarts: re-aggregating the open round, finishing an interrupted close."""

from __future__ import annotations

import numpy as np
from hub_helpers import delta_of, make_update

from hub.intake import Intake
from hub.registry import ModelRegistry
from hub.rounds import RoundManager, RoundPolicy
from hub.store import HubStore
from hub.strategies import FedAvg
from models import Model, activity_spec
from models.protocol.codec import UpdateCodec
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.topics import Topics

TOPICS = Topics("fed")


def _manager(state) -> tuple[RoundManager, HubStore]:
    store = HubStore(state)
    return RoundManager(store, ModelRegistry(state / "models"), FedAvg(), RoundPolicy(min_clients=1)), store


def test_a_close_interrupted_after_the_registry_write_is_finished_on_resume(tmp_path):
    manager, store = _manager(tmp_path)
    model = manager.resume(Model(activity_spec(), seed=0))
    shapes = {k: v.shape for k, v in model.network.state_dict().items()}
    intake = Intake(store, TOPICS, UpdateCodec.for_weights(model.network.state_dict()))
    current = manager.open(1, intake.decode_stored)
    delta = delta_of(shapes, seed=5)
    update = make_update(Ed25519PrivateKey.generate(), "edge-a", delta=delta, shapes=shapes)
    _, accepted = intake.process(TOPICS.update("edge-a"), update, current)
    manager.add(accepted)
    manager.build_next_model(intake.decode_stored)  # v1 is in the registry ... and the hub dies before recording it
    store.close()

    again, store = _manager(tmp_path)
    resumed = again.resume(None)

    assert resumed.version == 1 and store.get("round") == 2 and store.get("model_version") == 1
    assert [r.round for r in store.rounds()] == [1]
    for k, v in resumed.network.state_dict().items():
        np.testing.assert_allclose(v, model.network.state_dict()[k] + delta[k], rtol=1e-6, atol=1e-7)
    store.close()


def test_the_open_round_is_rebuilt_from_stored_updates(tmp_path):
    manager, store = _manager(tmp_path)
    model = manager.resume(Model(activity_spec(), seed=0))
    weights = model.network.state_dict()
    shapes = {k: v.shape for k, v in weights.items()}
    intake = Intake(store, TOPICS, UpdateCodec.for_weights(weights))
    current = manager.open(1, intake.decode_stored)
    deltas = [delta_of(shapes, seed=s) for s in (1, 2)]
    for i, d in enumerate(deltas):
        _, accepted = intake.process(TOPICS.update(f"edge-{i}"), make_update(
            Ed25519PrivateKey.generate(), f"edge-{i}", delta=d, shapes=shapes, num_examples=10 * (i + 1)), current)
        manager.add(accepted)
    before = manager.current.aggregate.mean()
    store.close()

    again, store = _manager(tmp_path)
    again.resume(None)
    current = again.open(1, Intake(store, TOPICS, UpdateCodec.for_weights(weights)).decode_stored)

    assert current.participants == {"edge-0", "edge-1"} and current.num_examples == 30
    for k, v in current.aggregate.mean().items():
        np.testing.assert_array_equal(v, before[k])
    store.close()
