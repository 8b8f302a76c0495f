"""Windowing with hop, window labels, and per-window normalization.

Windows are cut from a stream of (already resampled) samples every ``hop`` samples;
each window takes the activity that covers most of it and the mean reference HR.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edge_client.sources.base import UNKNOWN

__all__ = ["NORMALIZATIONS", "Windower", "Windows", "normalize_windows"]

NORMALIZATIONS = ("none", "center", "zscore")


@dataclass(frozen=True)
class Windows:
    """A batch of windows: x (n, channels, window) float32 with their labels.

    ``activity``: (n,) int16 class index or UNKNOWN; ``hr_bpm``: (n,) float32 or NaN;
    ``t_end``: (n,) float64 stream time of each window's last sample.
    """

    x: np.ndarray
    activity: np.ndarray
    hr_bpm: np.ndarray
    t_end: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    @staticmethod
    def empty(channels: int, window: int) -> Windows:
        return Windows(np.zeros((0, channels, window), np.float32), np.zeros(0, np.int16),
                       np.zeros(0, np.float32), np.zeros(0, np.float64))

    @staticmethod
    def concat(parts: Sequence[Windows]) -> Windows:
        return Windows(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("x", "activity", "hr_bpm", "t_end")))

    def select(self, index: np.ndarray) -> Windows:
        return Windows(self.x[index], self.activity[index], self.hr_bpm[index], self.t_end[index])


def normalize_windows(x: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """Per-window, per-channel normalization; x (n, channels, window), one mode a channel.

    ``center`` removes the window mean (gravity from acceleration), ``zscore`` also
    divides by the standard deviation (PPG amplitude differs by wearer and perfusion).
    """
    out = x.astype(np.float32, copy=True)
    modes = list(modes)
    center = [i for i, m in enumerate(modes) if m in ("center", "zscore")]
    if center:
        out[:, center] -= out[:, center].mean(axis=2, keepdims=True)
    scale = [i for i, m in enumerate(modes) if m == "zscore"]
    if scale:
        std = out[:, scale].std(axis=2, keepdims=True)
        out[:, scale] /= np.maximum(std, np.float32(1e-6))
    return out


class Windower:
    """Cuts windows of ``window`` samples every ``hop`` samples from a stream of segments.

    :meth:`reset` starts a new segment: buffered samples that never filled a window
    are dropped (counted in ``dropped_windows`` when a window was started).
    """

    def __init__(self, window: int, hop: int, channels: int, rate_hz: float, min_label_fraction: float = 0.5) -> None:
        self.window, self.hop, self.channels, self.rate_hz = window, hop, channels, rate_hz
        self.min_label_fraction = min_label_fraction
        self.dropped_windows = 0
        self.reset()

    def reset(self) -> None:
        if getattr(self, "_x", None) is not None and len(self._x) > 0 and self._pending_start < len(self._x):
            self.dropped_windows += 1
        self._x = np.zeros((0, self.channels), np.float32)
        self._act = np.zeros(0, np.int16)
        self._hr = np.zeros(0, np.float32)
        self._t = np.zeros(0, np.float64)
        self._pending_start = 0  # buffer index where the next window starts

    def __call__(self, x: np.ndarray, activity: np.ndarray, hr: np.ndarray, t: np.ndarray) -> Windows:
        self._x = np.concatenate([self._x, x])
        self._act = np.concatenate([self._act, activity.astype(np.int16)])
        self._hr = np.concatenate([self._hr, hr.astype(np.float32)])
        self._t = np.concatenate([self._t, t])
        n = len(self._x)
        starts = np.arange(self._pending_start, n - self.window + 1, self.hop)
        if len(starts) == 0:
            return Windows.empty(self.channels, self.window)
        xs = sliding_window_view(self._x, self.window, axis=0)[starts]  # (k, channels, window)
        acts = sliding_window_view(self._act, self.window)[starts]
        hrs = sliding_window_view(self._hr, self.window)[starts]
        label = self._majority(acts)
        with np.errstate(invalid="ignore"):
            known = np.isfinite(hrs)
            hr_mean = np.where(known.any(axis=1), np.nansum(hrs, axis=1) / np.maximum(known.sum(axis=1), 1), np.nan)
        out = Windows(np.ascontiguousarray(xs, dtype=np.float32), label, hr_mean.astype(np.float32),
                      self._t[starts + self.window - 1])
        next_start = int(starts[-1]) + self.hop
        drop = min(next_start, n)
        self._x, self._act, self._hr, self._t = self._x[drop:], self._act[drop:], self._hr[drop:], self._t[drop:]
        self._pending_start = next_start - drop
        return out

    def _majority(self, acts: np.ndarray) -> np.ndarray:
        """The activity covering at least ``min_label_fraction`` of each window, else UNKNOWN."""
        labels = np.full(len(acts), UNKNOWN, np.int16)
        if acts.size == 0 or acts.max() < 0:
            return labels
        k = int(acts.max()) + 1
        rows = np.repeat(np.arange(len(acts)), acts.shape[1])
        flat = acts.reshape(-1).astype(np.int64)
        ok = flat >= 0
        counts = np.bincount(rows[ok] * k + flat[ok], minlength=len(acts) * k).reshape(len(acts), k)
        best = counts.argmax(axis=1)
        enough = counts[np.arange(len(acts)), best] >= self.min_label_fraction * acts.shape[1]
        labels[enough] = best[enough]
        return labels


def modes_for(channels: Sequence[str], normalization: Mapping[str, str]) -> list[str]:
    """The normalization mode of each channel, from a {channel or prefix: mode} mapping."""
    out = []
    for c in channels:
        mode = normalization.get(c) or normalization.get(c.split("_")[0], "none")
        out.append(mode)
    return out
