"""Fixed-point encoding of updates, and arithmetic modulo 2^b on uint64 arrays.

Secure aggregation adds integers, so every client must put its floats on one grid:
the delta is L2-clipped to ``clip`` (so every coordinate lies in [-clip, clip]) and
divided by the common step ``clip / L`` with ``L = 2^(k-1) - 1`` for ``k`` value
bits, then rounded stochastically (down or up with the probabilities that make the
rounding unbiased). The masked sum of ``n`` such vectors lies in [-nL, nL], which
fits a ring of ``b = k + ceil(log2 n)`` bits with its sign (:func:`modulus_bits`).

Error bound of :func:`decode` (the mean of ``n`` clients), per coordinate, against
the mean of the *clipped* deltas: the error is unbiased, never exceeds one step
``clip / L``, and has standard deviation at most ``clip / (2 L sqrt(n))`` (each
client's rounding error is independent, in (-step, step), with variance <= step²/4).
Clipping itself changes any delta longer than ``clip``; that bias is the caller's
choice of ``clip``. With 16 value bits the step is ``clip / 32767``.
"""

from __future__ import annotations

import numpy as np

from models.errors import ConfigError
from models.protocol.secagg.errors import SecAggError

__all__ = ["decode", "encode", "from_ring", "levels", "modulus_bits", "ring_mask", "ring_sum", "step", "to_ring"]

MAX_VALUE_BITS = 48
"""Value bits beyond this leave float64 (53-bit mantissa) too little room for exact steps."""


def levels(value_bits: int) -> int:
    """``L = 2^(k-1) - 1``: the largest magnitude a ``k``-bit encoded value takes."""
    if not 2 <= value_bits <= MAX_VALUE_BITS:
        raise ConfigError(f"value bits must be 2..{MAX_VALUE_BITS}, got {value_bits}.")
    return (1 << (value_bits - 1)) - 1


def modulus_bits(value_bits: int, n_clients: int) -> int:
    """Ring bits ``b`` that hold the sum of ``n_clients`` values of ``value_bits`` bits with its sign.

    ``|sum| <= n L < n 2^(k-1) <= 2^(b-1)`` for ``b = k + ceil(log2 n)``, so the sum
    never wraps. Raises ConfigError when that exceeds the 64 bits of the arrays.
    """
    levels(value_bits)
    if n_clients < 1:
        raise ConfigError(f"the number of clients must be >= 1, got {n_clients}.")
    bits = value_bits + (n_clients - 1).bit_length()
    if bits > 64:
        raise ConfigError(f"{n_clients} clients of {value_bits}-bit values need {bits} ring bits (> 64);"
                          " use fewer value bits.")
    return bits


def ring_mask(bits: int) -> np.uint64:
    """``2^b - 1`` as a uint64: ``x & ring_mask(b)`` is ``x mod 2^b``."""
    if not 1 <= bits <= 64:
        raise ConfigError(f"ring bits must be 1..64, got {bits}.")
    return np.uint64((1 << bits) - 1)


def to_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers to their residues mod 2^b (two's complement), as uint64."""
    return np.asarray(values, np.int64).astype(np.uint64) & ring_mask(bits)


def from_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """Residues mod 2^b back to signed integers in [-2^(b-1), 2^(b-1)), as int64."""
    residues = np.asarray(values, np.uint64) & ring_mask(bits)
    if bits == 64:
        return residues.view(np.int64).copy()
    signed = residues.astype(np.int64)
    return np.where(signed >= (1 << (bits - 1)), signed - (1 << bits), signed)


def ring_sum(vectors: list[np.ndarray], bits: int) -> np.ndarray:
    """The plain sum mod 2^b of uint64 residue vectors (what secure aggregation must equal)."""
    total = np.zeros_like(np.asarray(vectors[0], np.uint64))
    for vector in vectors:
        total += np.asarray(vector, np.uint64)
    return total & ring_mask(bits)


def step(clip: float, value_bits: int) -> float:
    """The common quantization step ``clip / L`` every client uses."""
    if not (np.isfinite(clip) and clip > 0):
        raise ConfigError(f"clip must be a finite number > 0, got {clip}.")
    return float(clip) / levels(value_bits)


def encode(delta: np.ndarray, clip: float, value_bits: int, rng: np.random.Generator) -> np.ndarray:
    """A flat float delta, L2-clipped to ``clip``, stochastically rounded to the common grid.

    delta: (m,) float. Returns (m,) int64 in [-L, L]. Unbiased: the mean of many
    encodings of one clipped delta is that delta divided by the step.
    """
    x = np.asarray(delta, np.float64)
    if x.ndim != 1 or not np.all(np.isfinite(x)):
        raise ConfigError("the delta to encode must be a flat array of finite numbers.")
    unit = step(clip, value_bits)
    norm = float(np.linalg.norm(x))
    if norm > clip:
        x = x * (clip / norm)
    bound = levels(value_bits)
    q = np.floor(x / unit + rng.random(x.shape))
    return np.clip(q, -bound, bound).astype(np.int64)


def decode(total: np.ndarray, n_clients: int, clip: float, value_bits: int, bits: int) -> np.ndarray:
    """The mean of ``n_clients`` encoded deltas from their sum mod 2^b, as float32.

    Raises SecAggError ``overflow`` when the sum lies outside [-nL, nL]: a wrong ``n``
    or a corrupted aggregate, never a sum that honest clients produce.
    """
    if n_clients < 1:
        raise ConfigError(f"the number of clients must be >= 1, got {n_clients}.")
    signed = from_ring(total, bits)
    bound = n_clients * levels(value_bits)
    if signed.size and (int(signed.max()) > bound or int(signed.min()) < -bound):
        raise SecAggError("overflow", f"the aggregate exceeds what {n_clients} clients can sum (|sum| <= {bound}).")
    return (signed.astype(np.float64) * (step(clip, value_bits) / n_clients)).astype(np.float32)
