"""``lsl:NAME`` against real Lab Streaming Layer outlets on this machine (pylsl's bundled liblsl).

Discovery is kept on the machine: an ``lsl_api.cfg`` with ``ResolveScope = machine`` (and no
IPv6), given to liblsl through ``LSLAPICFG`` before its first use, so no multicast leaves the
host. Under ``CI=true`` a missing pylsl or liblsl fails these tests; elsewhere they are skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lsl_outlets import make_outlet, stream_name

from edge_client.edge_command import resolve_source
from edge_client.sources.base import UNKNOWN
from edge_client.sources.datasets import open_dataset
from edge_client.sources.live import collect
from edge_client.sources.recordings import RecordingsDataset, write_recording
from models.errors import ConfigError, InputError
from wearfl.broker import free_port

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 20.0
@pytest.fixture
def outlets(pylsl) -> Iterator[list[Any]]:
    """Outlets a test makes; all destroyed at its end."""
    made: list[Any] = []
    yield made
    made.clear()


def recording(tmp_path: Path, n: int = 200) -> RecordingsDataset:
    """A 32 Hz recording with acc_*, ppg and hr_bpm, some samples missing."""
    folder = tmp_path / "rec"
    folder.mkdir()
    (folder / "dataset.toml").write_text("sampling_rate_hz = 32\n")
    rng = np.random.default_rng(3)
    t = 5000.0 + np.arange(n) / 32.0
    acc = rng.normal(0, 0.3, (n, 3)).round(4)
    ppg = (51000 + 300 * np.sin(np.arange(n) / 5)).round(1)
    acc[7, 1] = np.nan
    ppg[11] = np.nan
    hr = np.where(np.arange(n) % 32 == 0, 60 + np.arange(n) / 10, np.nan)
    write_recording(folder / "p01.csv", t, acc_x=acc[:, 0], acc_y=acc[:, 1], acc_z=acc[:, 2], ppg=ppg, hr_bpm=hr)
    return RecordingsDataset(folder)


def concat(chunks: list[Any], field: str) -> np.ndarray:
    return np.concatenate([getattr(c, field) for c in chunks])


def test_a_recording_streamed_through_an_outlet_comes_out_as_chunks(pylsl, outlets, tmp_path):
    expected = recording(tmp_path).source("p01").read()
    name = stream_name()
    labels = ["PPG", "acc_z", "battery", "acc_x", " hr_bpm ", "acc_y"]  # any order, case and spaces; extras ignored
    outlet = make_outlet(pylsl, name, labels)
    outlets.append(outlet)
    columns = {"ppg": expected.columns(["ppg"])[:, 0], "acc_x": expected.columns(["acc_x"])[:, 0],
               "acc_y": expected.columns(["acc_y"])[:, 0], "acc_z": expected.columns(["acc_z"])[:, 0],
               "hr_bpm": expected.hr_bpm, "battery": np.full(len(expected), 87.0)}
    samples = np.stack([columns[label.strip().lower()] for label in labels], axis=1).astype(np.float32)

    source = resolve_source(f"lsl:{name}", None)  # the spec names the client: NAME
    assert (source.client_id, source.channels, source.sampling_rate_hz) == (name, ("acc_x", "acc_y", "acc_z", "ppg"),
                                                                            32.0)
    assert outlet.wait_for_consumers(WAIT_S)  # the inlet is open from the start: nothing pushed now is lost
    outlet.push_chunk(samples, expected.t.tolist())
    chunks = collect(source, len(expected), WAIT_S, max_samples=64)

    assert sum(map(len, chunks)) == len(expected)
    assert all(len(c) <= 64 and c.client_id == name and c.channels == source.channels for c in chunks)
    data = concat(chunks, "data")
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, expected.data)  # NaN where the recording misses a sample
    assert np.isnan(data[7, 1]) and np.isnan(data[11, 3])
    np.testing.assert_allclose(concat(chunks, "t"), expected.t, rtol=0, atol=1e-9)  # the LSL timestamps
    np.testing.assert_array_equal(concat(chunks, "hr_bpm"), expected.hr_bpm)
    assert (concat(chunks, "activity") == UNKNOWN).all()


def test_open_dataset_gives_the_stream_as_a_one_client_live_dataset(pylsl, outlets):
    name = stream_name()
    outlets.append(make_outlet(pylsl, name, ["ppg", "hr_bpm"], rate=25.0))
    with pytest.raises(ConfigError, match="live source"):
        open_dataset(f"lsl:{name}")  # a data set is read to its end; a live stream has none
    dataset = open_dataset(f"lsl:{name}", live=True)
    try:
        assert (dataset.clients, dataset.channels, dataset.sampling_rate_hz, dataset.has_heart_rate) == (
            (name,), ("ppg",), 25.0, True)
        assert dataset.source("gw-7").client_id == "gw-7"
    finally:
        dataset.close()


def test_a_missing_stream_is_a_clear_error_naming_what_is_there(pylsl, outlets, monkeypatch):
    from edge_client.sources import lsl

    other = stream_name()
    outlets.append(make_outlet(pylsl, other, ["ppg"]))
    monkeypatch.setattr(lsl, "RESOLVE_TIMEOUT_S", 0.5)
    with pytest.raises(InputError, match="no Lab Streaming Layer stream named 'nobody-here'") as caught:
        resolve_source("lsl:nobody-here", None)
    assert other in str(caught.value) and "docs/devices.md" in str(caught.value)


@pytest.mark.parametrize(
    ("labels", "rate", "fmt", "match"),
    [
        (["ppg", "acc_x"], 0.0, "float32", "irregular rate"),
        (["battery", "hr_bpm"], 32.0, "float32", "no sensor channel"),
        (["ppg", "ppg"], 32.0, "float32", "more than one channel"),
        (["ppg"], 32.0, "string", "strings"),
    ],
)
def test_streams_wearfl_cannot_read_are_refused(pylsl, outlets, labels, rate, fmt, match):
    from edge_client.sources.lsl import LslSource

    name = stream_name()
    outlets.append(make_outlet(pylsl, name, labels, rate=rate, fmt=fmt))
    with pytest.raises(InputError, match=match):
        LslSource(name, timeout_s=WAIT_S)


def test_a_stream_without_channel_labels_is_refused(pylsl, outlets):
    from edge_client.sources.lsl import LslSource

    name = stream_name()
    outlets.append(pylsl.StreamOutlet(pylsl.StreamInfo(name, "wearable", 3, 32.0, "float32", "")))
    with pytest.raises(InputError, match="labels 0 of its 3 channels"):
        LslSource(name, timeout_s=WAIT_S)


def test_close_ends_a_read_that_waits_for_samples(pylsl, outlets):
    from edge_client.sources.lsl import LslSource

    name = stream_name()
    outlets.append(make_outlet(pylsl, name, ["ppg"]))
    source = LslSource(name, timeout_s=WAIT_S)
    started = threading.Event()
    got: list[Any] = []

    def read() -> None:
        started.set()
        got.extend(source.chunks())  # blocks: nothing is pushed

    reader = threading.Thread(target=read)
    reader.start()
    started.wait(WAIT_S)
    source.close()
    reader.join(WAIT_S)
    assert not reader.is_alive() and got == []
    assert list(source.chunks()) == []  # closed: a new read ends at once


def test_reading_goes_on_when_the_outlet_goes_away_and_comes_back(pylsl, outlets):
    from edge_client.sources.lsl import LslSource

    name = stream_name()
    first = make_outlet(pylsl, name, ["ppg"])  # no source id: liblsl cannot recover it; the source resolves again
    source = LslSource(name, timeout_s=WAIT_S)
    assert first.wait_for_consumers(WAIT_S)
    first.push_chunk(np.arange(10, dtype=np.float32)[:, None])
    returned = threading.Event()

    def device_restarts() -> None:
        nonlocal first
        del first  # the outlet goes away
        second = make_outlet(pylsl, name, ["ppg"])
        outlets.append(second)
        if second.wait_for_consumers(WAIT_S):
            second.push_chunk(np.arange(10, 20, dtype=np.float32)[:, None])
            returned.set()

    restarter = threading.Timer(0.3, device_restarts)  # after the first ten are read
    restarter.start()
    chunks = collect(source, 20, WAIT_S)
    restarter.join(WAIT_S)
    assert returned.is_set()
    np.testing.assert_array_equal(concat(chunks, "data")[:, 0], np.arange(20, dtype=np.float32))


def test_wearfl_edge_takes_the_client_from_an_lsl_spec(pylsl, outlets, lsl_config, tmp_path):
    """The command line end to end in its own process: the stream resolves, NAME is the client, then no broker."""
    name = stream_name()
    outlets.append(make_outlet(pylsl, name, ["acc_x", "acc_y", "acc_z"], rate=50.0))
    result = subprocess.run(
        [sys.executable, "-m", "wearfl", "edge", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--federation", "f1",
         "--source", f"lsl:{name}", "--state", str(tmp_path / "edge"), "--connect-timeout", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "LSLAPICFG": str(lsl_config)},
    )
    assert result.returncode == 2, result.stderr
    assert f"edge {name} of federation f1" in result.stderr and f"reading lsl:{name}" in result.stderr
    assert "error: " in result.stderr and "Traceback" not in result.stderr
