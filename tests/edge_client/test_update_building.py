"""Update building and the fit in flight: one clipped delta for plain and secure rounds, windows given back.

The training part runs here without a broker: a real stream view of a simulated wearer, a
real fit and a real outbox; only the sending, evaluation and secure-round parts are stand-ins
that record what they were handed.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_client.adoption import ModelAdoption
from edge_client.config import EdgeConfig
from edge_client.evaluation import task_spec
from edge_client.finetune import FineTunePolicy
from edge_client.ingest import Ingest
from edge_client.shared import Wakes
from edge_client.sources.simulator import SimulatedDataset
from edge_client.training import RoundTrainer
from edge_client.updates import clipped_delta, encode_update, read_residual, residual_bytes
from models.model import Model
from models.protocol.codec import CodecConfig, UpdateCodec
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.messages import MAX_MODEL_BYTES, Task, build_model, parse_model, parse_update_meta
from models.protocol.signed import verify_and_parse
from models.training import TrainConfig
from models.transport.outbox import Outbox

DATASET = SimulatedDataset(seed=0, wearers=1, minutes=3, test_wearers=0)
CLIENT = DATASET.clients[0]
CLIP = 0.05  # well below the norm of a one-epoch delta, so the clip always acts


def weights_pair(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    base = Model(task_spec("activity", DATASET), seed=seed).network.state_dict()
    rng = np.random.default_rng(seed)
    return base, {k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in base.items()}


# -- the builder alone -------------------------------------------------------------------------


def test_the_clipped_delta_is_the_weight_difference_scaled_to_the_update_clip():
    base, trained = weights_pair()
    layout = UpdateCodec.for_weights(base)
    raw = layout.flatten({k: trained[k] - base[k] for k in base})
    assert np.linalg.norm(raw) > CLIP

    delta = clipped_delta(base, trained, CodecConfig(update_clip=CLIP))

    assert np.linalg.norm(delta) == pytest.approx(CLIP, rel=1e-5)
    np.testing.assert_allclose(delta, raw * (CLIP / np.linalg.norm(raw)), rtol=1e-5)
    np.testing.assert_array_equal(clipped_delta(base, trained, CodecConfig(update_clip=0.0)), raw)


@pytest.mark.parametrize("scheme", ["none", "int8", "int4", "topk"])
def test_encoding_an_update_gives_the_bytes_the_codec_gives_for_the_same_delta(scheme):
    base, trained = weights_pair(1)
    codec = CodecConfig(scheme, topk_fraction=0.1, update_clip=CLIP)
    codec_itself = UpdateCodec.for_weights(base, codec)
    residual = np.random.default_rng(2).normal(0, 0.01, codec_itself.size).astype(np.float32)

    built = encode_update(base, trained, codec, np.random.default_rng(7), residual)
    tensors, meta, new_residual = codec_itself.encode({k: trained[k] - base[k] for k in base},
                                                      np.random.default_rng(7), residual)

    assert built.codec == meta
    assert built.tensors.keys() == tensors.keys()
    for name in tensors:
        np.testing.assert_array_equal(built.tensors[name], tensors[name])
    if scheme == "topk":
        np.testing.assert_array_equal(built.residual, new_residual)
    else:
        assert built.residual is None is new_residual


def test_a_residual_comes_back_only_when_it_fits_the_model():
    residual = np.arange(5, dtype=np.float32)
    assert read_residual(residual_bytes(None), 5, CLIENT) is None
    np.testing.assert_array_equal(read_residual(residual_bytes(residual), 5, CLIENT), residual)
    assert read_residual(residual_bytes(residual), 6, CLIENT) is None
    assert read_residual(b"not a residual", 5, CLIENT) is None


# -- the training part with stand-ins ------------------------------------------------------------


class RecordingSender:
    """Stores like the outbox would (sequence 1) unless told it is full; records what it was given."""

    def __init__(self, full: bool = False) -> None:
        self.full, self.stats, self.stored, self.sent = full, None, [], []

    async def store(self, round_number: int, build: Any, state: dict[str, bytes]) -> tuple[int, bytes] | None:
        if self.full:
            return None
        self.stored.append((round_number, build(1), state))
        return 1, self.stored[-1][1]

    async def send(self, sequence: int, payload: bytes) -> bool:
        self.sent.append(sequence)
        return True


class RecordingSecureRound:
    def __init__(self) -> None:
        self.joined: list[tuple[int, np.ndarray]] = []

    async def join(self, task: Task, delta: np.ndarray) -> None:
        self.joined.append((task.round, delta))


class SilentEvaluator:
    async def evaluate_and_publish(self, *args: Any) -> None:
        return None


def edge_parts(state_dir: Path, sender: RecordingSender) -> tuple[RoundTrainer, Ingest, RecordingSecureRound, Any]:
    """A training part over a real stream view that has read the whole simulated stream."""
    policy = FineTunePolicy(train=TrainConfig(epochs=1, batch_size=32), min_new_windows=1)
    config = EdgeConfig(broker="mqtt://127.0.0.1:1", federation="f", client_id=CLIENT, state_dir=state_dir,
                        policy=policy)
    wakes, counters = Wakes(), {"updates_built": 0, "rounds_skipped": 0}
    ingest = Ingest(config, DATASET.source(CLIENT), wakes, lambda view: False)
    models = ModelAdoption(config, ingest, wakes, counters)
    key = Ed25519PrivateKey.generate()
    message = parse_model(build_model(Model(task_spec("activity", DATASET), version=1, seed=0), 0, key))
    models.install(message, ingest.prepare(message.model.spec))
    view = ingest.view
    chunks = DATASET.source(CLIENT).chunks(500)
    while (batch := view.read(chunks, None)) is not None:
        view.commit([batch])
    secure = RecordingSecureRound()
    state_dir.mkdir(parents=True, exist_ok=True)
    outbox = Outbox(state_dir)
    trainer = RoundTrainer(config, ingest, models, sender, secure, SilentEvaluator(), wakes, counters)
    trainer.open(outbox, key)
    trainer.task = Task(round=1, model_version=1, config={"quantize": "none", "update_clip": CLIP})
    return trainer, ingest, secure, message


def train_round(trainer: RoundTrainer) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Run the round; returns the (base, trained) weights the fit handed to the weights hook."""
    seen = []

    async def hook(round_number: int, base: dict[str, np.ndarray], weights: Any) -> Any:
        seen.append((base, dict(weights)))
        return weights

    trainer.weights_hook = hook
    asyncio.run(trainer.maybe_train())
    return seen


def test_plain_and_secure_rounds_send_the_same_clipped_delta(tmp_path):
    plain_sender = RecordingSender()
    plain, _, _, message = edge_parts(tmp_path / "plain", plain_sender)
    secure_edge, _, secure, _ = edge_parts(tmp_path / "secure", RecordingSender())
    secure_edge.task = replace(secure_edge.task, config={**secure_edge.task.config, "secagg": "announced"})

    (base, trained), = train_round(plain)
    (secure_base, secure_trained), = train_round(secure_edge)
    plain.outbox.close()
    secure_edge.outbox.close()

    [(round_number, payload, state)] = plain_sender.stored
    signed = verify_and_parse(payload, MAX_MODEL_BYTES)
    meta = parse_update_meta(signed)
    layout = UpdateCodec.for_weights(base, CodecConfig("none"))
    sent = layout.flatten(layout.decode(signed.tensors, meta.codec))
    [(secure_round, secure_delta)] = secure.joined
    expected = clipped_delta(base, trained, CodecConfig(update_clip=CLIP))
    secure_expected = clipped_delta(secure_base, secure_trained, CodecConfig(update_clip=CLIP))

    assert (round_number, meta.round, meta.base_hash, secure_round) == (1, 1, message.hash, 1)
    assert state["last_round"] == b"1" and plain.last_round == secure_edge.last_round == 1
    assert plain_sender.sent == [1]
    assert np.linalg.norm(layout.flatten({k: trained[k] - base[k] for k in base})) > CLIP
    np.testing.assert_array_equal(sent, expected)
    np.testing.assert_array_equal(secure_delta, secure_expected)
    assert np.linalg.norm(expected) == pytest.approx(CLIP, rel=1e-5)
    assert np.linalg.norm(secure_delta) == pytest.approx(CLIP, rel=1e-5)


def test_an_update_the_outbox_refuses_gives_its_windows_back_for_the_next_attempt(tmp_path):
    sender = RecordingSender(full=True)
    trainer, ingest, _, _ = edge_parts(tmp_path / "edge", sender)
    new_before = ingest.view.replay.new_windows
    assert new_before > 0

    assert len(train_round(trainer)) == 1  # it trained ...

    assert sender.stored == [] and sender.sent == []  # ... but nothing was stored or sent
    assert ingest.view.replay.new_windows == new_before
    assert trainer.state == "paused: outbox full"
    assert trainer.last_round == -1 and ingest.dirty

    sender.full = False
    assert len(train_round(trainer)) == 1  # the next attempt trains the round again and stores it
    assert [r for r, _, _ in sender.stored] == [1] and trainer.last_round == 1
    assert ingest.view.replay.new_windows == 0
    trainer.outbox.close()
