"""Hub memory stays O(model) with 1000 clients (issue 6): intake plus streaming FedAvg.

Signed int8 updates from N distinct clients (each its own Ed25519 key, pinned on first
use) go through the hub's real intake (:meth:`hub.intake.Intake.process_batch`, in
batches, as :class:`hub.service.HubService` runs it) into the round manager's real
streaming aggregate (:meth:`hub.rounds.RoundManager.add`, one
:class:`hub.aggregation.StreamingAverage` for the default FedAvg), over a real state
directory (SQLite store, model registry). tracemalloc records the peak of what the hub
allocates meanwhile (Python objects and NumPy buffers; SQLite's own page cache is C
memory it does not see: ``scripts/bench_hub_memory.py`` measures the whole process).

This covers the FedAvg family (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad,
FedBuff), which sum updates as they arrive. The robust rules (FedMedian, FedTrimmedAvg,
Krum, MultiKrum, Bulyan) are buffered by design: they need every delta of a round at
once at the close, O(clients x model), and are not what this test is about.

Not seen here: updates the MQTT session holds before they reach the intake (the hub's
receive backlog, measured by the benchmark). Resuming an open round after a restart is
checked too.

No timing is asserted here; speed is measured by the benchmarks.
"""

from __future__ import annotations

import gc
import logging
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from hub.intake import Intake
from hub.registry import ModelRegistry
from hub.rounds import RoundManager, RoundPolicy
from hub.store import HubStore
from hub.strategies import FedAvg
from models import Model, activity_spec
from models.protocol.codec import CodecConfig, UpdateCodec
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.messages import UpdateMeta, build_update
from models.protocol.topics import Topics

pytestmark = pytest.mark.slow  # the quick loop is `pytest -m "not slow"`

TOPICS = Topics("memory")
SEED = 6
FEW, MANY = 100, 1000
BATCH = 50
"""Messages per intake transaction. The service takes up to ``max_batch`` (256) queued
messages at once; 50 divides both runs into full batches, so the per-batch term of the
peak is the same at 100 and at 1000 clients and only growth with the clients remains."""


@dataclass(frozen=True)
class Federation:
    """MANY clients' signed updates for round 1 on model v0, and what their mean must be."""

    weights: dict[str, np.ndarray]  # the global model v0
    messages: list[tuple[str, bytes]]  # (update/<client> topic, signed payload), client i at index i
    expected: dict[int, dict[str, np.ndarray]]  # n -> example-weighted mean of the first n decoded deltas
    examples: dict[int, int]  # n -> total examples of the first n clients

    @property
    def model_bytes(self) -> int:
        """The model's size as float32: the unit of "O(model)"."""
        return sum(v.size for v in self.weights.values()) * 4

    @property
    def update_bytes(self) -> int:
        """The largest signed update, in bytes."""
        return max(len(payload) for _, payload in self.messages)


@pytest.fixture(scope="module")
def federation() -> Federation:
    """Built once, before anything is traced: the edges' side is not the hub's memory."""
    weights = Model(activity_spec(), seed=0).network.state_dict()
    codec = UpdateCodec.for_weights(weights, CodecConfig(quantize="int8"))
    sums = {k: np.zeros(v.shape, np.float64) for k, v in weights.items()}
    messages: list[tuple[str, bytes]] = []
    expected: dict[int, dict[str, np.ndarray]] = {}
    examples: dict[int, int] = {}
    total = 0
    for i in range(MANY):
        rng = np.random.default_rng([SEED, i])
        client = f"edge-{i:04d}"
        delta = {k: (0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in weights.items()}
        tensors, codec_meta, _ = codec.encode(delta, rng)
        n_examples = int(rng.integers(8, 512))
        meta = UpdateMeta(
            client=client,
            round=1,
            base_version=0,
            base_hash="0" * 64,
            num_examples=n_examples,
            sequence=0,
            codec=codec_meta,
            timestamp=1_700_000_000.0 + i,
        )
        key = Ed25519PrivateKey.from_private_bytes(rng.bytes(32))  # each client its own key
        messages.append((TOPICS.update(client), build_update(meta, tensors, key)))
        # What the hub must average: the int8 delta as the client sent it, dequantized.
        for k, v in codec.decode(tensors, codec_meta).items():
            sums[k] += n_examples * v.astype(np.float64)
        total += n_examples
        if i + 1 in (FEW, MANY):
            expected[i + 1] = {k: s / total for k, s in sums.items()}
            examples[i + 1] = total
    return Federation(weights, messages, expected, examples)


@dataclass
class Hub:
    """A hub's state over ``state_dir``, wired as :class:`hub.service.HubService` wires it."""

    store: HubStore
    rounds: RoundManager
    intake: Intake
    model: Model


@pytest.fixture
def open_hub(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[str, Model | None], Hub]]:
    # The store logs every newly pinned key as a warning; pytest would keep each record in
    # memory (traced, and growing with the clients), which is not the hub's memory.
    caplog.set_level(logging.ERROR, logger="hub")
    stores: list[HubStore] = []

    def start(name: str, initial: Model | None) -> Hub:
        state = tmp_path / name
        store = HubStore(state)
        stores.append(store)
        rounds = RoundManager(store, ModelRegistry(state / "models"), FedAvg(), RoundPolicy(min_clients=1))
        model = rounds.resume(initial)
        intake = Intake(store, TOPICS, UpdateCodec.for_weights(model.network.state_dict()))
        return Hub(store, rounds, intake, model)

    yield start
    for store in stores:
        store.close()


def _handle(hub: Hub, batch: list[tuple[str, bytes]], statuses: Counter[str]) -> None:
    """One intake batch as ``HubService._take_updates`` runs it: one transaction, then each accepted update is added."""
    for receipt, accepted in hub.intake.process_batch(batch, hub.rounds.current):
        statuses[receipt.status] += 1
        if accepted is not None:
            hub.rounds.add(accepted)


def _traced_round(hub: Hub, messages: list[tuple[str, bytes]]) -> tuple[int, Counter[str], dict[str, np.ndarray]]:
    """(peak bytes the hub allocated, receipt statuses, mean delta) for one round of ``messages``."""
    statuses: Counter[str] = Counter()
    gc.collect()
    tracemalloc.start()
    try:
        for start in range(0, len(messages), BATCH):
            _handle(hub, messages[start : start + BATCH], statuses)
        cur = hub.rounds.current
        assert cur is not None and cur.aggregate is not None, "FedAvg must aggregate in a streaming buffer"
        mean = cur.aggregate.mean()  # what RoundManager.build_next_model steps the model along
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, statuses, mean


def _check_mean(mean: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(mean) == sorted(expected)
    for k, v in expected.items():
        assert mean[k].dtype == np.float32 and mean[k].shape == v.shape
        np.testing.assert_allclose(mean[k], v, rtol=1e-5, atol=1e-9, err_msg=k)


def test_hub_memory_stays_o_model_with_1000_clients(federation, open_hub):
    peaks: dict[int, int] = {}
    for n in (FEW, MANY):
        hub = open_hub(f"hub-{n}", Model(activity_spec(), seed=0))
        hub.rounds.open(1, hub.intake.decode_stored)

        peaks[n], statuses, mean = _traced_round(hub, federation.messages[:n])

        # The work was done: every update accepted, counted and averaged exactly ...
        cur = hub.rounds.current
        assert statuses == {"accepted": n}
        assert cur.updates_accepted == n and len(cur.participants) == n and cur.aggregate.count == n
        assert cur.num_examples == federation.examples[n] == cur.aggregate.total_weight
        assert len(hub.store.pinned_keys()) == n
        _check_mean(mean, federation.expected[n])
        # ... and the close the service runs next (server step, registry) steps along it: v1 = v0 + mean.
        new = hub.rounds.build_next_model(hub.intake.decode_stored)
        assert new.version == 1
        for k, v in new.network.state_dict().items():
            want = federation.weights[k] + federation.expected[n][k]
            want = np.maximum(want, 0.0) if k.endswith("running_var") else want
            np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-7, err_msg=k)

    model_bytes = federation.model_bytes  # 11,494 parameters: 45,976 bytes
    # (a) An absolute bound at MANY clients: one intake batch plus a small multiple of the model.
    #   One batch: process_batch returns the BATCH decoded float32 deltas together (the
    #     service adds them once the transaction has committed), and a hub holds the batch's
    #     raw messages (pre-built here, so not traced; counted anyway).
    #   16 model sizes for the rest: the decode temporaries of one update (int8 -> float32
    #     values, repeated scales, their product), the mean (float64 quotient, float32
    #     copy), and the round's per-client bookkeeping (participant ids, the intake's cache
    #     of pinned keys: ~0.4 KB a client, so ~8 sizes of this small model at 1000 clients).
    # A hub that kept every delta until the close would need MANY * model_bytes (46 MB).
    batch_bytes = BATCH * (federation.update_bytes + model_bytes)
    bound = batch_bytes + 16 * model_bytes
    assert peaks[MANY] < bound, f"peak {peaks[MANY]:,} B at {MANY} clients; bound {bound:,} B"
    # (b) No growth with the clients: ten times the clients, about the same peak; what it
    # does grow by is bookkeeping, far below a model (or even a raw update) per client.
    per_client = (peaks[MANY] - peaks[FEW]) / (MANY - FEW)
    assert peaks[MANY] / peaks[FEW] < 1.3, f"peaks {peaks}"
    assert per_client < model_bytes / 16, f"{per_client:.0f} B more per extra client; peaks {peaks}"


def test_resuming_an_open_round_of_1000_clients_stays_o_model(federation, open_hub):
    peaks: dict[int, int] = {}
    for n in (FEW, MANY):
        hub = open_hub(f"hub-{n}", Model(activity_spec(), seed=0))
        hub.rounds.open(1, hub.intake.decode_stored)
        for start in range(0, n, BATCH):
            _handle(hub, federation.messages[start : start + BATCH], Counter())
        hub.store.close()
        again = open_hub(f"hub-{n}", None)  # the hub restarted with the round still open
        gc.collect()
        tracemalloc.start()
        try:
            cur = again.rounds.open(1, again.intake.decode_stored)
            _, peaks[n] = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert cur.updates_accepted == n and len(cur.participants) == n
        _check_mean(cur.aggregate.mean(), federation.expected[n])

    # Stored updates are read a page at a time (HubStore.iter_round_updates), never all at once.
    assert peaks[MANY] / peaks[FEW] < 1.3, f"resume peaks {peaks}"
