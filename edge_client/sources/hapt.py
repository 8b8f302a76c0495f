"""UCI HAPT raw recordings as a wearfl :class:`~edge_client.sources.base.Dataset`.

UCI HAPT ("Smartphone-Based Recognition of Human Activities and Postural
Transitions", Reyes-Ortiz et al., 2016) is the real-data benchmark wearfl trains and
evaluates activity models on. Its ``RawData`` folder holds, per experiment, a
waist-worn phone's accelerometer (g) and gyroscope (rad/s) at 50 Hz::

    acc_exp01_user01.txt     gyro_exp01_user01.txt     (3 space-separated columns each)
    labels.txt               experiment user activity first last   (0-based, inclusive)
    activity_labels.txt      1 WALKING ... 12 LIE_TO_STAND

Each of the 30 volunteers is one federated client (``user-01`` .. ``user-30``). The
classes are the six basic activities (labels 1-6, names lowercased from
``activity_labels.txt``); the postural transitions 7-12 and unlabelled samples are
:data:`~edge_client.sources.base.UNKNOWN`. A user's experiments are yielded in
experiment order on one time axis, with ``t`` jumping :data:`EXPERIMENT_GAP_S`
forward between two experiments, so downstream windowing sees a gap and never builds a
window across two recordings. No chunk holds samples of two experiments either.

Files are read lazily: opening the dataset reads only ``labels.txt``,
``activity_labels.txt`` and the folder listing; a client's files are parsed when its
chunks are iterated, one experiment at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edge_client.sources.base import UNKNOWN, Chunk
from models.errors import ConfigError, InputError

__all__ = [
    "EXPERIMENT_GAP_S",
    "HAPT_CHANNELS",
    "HAPT_HINT",
    "HAPT_SAMPLING_RATE_HZ",
    "HAPT_TEST_USERS",
    "HaptDataset",
    "HaptSource",
]

HAPT_CHANNELS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")
HAPT_SAMPLING_RATE_HZ = 50.0
HAPT_TEST_USERS = (2, 4, 9, 10, 12, 13, 18, 20, 24)
"""The volunteers of UCI HAR / HAPT's standard test split (the other 21 are training)."""
EXPERIMENT_GAP_S = 10.0
"""Time from the last sample of one experiment to the first sample of the user's next one."""
HAPT_HINT = (
    "download 'Smartphone-Based Recognition of Human Activities and Postural Transitions' from the "
    "UCI Machine Learning Repository, unpack it, and point the spec (hapt:DIR) or WEARFL_HAPT_DIR at "
    "its RawData folder"
)

_N_CLASSES = 6  # labels 1..6 are the basic activities; 7..12 are transitions (UNKNOWN here)
_ACC_FILE = re.compile(r"acc_exp(\d+)_user(\d+)\.txt")


def _read_xyz(path: Path) -> np.ndarray:
    """A raw HAPT signal file as (n, 3) float32; InputError naming the file when it cannot be."""
    try:
        values = np.loadtxt(path, dtype=np.float32, ndmin=2)
    except OSError as exc:
        raise InputError(f"cannot read {path} ({exc}); check the HAPT RawData folder is complete.") from exc
    except ValueError as exc:
        raise InputError(
            f"{path} is not a HAPT signal file ({exc}); each line must be 3 space-separated numbers. "
            f"Re-extract the RawData folder ({HAPT_HINT})."
        ) from exc
    if values.size == 0:
        return np.zeros((0, 3), np.float32)
    if values.shape[1] != 3:
        raise InputError(
            f"{path} has {values.shape[1]} columns, a HAPT signal file has 3 (x y z); "
            f"re-extract the RawData folder ({HAPT_HINT})."
        )
    return values


def _read_labels(path: Path) -> np.ndarray:
    """labels.txt as an (n, 5) int64 array: experiment, user, activity, first, last."""
    if not path.is_file():
        raise InputError(f"{path} does not exist, so {path.parent} is not a HAPT RawData folder; {HAPT_HINT}.")
    try:
        rows = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise InputError(
            f"{path} is not a HAPT labels file ({exc}); each line must be 5 integers "
            f"'experiment user activity first last'."
        ) from exc
    if rows.size == 0:
        raise InputError(f"{path} holds no labels; re-extract the RawData folder ({HAPT_HINT}).")
    if rows.shape[1] != 5:
        raise InputError(
            f"{path} has {rows.shape[1]} columns; a HAPT labels file has 5 ('experiment user activity first last')."
        )
    return rows


def _read_class_names(path: Path) -> tuple[str, ...]:
    """The names of activities 1..6 from activity_labels.txt, lowercased, in label order."""
    if not path.is_file():
        raise InputError(f"{path} does not exist, so {path.parent} is not a HAPT RawData folder; {HAPT_HINT}.")
    names: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit():
            raise InputError(f"{path} line {lineno}: {line!r} is not '<number> <NAME>'; re-extract the RawData folder.")
        names[int(parts[0])] = parts[1].lower()
    missing = [i for i in range(1, _N_CLASSES + 1) if i not in names]
    if missing:
        raise InputError(f"{path} has no names for activities {missing}; re-extract the RawData folder ({HAPT_HINT}).")
    return tuple(names[i] for i in range(1, _N_CLASSES + 1))


class HaptSource:
    """One HAPT volunteer's experiments, in order, on one time axis."""

    def __init__(self, dataset: HaptDataset, client_id: str, user: int, experiments: tuple[int, ...]) -> None:
        self.client_id = client_id
        self.channels = HAPT_CHANNELS
        self.sampling_rate_hz = HAPT_SAMPLING_RATE_HZ
        self.classes = dataset.classes
        self.user = user
        self.experiments = experiments
        self._dataset = dataset

    def _activity(self, experiment: int, n: int) -> np.ndarray:
        """Per-sample class index of one experiment of n samples, from labels.txt."""
        activity = np.full(n, UNKNOWN, np.int16)
        labels = self._dataset._labels
        for row in np.flatnonzero((labels[:, 0] == experiment) & (labels[:, 1] == self.user)):
            _, _, act, first, last = (int(v) for v in labels[row])
            if not 0 <= first <= last < n:
                raise InputError(
                    f"{self._dataset.path / 'labels.txt'} line {row + 1}: samples {first}..{last} of experiment "
                    f"{experiment} are outside its {n} samples; the labels file does not match the signal files, "
                    f"re-extract the RawData folder."
                )
            if 1 <= act <= _N_CLASSES:
                activity[first : last + 1] = act - 1
        return activity

    def chunks(self, max_samples: int = 4096) -> Iterator[Chunk]:
        """Yield the user's samples, one experiment after another, at most ``max_samples`` a chunk."""
        if max_samples < 1:
            raise ConfigError(f"max_samples must be at least 1, got {max_samples}.")
        start = 0.0
        for experiment in self.experiments:
            stem = f"exp{experiment:02d}_user{self.user:02d}.txt"
            acc_path, gyro_path = self._dataset.path / f"acc_{stem}", self._dataset.path / f"gyro_{stem}"
            acc, gyro = _read_xyz(acc_path), _read_xyz(gyro_path)
            if len(acc) != len(gyro):
                raise InputError(
                    f"{acc_path} has {len(acc)} samples but {gyro_path} has {len(gyro)}; they must match, "
                    f"re-extract the RawData folder."
                )
            n = len(acc)
            if n == 0:
                continue
            data = np.concatenate([acc, gyro], axis=1)
            activity = self._activity(experiment, n)
            t = start + np.arange(n, dtype=np.float64) / self.sampling_rate_hz
            hr = np.full(n, np.nan, np.float32)
            start = float(t[-1]) + EXPERIMENT_GAP_S
            for lo in range(0, n, max_samples):
                hi = min(lo + max_samples, n)
                yield Chunk(
                    client_id=self.client_id,
                    t=t[lo:hi],
                    data=data[lo:hi],
                    channels=self.channels,
                    activity=activity[lo:hi],
                    hr_bpm=hr[lo:hi],
                    classes=self.classes,
                )


class HaptDataset:
    """The UCI HAPT RawData folder: 30 clients, 6 classes, accelerometer + gyroscope, no heart rate.

    ``train_clients`` / ``test_clients`` follow the dataset's standard volunteer split
    (:data:`HAPT_TEST_USERS` are held out). ``holdout_fraction`` is 0.0: the split is by
    client, no client's own time series is cut.
    """

    name = "hapt"
    channels = HAPT_CHANNELS
    sampling_rate_hz = HAPT_SAMPLING_RATE_HZ
    has_heart_rate = False
    holdout_fraction = 0.0

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise InputError(f"the HAPT folder {self.path} does not exist; {HAPT_HINT}.")
        self.classes = _read_class_names(self.path / "activity_labels.txt")
        self._labels = _read_labels(self.path / "labels.txt")
        experiments: dict[int, list[int]] = {}
        for acc in self.path.glob("acc_exp*_user*.txt"):
            match = _ACC_FILE.fullmatch(acc.name)
            if match is None:
                continue
            experiment, user = int(match.group(1)), int(match.group(2))
            gyro = acc.with_name("gyro_" + acc.name.removeprefix("acc_"))
            if not gyro.is_file():
                raise InputError(f"{acc} has no matching {gyro.name}; re-extract the RawData folder ({HAPT_HINT}).")
            experiments.setdefault(user, []).append(experiment)
        if not experiments:
            raise InputError(
                f"{self.path} holds no acc_expXX_userYY.txt files, so it is not a HAPT RawData folder; {HAPT_HINT}."
            )
        self._experiments = {f"user-{u:02d}": (u, tuple(sorted(e))) for u, e in sorted(experiments.items())}
        self.clients = tuple(self._experiments)
        test = {f"user-{u:02d}" for u in HAPT_TEST_USERS}
        self.test_clients = tuple(c for c in self.clients if c in test)
        self.train_clients = tuple(c for c in self.clients if c not in test)

    def source(self, client_id: str) -> HaptSource:
        """The stream of one volunteer (``user-01`` .. ``user-30``)."""
        if client_id not in self._experiments:
            raise ConfigError(
                f"HAPT has no client {client_id!r}; its clients are {self.clients[0]} .. {self.clients[-1]}."
            )
        user, experiments = self._experiments[client_id]
        return HaptSource(self, client_id, user, experiments)

    def __repr__(self) -> str:
        return f"HaptDataset({str(self.path)!r}, clients={len(self.clients)})"
