"""The simulated-wearers source ``sim:SEED``: determinism, stream format, physiology and motion."""

from __future__ import annotations

import math
import time
from functools import cache

import numpy as np
import pytest
from scipy.signal import butter, sosfiltfilt

from edge_client.sources.base import CHANNELS, Chunk
from edge_client.sources.simulator import SIM_CLASSES, SimulatedDataset, SimulatedWearer, WearerProfile
from models.errors import ConfigError

FS = 50.0
SIT, STAND, LIE, WALK, RUN, CYCLE, STAIRS = range(7)
WINDOW = 400  # 8 s


@cache
def stream(seed: int, client_id: str, minutes: float = 30.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole stream of one wearer: data (n, 7), activity (n,), hr (n,)."""
    (chunk,) = SimulatedWearer(client_id, seed, minutes).chunks(max_samples=10**6)
    return chunk.data, chunk.activity, chunk.hr_bpm


def dataset_streams(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [stream(seed, c) for c in SimulatedDataset(seed).clients]


def concatenated(wearer: SimulatedWearer, max_samples: int) -> tuple[np.ndarray, ...]:
    chunks = list(wearer.chunks(max_samples))
    assert all(len(c) <= max_samples for c in chunks)
    return tuple(np.concatenate([getattr(c, f) for c in chunks]) for f in ("t", "data", "activity", "hr_bpm"))


def windows_of(activity: np.ndarray, k: int) -> list[slice]:
    """Non-overlapping 8 s windows that lie wholly inside activity ``k``."""
    starts = range(0, len(activity) - WINDOW, WINDOW)
    return [slice(s, s + WINDOW) for s in starts if (activity[s:s + WINDOW] == k).all()]


def spectrum(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies (Hz) and power of a Hann-windowed, zero-padded window, restricted to 0.6-4 Hz."""
    f = np.fft.rfftfreq(4096, 1 / FS)
    p = np.abs(np.fft.rfft((x - x.mean()) * np.hanning(len(x)), 4096)) ** 2
    band = (f > 0.6) & (f < 4.0)
    return f[band], p[band]


def vertical(acc: np.ndarray) -> np.ndarray:
    """Acceleration along the window's mean direction (gravity): where the steps show."""
    up = acc.mean(axis=0)
    return acc @ (up / np.linalg.norm(up))


def cadence(acc: np.ndarray) -> float:
    """The step (or pedal) rate of a window: the spectral peak of its vertical acceleration."""
    f, p = spectrum(vertical(acc))
    return float(f[np.argmax(p)])


def bandpassed_ppg(data: np.ndarray) -> np.ndarray:
    return sosfiltfilt(butter(3, [0.6, 4.0], btype="band", fs=FS, output="sos"), data[:, 6].astype(np.float64))


# Determinism and stream format


def test_same_seed_and_wearer_give_identical_streams():
    a, b = SimulatedWearer("wearer-03", 7, minutes=2), SimulatedWearer("wearer-03", 7, minutes=2)
    assert a.profile == b.profile
    first, again, other = concatenated(a, 4096), concatenated(a, 4096), concatenated(b, 4096)
    for x, y, z in zip(first, again, other, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)


@pytest.mark.parametrize(("minutes", "sizes"), [(0.4, (1, 37, 4096)), (6.0, (37, 4096, 10_000, 10**6))])
def test_samples_do_not_depend_on_chunk_size(minutes, sizes):
    wearer = SimulatedWearer("wearer-05", 1, minutes=minutes)
    reference = concatenated(wearer, sizes[0])
    assert len(reference[0]) == round(minutes * 60 * FS)
    for size in sizes[1:]:
        for x, y in zip(reference, concatenated(wearer, size), strict=True):
            np.testing.assert_array_equal(x, y)


def test_longer_stream_starts_with_the_shorter_one():
    short = concatenated(SimulatedWearer("wearer-02", 0, minutes=3), 4096)
    long = concatenated(SimulatedWearer("wearer-02", 0, minutes=9), 500)
    for x, y in zip(short, long, strict=True):
        np.testing.assert_array_equal(x, y[: len(x)])


def test_endless_stream_starts_like_a_finite_one():
    endless = SimulatedWearer("wearer-02", 0, minutes=math.inf).chunks(3000)
    finite = concatenated(SimulatedWearer("wearer-02", 0, minutes=3), 4096)
    head = [next(endless) for _ in range(3)]
    for field, expected in zip(("t", "data", "activity", "hr_bpm"), finite, strict=True):
        np.testing.assert_array_equal(np.concatenate([getattr(c, field) for c in head]), expected)
    assert next(endless).t[0] == 180.0


def test_different_seeds_and_wearers_differ():
    base = SimulatedWearer("wearer-01", 0, minutes=1)
    others = [SimulatedWearer("wearer-02", 0, minutes=1), SimulatedWearer("wearer-01", 1, minutes=1)]
    _, data, _, hr = concatenated(base, 4096)
    for other in others:
        assert other.profile != base.profile
        _, data2, _, hr2 = concatenated(other, 4096)
        assert not np.allclose(data, data2)
        assert not np.allclose(hr, hr2)


def test_wearer_identity_is_its_index_whatever_the_id_width():
    assert SimulatedWearer("wearer-07", 3).profile == SimulatedWearer("wearer-007", 3).profile


def test_chunks_have_the_source_format():
    wearer = SimulatedWearer("wearer-00", 0, minutes=3)
    assert (wearer.channels, wearer.sampling_rate_hz, wearer.classes) == (CHANNELS, 50.0, SIM_CLASSES)
    assert isinstance(wearer.profile, WearerProfile)
    chunks = list(wearer.chunks(1000))
    assert [len(c) for c in chunks] == [1000] * 9
    for c in chunks:
        assert isinstance(c, Chunk)
        assert (c.client_id, c.channels, c.classes) == ("wearer-00", CHANNELS, SIM_CLASSES)
        assert c.t.dtype == np.float64 and c.data.dtype == np.float32 and c.data.shape == (len(c), 7)
        assert c.activity.dtype == np.int16 and c.hr_bpm.dtype == np.float32
        assert np.isfinite(c.data).all() and np.isfinite(c.hr_bpm).all()
        assert ((c.activity >= 0) & (c.activity < len(SIM_CLASSES))).all()
    t = np.concatenate([c.t for c in chunks])
    np.testing.assert_allclose(t, np.arange(9000) / FS)
    assert (np.diff(t) > 0).all()


def test_realtime_paces_chunks_to_wall_clock():
    wearer = SimulatedWearer("wearer-00", 0, minutes=0.01, realtime=True)  # 30 samples = 0.6 s
    start = time.monotonic()
    for chunk in wearer.chunks(10):
        assert time.monotonic() - start >= chunk.t[-1] - 0.02
    assert time.monotonic() - start >= 0.55


def test_invalid_arguments_raise_config_error():
    with pytest.raises(ConfigError):
        SimulatedWearer("wearer-00", -1)
    with pytest.raises(ConfigError):
        SimulatedWearer("wearer-00", 0, minutes=0)
    with pytest.raises(ConfigError):
        next(SimulatedWearer("wearer-00", 0).chunks(0))
    with pytest.raises(ConfigError):
        SimulatedDataset(wearers=3, test_wearers=4)


# Dataset


def test_dataset_names_clients_and_splits_them():
    ds = SimulatedDataset(seed=4)
    assert ds.name == "sim:4"
    assert ds.clients == tuple(f"wearer-{i:02d}" for i in range(30))
    assert ds.train_clients == ds.clients[:24] and ds.test_clients == ds.clients[24:]
    assert (ds.channels, ds.sampling_rate_hz, ds.classes, ds.has_heart_rate) == (CHANNELS, 50.0, SIM_CLASSES, True)
    source = ds.source("wearer-29")
    assert (source.client_id, source.seed, source.minutes) == ("wearer-29", 4, 30.0)
    assert source.profile == SimulatedWearer("wearer-29", 4).profile


def test_unknown_client_raises_config_error_listing_valid_ids():
    with pytest.raises(ConfigError, match=r"wearer-00.*wearer-04"):
        SimulatedDataset(wearers=5, test_wearers=1).source("wearer-05")


def test_every_wearer_runs_and_climbs_stairs_and_the_dataset_covers_all_classes():
    seen = set()
    for _, activity, _ in dataset_streams():
        starts = np.flatnonzero(np.diff(activity, prepend=-1) != 0)
        visits = np.bincount(activity[starts], minlength=7)
        assert visits[RUN] >= 2 and visits[STAIRS] >= 2
        seen |= set(np.unique(activity).tolist())
    assert seen == set(range(len(SIM_CLASSES)))


def test_heart_rate_spans_rest_to_near_maximal_across_the_dataset():
    hr = np.concatenate([h for _, _, h in dataset_streams()])
    assert 36 < hr.min() < 55 and 185 < hr.max() < 215


# Physiology


def steady_hr(activity: np.ndarray, hr: np.ndarray, k: int) -> float:
    """Mean HR over the second half of activity ``k``'s segments that last a minute or more."""
    starts = np.flatnonzero(np.diff(activity, prepend=-1) != 0)
    ends = np.append(starts[1:], len(activity))
    parts = [hr[(s + e) // 2:e] for s, e in zip(starts, ends, strict=True) if activity[s] == k and e - s >= 60 * FS]
    return float(np.concatenate(parts).mean()) if parts else np.nan


def test_mean_hr_is_higher_while_running_than_walking_than_sitting():
    streams = dataset_streams()
    activity, hr = (np.concatenate([s[i] for s in streams]) for i in (1, 2))
    assert hr[activity == RUN].mean() > hr[activity == WALK].mean() + 20 > hr[activity == SIT].mean() + 30
    compared = 0
    for _, activity, hr in streams:  # per wearer, once HR has settled into the activity
        steady = [steady_hr(activity, hr, k) for k in (SIT, WALK, RUN)]
        if not np.isnan(steady).any():
            assert steady[2] > steady[1] > steady[0]
            compared += 1
    assert compared >= 10


def test_hr_rises_over_tens_of_seconds_after_switching_from_rest_to_running():
    switches = 0
    for _, activity, hr in dataset_streams():
        for k in np.flatnonzero(np.diff(activity) != 0) + 1:
            before, after = activity[max(0, k - 1500):k], activity[k:k + 3000]
            rested = np.isin(before, [SIT, STAND, LIE]).all()
            if activity[k] == RUN and len(after) == 3000 and (after == RUN).all() and rested:
                switches += 1
                rest = hr[k - 250:k].mean()  # 2 s averages, so that RSA and HRV do not blur the trend
                rise_5s, rise_30s, rise_60s = (hr[k + 50 * s - 50:k + 50 * s + 50].mean() - rest for s in (5, 30, 60))
                assert rise_60s > 20
                assert rise_5s < 0.4 * rise_60s
                assert 0.4 * rise_60s < rise_30s < 0.95 * rise_60s
    assert switches >= 3


def test_ppg_spectral_peak_is_the_heart_rate_while_sitting():
    errors = []
    for data, activity, hr in dataset_streams()[:8]:
        ppg = bandpassed_ppg(data)
        for w in windows_of(activity, SIT):
            f, p = spectrum(ppg[w])
            errors.append(abs(60 * f[np.argmax(p)] - hr[w].mean()))
    assert len(errors) > 50
    assert np.mean(np.array(errors) < 5) > 0.9


def cadence_lines(data: np.ndarray, activity: np.ndarray, hr: np.ndarray, k: int) -> list[tuple[float, float]]:
    """Per 8 s window of activity ``k``: the PPG power at the accelerometer's cadence, and its ratio to the median."""
    ppg, lines = bandpassed_ppg(data), []
    for w in windows_of(activity, k):
        step = cadence(data[w, :3])
        if abs(step - hr[w].mean() / 60) > 0.3:  # a line of its own, not the heart's
            f, p_ppg = spectrum(ppg[w])
            line = p_ppg[np.abs(f - step) < 0.1].max()
            lines.append((line, line / np.median(p_ppg)))
    return lines


def test_running_cadence_shows_up_in_the_ppg_spectrum():
    ratios = [r for stream_ in dataset_streams()[:8] for _, r in cadence_lines(*stream_, RUN)]
    assert len(ratios) > 20
    assert np.median(ratios) > 20  # a clear spectral line at the cadence, not the noise floor


def test_motion_artifact_grows_with_motion_intensity():
    for stream_ in dataset_streams()[:8]:
        walking, running = ([line for line, _ in cadence_lines(*stream_, k)] for k in (WALK, RUN))
        if walking and running:
            assert np.median(running) > 3 * np.median(walking)


# Motion


def test_gait_cadence_depends_on_activity():
    checked = 0
    for data, activity, _ in dataset_streams()[:8]:
        rate = {k: np.median([cadence(data[w, :3]) for w in windows_of(activity, k)] or [np.nan])
                for k in (WALK, RUN, CYCLE, STAIRS)}
        assert np.isnan(rate[RUN]) or 2.4 < rate[RUN] < 3.1
        assert np.isnan(rate[CYCLE]) or 1.1 < rate[CYCLE] < 1.7
        if not np.isnan(rate[WALK]):
            assert 1.5 < rate[WALK] < 2.1
            assert np.isnan(rate[STAIRS]) or rate[STAIRS] < rate[WALK]
            checked += 1
    assert checked >= 4


def test_gravity_direction_differs_between_lying_and_standing():
    compared = 0
    for data, activity, _ in dataset_streams():
        if (activity == LIE).sum() > 500 and (activity == STAND).sum() > 500:
            lying, standing = (data[activity == k, :3].mean(axis=0) for k in (LIE, STAND))
            cos = lying @ standing / np.linalg.norm(lying) / np.linalg.norm(standing)
            assert cos < np.cos(np.radians(45))
            assert 0.85 < np.linalg.norm(lying) < 1.15
            compared += 1
    assert compared >= 3


def test_gyroscope_follows_arm_swing():
    swings = 0
    for data, activity, _ in dataset_streams()[:8]:
        rms = {k: np.sqrt(np.mean(data[activity == k, 3:6] ** 2)) for k in (SIT, WALK, RUN) if (activity == k).any()}
        assert rms[RUN] > rms.get(WALK, 0.0) > 3 * rms.get(SIT, 0.0)
        for w in windows_of(activity, WALK)[:5]:  # the arm swings once a stride: half the step rate
            gyro = data[w, 3:6] - data[w, 3:6].mean(axis=0)
            f, p = spectrum(gyro @ np.linalg.svd(gyro, full_matrices=False)[2][0])  # about the swing axis
            assert abs(f[np.argmax(p)] - cadence(data[w, :3]) / 2) < 0.15
            swings += 1
    assert swings >= 20


def test_sim_grows_to_any_number_of_training_wearers_and_keeps_its_held_out_ones():
    small = SimulatedDataset(seed=3)
    big = small.grown(1000)
    assert len(big.train_clients) == 1000 and big.test_clients == small.test_clients
    assert big.train_clients[:24] == small.train_clients and big.train_clients[24] == "wearer-30"
    assert small.grown(10) is small
    a = next(small.source("wearer-07").chunks(256)).data
    b = next(big.source("wearer-07").chunks(256)).data
    np.testing.assert_array_equal(a, b)  # the same wearer whatever the dataset's size
    assert big.train_clients[-1] == "wearer-1005" and big.source("wearer-1005").index == 1005


def test_another_device_records_the_same_wearers_differently():
    from edge_client.sources.datasets import open_dataset
    from models.errors import ConfigError

    wrist, arm = open_dataset("sim:3"), open_dataset("sim:3:arm-ir")
    assert arm.name == "sim:3:arm-ir" and arm.clients == wrist.clients
    a = next(wrist.source("wearer-02").chunks(3000))
    b = next(arm.source("wearer-02").chunks(3000))
    np.testing.assert_array_equal(a.activity, b.activity)  # the same life: activities and heart rate
    np.testing.assert_array_equal(a.hr_bpm, b.hr_bpm)
    ppg, acc = a.channels.index("ppg"), [a.channels.index(c) for c in ("acc_x", "acc_y", "acc_z")]
    assert not np.allclose(a.data[:, ppg], b.data[:, ppg])
    assert b.data[:, ppg].std() != a.data[:, ppg].std()
    # the band sits turned on the arm: the same acceleration's magnitude on other axes
    np.testing.assert_allclose(np.linalg.norm(a.data[:, acc], axis=1), np.linalg.norm(b.data[:, acc], axis=1),
                               rtol=0.2, atol=0.05)
    assert not np.allclose(a.data[:, acc], b.data[:, acc], atol=0.05)
    with pytest.raises(ConfigError, match="unknown simulated device 'ankle'"):
        open_dataset("sim:3:ankle")
