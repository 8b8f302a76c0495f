"""``follow:FILE.csv``: a recording file read while another program appends to it, replaces and truncates it.

The writer is this test (or a thread of it); a reader thread iterates ``chunks()``. Waits are
for rows to arrive (bounded); every row must arrive exactly once, with its values.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_client.edge_command import resolve_source
from edge_client.sources.base import UNKNOWN
from edge_client.sources.datasets import open_dataset
from edge_client.sources.follow import FollowSource
from models.errors import ConfigError, InputError

WAIT_S = 20.0
POLL_S = 0.05


def row(i: int, order: tuple[str, ...] = ("t", "acc_x", "acc_y", "acc_z", "ppg")) -> str:
    values = {"t": repr(i / 32), "acc_x": str(i), "acc_y": str(-i), "acc_z": "0.5", "ppg": str(1000 + i)}
    return ",".join(values[c] for c in order) + "\n"


def expected(n: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(n)
    return i / 32, np.stack([i, -i, np.full(n, 0.5), 1000 + i], axis=1).astype(np.float32)


def folder(tmp_path: Path, toml: str = "sampling_rate_hz = 32\n") -> Path:
    (tmp_path / "dataset.toml").write_text(toml)
    return tmp_path


class Reader:
    """``chunks()`` of a source on a thread of its own, collected; stopped by :meth:`stop`."""

    def __init__(self, source: Any) -> None:
        self.source, self.chunks = source, []
        self.thread = threading.Thread(target=lambda: self.chunks.extend(source.chunks(16)))
        self.thread.start()

    @property
    def rows(self) -> int:
        return sum(len(c) for c in list(self.chunks))

    def wait_for(self, n: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while self.rows < n:
            assert time.monotonic() < deadline, f"timed out waiting for {n} rows (have {self.rows})"
            time.sleep(0.01)

    def stop(self) -> list[Any]:
        self.source.close()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()
        return self.chunks


@pytest.fixture
def readers() -> Iterator[list[Reader]]:
    made: list[Reader] = []
    yield made
    for reader in made:
        reader.stop()


def test_every_row_arrives_once_through_growth_replacement_and_truncation(tmp_path, readers):
    path = folder(tmp_path) / "wrist-07.csv"
    path.write_text("t,acc_x,acc_y,acc_z,ppg\n" + "".join(row(i) for i in range(50)))
    source = resolve_source(f"follow:{path}", None)
    assert isinstance(source, FollowSource)
    assert (source.client_id, source.channels, source.sampling_rate_hz) == ("wrist-07", ("acc_x", "acc_y", "acc_z",
                                                                                         "ppg"), 32.0)
    source.poll_s = POLL_S
    reader = Reader(source)
    readers.append(reader)

    def append() -> None:  # a logger writing in bursts, each ending in half a line
        with path.open("a") as f:
            for i in range(50, 100):
                line = row(i)
                if i % 7 == 6:
                    f.write(line[:5])
                    f.flush()
                    f.write(line[5:])
                else:
                    f.write(line)
                if i % 7 == 6:
                    f.flush()

    writer = threading.Thread(target=append)
    writer.start()
    writer.join(WAIT_S)
    with path.open("a") as f:  # rows the reader may not have seen when the file is replaced
        f.write("".join(row(i) for i in range(100, 110)))
    os.rename(path, tmp_path / "wrist-07.csv.1")
    order = ("ppg", "t", "acc_x", "acc_z", "acc_y")  # the new file orders its columns differently
    path.write_text(",".join(order) + "\n" + "".join(row(i, order) for i in range(110, 130)))
    reader.wait_for(130)
    with path.open("w") as f:  # truncated in place, shorter than what was read
        f.write("t,acc_x,acc_y,acc_z,ppg\n" + "".join(row(i) for i in range(130, 135)))
    reader.wait_for(135)
    with path.open("a") as f:
        f.write("".join(row(i) for i in range(135, 160)))
    reader.wait_for(160)
    chunks = reader.stop()

    t, data = expected(160)
    np.testing.assert_array_equal(np.concatenate([c.t for c in chunks]), t)
    np.testing.assert_array_equal(np.concatenate([c.data for c in chunks]), data)
    assert all(len(c) <= 16 and c.client_id == "wrist-07" for c in chunks)
    assert all((c.activity == UNKNOWN).all() and np.isnan(c.hr_bpm).all() for c in chunks)
    assert source.skipped_rows == 0


def test_a_half_written_line_waits_for_its_end(tmp_path):
    path = folder(tmp_path) / "w.csv"
    path.write_text("t,ppg\n0.0,1\n0.5,2")  # the last line is being written
    source = FollowSource(path, poll_s=POLL_S)
    stream = source.chunks()
    try:
        first = next(stream)
        def finish_the_line() -> None:  # the logger finishes the line: "2" becomes "25"
            with path.open("a") as f:
                f.write("5\n")

        finisher = threading.Timer(0.2, finish_the_line)
        finisher.start()
        second = next(stream)
        finisher.join()
    finally:
        stream.close()
        source.close()
    np.testing.assert_array_equal(first.t, [0.0])
    np.testing.assert_array_equal(second.t, [0.5])
    np.testing.assert_array_equal(second.data[:, 0], [25.0])


def test_bad_rows_are_logged_and_skipped(tmp_path, caplog, readers):
    path = folder(tmp_path) / "w.csv"
    path.write_text("t,ppg,hr_bpm\n0.0,1,60\n0.1,abc,60\n0.2,3\n0.3,4,\n,5,61\n0.5,6,nan\n")
    source = FollowSource(path, poll_s=POLL_S)
    with caplog.at_level(logging.WARNING, logger="edge_client.sources.follow"):
        reader = Reader(source)
        readers.append(reader)
        reader.wait_for(3)
        chunks = reader.stop()
    np.testing.assert_array_equal(np.concatenate([c.t for c in chunks]), [0.0, 0.3, 0.5])
    np.testing.assert_array_equal(np.concatenate([c.hr_bpm for c in chunks]), [60, np.nan, np.nan])
    assert source.skipped_rows == 3
    assert "w.csv line 3, column ppg: 'abc' is not a number" in caplog.text  # the first, logged at once


def test_activity_names_map_to_the_labels_and_strangers_are_unknown(tmp_path, caplog, readers):
    path = folder(tmp_path, 'sampling_rate_hz = 32\nlabels = ["walking", "sitting"]\n') / "w.csv"
    path.write_text("t,acc_x,activity\n0,1,sitting\n1,2,\n2,3,walking\n3,4,dancing\n")
    source = FollowSource(path, poll_s=POLL_S)
    assert source.classes == ("walking", "sitting")
    with caplog.at_level(logging.WARNING, logger="edge_client.sources.follow"):
        reader = Reader(source)
        readers.append(reader)
        reader.wait_for(4)
        chunks = reader.stop()
    np.testing.assert_array_equal(np.concatenate([c.activity for c in chunks]), [1, UNKNOWN, 0, UNKNOWN])
    assert "dancing" in caplog.text and source.skipped_rows == 0


def test_opening_waits_for_the_logger_to_create_the_file(tmp_path):
    path = folder(tmp_path) / "late.csv"
    creator = threading.Timer(0.2, lambda: path.write_text("t,ppg\n0,1\n"))
    creator.start()
    source = FollowSource(path, timeout_s=WAIT_S, poll_s=POLL_S)
    creator.join()
    source.close()
    assert source.channels == ("ppg",)


def test_what_cannot_work_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"dataset\.toml"):
        FollowSource(tmp_path / "w.csv", timeout_s=0.1)
    folder(tmp_path)
    with pytest.raises(InputError, match=r"does not exist .*start the logger"):
        FollowSource(tmp_path / "w.csv", timeout_s=0.1, poll_s=POLL_S)
    with pytest.raises(ConfigError, match=r"not a \.csv file"):
        FollowSource(tmp_path / "w.txt")
    (tmp_path / "h.csv").write_text("t,ppg")  # no complete header line
    with pytest.raises(InputError, match="no complete header line"):
        FollowSource(tmp_path / "h.csv", timeout_s=0.1, poll_s=POLL_S)
    (tmp_path / "u.csv").write_text("t,pulse\n")
    with pytest.raises(InputError, match="unknown columns"):
        FollowSource(tmp_path / "u.csv")
    with pytest.raises(ConfigError, match="live source"):
        open_dataset(f"follow:{tmp_path / 'u.csv'}")
