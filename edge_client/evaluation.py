"""Central training, evaluation and personalization over a dataset's clients.

This is what ``wearfl evaluate`` runs, and what the federation's results are judged
against: a model trained centrally on the training clients and evaluated on the
held-out ones, and per-client fine-tuning on the head of each stream evaluated on
its tail (personalization).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_client.pipeline import windows_from_chunks
from edge_client.sources.base import Chunk, Dataset, Source
from edge_client.windowing import Windows
from models.errors import ConfigError, InputError
from models.metrics import regression_metrics, task_metrics
from models.model import Model
from models.spec import ModelSpec, default_spec
from models.training import TrainConfig, fit

__all__ = [
    "CENTRAL_TRAINING",
    "ClientData",
    "client_windows",
    "head_layers",
    "load_clients",
    "personalize",
    "spectral_peak_bpm",
    "summarize",
    "task_spec",
    "train_central",
]

ACTIVITY_SENSORS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")
HEART_RATE_SENSORS = ("ppg", "acc_x", "acc_y", "acc_z")
DEFAULT_WINDOW_S = {"activity": 2.56, "heart-rate": 8.0}

CENTRAL_TRAINING = {
    "activity": {"hop_fraction": 0.125, "schedule": [(5, 3e-3), (5, 1e-3), (5, 3e-4), (5, 1e-4)], "batch_size": 64},
    "heart-rate": {"hop_fraction": 0.125, "schedule": [(4, 3e-3), (4, 1e-3), (4, 3e-4)], "batch_size": 64},
}
"""Training recipe per task: training windows overlap more than test windows (cheap
augmentation), and a step-decayed learning rate (epochs, lr) per stage."""

Progress = Callable[[str, int, int], None]


def task_spec(task: str, dataset: Dataset, window_s: float | None = None) -> ModelSpec:
    """A fresh model spec whose channels, sampling rate and classes come from ``dataset``."""
    rate = dataset.sampling_rate_hz
    window = round((window_s or DEFAULT_WINDOW_S.get(task, 0)) * rate)
    if window_s is not None and window_s <= 0:
        raise ConfigError(f"--window-s must be > 0, got {window_s}.")
    if task == "activity":
        channels = [c for c in ACTIVITY_SENSORS if c in dataset.channels]
        if not channels:
            raise ConfigError(f"dataset {dataset.name} has no accelerometer or gyroscope channels.")
        if len(dataset.classes) < 2:
            raise ConfigError(f"dataset {dataset.name} has fewer than two activity classes.")
        return default_spec(task, channels=channels, window=window, classes=dataset.classes, sampling_rate_hz=rate)
    if task == "heart-rate":
        missing = [c for c in HEART_RATE_SENSORS if c not in dataset.channels]
        if missing or not dataset.has_heart_rate:
            raise ConfigError(
                f"dataset {dataset.name} cannot train heart rate: it lacks "
                f"{', '.join(missing) if missing else 'reference heart rate (hr_bpm)'}."
            )
        return default_spec(task, channels=HEART_RATE_SENSORS, window=window, sampling_rate_hz=rate)
    raise ConfigError(f"unknown task {task!r}; use activity or heart-rate.")


@dataclass(frozen=True)
class ClientData:
    """One client's labelled windows in stream order: x (n, channels, window), targets y (n,)."""

    client_id: str
    x: np.ndarray
    y: np.ndarray
    dropped_windows: int = 0

    def split(self, fraction: float) -> tuple[ClientData, ClientData]:
        """The first ``fraction`` of the stream and the rest."""
        cut = round(len(self.x) * fraction)
        return (ClientData(self.client_id, self.x[:cut], self.y[:cut]),
                ClientData(self.client_id, self.x[cut:], self.y[cut:]))


def _labelled(windows: Windows, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    if spec.is_classifier:
        keep = windows.activity >= 0
        return windows.x[keep], windows.activity[keep].astype(np.int64)
    keep = np.isfinite(windows.hr_bpm)
    return windows.x[keep], windows.hr_bpm[keep]


def load_clients(
    dataset: Dataset, clients: Sequence[str], spec: ModelSpec, hop: int | None = None,
    progress: Progress | None = None,
) -> list[ClientData]:
    """Every client's labelled windows for ``spec`` (resampled and windowed to its input)."""
    out = []
    for i, client in enumerate(clients):
        out.append(client_windows(dataset.source(client), spec, hop=hop))
        if progress:
            progress("windowing", i + 1, len(clients))
    return out


def client_windows(source: Source, spec: ModelSpec, hop: int | None = None,
                   chunks: Iterable[Chunk] | None = None) -> ClientData:
    """One source's labelled windows for ``spec`` (``chunks``: these of the source instead of all of it)."""
    windows, stats = windows_from_chunks(source.chunks() if chunks is None else chunks, spec,
                                         source.sampling_rate_hz, hop=hop)
    if spec.is_classifier and source.classes and tuple(source.classes) != spec.classes:
        windows = _remap_classes(windows, source.classes, spec.classes)
    x, y = _labelled(windows, spec)
    return ClientData(source.client_id, x, y, stats.dropped_windows)


def _remap_classes(windows: Windows, have: Sequence[str], want: Sequence[str]) -> Windows:
    """Map the source's class indices onto the model's names; unknown names become UNKNOWN."""
    table = np.array([want.index(c) if c in want else -1 for c in have] + [-1], np.int16)
    activity = table[np.where(windows.activity >= 0, windows.activity, len(have))]
    return Windows(windows.x, activity, windows.hr_bpm, windows.t_end)


def _stack(data: Sequence[ClientData], spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    xs = [d.x for d in data if len(d.x)]
    if not xs:
        raise InputError("no labelled windows were found for this task in the dataset's clients.")
    return np.concatenate(xs), np.concatenate([d.y for d in data if len(d.x)])


def train_central(
    spec: ModelSpec, data: Sequence[ClientData], seed: int = 0, progress: Progress | None = None
) -> Model:
    """Train a fresh model on all of ``data`` with the task's recipe."""
    recipe = CENTRAL_TRAINING[spec.task]
    x, y = _stack(data, spec)
    model = Model(spec, seed=seed)
    stages = recipe["schedule"]
    steps_per_epoch = -(-len(x) // recipe["batch_size"])
    total = steps_per_epoch * sum(e for e, _ in stages)
    done = 0
    for i, (epochs, lr) in enumerate(stages):
        def on_step(step: int, loss: float, base: int = done) -> None:
            if progress:
                progress("training", base + step, total)

        fit(model, x, y, TrainConfig(epochs=epochs, batch_size=recipe["batch_size"], lr=lr, seed=seed + i),
            on_step=on_step)
        done += steps_per_epoch * epochs
    return model


def head_layers(spec: ModelSpec) -> tuple[str, ...]:
    """The dense layers after the last pooling layer: what personalization adapts."""
    names = [layer["name"] for layer in spec.architecture]
    kinds = [layer["type"] for layer in spec.architecture]
    last_pool = max((i for i, k in enumerate(kinds) if k == "global_avg_pool1d"), default=-1)
    return tuple(n for n, k in zip(names[last_pool + 1 :], kinds[last_pool + 1 :], strict=True) if k == "dense")


def spectral_peak_bpm(x: np.ndarray, rate_hz: float, low_hz: float = 0.5, high_hz: float = 4.0) -> np.ndarray:
    """The classic baseline: the strongest PPG frequency in the HR band, per window (channel 0)."""
    n = x.shape[-1]
    pad = max(4096, n)
    spectrum = np.abs(np.fft.rfft(x[:, 0] - x[:, 0].mean(axis=1, keepdims=True), n=pad, axis=1))
    freqs = np.fft.rfftfreq(pad, 1.0 / rate_hz)
    band = (freqs >= low_hz) & (freqs <= high_hz)
    return (freqs[band][spectrum[:, band].argmax(axis=1)] * 60.0).astype(np.float32)


def summarize(model: Model, data: Sequence[ClientData]) -> dict[str, Any]:
    """Pooled metrics over all windows, and per client."""
    x, y = _stack(data, model.spec)
    result: dict[str, Any] = {"metrics": task_metrics(model.spec, model.predict(x), y), "windows": len(x),
                              "clients": {d.client_id: task_metrics(model.spec, model.predict(d.x), d.y)
                                          for d in data if len(d.x)}}
    if not model.spec.is_classifier:
        baseline = regression_metrics(spectral_peak_bpm(x, model.spec.sampling_rate_hz), y)
        result["baseline"] = {"spectral_peak": baseline}
    return result


def personalize(
    model: Model, data: Sequence[ClientData], fraction: float, config: TrainConfig | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fine-tune a copy of ``model`` per client on the first ``fraction`` of its windows; evaluate on the rest."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"--personalize-fraction must be between 0 and 1, got {fraction}.")
    config = config or _head_only(model.spec)
    weights = model.network.state_dict()
    before, after, per_client = [], [], {}
    for i, client in enumerate(data):
        head, tail = client.split(fraction)
        if len(head.x) < 2 or len(tail.x) == 0:
            continue
        local = Model(model.spec, version=model.version)
        local.network.load_state_dict(weights)
        out_before = local.predict(tail.x)
        fit(local, head.x, head.y, config, global_weights=weights)
        out_after = local.predict(tail.x)
        before.append((out_before, tail.y))
        after.append((out_after, tail.y))
        per_client[client.client_id] = {
            "before": task_metrics(model.spec, out_before, tail.y),
            "after": task_metrics(model.spec, out_after, tail.y),
            "train_windows": len(head.x), "test_windows": len(tail.x),
        }
        if progress:
            progress("personalizing", i + 1, len(data))
    if not per_client:
        raise InputError("no client has enough windows to personalize; use a longer stream or another fraction.")
    return {"metrics_before": _pooled(model.spec, before), "metrics_after": _pooled(model.spec, after),
            "clients": per_client, **_outcome(model.spec, per_client), "personalized_clients": len(per_client)}


def _pooled(spec: ModelSpec, pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    return task_metrics(spec, np.concatenate([p for p, _ in pairs]), np.concatenate([t for _, t in pairs]))


def _outcome(spec: ModelSpec, per_client: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How many clients the change from ``before`` to ``after`` helped, left alone or hurt, and its spread."""
    key = "accuracy" if spec.is_classifier else "mae_bpm"
    sign = 1.0 if spec.is_classifier else -1.0  # accuracy up is better, MAE down is better
    deltas = np.array([c["after"][key] - c["before"][key] for c in per_client.values()])
    gains = sign * deltas
    return {"improved_clients": int((gains > 0).sum()), "unchanged_clients": int((gains == 0).sum()),
            "worse_clients": int((gains < 0).sum()),
            "delta_" + key: {"min": float(deltas.min()), "median": float(np.median(deltas)),
                             "max": float(deltas.max())}}


def _head_only(spec: ModelSpec) -> TrainConfig:
    """Personalization's fine-tuning: only the dense head adapts, BatchNorm statistics fixed (a few hundred windows
    of one wearer are too few to retrain the feature extractor without forgetting)."""
    return TrainConfig(epochs=10, batch_size=32, lr=1e-3, train_only=head_layers(spec))


def adapt(
    model: Model, data: Sequence[ClientData], fraction: float, personalize_fraction: float | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Per client: adapt a copy of ``model`` to the first ``fraction`` of its windows without reading their
    labels (:func:`edge_client.adaptation.adapt_for_wearer`), then (``personalize_fraction``) fine-tune its head on the
    first ``personalize_fraction`` of the windows with their labels; evaluate the global, the adapted and the
    personalized model on the windows after both.

    ``{"metrics_before", "metrics_after", "metrics_adapted", "clients": {id: {"before", "adapted", "after",
    "kept_global", "adapt_windows", "test_windows"}}, "improved_clients", "unchanged_clients", "worse_clients",
    "adapted_clients", "kept_global_clients", "delta_<metric>"}``: "after" is the last model (the personalized one
    when asked, else the adapted one).
    """
    from edge_client.adaptation import adapt_for_wearer

    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"--adapt-fraction must be between 0 and 1, got {fraction}.")
    if personalize_fraction is not None and not 0.0 < personalize_fraction < 1.0:
        raise ConfigError(f"--personalize-fraction must be between 0 and 1, got {personalize_fraction}.")
    config = _head_only(model.spec)
    weights = model.network.state_dict()
    before, adapted_out, after, per_client = [], [], [], {}
    cut_fraction = max(fraction, personalize_fraction or 0.0)
    for i, client in enumerate(data):
        head, _ = client.split(fraction)  # its labels are never read
        _, tail = client.split(cut_fraction)
        if len(head.x) < 2 or len(tail.x) == 0:
            continue
        out_before = model.predict(tail.x)
        adapted, report = adapt_for_wearer(model, head.x)
        out_adapted = adapted.predict(tail.x)
        out_after, tuned = out_adapted, 0
        if personalize_fraction is not None:
            labelled, _ = client.split(personalize_fraction)
            if len(labelled.x) >= 2:
                local = Model(model.spec, version=model.version)  # never the global model, even when kept
                local.network.load_state_dict(adapted.network.state_dict())
                fit(local, labelled.x, labelled.y, config, global_weights=weights)
                out_after, tuned = local.predict(tail.x), len(labelled.x)
        before.append((out_before, tail.y))
        adapted_out.append((out_adapted, tail.y))
        after.append((out_after, tail.y))
        per_client[client.client_id] = {
            "before": task_metrics(model.spec, out_before, tail.y),
            "adapted": task_metrics(model.spec, out_adapted, tail.y),
            "after": task_metrics(model.spec, out_after, tail.y),
            "kept_global": report["kept_global"], "reason": report["reason"], "check": report["check"],
            "adapt_windows": len(head.x), "personalize_windows": tuned, "test_windows": len(tail.x),
        }
        if progress:
            progress("adapting", i + 1, len(data))
    if not per_client:
        raise InputError("no client has enough windows to adapt on; use a longer stream or another fraction.")
    kept = sum(1 for c in per_client.values() if c["kept_global"])
    return {
        "metrics_before": _pooled(model.spec, before),
        "metrics_adapted": _pooled(model.spec, adapted_out),
        "metrics_after": _pooled(model.spec, after),
        "clients": per_client,
        **_outcome(model.spec, per_client),
        "adapted_clients": len(per_client) - kept,
        "kept_global_clients": kept,
    }
