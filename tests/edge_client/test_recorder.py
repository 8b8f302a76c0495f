"""`wearfl record`: any source written in the recording format reads back as the same stream."""

from __future__ import annotations

import numpy as np
import pytest

from edge_client.sources.recorder import record_source
from edge_client.sources.recordings import RecordingsDataset
from edge_client.sources.simulator import SimulatedWearer
from models.errors import ConfigError
from wearfl.cli import main


def _stream(source) -> tuple[np.ndarray, ...]:
    chunks = list(source.chunks(1000))
    return tuple(np.concatenate([getattr(c, name) for c in chunks]) for name in ("t", "data", "hr_bpm", "activity"))


def test_a_recorded_wearer_reads_back_as_the_same_stream(tmp_path):
    wearer = SimulatedWearer("wearer-04", 3, minutes=1.0)
    done = record_source(wearer, tmp_path)
    assert done.path == tmp_path / "wearer-04.csv" and done.samples == 3000
    assert not list(tmp_path.glob(".*partial"))
    dataset = RecordingsDataset(tmp_path)
    assert dataset.clients == ("wearer-04",) and dataset.sampling_rate_hz == wearer.sampling_rate_hz
    back = dataset.source("wearer-04")
    assert back.classes == wearer.classes and set(back.channels) == set(wearer.channels)
    t, data, hr, activity = _stream(wearer)
    t2, data2, hr2, activity2 = _stream(back)
    order = [back.channels.index(c) for c in wearer.channels]
    np.testing.assert_allclose(t2, t, atol=1e-9)
    np.testing.assert_allclose(data2[:, order], data, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(hr2, hr, rtol=1e-5)
    np.testing.assert_array_equal(activity2, activity)


def test_minutes_bound_the_recording_and_a_folder_takes_more_clients_of_the_same_kind(tmp_path):
    done = record_source(SimulatedWearer("a", 0, minutes=2.0), tmp_path, max_seconds=30.0)
    assert done.samples == 1500 and done.seconds == pytest.approx(29.98)
    record_source(SimulatedWearer("b", 0, minutes=0.5), tmp_path)
    assert RecordingsDataset(tmp_path).clients == ("a", "b")
    (tmp_path / "dataset.toml").write_text("sampling_rate_hz = 32\n")
    with pytest.raises(ConfigError, match="describes another stream"):
        record_source(SimulatedWearer("c", 0, minutes=0.5), tmp_path)
    assert not (tmp_path / "c.csv").exists()


def test_the_command_writes_a_recordings_source_and_refuses_an_endless_one(tmp_path, capsys):
    assert main(["record", "--source", "sim:0/wearer-02", "--out", str(tmp_path), "--minutes", "0.5"]) == 0
    out = capsys.readouterr().out
    assert f"--source recordings:{tmp_path}/wearer-02" in out and "1,500 samples" in out
    assert RecordingsDataset(tmp_path).clients == ("wearer-02",)
    assert main(["record", "--source", "lsl:nothing-here", "--out", str(tmp_path)]) == 2
    assert "give --minutes" in capsys.readouterr().err
    assert main(["record", "--source", "sim:0/wearer-02", "--out", str(tmp_path), "--minutes", "-1"]) == 2
