"""Shamir t-of-n secret sharing over the prime field GF(2^521 - 1).

A secret of up to 64 bytes is the constant term of a random polynomial of degree
``t - 1``; a share is the polynomial's value at a holder's nonzero x (its roster
index). Any ``t`` shares give the secret back by Lagrange interpolation at zero;
``t - 1`` shares are consistent with every secret equally (perfect secrecy), so
they tell nothing. The Mersenne prime 2^521 - 1 holds a 32-byte key whole, and
Python's integers do the arithmetic: sharing one secret among ``k`` holders costs
``k (t - 1)`` multiplications, well under a millisecond for 50 clients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from models.protocol.secagg.errors import SecAggError

__all__ = ["PRIME", "SHARE_BYTES", "lagrange_at_zero", "reconstruct", "share_from_bytes", "share_to_bytes", "split"]

PRIME = (1 << 521) - 1
SHARE_BYTES = 66
"""A field element, big-endian: 521 bits round up to 66 bytes."""
MAX_SECRET_BYTES = 64


def random_element(randbytes: Callable[[int], bytes]) -> int:
    """A uniform field element, by rejection (a draw of 2^521 - 1 itself is the only one refused)."""
    while True:
        value = int.from_bytes(randbytes(SHARE_BYTES), "big") & PRIME
        if value < PRIME:
            return value


def split(secret: bytes, xs: Sequence[int], threshold: int, randbytes: Callable[[int], bytes]) -> list[int]:
    """Shares of ``secret`` at the distinct nonzero points ``xs``; any ``threshold`` of them recover it."""
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise SecAggError("bad_input", f"a shared secret is 1..{MAX_SECRET_BYTES} bytes, got {len(secret)}.")
    _check_points(xs)
    if not 1 <= threshold <= len(xs):
        raise SecAggError("bad_config", f"threshold {threshold} must be 1..{len(xs)} (the number of holders).")
    coefficients = [int.from_bytes(secret, "big")] + [random_element(randbytes) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares.append(y)
    return shares


def lagrange_at_zero(points: Sequence[tuple[int, int]]) -> int:
    """The value at 0 of the polynomial of degree ``len(points) - 1`` through ``points``."""
    xs = [x for x, _ in points]
    _check_points(xs)
    total = 0
    for j, (xj, yj) in enumerate(points):
        numerator, denominator = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                numerator = numerator * xm % PRIME
                denominator = denominator * (xm - xj) % PRIME
        total = (total + yj * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def reconstruct(points: Sequence[tuple[int, int]], threshold: int, length: int) -> bytes:
    """The ``length``-byte secret from at least ``threshold`` ``(x, share)`` points (the first ``threshold`` used).

    Raises SecAggError ``too_few_survivors`` with fewer points, and ``bad_share`` when
    the interpolated value does not fit ``length`` bytes (the shares were not of one
    polynomial of a secret that size).
    """
    if len(points) < threshold:
        raise SecAggError("too_few_survivors", f"{len(points)} shares cannot recover a {threshold}-of-n secret.",
                          needed=threshold, got=len(points))
    value = lagrange_at_zero(points[:threshold])
    if value >> (8 * length):
        raise SecAggError("bad_share", f"the shares do not interpolate to a {length}-byte secret.")
    return value.to_bytes(length, "big")


def share_to_bytes(share: int) -> bytes:
    return share.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """A share from its 66 bytes; SecAggError ``malformed`` unless it is a field element."""
    if len(data) != SHARE_BYTES:
        raise SecAggError("malformed", f"a share is {SHARE_BYTES} bytes, got {len(data)}.")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise SecAggError("malformed", "a share is not below the field prime 2^521 - 1.")
    return value


def _check_points(xs: Sequence[int]) -> None:
    if any(not 0 < x < PRIME for x in xs) or len(set(xs)) != len(xs):
        raise SecAggError("bad_config", "share points must be distinct and nonzero.")
