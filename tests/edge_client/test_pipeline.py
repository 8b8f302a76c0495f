"""Streaming preprocessing: chunk invariance, resampling accuracy, bad data counted not fatal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import signal

from edge_client.pipeline import Preprocessor, windows_from_chunks
from edge_client.resampling import StreamingResampler
from edge_client.sources.base import Chunk
from edge_client.windowing import Windower, Windows, normalize_windows
from models import activity_spec, heart_rate_spec

CHANNELS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z", "ppg")


def _stream(seconds: float = 90.0, rate: float = 50.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    data = (0.3 * rng.standard_normal((n, 7))).astype(np.float32)
    data[:, 2] += 1.0
    data[:, 6] += np.sin(2 * np.pi * 1.4 * t)
    activity = (np.arange(n) // 700 % 4).astype(np.int16)
    hr = np.full(n, 84.0, np.float32)
    return t, data, activity, hr


def _run(spec, t, data, act, hr, sizes):
    pre = Preprocessor(spec, 50.0)
    outs, i, k = [], 0, 0
    while i < len(t):
        size = sizes[k % len(sizes)]
        sl = slice(i, i + size)
        outs.append(pre(Chunk("c", t[sl], data[sl], CHANNELS, act[sl], hr[sl])))
        i, k = i + size, k + 1
    outs = [o for o in outs if len(o)]
    return outs, pre.stats


def _same(a, b):
    from edge_client.windowing import Windows

    a, b = Windows.concat(a), Windows.concat(b)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.activity, b.activity)
    np.testing.assert_array_equal(a.hr_bpm, b.hr_bpm)
    np.testing.assert_array_equal(a.t_end, b.t_end)
    return a


@pytest.mark.parametrize("spec", [heart_rate_spec(), activity_spec()], ids=["heart-rate", "activity"])
def test_one_sample_at_a_time_gives_the_same_windows_as_one_block(spec):
    t, data, act, hr = _stream(60)
    data[1200:1230, 6] = np.nan  # a NaN run
    t[2000:] += 3.0  # a gap
    whole, _ = _run(spec, t, data, act, hr, [len(t)])
    single, _ = _run(spec, t, data, act, hr, [1])
    merged = _same(whole, single)
    assert len(merged) > 5


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 700), min_size=1, max_size=6))
def test_any_chunking_gives_the_same_windows(sizes):
    t, data, act, hr = _stream(40, seed=3)
    reference, _ = _run(heart_rate_spec(), t, data, act, hr, [len(t)])
    chunked, _ = _run(heart_rate_spec(), t, data, act, hr, sizes)
    _same(reference, chunked)


def test_resampler_matches_scipy_polyphase_resampling():
    x = np.random.default_rng(1).standard_normal(3000).astype(np.float32)
    ours, _, _, index = StreamingResampler(50.0, 32.0, 1)(x[:, None], np.zeros(3000, np.int16), np.zeros(3000))
    theirs = signal.resample_poly(x.astype(np.float64), 16, 25)
    assert index[0] == 0 and np.all(np.diff(index) == 1)
    np.testing.assert_allclose(ours[:, 0], theirs[: len(ours)], atol=1e-5)


def test_heart_rate_windows_are_resampled_filtered_and_normalized():
    t, data, act, hr = _stream(60)
    spec = heart_rate_spec()
    windows, stats = windows_from_chunks([Chunk("c", t, data, CHANNELS, act, hr)], spec, 50.0)
    assert windows.x.shape[1:] == (4, 256)
    assert stats.windows == len(windows) and stats.invalid_samples == 0
    np.testing.assert_allclose(windows.x[:, 0].mean(axis=1), 0, atol=1e-4)  # ppg z-scored
    np.testing.assert_allclose(windows.x[:, 0].std(axis=1), 1, atol=1e-3)
    np.testing.assert_allclose(windows.x[:, 3].mean(axis=1), 0, atol=1e-4)  # gravity removed
    spectrum = np.abs(np.fft.rfft(windows.x[:, 0], axis=1)).mean(axis=0)
    peak_hz = np.fft.rfftfreq(256, 1 / 32.0)[spectrum.argmax()]
    assert abs(peak_hz - 1.4) < 0.15
    np.testing.assert_allclose(windows.hr_bpm, 84.0)


def test_windows_never_span_gaps_nan_runs_or_saturated_samples():
    t, data, act, hr = _stream(60)
    data[500, 0] = 20.0  # saturated accelerometer
    data[1500:1510, 6] = np.nan
    t[2200:] -= 0.5  # the clock steps back
    spec = activity_spec(channels=CHANNELS[:6])
    windows, stats = windows_from_chunks([Chunk("c", t, data, CHANNELS, act, hr)], spec, 50.0)
    assert stats.invalid_samples == 1  # the NaN run is in ppg, which this model does not read
    assert stats.gaps == 2 and stats.dropped_windows == 2
    for i in range(len(windows)):
        end = windows.t_end[i]
        start = end - (spec.window - 1) / 50.0
        assert not (start <= t[500] <= end)
        assert np.all(np.abs(windows.x[i]) < 16)


def test_window_label_is_the_majority_activity_else_unknown():
    w = Windower(window=10, hop=5, channels=1, rate_hz=1.0)
    act = np.array([0] * 8 + [1] * 12 + [-1] * 10, np.int16)
    out = w(np.zeros((30, 1), np.float32), act, np.full(30, np.nan, np.float32), np.arange(30.0))
    assert out.activity.tolist() == [0, 1, 1, 1, -1]
    assert np.isnan(out.hr_bpm).all()


def test_normalize_center_and_zscore():
    x = np.random.default_rng(0).standard_normal((3, 3, 50)).astype(np.float32) * 4 + 2
    y = normalize_windows(x, ["none", "center", "zscore"])
    np.testing.assert_array_equal(y[:, 0], x[:, 0])
    np.testing.assert_allclose(y[:, 1].mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(y[:, 2].std(axis=1), 1, atol=1e-4)


def test_a_missing_channel_is_a_clear_input_error():
    from models import InputError

    t, data, act, hr = _stream(5)
    pre = Preprocessor(heart_rate_spec(), 50.0)
    with pytest.raises(InputError, match="ppg"):
        pre(Chunk("c", t, data[:, :6], CHANNELS[:6], act, hr))


class _ScipySOS:
    """The band-pass stage as the edge ran it on scipy (sosfilt with carried zi), for reference."""

    def __init__(self, sos, channels):
        self.sos, self._zi = sos, None

    def reset(self):
        self._zi = None

    def __call__(self, x):
        x64 = x.astype(np.float64)
        if self._zi is None:
            self._zi = signal.sosfilt_zi(self.sos)[:, :, None] * x64[0][None, None, :]
        y, self._zi = signal.sosfilt(self.sos, x64, axis=0, zi=self._zi)
        return y.astype(np.float32)


def test_windows_match_the_scipy_band_pass(monkeypatch):
    import edge_client.pipeline as pipeline

    t, data, act, hr = _stream(60)
    data[1200:1230, 6] = np.nan
    t[2000:] += 3.0
    ours, _ = _run(heart_rate_spec(), t, data, act, hr, [333])
    monkeypatch.setattr(pipeline, "StreamingSOS", _ScipySOS)
    theirs, _ = _run(heart_rate_spec(), t, data, act, hr, [333])
    a, b = Windows.concat(ours), Windows.concat(theirs)
    assert len(a) == len(b) > 5
    np.testing.assert_allclose(a.x, b.x, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(a.t_end, b.t_end)


def test_the_edge_pipeline_does_not_import_scipy():
    """import scipy.signal costs a gateway ~100 MB resident; the edge data path must not pull it in."""
    code = (
        "import sys, edge_client.pipeline\n"
        "loaded = sorted(m for m in sys.modules if m == 'scipy' or m.startswith('scipy.'))\n"
        "assert not loaded, loaded\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
