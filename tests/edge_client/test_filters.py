"""The numpy-only filters match scipy.signal, and stream identically to the bit however chunked.

scipy is only the reference here: the edge imports neither it nor anything that loads it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import signal

from edge_client.filters import BLOCK, StreamingSOS, bandpass_sos, sosfilt_zi
from edge_client.resampling import lowpass_taps
from models.errors import ConfigError

DESIGNS = [
    (order, rate, band)
    for order, rate, band in itertools.product(
        range(1, 7),
        [25.0, 50.0, 64.0, 100.0, 1000.0],
        [(0.5, 4.0), (0.1, 0.2), (1.0, 10.0), (0.05, 12.0), (5.0, 12.4)],
    )
    if band[1] < rate / 2
]


def _response(sos: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Complex frequency response of second-order sections at w (rad/sample), in numpy."""
    z = np.exp(-1j * w)[:, None]
    num = sos[:, 0] + sos[:, 1] * z + sos[:, 2] * z**2
    den = sos[:, 3] + sos[:, 4] * z + sos[:, 5] * z**2
    return np.prod(num / den, axis=1)


def _ppg(n: int, channels: int = 1, seed: int = 0, offset: float = 100.0) -> np.ndarray:
    """Pulse-like signal on a large DC offset (raw PPG sits far from zero), plus noise and drift."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None] / 50.0
    x = offset + np.sin(2 * np.pi * 1.3 * t + np.arange(channels)) + 0.3 * rng.standard_normal((n, channels))
    return (x + 0.5 * np.sin(2 * np.pi * 0.01 * t)).astype(np.float32)


def _reference(sos: np.ndarray, x: np.ndarray) -> np.ndarray:
    """What the edge did with scipy: sosfilt started at the steady state for x[0], in float64."""
    x64 = x.astype(np.float64)
    y, _ = signal.sosfilt(sos, x64, axis=0, zi=signal.sosfilt_zi(sos)[:, :, None] * x64[0][None, None, :])
    return y


def _chunked(f: StreamingSOS, x: np.ndarray, sizes: list[int]) -> np.ndarray:
    out, i, k = [], 0, 0
    while i < len(x):
        size = sizes[k % len(sizes)]
        out.append(f.filter_float64(x[i : i + size]))
        i, k = i + size, k + 1
    return np.concatenate(out)


@pytest.mark.parametrize(("order", "rate", "band"), DESIGNS)
def test_bandpass_design_matches_scipy_butter(order, rate, band):
    ours = bandpass_sos(band[0], band[1], rate, order)
    theirs = signal.butter(order, list(band), btype="bandpass", fs=rate, output="sos")
    assert ours.shape == theirs.shape == (order, 6)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-15)  # same sections, same order, same gain
    w = np.linspace(0, np.pi, 2048)
    np.testing.assert_allclose(_response(ours, w), signal.sosfreqz(theirs, worN=w)[1], rtol=0, atol=1e-9)


def test_bandpass_passes_the_band_and_stops_outside_it():
    sos = bandpass_sos(0.5, 4.0, 50.0)
    gain = np.abs(_response(sos, 2 * np.pi * np.array([0.0, 0.05, 1.4, 10.0, 25.0]) / 50.0))
    assert gain[0] < 1e-12 and gain[-1] < 1e-12  # zeros at DC and Nyquist
    assert gain[1] < 0.02 and gain[3] < 0.1
    assert 0.95 < gain[2] <= 1.0 + 1e-12
    np.testing.assert_allclose(np.abs(_response(sos, 2 * np.pi * np.array([0.5, 4.0]) / 50.0)), 2**-0.5, rtol=1e-9)


@pytest.mark.parametrize(
    ("low", "high", "rate", "order"),
    [(0.0, 4.0, 50.0, 2), (4.0, 0.5, 50.0, 2), (0.5, 25.0, 50.0, 2), (0.5, 4.0, 50.0, 0)],
)
def test_bandpass_rejects_bad_bands_and_orders(low, high, rate, order):
    with pytest.raises(ConfigError):
        bandpass_sos(low, high, rate, order)


@pytest.mark.parametrize(("order", "rate", "band"), DESIGNS[::7])
def test_steady_state_matches_scipy_sosfilt_zi(order, rate, band):
    sos = bandpass_sos(band[0], band[1], rate, order)
    np.testing.assert_allclose(sosfilt_zi(sos), signal.sosfilt_zi(sos), rtol=1e-11, atol=1e-13)


def test_a_constant_stream_starts_in_steady_state():
    f = StreamingSOS(bandpass_sos(0.5, 4.0, 50.0), 2)
    y = f.filter_float64(np.full((500, 2), [1500.0, -3.0]))
    assert np.abs(y).max() < 1e-9  # no start-up step: a band-pass passes nothing of a constant


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("channels", [1, 3])
def test_filter_matches_scipy_sosfilt(order, channels):
    sos = bandpass_sos(0.5, 4.0, 50.0, order)
    x = _ppg(20_000 + 17, channels, seed=order)
    y = StreamingSOS(sos, channels).filter_float64(x)
    ref = _reference(sos, x)
    assert y.shape == ref.shape
    assert np.abs(y - ref).max() <= 1e-10 * np.abs(ref).max()


def test_filter_matches_scipy_over_an_hour_in_pipeline_chunks():
    """One hour at 50 Hz, fed as the runtime reads it: the block recursion does not drift."""
    sos = bandpass_sos(0.5, 4.0, 50.0)
    x = _ppg(3600 * 50)
    y = _chunked(StreamingSOS(sos, 1), x, [500])
    ref = _reference(sos, x)
    assert np.abs(y - ref).max() <= 1e-10 * np.abs(ref).max()
    np.testing.assert_array_equal(StreamingSOS(sos, 1).filter_float64(x), y)  # one call, run in slabs
    f = StreamingSOS(sos, 1)
    out = np.concatenate([f(x[i : i + 500]) for i in range(0, len(x), 500)])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, y.astype(np.float32))


def test_one_sample_at_a_time_is_bit_identical_to_one_block():
    sos = bandpass_sos(0.5, 4.0, 50.0)
    x = _ppg(7 * BLOCK + 5, 3)
    whole = StreamingSOS(sos, 3).filter_float64(x)
    single = _chunked(StreamingSOS(sos, 3), x, [1])
    np.testing.assert_array_equal(single, whole)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3 * BLOCK + 1), min_size=1, max_size=8),
    order=st.integers(1, 4),
    channels=st.integers(1, 3),
)
def test_any_chunking_is_bit_identical(sizes, order, channels):
    sos = bandpass_sos(0.5, 4.0, 50.0, order)
    x = _ppg(25 * BLOCK + 11, channels, seed=len(sizes))
    whole = StreamingSOS(sos, channels).filter_float64(x)
    chunked = _chunked(StreamingSOS(sos, channels), x, sizes)
    np.testing.assert_array_equal(chunked, whole)
    f = StreamingSOS(sos, channels)
    np.testing.assert_array_equal(np.concatenate([f(x[:37]), f(x[37:])]), whole.astype(np.float32))


def test_reset_starts_a_new_segment_from_its_first_sample():
    sos = bandpass_sos(0.5, 4.0, 50.0)
    a, b = _ppg(301, seed=1), _ppg(200, seed=2, offset=-40.0)
    f = StreamingSOS(sos, 1)
    f(a)  # leaves a partial block pending
    f.reset()
    np.testing.assert_array_equal(f.filter_float64(b), StreamingSOS(sos, 1).filter_float64(b))


def test_empty_and_misshaped_input():
    f = StreamingSOS(bandpass_sos(0.5, 4.0, 50.0), 2)
    out = f(np.zeros((0, 2), np.float32))
    assert out.shape == (0, 2) and out.dtype == np.float32
    with pytest.raises(ValueError, match="expected"):
        f(np.zeros((5, 3), np.float32))


@pytest.mark.parametrize(("up", "down"), [(16, 25), (25, 16), (1, 2), (3, 5), (32, 50), (64, 25), (1, 1000)])
def test_lowpass_taps_match_scipy_firwin(up, down):
    half = 10 * max(up, down)
    cutoff = 1.0 / max(up, down)
    ours = lowpass_taps(2 * half + 1, cutoff)
    theirs = signal.firwin(2 * half + 1, cutoff, window=("kaiser", 5.0))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12 * np.abs(theirs).max())
    assert abs(ours.sum() - 1.0) < 1e-12  # unit DC gain, as firwin's scale=True
    np.testing.assert_allclose(ours, ours[::-1], rtol=0, atol=1e-18)  # linear phase


def test_lowpass_taps_rejects_a_bad_cutoff():
    with pytest.raises(ConfigError):
        lowpass_taps(21, 1.0)
