"""Streaming IIR filtering with carried state: the PPG band-pass.

A second-order-sections filter whose state (``zi``) survives between chunks gives
the same output whether the stream arrives one sample or a thousand at a time.
"""

from __future__ import annotations

import numpy as np
from scipy import signal

from models.errors import ConfigError

__all__ = ["StreamingSOS", "bandpass_sos"]


def bandpass_sos(low_hz: float, high_hz: float, rate_hz: float, order: int = 2) -> np.ndarray:
    """Butterworth band-pass as second-order sections (e.g. 0.5-4 Hz keeps 30-240 BPM)."""
    nyquist = rate_hz / 2
    if not 0 < low_hz < high_hz < nyquist:
        raise ConfigError(f"band-pass {low_hz}-{high_hz} Hz needs 0 < low < high < {nyquist} Hz (Nyquist).")
    return signal.butter(order, [low_hz, high_hz], btype="bandpass", fs=rate_hz, output="sos")


class StreamingSOS:
    """Filters (n, channels) blocks along time, carrying the filter state between blocks.

    The state starts at the steady state for the first sample (no start-up step) and
    is dropped by :meth:`reset` at a gap, so a filter never runs across missing data.
    """

    def __init__(self, sos: np.ndarray, channels: int) -> None:
        self.sos = np.asarray(sos, dtype=np.float64)
        self.channels = channels
        self._zi_unit = signal.sosfilt_zi(self.sos)[:, :, None]  # (sections, 2, 1)
        self._zi: np.ndarray | None = None

    def reset(self) -> None:
        self._zi = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (n, channels) -> filtered (n, channels) float32."""
        if len(x) == 0:
            return x.astype(np.float32)
        x64 = x.astype(np.float64)
        if self._zi is None:
            self._zi = self._zi_unit * x64[0][None, None, :]
        y, self._zi = signal.sosfilt(self.sos, x64, axis=0, zi=self._zi)
        return y.astype(np.float32)
