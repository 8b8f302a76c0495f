"""Sensor sources: UCI HAPT, the wearfl recording format, the live push source, dataset specs."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_client.sources.base import CHANNELS, UNKNOWN, Chunk
from edge_client.sources.datasets import open_dataset
from edge_client.sources.hapt import EXPERIMENT_GAP_S, HAPT_TEST_USERS, HaptDataset
from edge_client.sources.push import PushBufferFull, PushClosed, PushSource
from edge_client.sources.recordings import RecordingsDataset, write_recording
from models.errors import ConfigError, InputError


def concat(chunks: list[Chunk]) -> dict[str, np.ndarray]:
    return {
        "t": np.concatenate([c.t for c in chunks]),
        "data": np.concatenate([c.data for c in chunks]),
        "activity": np.concatenate([c.activity for c in chunks]),
        "hr_bpm": np.concatenate([c.hr_bpm for c in chunks]),
    }


def assert_chunks_well_formed(chunks: list[Chunk], max_samples: int) -> None:
    for c in chunks:
        assert 0 < len(c) <= max_samples
        assert c.t.dtype == np.float64 and c.t.shape == (len(c),)
        assert c.data.dtype == np.float32 and c.data.shape == (len(c), len(c.channels))
        assert c.activity.dtype == np.int16 and c.activity.shape == (len(c),)
        assert c.hr_bpm.dtype == np.float32 and c.hr_bpm.shape == (len(c),)


# ---------------------------------------------------------------- UCI HAPT (real data)


def expected_hapt_activity(hapt_dir: Path, user: int) -> list[np.ndarray]:
    """Per experiment of one user, the class index of every sample, straight from labels.txt."""
    labels = np.loadtxt(hapt_dir / "labels.txt", dtype=int)
    out = []
    for exp in sorted(set(labels[labels[:, 1] == user, 0])):
        n = len((hapt_dir / f"acc_exp{exp:02d}_user{user:02d}.txt").read_text().splitlines())
        act = np.full(n, UNKNOWN)
        for _, _, a, first, last in labels[(labels[:, 0] == exp) & (labels[:, 1] == user)]:
            if a <= 6:
                act[first : last + 1] = a - 1
        out.append(act)
    return out


def test_hapt_clients_splits_and_metadata(hapt_dir):
    ds = open_dataset(f"hapt:{hapt_dir}")
    assert isinstance(ds, HaptDataset)
    assert ds.clients == tuple(f"user-{u:02d}" for u in range(1, 31))
    assert ds.test_clients == tuple(f"user-{u:02d}" for u in HAPT_TEST_USERS)
    assert len(ds.train_clients) == 21 and not set(ds.train_clients) & set(ds.test_clients)
    assert set(ds.train_clients) | set(ds.test_clients) == set(ds.clients)
    assert ds.classes == ("walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "laying")
    assert ds.channels == CHANNELS[:6] and ds.sampling_rate_hz == 50.0
    assert ds.has_heart_rate is False and ds.holdout_fraction == 0.0
    with pytest.raises(ConfigError, match="user-31"):
        ds.source("user-31")


def test_hapt_labels_values_and_experiment_gaps(hapt_dir):
    ds = HaptDataset(hapt_dir)
    src = ds.source("user-10")  # the one volunteer with three experiments
    chunks = list(src.chunks(100_000))
    assert_chunks_well_formed(chunks, 100_000)
    assert [c.client_id for c in chunks] == ["user-10"] * 3 and chunks[0].classes == ds.classes
    expected = expected_hapt_activity(hapt_dir, 10)
    assert len(chunks) == len(expected) == 3
    for chunk, act in zip(chunks, expected, strict=True):
        np.testing.assert_array_equal(chunk.activity, act)
    whole = concat(chunks)
    counts = np.bincount(whole["activity"][whole["activity"] >= 0], minlength=6)
    np.testing.assert_array_equal(counts, np.bincount(np.concatenate(expected)[np.concatenate(expected) >= 0]))
    assert np.isnan(whole["hr_bpm"]).all()
    # values: first line of the files, in acc then gyro order
    acc = np.array((hapt_dir / "acc_exp19_user10.txt").read_text().split()[:3], np.float32)
    gyro = np.array((hapt_dir / "gyro_exp19_user10.txt").read_text().split()[:3], np.float32)
    np.testing.assert_array_equal(chunks[0].data[0], np.concatenate([acc, gyro]))
    # time: 50 Hz within an experiment, one jump of EXPERIMENT_GAP_S between experiments
    dt = np.diff(whole["t"])
    jumps = np.flatnonzero(dt > 1.0)
    assert list(jumps + 1) == list(np.cumsum([len(a) for a in expected])[:-1])
    np.testing.assert_allclose(dt[jumps], EXPERIMENT_GAP_S)
    np.testing.assert_allclose(np.delete(dt, jumps), 0.02, atol=1e-9)
    assert whole["t"][0] == 0.0


def test_hapt_chunk_size_invariance(hapt_dir):
    src = HaptDataset(hapt_dir).source("user-01")
    reference = concat(list(src.chunks(1_000_000)))
    for size in (997, 4096):
        chunks = list(src.chunks(size))
        assert_chunks_well_formed(chunks, size)
        for c in chunks:  # no chunk straddles two experiments
            assert np.all(np.diff(c.t) < 1.0)
        got = concat(chunks)
        for key in reference:
            np.testing.assert_array_equal(got[key], reference[key])


# ---------------------------------------------------------------- HAPT layout errors (small fake folder)


def fake_hapt(root: Path) -> Path:
    """A HAPT-shaped folder: user 1 with experiments 1 and 2, user 2 with experiment 3."""
    root.mkdir()
    (root / "activity_labels.txt").write_text(
        "\n".join(
            f"{i} {n}"
            for i, n in enumerate(
                [
                    "WALKING",
                    "WALKING_UPSTAIRS",
                    "WALKING_DOWNSTAIRS",
                    "SITTING",
                    "STANDING",
                    "LAYING",
                    "STAND_TO_SIT",
                    "SIT_TO_STAND",
                    "SIT_TO_LIE",
                    "LIE_TO_SIT",
                    "STAND_TO_LIE",
                    "LIE_TO_STAND",
                ],
                start=1,
            )
        )
        + "\n"
    )
    rng = np.random.default_rng(0)
    for exp, user, n in ((1, 1, 30), (2, 1, 20), (3, 2, 10)):
        for kind in ("acc", "gyro"):
            np.savetxt(root / f"{kind}_exp{exp:02d}_user{user:02d}.txt", rng.normal(size=(n, 3)), fmt="%.6f")
    (root / "labels.txt").write_text("1 1 5 2 9\n1 1 7 10 12\n1 1 1 13 29\n2 1 6 0 19\n3 2 2 5 9\n")
    return root


def test_hapt_fake_folder_layout(tmp_path):
    ds = HaptDataset(fake_hapt(tmp_path / "RawData"))
    assert ds.clients == ("user-01", "user-02") and ds.test_clients == ("user-02",)
    whole = concat(list(ds.source("user-01").chunks(7)))
    expected = np.full(50, UNKNOWN)
    expected[2:10], expected[13:30], expected[30:50] = 4, 0, 5  # 7 (a transition) stays UNKNOWN
    np.testing.assert_array_equal(whole["activity"], expected)
    np.testing.assert_allclose(whole["t"][30] - whole["t"][29], EXPERIMENT_GAP_S)


def test_hapt_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="Smartphone-Based Recognition"):
        open_dataset(f"hapt:{tmp_path / 'nowhere'}")
    root = fake_hapt(tmp_path / "RawData")
    (root / "labels.txt").unlink()
    with pytest.raises(InputError, match=r"labels\.txt does not exist.*WEARFL_HAPT_DIR"):
        HaptDataset(root)
    root = fake_hapt(tmp_path / "bad-number")
    (root / "gyro_exp02_user01.txt").write_text("0.1 0.2 0.3\n0.1 abc 0.3\n")
    src = HaptDataset(root).source("user-01")
    with pytest.raises(InputError, match=r"gyro_exp02_user01\.txt"):
        list(src.chunks())
    root = fake_hapt(tmp_path / "missing-gyro")
    (root / "gyro_exp03_user02.txt").unlink()
    with pytest.raises(InputError, match=r"gyro_exp03_user02\.txt"):
        HaptDataset(root)
    root = fake_hapt(tmp_path / "bad-range")
    (root / "labels.txt").write_text("3 2 2 5 10\n")
    with pytest.raises(InputError, match=r"labels\.txt line 1"):
        list(HaptDataset(root).source("user-02").chunks())


# ---------------------------------------------------------------- the wearfl recording format


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.lstrip("\n"))
    return path


def test_recordings_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    n = 250
    t = np.arange(n) / 25.0
    data = rng.normal(size=(n, 7)).astype(np.float32)
    data[10:20, 2] = np.nan  # a run of missing samples
    hr = np.where(np.arange(n) % 50 < 25, 72.5, np.nan)
    activity = np.where(np.arange(n) < 100, "walking", np.where(np.arange(n) < 120, "", "sitting"))
    write(tmp_path / "dataset.toml", "sampling_rate_hz = 25\n")
    write_recording(tmp_path / "alice.csv", t, **dict(zip(CHANNELS, data.T, strict=True)), hr_bpm=hr, activity=activity)
    write_recording(
        tmp_path / "bob.csv",
        t[:5],
        acc_x=data[:5, 0],
        acc_y=data[:5, 1],
        acc_z=data[:5, 2],
        gyro_x=data[:5, 3],
        gyro_y=data[:5, 4],
        gyro_z=data[:5, 5],
        ppg=data[:5, 6],
    )

    ds = open_dataset(f"recordings:{tmp_path}")
    assert isinstance(ds, RecordingsDataset)
    assert ds.clients == ds.train_clients == ds.test_clients == ("alice", "bob")
    assert ds.holdout_fraction == 0.2 and ds.sampling_rate_hz == 25.0 and ds.name == tmp_path.name
    assert ds.channels == CHANNELS and ds.has_heart_rate
    assert ds.classes == ("sitting", "walking")  # found in the files, sorted
    chunks = list(ds.source("alice").chunks(64))
    assert_chunks_well_formed(chunks, 64)
    whole = concat(chunks)
    np.testing.assert_array_equal(whole["t"], t)
    np.testing.assert_array_equal(whole["data"], data)  # float32 survives the text round trip
    np.testing.assert_array_equal(whole["hr_bpm"], hr.astype(np.float32))
    expected = np.where(activity == "walking", 1, np.where(activity == "sitting", 0, UNKNOWN))
    np.testing.assert_array_equal(whole["activity"], expected)
    bob = concat(list(ds.source("bob").chunks()))
    assert (bob["activity"] == UNKNOWN).all() and np.isnan(bob["hr_bpm"]).all()
    with pytest.raises(ConfigError, match="carol"):
        ds.source("carol")


def test_recordings_labels_fix_classes_and_order(tmp_path):
    write(tmp_path / "dataset.toml", 'sampling_rate_hz = 50\nlabels = ["walking", "running", "sitting"]\n')
    write(tmp_path / "s1.csv", "t,acc_x,activity\n0,1,sitting\n0.02,1,walking\n0.04,1,\n")
    ds = RecordingsDataset(tmp_path)
    assert ds.classes == ("walking", "running", "sitting")  # order of labels, "running" kept though absent
    np.testing.assert_array_equal(next(ds.source("s1").chunks()).activity, [2, 0, UNKNOWN])


def test_recordings_column_renaming_ignore_and_missing_channels(tmp_path):
    write(
        tmp_path / "dataset.toml",
        """
sampling_rate_hz = 100
ignore = ["Battery"]
name = "ward-3"
[columns]
Time = "t"
AccX = "acc_x"
AccZ = "acc_z"
PPG = "ppg"
Label = "activity"
""",
    )
    write(
        tmp_path / "p7.csv",
        """
Time,PPG,AccZ,Battery,AccX,Label
0.00,512,0.98,88,0.01,rest
0.01,,0.97,88,0.02,rest
0.02,530,,87,0.03,
""",
    )
    ds = RecordingsDataset(tmp_path)
    assert ds.name == "ward-3" and ds.channels == ("acc_x", "acc_z", "ppg")  # wearfl order, not file order
    assert ds.has_heart_rate is False and ds.classes == ("rest",)
    chunk = next(ds.source("p7").chunks())
    np.testing.assert_array_equal(
        chunk.columns(["acc_x", "acc_z"]), np.array([[0.01, 0.98], [0.02, 0.97], [0.03, np.nan]], np.float32)
    )
    np.testing.assert_array_equal(chunk.columns(["ppg"])[:, 0], [512, np.nan, 530])
    np.testing.assert_array_equal(chunk.activity, [0, 0, UNKNOWN])


def test_recordings_bad_data_is_nan_not_an_exception(tmp_path):
    write(tmp_path / "dataset.toml", "sampling_rate_hz = 50\n")
    write(tmp_path / "x.csv", "t,acc_x,acc_y,hr_bpm\n0,nan,1,\n0.02, ,inf,70\n\n0.04,,,nan\n0.06,1,2,71\n")
    chunk = next(RecordingsDataset(tmp_path).source("x").chunks())
    np.testing.assert_array_equal(chunk.t, [0, 0.02, 0.04, 0.06])
    np.testing.assert_array_equal(chunk.data, np.array([[np.nan, 1], [np.nan, np.nan], [np.nan, np.nan], [1, 2]]))
    np.testing.assert_array_equal(chunk.hr_bpm, [np.nan, 70, np.nan, 71])


def test_recordings_errors_name_file_line_and_column(tmp_path):
    def dataset(name: str, csv_text: str, toml: str = "sampling_rate_hz = 50\n") -> Path:
        root = tmp_path / name
        write(root / "dataset.toml", toml)
        write(root / "walk.csv", csv_text)
        return root

    rows = "".join(f"{i / 50},0.1,0.2\n" for i in range(15))
    root = dataset("bad-number", f"t,acc_x,acc_y\n{rows}0.3,0.1,abc\n")
    with pytest.raises(InputError, match=r"walk\.csv line 17, column acc_y: 'abc' is not a number"):
        list(RecordingsDataset(root).source("walk").chunks())
    root = dataset("unknown-column", "t,acc_x,AccY,Mag\n0,1,2,3\n")
    with pytest.raises(InputError, match=r"walk\.csv line 1: unknown columns \['AccY', 'Mag'\].*\[columns\]"):
        RecordingsDataset(root)
    root = dataset(
        "unknown-label",
        "t,acc_x,activity\n0,1,walking\n0.02,1,jogging\n",
        'sampling_rate_hz = 50\nlabels = ["walking"]\n',
    )
    with pytest.raises(InputError, match=r"walk\.csv line 3, column activity: 'jogging' is not one of"):
        list(RecordingsDataset(root).source("walk").chunks())
    root = dataset("no-t", "time,acc_x\n0,1\n")
    with pytest.raises(InputError, match=r"unknown columns \['time'\]"):
        RecordingsDataset(root)
    root = dataset("no-t-renamed", "time,acc_x\n0,1\n", 'sampling_rate_hz = 50\n[columns]\ntime = "acc_y"\n')
    with pytest.raises(InputError, match=r"walk\.csv line 1: there is no 't' column"):
        RecordingsDataset(root)
    root = dataset("empty-t", "t,acc_x\n0,1\n,2\n")
    with pytest.raises(InputError, match=r"walk\.csv line 3, column t: the cell is empty"):
        list(RecordingsDataset(root).source("walk").chunks())
    root = dataset("ragged", "t,acc_x\n0,1\n0.02,1,5\n")
    with pytest.raises(InputError, match=r"walk\.csv line 3: 3 fields, but the header has 2"):
        list(RecordingsDataset(root).source("walk").chunks())
    root = dataset("no-toml", "t,acc_x\n0,1\n")
    (root / "dataset.toml").unlink()
    with pytest.raises(InputError, match=r"dataset\.toml does not exist.*sampling_rate_hz"):
        RecordingsDataset(root)
    root = dataset("bad-toml", "t,acc_x\n0,1\n", "sampling_rate = 50\n")
    with pytest.raises(InputError, match=r"unknown keys \['sampling_rate'\]"):
        RecordingsDataset(root)
    root = dataset("different-sensors", "t,acc_x\n0,1\n")
    write(root / "run.csv", "t,acc_x,ppg\n0,1,2\n")
    with pytest.raises(InputError, match="same sensor columns"):
        RecordingsDataset(root)
    with pytest.raises(InputError, match="does not exist"):
        open_dataset(f"recordings:{tmp_path / 'nowhere'}")


def test_recordings_large_file_reads_whole(tmp_path):
    n = 100_000  # ~33 min at 50 Hz
    write(tmp_path / "dataset.toml", "sampling_rate_hz = 50\n")
    t = np.arange(n) / 50.0
    rng = np.random.default_rng(2)
    cols = {c: rng.normal(size=n).astype(np.float32) for c in CHANNELS[:6]}
    write_recording(tmp_path / "long.csv", t, **cols, activity=np.where(t < 600, "walking", ""))
    ds = RecordingsDataset(tmp_path)
    whole = concat(list(ds.source("long").chunks()))  # its speed is a benchmark's business, not a test's
    assert len(whole["t"]) == n and ds.classes == ("walking",)
    np.testing.assert_array_equal(whole["data"][:, 3], cols["gyro_x"])


def _long_recording(folder: Path, n: int, labels: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A recording of ``n`` rows at 50 Hz (t, acc_x, hr_bpm with gaps, activity); returns t, acc_x, hr."""
    t = np.arange(n) / 50.0
    acc = np.round(np.sin(t), 5).astype(np.float32)
    hr = np.where(np.arange(n) % 7 == 3, np.nan, 60 + np.arange(n) % 40).astype(np.float32)
    activity = np.where(np.arange(n) < n // 2, "walking", np.where(np.arange(n) % 1000 == 999, "running", ""))
    toml = "sampling_rate_hz = 50\n" + ('labels = ["walking", "running"]\n' if labels else "")
    write(folder / "dataset.toml", toml)
    write_recording(folder / "long.csv", t, acc_x=acc, hr_bpm=hr, activity=activity)
    return t, acc, hr


@pytest.mark.parametrize("max_samples", [1, 64, 100, 500, 700, 1000])
def test_recordings_are_parsed_in_bounded_blocks(tmp_path, monkeypatch, max_samples):
    """A file is parsed a block of rows at a time (never whole), and chunks still come out
    ``max_samples`` long (the last one shorter), whether a chunk is shorter or longer than a block."""
    import edge_client.sources.recordings as recordings

    n = 2345
    t, acc, hr = _long_recording(tmp_path, n)
    monkeypatch.setattr(recordings, "BLOCK_ROWS", 200)
    parsed: list[int] = []
    real = recordings.rows_to_columns

    def spy(rows, header, line_of):
        parsed.append(len(rows))
        return real(rows, header, line_of)

    monkeypatch.setattr(recordings, "rows_to_columns", spy)
    ds = RecordingsDataset(tmp_path)
    assert ds.classes == ("running", "walking")  # found in the file without labels ...
    assert parsed and max(parsed) <= 200 and sum(parsed) == n  # ... block by block
    parsed.clear()
    chunks = list(ds.source("long").chunks(max_samples))
    assert max(parsed) <= max(200, max_samples) and sum(parsed) == n and len(parsed) >= n // max(200, max_samples)
    tail = [n % max_samples] if n % max_samples else []
    assert [len(c) for c in chunks] == [max_samples] * (n // max_samples) + tail
    assert_chunks_well_formed(chunks, max_samples)
    whole = concat(chunks)
    np.testing.assert_array_equal(whole["t"], t)
    np.testing.assert_array_equal(whole["data"][:, 0], acc)
    np.testing.assert_array_equal(whole["hr_bpm"], hr)
    expected = np.where(np.arange(n) < n // 2, 1, np.where(np.arange(n) % 1000 == 999, 0, UNKNOWN))
    np.testing.assert_array_equal(whole["activity"], expected)
    one = ds.source("long").read()  # the whole file as one chunk, as before
    np.testing.assert_array_equal(one.t, t)
    np.testing.assert_array_equal(one.hr_bpm, hr)


def test_reading_a_long_recording_needs_a_block_of_memory_not_the_file(tmp_path):
    import tracemalloc

    from edge_client.sources.recordings import BLOCK_ROWS

    n = 30_000  # 10 minutes at 50 Hz: ~18 MB as Python strings if parsed at once
    _long_recording(tmp_path, n, labels=True)
    ds = RecordingsDataset(tmp_path)
    tracemalloc.start()
    try:
        samples = sum(len(c) for c in ds.source("long").chunks(500))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert samples == n
    assert BLOCK_ROWS <= 4096 and peak < 2_000_000, peak


def test_a_bad_cell_deep_in_a_recording_names_its_line(tmp_path, monkeypatch):
    """Line numbers stay right across blocks and blank lines; the chunks before the bad block come first."""
    import edge_client.sources.recordings as recordings

    monkeypatch.setattr(recordings, "BLOCK_ROWS", 50)
    lines = ["t,acc_x"]
    for i in range(300):
        lines.append(f"{i / 50},0.5")
        if i % 40 == 0:
            lines.append("")  # blank lines are skipped, but count as lines
    bad = 260
    lines[lines.index(f"{bad / 50},0.5")] = f"{bad / 50},0.5x"
    write(tmp_path / "dataset.toml", "sampling_rate_hz = 50\n")
    (tmp_path / "walk.csv").write_text("\n".join(lines) + "\n")
    line = lines.index(f"{bad / 50},0.5x") + 1
    got = []
    with pytest.raises(InputError, match=rf"walk\.csv line {line}, column acc_x: '0\.5x' is not a number"):
        for chunk in RecordingsDataset(tmp_path).source("walk").chunks(50):
            got.append(chunk)
    # the chunks read before the bad block came out first, whole (blank lines make blocks a little short)
    assert len(got) == 4 and all(len(c) == 50 for c in got) and got[-1].t[-1] < bad / 50
    ragged = "t,acc_x\n" + "".join(f"{i / 50},1\n" for i in range(120)) + "2.4,1,5\n"
    (tmp_path / "walk.csv").write_text(ragged)
    with pytest.raises(InputError, match=r"walk\.csv line 122: 3 fields, but the header has 2"):
        list(RecordingsDataset(tmp_path).source("walk").chunks())


# ---------------------------------------------------------------- live push source


def test_push_from_another_thread_is_ordered_and_complete():
    src = PushSource(
        "wrist-1", ("acc_x", "acc_y", "acc_z"), 50.0, classes=("rest", "walk"), max_buffered_s=1.0, push_timeout_s=10.0
    )  # 50-sample buffer: the producer must wait
    total = 3000
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 20, 400)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    bounds = [*bounds[bounds < total].tolist(), total]
    values = np.arange(total * 3, dtype=np.float32).reshape(total, 3)

    def produce() -> None:
        for lo, hi in itertools.pairwise(bounds):
            labels = ["walk" if i % 7 else "rest" for i in range(lo, hi)]
            src.push(np.arange(lo, hi) / 50.0, values[lo:hi], activity=labels, hr_bpm=float(lo))
        src.push(total / 50.0, [1.0, 2.0, 3.0])  # one sample as (C,)
        src.close()

    producer = threading.Thread(target=produce)
    producer.start()
    chunks = []
    for chunk in src.chunks(max_samples=32):
        chunks.append(chunk)
        if len(chunks) % 10 == 0:
            time.sleep(0.001)  # a consumer that lags now and then
    producer.join(5)
    assert not producer.is_alive()
    assert_chunks_well_formed(chunks, 32)
    whole = concat(chunks)
    assert len(whole["t"]) == total + 1
    np.testing.assert_array_equal(whole["t"], np.arange(total + 1) / 50.0)
    np.testing.assert_array_equal(whole["data"][:total], values)
    np.testing.assert_array_equal(whole["data"][total], [1, 2, 3])
    np.testing.assert_array_equal(whole["activity"][:total], [1 if i % 7 else 0 for i in range(total)])
    assert whole["activity"][total] == UNKNOWN and np.isnan(whole["hr_bpm"][total])
    assert chunks[0].classes == ("rest", "walk") and chunks[0].channels == ("acc_x", "acc_y", "acc_z")


def test_push_close_ends_iteration_and_a_full_buffer_raises():
    src = PushSource("w", ("ppg",), 10.0, max_buffered_s=1.0, push_timeout_s=0.05)
    src.push([0.0, 0.1], [[1.0], [np.nan]])  # NaN samples pass through as missing
    src.push(np.arange(2, 10) / 10, np.ones((8, 1)))
    start = time.perf_counter()
    with pytest.raises(PushBufferFull, match="chunks\\(\\) is being iterated"):
        src.push(1.0, [5.0])  # nobody consumes: 10 samples buffered, no room for an 11th
    assert time.perf_counter() - start >= 0.04
    done = threading.Event()
    got: list[Chunk] = []

    def consume() -> None:
        got.extend(src.chunks())
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    time.sleep(0.05)
    assert not done.is_set()  # waits for more
    src.close()
    assert done.wait(2)
    whole = concat(got)
    assert len(whole["t"]) == 10 and np.isnan(whole["data"][1, 0])
    with pytest.raises(PushClosed):
        src.push(1.0, [1.0])


def test_push_rejects_malformed_input():
    src = PushSource("w", ("acc_x", "acc_y"), 50.0, classes=("a", "b"))
    with pytest.raises(InputError, match=r"shape \(3,\)"):
        src.push(0.0, [1, 2, 3])
    with pytest.raises(InputError, match="samples must be numbers"):
        src.push(0.0, ["a", "b"])
    with pytest.raises(InputError, match="2 times for 3 samples"):
        src.push([0, 1], np.zeros((3, 2)))
    with pytest.raises(InputError, match=r"\['c'\] is not one of"):
        src.push(0.0, [1, 2], activity="c")
    with pytest.raises(InputError, match="indices must be in"):
        src.push(0.0, [1, 2], activity=2)
    with pytest.raises(ConfigError, match="distinct wearfl channel names"):
        PushSource("w", ("acc_x", "heart"), 50.0)
    src.push(0.0, [1, 2], activity=1)
    src.close()
    assert next(src.chunks()).activity.tolist() == [1]


# ---------------------------------------------------------------- dataset specs


@pytest.mark.parametrize("spec", ["", "hap:/x", "simulated", "recording:/x", "/data/hapt"])
def test_open_dataset_rejects_bad_specs(spec):
    with pytest.raises(ConfigError) as err:
        open_dataset(spec)
    for form in ("sim[:SEED]", "hapt:DIR", "recordings:DIR"):
        assert form in str(err.value)


def test_open_dataset_argument_errors(monkeypatch):
    with pytest.raises(ConfigError, match="not an integer"):
        open_dataset("sim:abc")
    with pytest.raises(ConfigError, match="recordings:DIR"):
        open_dataset("recordings:")
    monkeypatch.delenv("WEARFL_HAPT_DIR", raising=False)
    with pytest.raises(ConfigError, match="UCI Machine Learning Repository"):
        open_dataset("hapt")


def test_open_dataset_sim():
    simulator = pytest.importorskip("edge_client.sources.simulator")
    ds = open_dataset("sim:3")
    assert isinstance(ds, simulator.SimulatedDataset)
    assert ds.clients
