"""Streaming FedAvg: means, weights, streaming equals batch, merging partial sums, O(model) memory."""

from __future__ import annotations

import numpy as np
import pytest
from hub_helpers import SHAPES, delta_of

from hub.aggregation import StreamingAverage
from hub.strategies import FedAvg


def test_mean_of_identical_deltas_is_that_delta():
    delta = delta_of(SHAPES, seed=1)
    avg = StreamingAverage(SHAPES)
    for weight in (1, 5, 30):
        avg.add(delta, weight)
    mean = avg.mean()
    for k in SHAPES:
        np.testing.assert_allclose(mean[k], delta[k], rtol=1e-6)
        assert mean[k].dtype == np.float32 and mean[k].shape == SHAPES[k]


def test_weights_scale_each_delta():
    a = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}
    b = {k: np.full(s, 4.0, np.float32) for k, s in SHAPES.items()}
    avg = StreamingAverage(SHAPES)
    avg.add(a, 3)
    avg.add(b, 1)
    for v in avg.mean().values():
        np.testing.assert_allclose(v, (3 * 1.0 + 1 * 4.0) / 4)


def test_streaming_equals_batch_fedavg():
    deltas = [delta_of(SHAPES, seed=s) for s in range(7)]
    weights = [float(w) for w in range(1, 8)]
    streamed = StreamingAverage(SHAPES)
    for d, w in zip(deltas, weights, strict=True):
        streamed.add(d, w)
    batch = FedAvg().aggregate(deltas, weights)
    expected = {k: sum(w * d[k].astype(np.float64) for d, w in zip(deltas, weights, strict=True)) / sum(weights)
                for k in SHAPES}
    for k in SHAPES:
        np.testing.assert_allclose(streamed.mean()[k], expected[k], rtol=1e-5, atol=1e-8)
        np.testing.assert_array_equal(streamed.mean()[k], batch[k])


def test_merged_partial_sums_equal_one_sum():
    deltas = [delta_of(SHAPES, seed=s) for s in range(6)]
    whole, left, right = StreamingAverage(SHAPES), StreamingAverage(SHAPES), StreamingAverage(SHAPES)
    for i, d in enumerate(deltas):
        whole.add(d, i + 1)
        (left if i % 2 else right).add(d, i + 1)
    left.merge(right)
    assert left.count == whole.count == 6 and left.total_weight == whole.total_weight
    for k in SHAPES:
        np.testing.assert_allclose(left.mean()[k], whole.mean()[k], rtol=1e-12)


def test_memory_does_not_grow_with_clients():
    avg = StreamingAverage(SHAPES)
    before = avg.nbytes
    for s in range(200):
        avg.add(delta_of(SHAPES, seed=s), 1.0)
    assert avg.nbytes == before <= 2 * 8 * sum(int(np.prod(s)) for s in SHAPES.values())


def test_float32_buffer_is_allowed_and_close():
    deltas = [delta_of(SHAPES, seed=s) for s in range(5)]
    a64, a32 = StreamingAverage(SHAPES), StreamingAverage(SHAPES, np.float32)
    for d in deltas:
        a64.add(d, 2.0)
        a32.add(d, 2.0)
    for k in SHAPES:
        np.testing.assert_allclose(a32.mean()[k], a64.mean()[k], rtol=1e-5, atol=1e-7)


def test_bad_input_is_refused():
    avg = StreamingAverage(SHAPES)
    with pytest.raises(ValueError, match="undefined"):
        avg.mean()
    with pytest.raises(ValueError, match="names"):
        avg.add({"x": np.zeros(3)}, 1.0)
    wrong = {k: np.zeros((*s, 1), np.float32) for k, s in SHAPES.items()}
    with pytest.raises(ValueError, match="shape"):
        avg.add(wrong, 1.0)
    with pytest.raises(ValueError, match="weight"):
        avg.add(delta_of(SHAPES), 0.0)
    with pytest.raises(ValueError, match="layouts"):
        avg.merge(StreamingAverage({"x": (3,)}))


def test_fedavg_server_step_scales_the_mean_delta():
    weights = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}
    delta = delta_of(SHAPES, seed=3)
    stepped = FedAvg(server_lr=0.5).server_step(weights, delta)
    for k in SHAPES:
        np.testing.assert_allclose(stepped[k], 1.0 + 0.5 * delta[k], rtol=1e-6)
    with pytest.raises(ValueError):
        FedAvg(server_lr=0.0)
    with pytest.raises(ValueError):
        FedAvg().aggregate([], [])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_large_model_path_gives_the_same_mean(monkeypatch, dtype):
    import hub.aggregation as aggregation

    deltas = [delta_of(SHAPES, seed=s) for s in range(4)]
    small = StreamingAverage(SHAPES, dtype)
    monkeypatch.setattr(aggregation, "GATHER_MAX", 0)  # per tensor, in chunks (BLAS axpy for float32)
    monkeypatch.setattr(aggregation, "CHUNK", 7)
    large = StreamingAverage(SHAPES, dtype)
    for i, d in enumerate(deltas):
        small.add(d, i + 1)
        large.add(d, i + 1)
    for k in SHAPES:
        np.testing.assert_allclose(large.mean()[k], small.mean()[k], rtol=1e-6, atol=1e-9)
