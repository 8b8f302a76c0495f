"""Streaming polyphase resampling between sampling rates (e.g. 50 Hz -> 32 Hz).

Output m of a segment sits at time m / to_hz and is a fixed dot product of a
windowed-sinc filter with the input samples around it, computed for a batch of
outputs at once. Each output uses the same samples, coefficients and summation
order whatever the chunking, so the stream is chunk-invariant to the bit.

The anti-aliasing filter is designed here in numpy (:func:`lowpass_taps`, the same
Kaiser-windowed sinc as ``scipy.signal.firwin``) rather than imported: ``import
scipy.signal`` costs a gateway ~100 MB resident and ~0.8 s, against a 60 MB budget.
"""

from __future__ import annotations

import numpy as np

from models.errors import ConfigError

__all__ = ["StreamingResampler", "lowpass_taps", "rational_ratio"]

KAISER_BETA = 5.0
"""Kaiser window shape of the anti-aliasing filter (about 54 dB of stop-band attenuation)."""


def lowpass_taps(numtaps: int, cutoff: float, beta: float = KAISER_BETA) -> np.ndarray:
    """Linear-phase low-pass FIR: a Kaiser-windowed sinc with unit gain at DC.

    ``cutoff`` is relative to Nyquist (0 < cutoff < 1). Equals
    ``scipy.signal.firwin(numtaps, cutoff, window=("kaiser", beta))`` (its ``scale=True``
    normalises the DC gain to 1) to rounding.
    """
    if numtaps < 1 or not 0 < cutoff < 1:
        raise ConfigError(f"low-pass needs numtaps >= 1 and 0 < cutoff < 1 (of Nyquist), got {numtaps}, {cutoff}.")
    m = np.arange(numtaps, dtype=np.float64) - 0.5 * (numtaps - 1)
    h = cutoff * np.sinc(cutoff * m)  # ideal low-pass impulse response, centred
    h *= np.kaiser(numtaps, beta)
    return h / np.sum(h)


def rational_ratio(x: float, max_denominator: int) -> tuple[int, int]:
    """``Fraction(x).limit_denominator(max_denominator)`` as (numerator, denominator), x > 0.

    The closest fraction with a denominator of at most ``max_denominator`` (continued fractions;
    a tie goes to the last convergent, as in :mod:`fractions`), in integers: importing
    :mod:`fractions` costs a gateway its ``decimal`` module as well (~0.4 MB resident).
    """
    n0, d0 = float(x).as_integer_ratio()
    if d0 <= max_denominator:
        return n0, d0
    p0, q0, p1, q1 = 0, 1, 1, 0
    n, d = n0, d0
    while True:
        a = n // d
        q2 = q0 + a * q1
        if q2 > max_denominator:
            break
        p0, q0, p1, q1 = p1, q1, p0 + a * p1, q2
        n, d = d, n - a * d
    k = (max_denominator - q0) // q1
    p2, q2 = p0 + k * p1, q0 + k * q1
    # |p1/q1 - x| <= |p2/q2 - x|, compared exactly: |p1 d0 - n0 q1| q2 <= |p2 d0 - n0 q2| q1
    if abs(p1 * d0 - n0 * q1) * q2 <= abs(p2 * d0 - n0 * q2) * q1:
        return p1, q1
    return p2, q2


class StreamingResampler:
    """Resamples (n, channels) float blocks, plus per-sample labels, from one rate to another.

    A segment starts with zero history; :meth:`reset` starts a new segment (at a gap).
    Labels are taken from the input sample nearest in time to each output.
    """

    def __init__(self, from_hz: float, to_hz: float, channels: int, max_denominator: int = 1000) -> None:
        if from_hz <= 0 or to_hz <= 0:
            raise ConfigError(f"sampling rates must be > 0, got {from_hz} -> {to_hz} Hz.")
        self.up, self.down = rational_ratio(to_hz / from_hz, max_denominator)
        self.from_hz, self.to_hz, self.channels = from_hz, to_hz, channels
        self.identity = self.up == self.down
        self.reset()
        if self.identity:
            return
        half = 10 * max(self.up, self.down)
        h = lowpass_taps(2 * half + 1, 1.0 / max(self.up, self.down)) * self.up
        taps = -(-(2 * half + 1) // self.up)
        padded = np.zeros(taps * self.up)
        padded[: len(h)] = h
        # phases[p, i] = h[p + up * i]: the coefficients of input sample base - i for phase p
        self.phases = padded.reshape(taps, self.up).T.astype(np.float32)
        self.half, self.taps = half, taps

    def reset(self) -> None:
        self._x = np.zeros((0, self.channels), np.float32)
        self._act = np.zeros(0, np.int16)
        self._hr = np.zeros(0, np.float32)
        self._start = 0  # segment index of self._x[0]
        self._received = 0
        self._next = 0  # next output index

    def __call__(
        self, x: np.ndarray, activity: np.ndarray, hr: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Feed (n, channels) samples with labels; returns (outputs, activity, hr, output indices)."""
        if self.identity:
            idx = np.arange(self._received, self._received + len(x))
            self._received += len(x)
            return x.astype(np.float32), activity, hr, idx
        self._x = np.concatenate([self._x, x.astype(np.float32)])
        self._act = np.concatenate([self._act, activity])
        self._hr = np.concatenate([self._hr, hr])
        self._received += len(x)
        up, down, half = self.up, self.down, self.half
        # Output m needs input samples up to floor((m*down + half) / up).
        end = -(-(up * self._received - half) // down)
        m = np.arange(self._next, max(end, self._next))
        if len(m) == 0:
            return np.zeros((0, self.channels), np.float32), self._act[:0], self._hr[:0], m
        pos = m * down + half
        base, phase = pos // up, pos % up
        k = base[:, None] - np.arange(self.taps)[None, :]  # (outputs, taps) input indices
        valid = k >= self._start
        gathered = self._x[np.where(valid, k - self._start, 0)]  # (outputs, taps, channels)
        gathered[~valid] = 0.0
        y = (self.phases[phase][:, :, None] * gathered).sum(axis=1, dtype=np.float32)
        nearest = np.clip((m * down + up // 2) // up, self._start, self._received - 1) - self._start
        act, hr = self._act[nearest], self._hr[nearest]
        self._next = int(m[-1]) + 1
        keep_from = max((self._next * down + half) // up - self.taps + 1, self._start)
        # Keep what the next output needs, and what nearest-label lookups still need.
        keep_from = min(keep_from, (self._next * down) // up)
        drop = max(keep_from - self._start, 0)
        if drop:
            self._x, self._act, self._hr = self._x[drop:], self._act[drop:], self._hr[drop:]
            self._start += drop
        return y, act, hr, m
