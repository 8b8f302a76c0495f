"""The numpy lfilter (the simulator's noise filters) matches scipy.signal.lfilter, state included.

scipy is only the reference here: the simulator and the rest of the edge do not import it.
"""

from __future__ import annotations

import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import signal

from edge_client.filters import LFILTER_BLOCK, lfilter
from edge_client.resampling import rational_ratio
from edge_client.sources import simulator

ROOT = Path(__file__).resolve().parents[2]

FILTERS = [  # name, b, a, tolerance as a share of the output's scale
    ("first-order 20 s", *simulator._SLOW, 1e-13),
    ("first-order 0.25 s", *simulator._FIDN, 1e-13),
    # Poles near z = 1 make the direct form ill-conditioned: the block form's sums in another
    # order then differ from scipy's sequential ones by ~1e-11 of the scale (against 6e-8 for
    # the float32 samples the simulator makes of them).
    ("0.1 Hz resonance", simulator._LF_B, simulator._LF_A, 1e-10),
    ("butterworth band-pass", *signal.butter(2, [0.5, 4.0], btype="bandpass", fs=50.0), 1e-9),
    ("FIR and IIR of unequal length, a0 != 1", np.array([0.2, 0.1, 0.3]), np.array([1.5, -0.3, 0.2, 0.1]), 1e-13),
    ("pure gain", np.array([2.0]), np.array([4.0]), 1e-13),
]
SHAPES = [(1,), (5,), (LFILTER_BLOCK,), (LFILTER_BLOCK + 1,), (8192,), (3, 8192), (2, 1000), (2, 3, 70), (4, 0)]


def _scale(y: np.ndarray) -> float:
    return max(1.0, float(np.abs(y).max(initial=0.0)))


@pytest.mark.parametrize("name,b,a,tol", FILTERS, ids=[f[0] for f in FILTERS])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_scipy_lfilter_with_and_without_state(name, b, a, tol, shape):
    if shape[-1] == 0 and len(np.atleast_1d(a)) == 1:
        pytest.skip("scipy cannot filter an empty signal through a pure FIR")
    rng = np.random.default_rng(len(name) + sum(shape))
    x = rng.random(shape) - 0.5
    order = max(len(np.atleast_1d(a)), len(np.atleast_1d(b))) - 1
    zi = rng.standard_normal((*shape[:-1], order))
    y, zf = lfilter(b, a, x, zi=zi)
    ref_y, ref_zf = signal.lfilter(b, a, x, zi=zi)
    assert y.shape == ref_y.shape and zf.shape == ref_zf.shape and y.dtype == np.float64
    scale = _scale(ref_y)
    np.testing.assert_allclose(y, ref_y, rtol=0, atol=tol * scale)
    if shape[-1]:  # scipy's final state of an empty input is uninitialised memory
        np.testing.assert_allclose(zf, ref_zf, rtol=0, atol=tol * scale)
    else:
        np.testing.assert_array_equal(zf, zi)
    np.testing.assert_allclose(lfilter(b, a, x), signal.lfilter(b, a, x), rtol=0, atol=tol * scale)


@settings(max_examples=40, deadline=None)
@given(
    poles=st.lists(st.floats(0.0, 0.999), min_size=1, max_size=4),
    gain=st.floats(0.01, 10.0),
    n=st.integers(1, 3000),
    seed=st.integers(0, 2**16),
)
def test_random_stable_filters_match_scipy(poles, gain, n, seed):
    a = np.poly(np.array(poles) * np.where(np.arange(len(poles)) % 2, -1.0, 1.0))
    b = gain * np.random.default_rng(seed).standard_normal(len(poles))
    x = np.random.default_rng(seed + 1).standard_normal((2, n))
    zi = np.random.default_rng(seed + 2).standard_normal((2, len(a) - 1))
    y, zf = lfilter(b, a, x, zi=zi)
    ref_y, ref_zf = signal.lfilter(b, a, x, zi=zi)
    # the block form sums in another order: the error grows with the filter's gain, not with n
    scale = _scale(ref_y) * max(1.0, float(np.sum(np.abs(b))) / float(np.prod(1 - np.abs(poles))))
    np.testing.assert_allclose(y, ref_y, rtol=0, atol=1e-11 * scale)
    np.testing.assert_allclose(zf, ref_zf, rtol=0, atol=1e-11 * scale)


def test_a_stream_filtered_in_pieces_continues_through_the_state():
    b, a = simulator._LF_B, simulator._LF_A
    x = np.random.default_rng(3).random(20_000) - 0.5
    whole, _ = signal.lfilter(b, a, x, zi=np.zeros(2))
    parts, state = [], np.zeros(2)
    for start in range(0, len(x), 8192):
        y, state = lfilter(b, a, x[start : start + 8192], zi=state)
        parts.append(y)
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=0, atol=1e-10 * _scale(whole))


def test_the_simulated_stream_rounds_like_the_scipy_filters():
    """The float32 samples made with these filters are those scipy's made, but for rare last-bit roundings."""
    b, a = simulator._LF_B, simulator._LF_A
    x = np.random.default_rng(5).random((1, 50_000)) - 0.5
    ours = lfilter(b, a, x).astype(np.float32)
    ref = signal.lfilter(b, a, x).astype(np.float32)
    assert np.mean(ours != ref) < 5e-3
    np.testing.assert_allclose(ours, ref, rtol=0, atol=float(np.spacing(np.float32(_scale(ref)))))  # one float32 step


def test_bad_coefficients_are_refused():
    with pytest.raises(ValueError):
        lfilter([1.0], [0.0, 1.0], np.ones(4))
    with pytest.raises(ValueError):
        lfilter([], [1.0], np.ones(4))


def test_simulator_noise_filters_match_scipy_over_a_block():
    """The simulator's four noise filters, with its block length and state shapes, as scipy ran them."""
    rng = np.random.default_rng(0)
    u = (rng.random((7, simulator._BLOCK)) - 0.5) * math.sqrt(12.0)
    cases = [((simulator._LF_B, simulator._LF_A), u[0], np.zeros(2)),
             (simulator._SLOW, u[1:3], rng.standard_normal((2, 1))),
             (simulator._CADN, u[3], rng.standard_normal(1)),
             (simulator._FIDN, u[4:7], rng.standard_normal((3, 1)))]
    for (b, a), x, zi in cases:
        y, zf = lfilter(b, a, x, zi=zi)
        ref_y, ref_zf = signal.lfilter(b, a, x, zi=zi)
        tol = 1e-10 if len(a) > 2 else 1e-13  # the resonance: see FILTERS
        np.testing.assert_allclose(y, ref_y, rtol=0, atol=tol * _scale(ref_y))
        np.testing.assert_allclose(zf, ref_zf, rtol=0, atol=tol * _scale(ref_y))


def test_the_simulator_does_not_import_scipy():
    code = (
        "import sys\n"
        "from edge_client.sources.simulator import SimulatedWearer\n"
        "next(SimulatedWearer('wearer-01', 0, minutes=1).chunks(500))\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'scipy')\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("to_hz,from_hz", [(32, 50), (50, 32), (25, 100), (32, 32), (1000 / 3, 128), (31.25, 50),
                                           (52.0, 50.0), (64, 50), (100, 7)])
@pytest.mark.parametrize("max_denominator", [1, 7, 10, 1000])
def test_rational_ratio_is_fractions_limit_denominator(to_hz, from_hz, max_denominator):
    expected = Fraction(to_hz / from_hz).limit_denominator(max_denominator)
    assert rational_ratio(to_hz / from_hz, max_denominator) == (expected.numerator, expected.denominator)


@settings(max_examples=300, deadline=None)
@given(x=st.floats(1e-3, 1e3), max_denominator=st.integers(1, 2000))
def test_rational_ratio_is_fractions_limit_denominator_for_any_ratio(x, max_denominator):
    expected = Fraction(x).limit_denominator(max_denominator)
    assert rational_ratio(x, max_denominator) == (expected.numerator, expected.denominator)
