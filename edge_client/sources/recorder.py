"""Write a source's stream in the recording format: ``wearfl record``.

A gateway's ``recordings:`` source replays files in the format of ``docs/recordings.md``.
This turns any source wearfl can read (a simulated wearer, a HAPT user, a live LSL or MQTT
device for a set time) into such a file, so the per-machine flow, a systemd unit or a test
can run on a recording without converting anything by hand. The stream is written chunk by
chunk (never held whole) to a temporary file that replaces ``<client>.csv`` when complete.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_client.sources.base import UNKNOWN, Source
from edge_client.sources.recordings import COLUMNS, read_config
from models.errors import ConfigError
from models.files import write_atomic

__all__ = ["Recorded", "record_source"]


@dataclass(frozen=True)
class Recorded:
    """What :func:`record_source` wrote."""

    path: Path
    samples: int
    seconds: float
    sampling_rate_hz: float
    columns: tuple[str, ...]


def _dataset_toml(folder: Path, source: Source) -> None:
    """Write ``dataset.toml`` for ``source``, or check that the one there describes it."""
    path = folder / "dataset.toml"
    rate, labels = float(source.sampling_rate_hz), tuple(source.classes)
    if path.exists():
        config = read_config(path)
        if not math.isclose(config.sampling_rate_hz, rate) or (labels and config.labels not in (None, labels)):
            raise ConfigError(
                f"{path} describes another stream (sampling_rate_hz {config.sampling_rate_hz:g}, labels "
                f"{list(config.labels or ())}) than {source.client_id} ({rate:g} Hz, labels {list(labels)}); "
                "record into another folder.")
        return
    text = f"sampling_rate_hz = {rate:g}\n"
    if labels:
        text += "labels = [" + ", ".join(f'"{c}"' for c in labels) + "]\n"
    write_atomic(path, text.encode())


def _cells(values: np.ndarray, digits: int) -> list[str]:
    """Numbers as CSV cells, NaN and infinities as empty cells."""
    text = np.char.mod(f"%.{digits}g", values.astype(np.float64))
    return np.where(np.isfinite(values), text, "").tolist()


def record_source(source: Source, folder: str | os.PathLike[str], *, max_seconds: float | None = None,
                  progress: object = None) -> Recorded:
    """Write ``source`` as ``folder/<client>.csv`` (and ``folder/dataset.toml``) until it ends or
    ``max_seconds`` of stream time have passed. ``progress``: called with the seconds written so far."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _dataset_toml(folder, source)
    channels = tuple(c for c in COLUMNS if c in source.channels)
    target = folder / f"{source.client_id}.csv"
    partial = target.with_name(f".{target.name}.partial")
    samples, start, end = 0, None, 0.0
    names = ["t", *channels, "hr_bpm", "activity"]
    classes = np.array([*source.classes, ""], dtype=object)
    try:
        with partial.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(names)
            for chunk in source.chunks(4096):
                if not len(chunk):
                    continue
                start = float(chunk.t[0]) if start is None else start
                keep = len(chunk) if max_seconds is None else int(np.searchsorted(chunk.t, start + max_seconds))
                data = chunk.columns(channels)[:keep]
                activity = chunk.activity[:keep].astype(np.int64)
                activity = np.where((activity == UNKNOWN) | (activity >= len(source.classes)), -1, activity)
                columns = [_cells(chunk.t[:keep], 12), *(_cells(data[:, i], 7) for i in range(len(channels))),
                           _cells(chunk.hr_bpm[:keep], 6), classes[activity].tolist()]
                writer.writerows(zip(*columns, strict=True))
                samples += keep
                if keep:
                    end = float(chunk.t[keep - 1])
                if callable(progress):
                    progress(end - start)
                if keep < len(chunk):
                    break
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    seconds = 0.0 if start is None else end - start
    return Recorded(target, samples, seconds, float(source.sampling_rate_hz), tuple(names))
