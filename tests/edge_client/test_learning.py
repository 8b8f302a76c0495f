"""Replay buffer, labels, fine-tuning policy and the edge trainer contract."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import synthetic_activity, synthetic_heart_rate

from edge_client.finetune import EdgeTrainer, FineTunePolicy, battery_hook, temperature_hook
from edge_client.labels import label_windows
from edge_client.replay import ReplayBuffer
from edge_client.windowing import Windows
from models import ConfigError, Model, ModelFormatError, TrainConfig, activity_spec, heart_rate_spec
from models.inference import open_model


def _buffer(policy: str, capacity: int = 60, seed: int = 0) -> ReplayBuffer:
    return ReplayBuffer((2, 4), max_windows=capacity, policy=policy, seed=seed)


def test_replay_buffer_is_bounded_in_windows_and_bytes():
    by_count = ReplayBuffer((6, 128), max_windows=10, max_bytes=10**9)
    by_bytes = ReplayBuffer((6, 128), max_windows=10**6, max_bytes=5 * (6 * 128 * 4 + 8))
    for buf in (by_count, by_bytes):
        buf.add(np.zeros((40, 6, 128)), np.zeros(40), "annotation")
    assert len(by_count) == 10 and len(by_bytes) == 5
    assert by_bytes.nbytes <= 5 * (6 * 128 * 4 + 8)
    assert by_count.seen == 40


def test_reservoir_keeps_a_uniform_sample_of_the_stream():
    kept = np.zeros(1000)
    for seed in range(200):
        buf = _buffer("reservoir", capacity=50, seed=seed)
        for start in range(0, 1000, 100):
            ids = np.arange(start, start + 100, dtype=np.float32)
            buf.add(np.zeros((100, 2, 4)), ids, "reference")
        kept[buf.y.astype(int)] += 1
    early, late = kept[:500].mean(), kept[500:].mean()
    assert early == pytest.approx(late, rel=0.1)  # every window equally likely: 50/1000 * 200 = 10
    assert kept.sum() == 50 * 200


def test_balanced_policy_evens_out_classes():
    buf = _buffer("balanced", capacity=60)
    labels = np.array([0] * 300 + [1] * 40 + [2] * 20, np.float32)
    order = np.random.default_rng(1).permutation(len(labels))
    buf.add(np.zeros((len(labels), 2, 4)), labels[order], "annotation")
    counts = np.bincount(buf.y.astype(int), minlength=3)
    assert counts.sum() == 60 and counts.max() - counts.min() <= 1


def test_replay_buffer_persists_exactly(tmp_path):
    buf = _buffer("reservoir")
    buf.add(np.random.default_rng(0).standard_normal((80, 2, 4)), np.arange(80), ["pseudo"] * 30 + ["annotation"] * 50)
    buf.save(tmp_path / "replay.safetensors")
    loaded = ReplayBuffer.load(tmp_path / "replay.safetensors")
    np.testing.assert_array_equal(loaded.x, buf.x)
    np.testing.assert_array_equal(loaded.y, buf.y)
    assert loaded.source_counts() == buf.source_counts() and loaded.seen == 80
    more = np.ones((5, 2, 4))
    buf.add(more, np.arange(5), "pseudo")
    loaded.add(more, np.arange(5), "pseudo")
    np.testing.assert_array_equal(loaded.y, buf.y)  # the random state travelled too


def test_a_corrupt_replay_file_says_what_to_do(tmp_path):
    (tmp_path / "r").write_bytes(b"junk")
    with pytest.raises(ModelFormatError, match="move it aside"):
        ReplayBuffer.load(tmp_path / "r")


def test_labels_record_their_source_and_pseudo_labels_need_confidence():
    spec = activity_spec()
    model = Model(spec, seed=0)
    x, y = synthetic_activity(20, seed=0)
    activity = y.astype(np.int16)
    activity[10:] = -1
    windows = Windows(x, activity, np.full(20, np.nan, np.float32), np.arange(20.0))
    plain = label_windows(windows, spec)
    assert len(plain) == 10 and set(plain.source) == {"annotation"}
    everything = label_windows(windows, spec, open_model(model), pseudo_threshold=0.0)
    assert len(everything) == 20 and (everything.source == "pseudo").sum() == 10
    none = label_windows(windows, spec, open_model(model), pseudo_threshold=1.01)
    assert len(none) == 10


def test_heart_rate_labels_come_from_the_reference_sensor():
    x, bpm = synthetic_heart_rate(6, seed=0)
    hr = bpm.copy()
    hr[:2] = np.nan
    labelled = label_windows(Windows(x, np.full(6, -1, np.int16), hr, np.arange(6.0)), heart_rate_spec())
    assert len(labelled) == 4 and set(labelled.source) == {"reference"}
    np.testing.assert_array_equal(labelled.y, bpm[2:])


def _trainer(policy: FineTunePolicy | None = None, hooks=()):
    spec = activity_spec()
    buf = ReplayBuffer(spec.input_shape, max_windows=512)
    x, y = synthetic_activity(200, seed=2)
    buf.add(x, y, "annotation")
    xt, yt = synthetic_activity(100, seed=3)
    trainer = EdgeTrainer(spec, buf, policy or FineTunePolicy(), hooks, holdout=(xt, yt))
    return trainer, Model(spec, seed=0).network.state_dict()


def test_fit_improves_the_held_out_metric_and_consumes_new_windows():
    trainer, weights = _trainer(FineTunePolicy(TrainConfig(epochs=4, lr=3e-3)))
    loss_before, n, before = trainer.evaluate(weights, {})
    new_weights, examples, metrics = trainer.fit(weights, {})
    loss_after, _, after = trainer.evaluate(new_weights, {})
    assert examples == 800 and metrics["label_annotation"] == 200
    assert after["accuracy"] > before["accuracy"] and loss_after < loss_before and n == 100
    assert trainer.buffer.new_windows == 0
    assert trainer.fit(new_weights, {})[2]["skipped"].startswith("0 new windows")


def test_a_resource_hook_vetoes_training():
    trainer, weights = _trainer(hooks=[lambda: "battery at 5%"])
    out, examples, metrics = trainer.fit(weights, {})
    assert examples == 0 and metrics == {"skipped": "battery at 5%"}
    assert all(np.array_equal(out[k], weights[k]) for k in weights)


def test_the_cpu_budget_stops_training_early():
    trainer, weights = _trainer(FineTunePolicy(TrainConfig(epochs=50)))
    _, examples, metrics = trainer.fit(weights, {"cpu_seconds": 1e-9})
    assert metrics["budget_exhausted"] and metrics["steps"] == 1 and examples == 32


def test_task_config_overrides_are_type_checked():
    with pytest.raises(ConfigError, match="epochs"):
        FineTunePolicy().with_overrides({"epochs": "many"})
    assert FineTunePolicy().with_overrides({"lr": "0.5", "unknown": 1}).train.lr == 0.5
    policy = FineTunePolicy().with_overrides({"rotation_deg": 10, "lr_schedule": "cosine"})
    assert policy.train.rotation_deg == 10.0  # the schedule itself is the hub's: edges get the round's lr
    with pytest.raises(ConfigError, match="rotation_deg"):
        FineTunePolicy().with_overrides({"rotation_deg": -5})


def test_battery_and_temperature_hooks_read_sysfs(tmp_path):
    (tmp_path / "capacity").write_text("12\n")
    (tmp_path / "status").write_text("Discharging\n")
    assert "12%" in battery_hook(30, supply=str(tmp_path))()
    (tmp_path / "status").write_text("Charging\n")
    assert battery_hook(30, supply=str(tmp_path))() is None
    (tmp_path / "temp").write_text("81000\n")
    assert "81 C" in temperature_hook(70, zone=str(tmp_path / "temp"))()
    assert battery_hook(supply=str(tmp_path / "none"))() is None


def test_evaluation_in_batches_matches_one_pass_over_the_holdout():
    trainer, weights = _trainer()  # 100 held-out windows: two batches
    loss, n, metrics = trainer.evaluate(weights, {})
    model = Model(activity_spec())
    model.network.load_state_dict(weights)
    x, y = trainer.holdout
    whole, _ = model.default_loss()(model.forward_raw(x), model.encode_target(y))
    assert n == 100 and loss == pytest.approx(float(whole), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(float(np.mean(model.predict(x).argmax(axis=1) == y)))


@pytest.mark.parametrize("config", [
    {"epochs": 10 ** 9}, {"seed": -1}, {"lr": -1.0}, {"lr": float("nan")}, {"lr": 1e9}, {"momentum": -1},
    {"momentum": 1.5}, {"weight_decay": -1}, {"grad_clip": float("inf")}, {"cpu_seconds": float("nan")},
    {"min_new_windows": -3}, {"batch_size": 0},
])
def test_a_tasks_settings_out_of_bounds_are_refused(config):
    with pytest.raises(ConfigError):
        FineTunePolicy().with_overrides(config)


def test_a_task_may_lower_the_gateways_cpu_budget_never_raise_it():
    policy = FineTunePolicy(cpu_seconds=5.0)
    assert policy.with_overrides({"cpu_seconds": 1e9}).cpu_seconds == 5.0
    assert policy.with_overrides({"cpu_seconds": 2}).cpu_seconds == 2.0


def test_an_interrupted_fit_stops_after_its_current_step():
    trainer, weights = _trainer(FineTunePolicy(TrainConfig(epochs=1000), cpu_seconds=600))
    trainer.interrupt()
    _, _, metrics = trainer.fit(weights, {})
    assert metrics["steps"] == 1
