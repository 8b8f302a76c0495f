"""What a sensor source is: something that yields timestamped multi-channel chunks.

Every source (simulated wearers, UCI HAPT, wearfl recordings, a live push source)
hands the rest of the gateway the same :class:`Chunk`, so preprocessing, labelling
and fine-tuning never know where samples came from.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = ["CHANNELS", "UNKNOWN", "Chunk", "Dataset", "Source"]

CHANNELS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z", "ppg")
"""wearfl's channel names: acceleration in g, angular rate in rad/s, PPG in any unit."""

UNKNOWN = -1
"""Activity index of a sample whose activity is not known."""


@dataclass(frozen=True)
class Chunk:
    """A run of consecutive samples from one client.

    ``t``: (n,) float64 seconds since the stream's start, non-decreasing in a healthy
    stream (gaps and clock jumps happen and are handled downstream).
    ``data``: (n, len(channels)) float32 in ``channels`` order; NaN where a sample is missing.
    ``activity``: (n,) int16 index into ``classes``, :data:`UNKNOWN` where not known.
    ``hr_bpm``: (n,) float32 reference heart rate, NaN where not known.
    The arrays may be views into the source's own buffers: read them, never write them.
    """

    client_id: str
    t: np.ndarray
    data: np.ndarray
    channels: tuple[str, ...]
    activity: np.ndarray
    hr_bpm: np.ndarray
    classes: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.t)

    def columns(self, names: tuple[str, ...] | list[str]) -> np.ndarray:
        """The data of ``names`` in that order: (n, len(names)); KeyError names what is missing."""
        index = {c: i for i, c in enumerate(self.channels)}
        missing = [c for c in names if c not in index]
        if missing:
            raise KeyError(f"channels {missing} are not in this source (it has {list(self.channels)})")
        return self.data[:, [index[c] for c in names]]


class Source(Protocol):
    """One client's stream of sensor samples."""

    client_id: str
    channels: tuple[str, ...]
    sampling_rate_hz: float
    classes: tuple[str, ...]

    def chunks(self, max_samples: int = 4096) -> Iterator[Chunk]:
        """Yield the stream in order, at most ``max_samples`` samples a chunk."""
        ...


class Dataset(Protocol):
    """A set of clients with a train / held-out split."""

    name: str
    clients: tuple[str, ...]
    train_clients: tuple[str, ...]
    test_clients: tuple[str, ...]
    channels: tuple[str, ...]
    sampling_rate_hz: float
    classes: tuple[str, ...]
    has_heart_rate: bool
    holdout_fraction: float
    """0.0: held-out clients are ``test_clients``; f > 0: every client holds out the last f of its stream."""

    def source(self, client_id: str) -> Source:
        """The stream of one client."""
        ...
