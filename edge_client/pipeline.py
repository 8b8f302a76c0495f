"""Streaming preprocessing: from a source's chunks to the windows a model takes.

One :class:`Preprocessor` per client stream, set up from the model's spec: pick the
model's channels, split the stream at gaps, clock jumps, NaN runs and saturated
samples, band-pass the PPG, resample to the model's rate, cut windows with hop and
normalize each window. Every stage carries its state between chunks, so the
windows are identical whether samples arrive one at a time or a thousand at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from edge_client.filters import StreamingSOS, bandpass_sos
from edge_client.resampling import StreamingResampler
from edge_client.sources.base import Chunk
from edge_client.windowing import Windower, Windows, modes_for, normalize_windows
from models.errors import ConfigError, InputError
from models.spec import ModelSpec

__all__ = ["DEFAULT_SATURATION", "PreprocessStats", "Preprocessor", "windows_from_chunks"]

DEFAULT_SATURATION = {"acc": 16.0, "gyro": 35.0}
"""Full-scale limits (g, rad/s): a sample at or beyond them is clipped by the sensor, not real."""


@dataclass
class PreprocessStats:
    """What preprocessing dropped, so bad data is counted rather than silently lost."""

    samples: int = 0
    invalid_samples: int = 0
    gaps: int = 0
    dropped_windows: int = 0
    windows: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Segment:
    t0: float | None = None


class Preprocessor:
    """Turns one client's chunks into normalized windows for ``spec``.

    ``source_rate_hz`` is the stream's nominal rate; ``hop`` defaults to half a window.
    A gap longer than ``max_gap_samples`` sample periods, a step back in time, a
    non-finite or a saturated sample ends the current segment: no filter, resampler or
    window ever runs across bad data.
    """

    def __init__(
        self,
        spec: ModelSpec,
        source_rate_hz: float,
        hop: int | None = None,
        saturation: Mapping[str, float] | None = None,
        max_gap_samples: float = 2.5,
    ) -> None:
        self.spec = spec
        self.channels = spec.channels
        self.source_rate_hz = float(source_rate_hz)
        self.hop = int(hop) if hop is not None else max(spec.window // 2, 1)
        if self.hop < 1:
            raise ConfigError(f"hop must be >= 1 sample, got {hop}.")
        limits = dict(DEFAULT_SATURATION, **(saturation or {}))
        self._limit = np.array([limits.get(c.split("_")[0], np.inf) for c in self.channels], np.float32)
        self._max_gap = max_gap_samples / self.source_rate_hz
        pre = spec.preprocessing
        band = pre.get("bandpass", {})
        self._band_idx = [self.channels.index(c) for c in band]
        self._filters = [StreamingSOS(bandpass_sos(lo, hi, self.source_rate_hz), 1) for lo, hi in band.values()]
        self._modes = modes_for(self.channels, pre.get("normalization", {}))
        self.resampler = StreamingResampler(self.source_rate_hz, spec.sampling_rate_hz, len(self.channels))
        self.windower = Windower(spec.window, self.hop, len(self.channels), spec.sampling_rate_hz)
        self.stats = PreprocessStats()
        self._segment = _Segment()
        self._last_t: float | None = None
        self._last_valid = True

    def _reset(self) -> None:
        for f in self._filters:
            f.reset()
        self.resampler.reset()
        self.windower.reset()
        self._segment = _Segment()

    def _breaks(self, t: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Indices where a new segment starts: after a gap or step back, or at a valid run after invalid ones."""
        prev_t = np.concatenate([[self._last_t if self._last_t is not None else -np.inf], t[:-1]])
        dt = t - prev_t
        jump = (dt > self._max_gap) | (dt <= 0)
        if self._last_t is None:
            jump[0] = False
        prev_valid = np.concatenate([[self._last_valid], valid[:-1]])
        return np.flatnonzero(valid & (jump | ~prev_valid))

    def __call__(self, chunk: Chunk) -> Windows:
        """Windows completed by this chunk (possibly none)."""
        if len(chunk) == 0:
            return Windows.empty(len(self.channels), self.spec.window)
        try:
            x = chunk.columns(self.channels).astype(np.float32, copy=False)
        except KeyError as exc:
            need = list(self.channels)
            raise InputError(f"client {chunk.client_id}: {exc.args[0]}; the model needs {need}.") from exc
        t = np.asarray(chunk.t, dtype=np.float64)
        valid = np.all(np.isfinite(x) & (np.abs(x) < self._limit), axis=1)
        self.stats.samples += len(x)
        self.stats.invalid_samples += int((~valid).sum())
        starts = set(self._breaks(t, valid).tolist())
        parts: list[Windows] = []
        # Runs of valid samples, split at segment starts.
        edges = np.flatnonzero(np.diff(np.concatenate([[0], valid.astype(np.int8), [0]])))
        for run_start, run_end in zip(edges[::2], edges[1::2], strict=True):
            cuts = sorted({int(run_start), *(s for s in starts if run_start < s < run_end), int(run_end)})
            for a, b in itertools.pairwise(cuts):
                if a in starts and self._segment.t0 is not None:
                    self._reset()
                    self.stats.gaps += 1
                parts.append(self._feed(x[a:b], chunk.activity[a:b], chunk.hr_bpm[a:b], t[a:b]))
        self._last_t = float(t[-1])
        self._last_valid = bool(valid[-1])
        self.stats.dropped_windows = self.windower.dropped_windows
        out = Windows.concat(parts) if parts else Windows.empty(len(self.channels), self.spec.window)
        self.stats.windows += len(out)
        return out

    def _feed(self, x: np.ndarray, act: np.ndarray, hr: np.ndarray, t: np.ndarray) -> Windows:
        seg = self._segment
        if seg.t0 is None:
            seg.t0 = float(t[0])
        if self._filters:
            x = x.copy()
            for i, f in zip(self._band_idx, self._filters, strict=True):
                x[:, i : i + 1] = f(x[:, i : i + 1])
        y, act_r, hr_r, index = self.resampler(x, act, hr)
        t_out = seg.t0 + index / self.spec.sampling_rate_hz
        w = self.windower(y, act_r, hr_r, t_out)
        if len(w) == 0:
            return w
        return Windows(normalize_windows(w.x, self._modes), w.activity, w.hr_bpm, w.t_end)


def windows_from_chunks(
    chunks: Iterable[Chunk], spec: ModelSpec, source_rate_hz: float, hop: int | None = None
) -> tuple[Windows, PreprocessStats]:
    """All windows of one stream, and what was dropped on the way."""
    pre = Preprocessor(spec, source_rate_hz, hop=hop)
    parts = [pre(chunk) for chunk in chunks]
    parts = [p for p in parts if len(p)]
    out = Windows.concat(parts) if parts else Windows.empty(len(spec.channels), spec.window)
    return out, pre.stats
