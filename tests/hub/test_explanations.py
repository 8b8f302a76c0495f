"""Federated explanations at the hub (hub/explanations.py), fed as edges feed them: the ``explanation`` of a
``metrics/<client>`` report, parsed by :class:`hub.reports.MetricsCollector`."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from hub.explanations import FederatedExplanations, strongest
from hub.reports import MetricsCollector

CLASSES = ["walking", "sitting", "laying"]
CHANNELS = ["acc_x", "acc_y"]
SEGMENTS = 4
ROUND = 3


def body(windows: list[Any], grid: Any, segments: int = SEGMENTS) -> dict[str, Any]:
    """An edge's ``explanation`` as models.attribution.attribution_map makes it."""
    grid = grid.tolist() if isinstance(grid, np.ndarray) else grid
    return {"method": "integrated-gradients", "segments": segments, "windows": windows, "map": grid}


def report(client: str, explanation: Any, round_number: int = ROUND, n: int = 10,
           accuracy: float = 0.5) -> bytes:
    """The JSON an edge publishes on ``metrics/<client>``."""
    return json.dumps({"client": client, "round": round_number, "model_version": "v1", "num_examples": n,
                       "metrics": {"accuracy": accuracy}, "explanation": explanation}).encode()


def a_map(seed: int, shape: tuple[int, ...] = (len(CLASSES), len(CHANNELS), SEGMENTS)) -> np.ndarray:
    """Non-negative values with at most 3 decimals, so the result's rounding to 6 decimals does not show."""
    return np.random.default_rng(seed).integers(1, 1000, shape) / 1000.0


def result(collector: MetricsCollector | FederatedExplanations, round_number: int = ROUND,
           **kw: Any) -> dict[str, Any] | None:
    explanations = collector.explanations if isinstance(collector, MetricsCollector) else collector
    return explanations.result(round_number, CLASSES, CHANNELS, SEGMENTS, **kw)


# --- without differential privacy ------------------------------------------------------------------------


def test_per_class_the_window_weighted_mean_of_the_edges_maps():
    maps = {"edge-a": a_map(1), "edge-b": a_map(2), "edge-c": a_map(3)}
    windows = {"edge-a": [2, 0, 1], "edge-b": [1, 3, 0], "edge-c": [1, 1, 3]}
    maps["edge-b"][2] = 999.0  # no window of "laying" at edge-b: its map of that class must not count
    maps["edge-a"][1] = 999.0
    collector = MetricsCollector()
    for client in maps:
        assert collector.add(client, report(client, body(windows[client], maps[client])), open_round=ROUND)
    out = result(collector)
    assert out is not None
    assert out["clients"] == 3 and out["round"] == ROUND and out["dp"] is None
    assert out["classes"] == CLASSES and out["channels"] == CHANNELS and out["segments"] == SEGMENTS
    assert out["method"] == "integrated-gradients"
    assert out["windows"] == [4, 4, 4]
    got = np.asarray(out["map"])
    assert got.shape == (3, 2, 4)
    for k in range(len(CLASSES)):  # by hand: sum over edges of windows * map, over the class's windows
        weighted = sum(windows[c][k] * maps[c][k] for c in maps)
        np.testing.assert_allclose(got[k], weighted / sum(windows[c][k] for c in maps), atol=1e-6)
    # spelled out for one cell: "laying", acc_y, segment 2, from edge-a (1 window) and edge-c (3 windows)
    assert got[2, 1, 2] == pytest.approx((1 * maps["edge-a"][2, 1, 2] + 3 * maps["edge-c"][2, 1, 2]) / 4, abs=1e-6)
    assert np.all(got < 999)


def test_a_class_no_edge_has_windows_of_is_zero_with_zero_windows():
    explanations = FederatedExplanations()
    explanations.add("edge-a", ROUND, body([2, 0, 0], a_map(1)))
    explanations.add("edge-b", ROUND, body([1, 0, 5], a_map(2)))
    out = result(explanations)
    assert out is not None and out["windows"] == [3, 0, 5]
    np.testing.assert_array_equal(np.asarray(out["map"])[1], 0.0)
    np.testing.assert_allclose(np.asarray(out["map"])[2], a_map(2)[2], atol=1e-6)  # edge-b alone


def test_an_edges_latest_map_of_the_round_counts():
    explanations = FederatedExplanations()
    explanations.add("edge-a", ROUND, body([1, 1, 1], a_map(1)))
    explanations.add("edge-a", ROUND, body([1, 1, 1], a_map(2)))
    out = result(explanations)
    assert out is not None and out["clients"] == 1 and out["windows"] == [1, 1, 1]
    np.testing.assert_allclose(out["map"], a_map(2), atol=1e-6)


def test_a_report_without_an_explanation_adds_metrics_only():
    collector = MetricsCollector()
    payload = json.dumps({"round": ROUND, "model_version": "v1", "num_examples": 4,
                          "metrics": {"accuracy": 0.75}}).encode()
    assert collector.add("edge-a", payload, open_round=ROUND)
    assert collector.result(ROUND)["accuracy"] == 0.75
    assert result(collector) is None


def test_an_explanation_of_a_report_for_another_round_is_not_kept():
    collector = MetricsCollector()
    assert not collector.add("edge-a", report("edge-a", body([1, 1, 1], a_map(1)), round_number=2),
                             open_round=ROUND)
    assert result(collector, 2) is None and result(collector) is None


# --- malformed maps ------------------------------------------------------------------------------------


def _good() -> list[Any]:
    return a_map(9).tolist()


def _with(cell: Any) -> list[Any]:
    grid = _good()
    grid[1][0][2] = cell
    return grid


MALFORMED = {
    "two levels": body([1, 1, 1], [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]),
    "four levels": body([1, 1, 1], a_map(9)[..., None]),
    "ragged": body([1, 1, 1], [[[0.1, 0.2, 0.3, 0.4], [0.1, 0.2]], *_good()[1:]]),
    "negative": body([1, 1, 1], _with(-0.5)),
    "nan": body([1, 1, 1], _with(float("nan"))),
    "infinite": body([1, 1, 1], _with(float("inf"))),
    "too large a value": body([1, 1, 1], _with(1e7)),
    "a string cell": body([1, 1, 1], _with("high")),
    "a null cell": body([1, 1, 1], _with(None)),
    "a string map": body([1, 1, 1], "acc_x mostly"),
    "a string body": "acc_x mostly",
    "a list body": [1, 2, 3],
    "no map": {"method": "integrated-gradients", "windows": [1, 1, 1]},
    "no windows": {"method": "integrated-gradients", "map": _good()},
    "windows not a list": body(3, _good()),
    "windows too short": body([1, 1], _good()),
    "windows too long": body([1, 1, 1, 1], _good()),
    "fractional windows": body([1, 1.5, 1], _good()),
    "negative windows": body([1, -1, 1], _good()),
    "nan windows": body([1, float("nan"), 1], _good()),
    "too many windows": body([1, 10**7, 1], _good()),
    "empty map": body([], []),
    "too many classes": body([1] * 65, np.ones((65, 2, 4))),
    "too many channels": body([1, 1, 1], np.ones((3, 33, 4))),
    "too many segments": body([1, 1, 1], np.ones((3, 2, 33))),
    "no channels": body([1, 1, 1], [[], [], []]),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_map_is_ignored_and_the_metrics_still_count(name):
    assert not FederatedExplanations().add("edge-bad", ROUND, MALFORMED[name])
    collector = MetricsCollector()
    good = a_map(4)
    assert collector.add("edge-good", report("edge-good", body([2, 2, 2], good), accuracy=0.8), ROUND)
    assert collector.add("edge-bad", report("edge-bad", MALFORMED[name], accuracy=0.6), ROUND)  # metrics kept
    metrics = collector.result(ROUND)
    assert metrics["eval_clients"] == 2.0
    assert metrics["accuracy"] == pytest.approx(0.7)
    out = result(collector)
    assert out is not None and out["clients"] == 1 and out["windows"] == [2, 2, 2]
    np.testing.assert_allclose(out["map"], good, atol=1e-6)


def test_only_malformed_maps_give_no_result():
    collector = MetricsCollector()
    assert collector.add("edge-bad", report("edge-bad", MALFORMED["negative"]), ROUND)
    assert collector.result(ROUND)["eval_clients"] == 1.0
    assert result(collector) is None


# --- the model's shape -----------------------------------------------------------------------------------


def test_maps_of_another_shape_than_the_models_are_left_out():
    explanations = FederatedExplanations()
    fits = a_map(1)
    assert explanations.add("edge-fits", ROUND, body([1, 2, 3], fits))
    assert explanations.add("edge-segments", ROUND, body([1, 2, 3], a_map(2, (3, 2, 5)), segments=5))
    assert explanations.add("edge-channels", ROUND, body([1, 2, 3], a_map(3, (3, 3, 4))))
    assert explanations.add("edge-classes", ROUND, body([1, 2], a_map(4, (2, 2, 4))))
    out = result(explanations)
    assert out is not None and out["clients"] == 1 and out["windows"] == [1, 2, 3]
    np.testing.assert_allclose(out["map"], fits, atol=1e-6)
    assert explanations.result(ROUND, CLASSES, CHANNELS, 5)["clients"] == 1  # the 5-segment one, alone
    assert explanations.result(ROUND, CLASSES, ["a", "b", "c", "d"], SEGMENTS) is None
    assert explanations.result(ROUND, ["one"], CHANNELS, SEGMENTS) is None


def test_no_map_of_the_round_gives_none():
    explanations = FederatedExplanations()
    explanations.add("edge-a", ROUND, body([1, 1, 1], a_map(1)))
    assert result(explanations, ROUND + 1) is None
    assert result(FederatedExplanations()) is None


# --- under differential privacy --------------------------------------------------------------------------


def test_under_dp_each_edge_counts_once_with_its_map_in_shares():
    explanations = FederatedExplanations()
    small, large = a_map(1), 500 * a_map(2)  # edge-b's attributions are 500 times larger, and it has more windows
    explanations.add("edge-a", ROUND, body([1, 0, 2], small))
    explanations.add("edge-b", ROUND, body([90, 4, 0], large))
    out = result(explanations, noise_multiplier=0.0, rng=np.random.default_rng(0))
    assert out is not None
    assert out["edges"] == [2, 1, 1] and out["windows"] is None  # under DP: edges per class; counts unpublished
    assert out["dp"] == {"noise_multiplier": 0.0, "sigma": [0.0, 0.0, 0.0]}
    got = np.asarray(out["map"])

    def shares(grid: np.ndarray) -> np.ndarray:
        return grid / grid.sum()

    np.testing.assert_allclose(got[0], (shares(small[0]) + shares(large[0])) / 2, atol=2e-6)
    np.testing.assert_allclose(got[1], shares(large[1]), atol=2e-6)  # edge-a has no "sitting" window
    np.testing.assert_allclose(got[2], shares(small[2]), atol=2e-6)  # edge-b has no "laying" window
    np.testing.assert_allclose(got.sum(axis=(1, 2)), 1.0, atol=1e-5)  # every class in shares


def test_under_dp_sigma_is_the_noise_multiplier_over_the_edges_with_windows():
    channels, segments = [f"ch{i}" for i in range(6)], 8  # 48 cells a class: enough to see the noise's spread
    explanations = FederatedExplanations()
    shape = (3, 6, 8)
    explanations.add("edge-a", ROUND, body([1, 1, 0], a_map(1, shape), segments))
    explanations.add("edge-b", ROUND, body([5, 0, 0], a_map(2, shape), segments))
    explanations.add("edge-c", ROUND, body([2, 7, 0], a_map(3, shape), segments))
    noisy = explanations.result(ROUND, CLASSES, channels, segments, noise_multiplier=1.2,
                                rng=np.random.default_rng(0))
    clean = explanations.result(ROUND, CLASSES, channels, segments, noise_multiplier=0.0)
    assert noisy is not None and clean is not None
    sigma = [1.2 / 3, 1.2 / 2, 0.0]
    assert noisy["dp"]["noise_multiplier"] == 1.2
    assert noisy["dp"]["sigma"] == pytest.approx(sigma, abs=1e-6)
    assert noisy["edges"] == [3, 2, 0] and noisy["windows"] is None
    residual = np.asarray(noisy["map"]) - np.asarray(clean["map"])
    for k in (0, 1):
        assert 0.6 * sigma[k] < residual[k].std() < 1.5 * sigma[k]
    np.testing.assert_array_equal(residual[2], 0.0)  # a class without windows gets no noise
    np.testing.assert_array_equal(np.asarray(noisy["map"])[2], 0.0)


def test_under_dp_the_same_rng_gives_the_same_map():
    explanations = FederatedExplanations()
    explanations.add("edge-a", ROUND, body([1, 1, 1], a_map(1)))
    first = result(explanations, noise_multiplier=1.0, rng=np.random.default_rng(0))
    again = result(explanations, noise_multiplier=1.0, rng=np.random.default_rng(0))
    other = result(explanations, noise_multiplier=1.0, rng=np.random.default_rng(1))
    assert first == again
    assert first["map"] != other["map"]


def test_under_dp_many_identical_edges_approach_the_shares():
    explanations = FederatedExplanations()
    grid = a_map(5)
    edges = 20_000
    for i in range(edges):
        explanations.add(f"edge-{i:05d}", ROUND, body([3, 1, 2], grid))
    out = result(explanations, noise_multiplier=1.0, rng=np.random.default_rng(0))
    assert out is not None and out["clients"] == edges and out["edges"] == [edges] * 3
    assert out["dp"]["sigma"] == pytest.approx([1.0 / edges] * 3)
    expected = grid / grid.sum(axis=(1, 2), keepdims=True)
    got = np.asarray(out["map"])
    np.testing.assert_allclose(got, expected, atol=1e-3)  # sigma 5e-5: the noise is small next to the shares
    assert not np.array_equal(got, np.round(expected, 6))  # and there is noise


# --- forgetting ------------------------------------------------------------------------------------------


def test_forget_before_drops_older_rounds():
    collector = MetricsCollector()
    for r in (1, 2, 3):
        assert collector.add("edge-a", report("edge-a", body([1, 1, 1], a_map(r)), round_number=r))
    collector.forget_before(3)
    assert result(collector, 1) is None and result(collector, 2) is None
    kept = result(collector, 3)
    assert kept is not None
    np.testing.assert_allclose(kept["map"], a_map(3), atol=1e-6)

    explanations = FederatedExplanations()
    explanations.add("edge-a", 5, body([1, 1, 1], a_map(5)))
    explanations.add("edge-a", 6, body([1, 1, 1], a_map(6)))
    explanations.forget_before(6)
    assert result(explanations, 5) is None and result(explanations, 6) is not None


# --- strongest -------------------------------------------------------------------------------------------


def test_strongest_names_the_channel_with_the_largest_share_and_where_it_peaks():
    explanation = {
        "classes": ["walking", "sitting", "laying"],
        "channels": ["acc_x", "acc_y", "gyro_x"],
        "map": [
            # acc_x holds the largest cell (5) but acc_y the largest share (7 of 12.5); acc_y peaks in segment 2
            [[0.0, 5.0, 0.0, 0.0], [2.0, 2.0, 2.5, 0.5], [0.0, 0.0, 0.5, 0.0]],
            # noise may make cells negative: their size counts; gyro_x peaks in segment 0
            [[0.1, 0.1, 0.1, 0.1], [-0.2, 0.0, 0.2, 0.0], [-3.0, 1.0, 0.5, 0.5]],
            [[0.0] * 4, [0.0] * 4, [0.0] * 4],  # nothing at all: no line for it
        ],
    }
    out = strongest(explanation)
    assert [(name, channel, segment) for name, channel, _, segment in out] == [
        ("walking", "acc_y", 2), ("sitting", "gyro_x", 0)]
    assert out[0][2] == pytest.approx(7.0 / 12.5)
    assert out[1][2] == pytest.approx(5.0 / 5.8)


def test_strongest_of_a_federated_result():
    explanations = FederatedExplanations()
    grid = np.full((3, 2, 4), 0.01)
    grid[0, 1, 3] = 0.9  # walking: acc_y, at the end of the window
    grid[1, 0, 1] = 0.5  # sitting: acc_x, segment 1
    grid[2, 0, :] = [0.2, 0.3, 0.1, 0.1]  # laying: acc_x, segment 1
    explanations.add("edge-a", ROUND, body([4, 4, 4], grid))
    out = result(explanations)
    assert out is not None
    got = strongest(out)
    assert [(name, channel, segment) for name, channel, _, segment in got] == [
        ("walking", "acc_y", 3), ("sitting", "acc_x", 1), ("laying", "acc_x", 1)]
    for _, _, share, _ in got:
        assert 0.5 < share <= 1.0 and math.isfinite(share)


def test_a_report_with_adapted_metrics_records_them_next_to_the_global_ones():
    import json

    from hub.reports import MetricsCollector

    collector = MetricsCollector()
    body = {"round": 2, "model_version": 1, "num_examples": 40,
            "metrics": {"accuracy": 0.8, "loss": 0.5, "adapted_accuracy": 0.9, "adapted_loss": 0.3}}
    assert collector.add("edge-a", json.dumps(body).encode(), 2)
    record = collector.personalization()["edge-a"]
    assert record["adapted"] == {"accuracy": 0.9, "loss": 0.3} and record["personalized"] == {}
    assert record["global"] == {"accuracy": 0.8, "loss": 0.5}
    assert collector.result(2)["adapted_accuracy"] == 0.9


@pytest.mark.parametrize("settings", [{"adapt": "yes"}, {"explain": "no"}, {"explain": True, "explain_segments": 0}])
def test_the_hub_refuses_bad_explain_and_adapt_settings(tmp_path, settings):
    from hub.config import HubConfig
    from models.errors import ConfigError

    with pytest.raises(ConfigError, match="must be"):
        config = HubConfig("mqtt://127.0.0.1:1883", "fed", tmp_path, task_config=settings)
        config.full_task_config(config.build_strategy())
