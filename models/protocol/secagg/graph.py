"""Who masks with whom: all-to-all for small rounds, a random Harary graph for large ones.

SecAgg+ (Bell et al. 2020) replaces the complete graph of SecAgg with a random
``k``-regular graph, ``k = O(log n)``: a client masks with and shares its secrets
among its ``k`` neighbours only, so its cost grows with ``log n`` instead of ``n``.
The graph is the Harary graph H(k, n) (every node joined to the ``k/2`` nearest on
each side of a ring; ``k``-connected) over the roster in an order drawn from a
public seed. The order is SHA-256 of seed and id, sorted: hub and clients compute
the same graph from the round's config, whatever their numpy versions.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from models.errors import ConfigError

__all__ = ["ALL_TO_ALL_BELOW", "choose_degree", "complete_graph", "harary_graph", "neighbourhoods"]

ALL_TO_ALL_BELOW = 64
"""Rounds of up to this many clients use the complete graph by default."""
DEGREE_FACTOR = 4.0
"""``k ≈ 4 log2 n``: 24 neighbours at n = 64, 40 at 1000, 54 at 10,000."""

Graph = dict[str, frozenset[str]]


def choose_degree(n: int, *, all_to_all_below: int = ALL_TO_ALL_BELOW, factor: float = DEGREE_FACTOR) -> int:
    """Neighbours per client: all ``n - 1`` up to ``all_to_all_below`` clients, else ``~factor log2 n``, even."""
    if n < 2:
        raise ConfigError(f"secure aggregation needs at least 2 clients, got {n}.")
    if n <= all_to_all_below:
        return n - 1
    k = 2 * math.ceil(factor * math.log2(n) / 2)
    return min(k, n - 1)


def complete_graph(ids: Sequence[str]) -> Graph:
    """Every client a neighbour of every other."""
    everyone = frozenset(ids)
    return {u: everyone - {u} for u in ids}


def harary_graph(ids: Sequence[str], degree: int, seed: bytes) -> Graph:
    """H(``degree``, n) over ``ids`` in the order the public ``seed`` draws; ``degree`` even, < n - 1."""
    n = len(ids)
    if degree % 2 or not 2 <= degree < n - 1:
        raise ConfigError(f"a Harary graph on {n} clients needs an even degree in 2..{n - 2}, got {degree}.")
    ring = sorted(ids, key=lambda u: hashlib.sha256(seed + b"\x00" + u.encode()).digest())
    half = degree // 2
    return {
        u: frozenset(ring[(p + d) % n] for d in range(-half, half + 1) if d)
        for p, u in enumerate(ring)
    }


def neighbourhoods(ids: Sequence[str], degree: int, seed: bytes) -> Graph:
    """The round's graph: complete when ``degree >= n - 1``, else the seeded Harary graph."""
    return complete_graph(ids) if degree >= len(ids) - 1 else harary_graph(ids, degree, seed)
