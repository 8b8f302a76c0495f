"""scripts/bench_adaptation.py: the still-window reference, the heart-rate rows on a shifted simulator, and the
HAPT split into recordings that its per-recording protocol relies on. No timing is asserted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_client.sources.simulator import SimulatedDataset
from models import Model, activity_spec, heart_rate_spec

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_adaptation.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_adaptation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_still_windows_take_the_spectral_peak_and_moving_ones_the_model(bench):
    spec = heart_rate_spec()
    model = Model(spec, seed=0)
    n = spec.input_shape[1]
    t = np.arange(n, dtype=np.float32) / spec.sampling_rate_hz
    x = np.zeros((2, *spec.input_shape), np.float32)
    x[:, spec.channels.index("ppg")] = np.sin(2 * np.pi * 1.5 * t)  # 90 BPM
    x[:, spec.channels.index("acc_z")] = 1.0  # gravity, no gait
    x[1, spec.channels.index("acc_x")] = 0.5 * np.sin(2 * np.pi * 1.8 * t)  # the second window walks
    got = bench._still_reference(model, x)
    assert bench._still(model, x).tolist() == [True, False]
    assert got[0] == pytest.approx(90.0, abs=1.0)
    assert got[1] == pytest.approx(float(model.predict(x[1:]).ravel()[0]))


def test_heart_rate_rows_cover_every_held_out_wearer(bench):
    model = Model(heart_rate_spec(), seed=0)
    dataset = SimulatedDataset(seed=0, wearers=3, minutes=2, test_wearers=2, device="arm-ir")
    rows = bench._heart_rate_rows(model, dataset, 0.5)
    assert set(rows["wearers"]) == set(dataset.test_clients)
    assert set(rows["mae_bpm"]) == {"global", "statistics", "still_reference"}
    assert all(np.isfinite(v) and v >= 0 for v in rows["mae_bpm"].values())
    assert rows["mae_bpm"]["statistics"] != rows["mae_bpm"]["global"]  # re-estimated statistics change predictions


def test_hapt_test_users_split_into_their_recordings(bench, hapt_dir):
    model = Model(activity_spec(), seed=0)
    users = bench._hapt_users(model, str(hapt_dir))
    assert len(users) == 9
    for client, (x, y, recording) in users.items():
        assert len(x) == len(y) == len(recording)
        experiments = len(list(Path(hapt_dir).glob(f"acc_exp*_user{client[-2:]}.txt")))  # two, user-10 three
        assert np.unique(recording).tolist() == list(range(experiments)), client
        assert np.all(np.diff(recording) >= 0), client
    result = bench.bench_hapt(model, str(hapt_dir), 0.5)
    assert set(result["users"]) == set(users)
    assert all(0.0 <= v <= 1.0 for v in result["pooled"].values())
