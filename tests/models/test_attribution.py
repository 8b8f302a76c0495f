"""Attributions on the numpy engine: the gradients are right, integrated gradients are complete, occlusion
gives the same answer on every backend, and the federated map is what an edge may share."""

from __future__ import annotations

import numpy as np
import pytest

from models import Model, activity_spec, heart_rate_spec
from models.attribution import (
    Explanation,
    attribution_map,
    explain,
    explain_settings,
    gradient_times_input,
    integrated_gradients,
    occlusion,
    output_gradients,
)
from models.errors import ConfigError


def _windows(spec, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *spec.input_shape)).astype(np.float32)


@pytest.mark.parametrize("make_spec", [activity_spec, heart_rate_spec])
def test_output_gradients_match_finite_differences(make_spec):
    spec = make_spec()
    model = Model(spec, seed=1)
    x = _windows(spec, 2)
    targets = model.predict(x).argmax(axis=1) if spec.is_classifier else np.zeros(2, np.int64)
    outputs, grads = output_gradients(model, x, targets)
    np.testing.assert_allclose(outputs, (model.predict(x)[np.arange(2), targets] if spec.is_classifier
                                         else model.predict(x)), rtol=1e-5, atol=1e-5)
    rng = np.random.default_rng(3)
    for _ in range(6):
        w, c, t = int(rng.integers(2)), int(rng.integers(x.shape[1])), int(rng.integers(x.shape[2]))
        eps = np.float32(2e-3)  # small: a ReLU kink between the two points would bend the difference
        up, down = x.copy(), x.copy()
        up[w, c, t] += eps
        down[w, c, t] -= eps
        hi, lo = model.predict(up)[w], model.predict(down)[w]
        if spec.is_classifier:
            hi, lo = hi[targets[w]], lo[targets[w]]
        numeric = (float(hi) - float(lo)) / (2 * float(eps))
        assert grads[w, c, t] == pytest.approx(numeric, rel=0.05, abs=2e-3 if spec.is_classifier else 2e-2)


@pytest.mark.parametrize("make_spec", [activity_spec, heart_rate_spec])
def test_integrated_gradients_are_complete_and_leave_the_model_as_it_was(make_spec):
    spec = make_spec()
    model = Model(spec, seed=2)
    before = model.network.state_dict()
    x = _windows(spec, 5, seed=4)
    predicted = model.predict(x)
    e = integrated_gradients(model, x)
    change = e.outputs.astype(np.float64) - e.baseline_outputs
    gap = np.abs(e.completeness_gap())
    assert np.all((gap <= 0.02 * np.abs(change)) | (gap <= 1e-3)), (gap, change)
    assert e.attributions.shape == x.shape and e.attributions.dtype == np.float32
    assert np.abs(change).max() > 1e-3  # the check above compares something
    for name, value in model.network.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    np.testing.assert_array_equal(model.predict(x), predicted)  # no layer left in training behaviour
    assert all(not layer._buffers for _, layer in model.network.layers)
    assert all(not np.any(p.grad) for p in model.network.parameters().values())


def test_a_window_that_misses_completeness_is_integrated_again():
    spec = activity_spec()
    model = Model(spec, seed=5)
    x = _windows(spec, 6, seed=6) * 3  # far from the baseline: the path bends
    coarse = integrated_gradients(model, x, steps=2, refine=False)
    refined = integrated_gradients(model, x, steps=2)
    assert np.abs(refined.completeness_gap()).max() < np.abs(coarse.completeness_gap()).max()
    change = np.abs(refined.outputs.astype(np.float64) - refined.baseline_outputs)
    assert np.all(np.abs(refined.completeness_gap()) <= np.maximum(0.01 * change, 5e-4) + 1e-6)


def test_targets_default_to_the_prediction_and_may_be_named():
    spec = activity_spec()
    model = Model(spec, seed=0)
    x = _windows(spec, 4)
    e = gradient_times_input(model, x)
    np.testing.assert_array_equal(e.targets, model.predict(x).argmax(axis=1))
    fixed = gradient_times_input(model, x, target=2)
    assert fixed.targets.tolist() == [2, 2, 2, 2]
    np.testing.assert_allclose(fixed.outputs, model.predict(x)[:, 2], rtol=1e-6)
    with pytest.raises(ConfigError, match="target class 9 is not one of the model's 6 classes"):
        gradient_times_input(model, x, target=9)
    hr = Model(heart_rate_spec(), seed=0)
    with pytest.raises(ConfigError, match="one output"):
        gradient_times_input(hr, _windows(hr.spec, 1), target=1)
    with pytest.raises(ConfigError, match="unknown explanation method"):
        explain(model, x, "saliency")


def test_the_json_contract():
    spec = heart_rate_spec()
    model = Model(spec, seed=0)
    body = explain(model, _windows(spec, 2), "gradient").to_json()
    assert list(body) == ["method", "channels", "targets", "outputs", "baseline_outputs", "attributions"]
    assert body["method"] == "gradient" and body["channels"] == list(spec.channels) and body["targets"] == [0, 0]
    assert np.asarray(body["attributions"]).shape == (2, *spec.input_shape)


def test_occlusion_is_the_drop_of_each_patch_and_the_same_on_onnx():
    from models.inference import open_model

    spec = activity_spec()
    model = Model(spec, seed=0)
    x = _windows(spec, 3)
    e = occlusion(model, x, span=16)
    w, ch, start = 1, 2, 32
    hidden = x[w:w + 1].copy()
    hidden[0, ch, start:start + 16] = 0.0
    drop = e.outputs[w] - model.predict(hidden)[0, e.targets[w]]
    np.testing.assert_allclose(e.attributions[w, ch, start:start + 16], drop, rtol=1e-5, atol=1e-6)
    assert len(np.unique(e.attributions[w, ch, start:start + 16])) == 1
    on_onnx = occlusion(open_model(model, "onnxruntime"), x, span=16)
    np.testing.assert_allclose(on_onnx.attributions, e.attributions, atol=1e-4)
    with pytest.raises(ConfigError, match="gradients"):
        explain(open_model(model, "onnxruntime"), x, "gradient")


def test_an_edge_s_map_holds_means_per_class_channel_and_segment_only():
    spec = activity_spec()
    model = Model(spec, seed=0)
    x = _windows(spec, 30, seed=8)
    y = np.r_[np.zeros(20, int), np.ones(7, int), np.full(3, 4)]
    body = attribution_map(model, x, y, segments=4, windows=12)
    assert set(body) == {"method", "segments", "windows", "map"}
    assert body["windows"] == [5, 4, 0, 0, 3, 0]  # 12 windows, the classes taken in turn
    grid = np.asarray(body["map"])
    assert grid.shape == (6, 6, 4) and grid.min() >= 0
    assert not grid[2].any() and grid[0].any()
    # the mean over class 4's three windows of |attribution| per segment, recomputed by hand
    picked = x[27:30]
    a = np.abs(integrated_gradients(model, picked, target=4, steps=16).attributions)
    expected = a.reshape(3, 6, 4, 32).mean(axis=(0, 3))
    np.testing.assert_allclose(grid[4], expected, rtol=1e-3, atol=1e-6)


def test_explain_settings_are_checked():
    assert explain_settings({}) is None and explain_settings({"explain": False}) is None
    assert explain_settings({"explain": True}) == (8, 64)
    assert explain_settings({"explain": 1, "explain_segments": 4, "explain_windows": 10}) == (4, 10)
    for bad in ({"explain_segments": 0}, {"explain_windows": 2.5}, {"explain_segments": True}):
        with pytest.raises(ConfigError, match="must be a whole number"):
            explain_settings({"explain": True, **bad})
    with pytest.raises(ConfigError, match="must be true or false"):
        explain_settings({"explain": "no"})


def test_strongest_names_the_stretch_that_moved_the_output_most():
    a = np.zeros((1, 2, 16), np.float32)
    a[0, 1, 8:12] = -0.5  # a negative push is as strong as a positive one
    a[0, 0, 0:4] = 0.3
    e = Explanation("gradient", ("a", "b"), np.zeros(1, np.int64), np.ones(1, np.float32), np.zeros(1, np.float32), a)
    assert e.strongest(0, 4) == (1, 8, 12, -2.0)
    patches = Explanation("occlusion", ("a", "b"), e.targets, e.outputs, e.baseline_outputs, a)
    assert patches.strongest(0, 4) == (1, 8, 12, -0.5)  # each sample carries its patch's drop: the mean


def test_a_prediction_in_another_thread_does_not_disturb_a_gradient_pass():
    import sys
    import threading

    spec = activity_spec()
    model = Model(spec, seed=0)
    x, other = _windows(spec, 24, seed=9), _windows(spec, 3, seed=10)
    expected = gradient_times_input(model, x).attributions
    stop = threading.Event()

    def predicting() -> None:
        while not stop.is_set():
            model.predict(other)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads as often as possible
    thread = threading.Thread(target=predicting)
    thread.start()
    try:
        for _ in range(40):
            np.testing.assert_array_equal(gradient_times_input(model, x).attributions, expected)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
