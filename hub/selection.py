"""Client selection: which online edges a round's task names.

A pure function of the round number, the edges online and the policy, with no side
effects: the same inputs give the same clients (the draw is seeded by the round), so a
restarted hub picks as before from the same edges. What follows from a selection (a
secure round over the selected edges, an intake that takes their updates only) is the
orchestrator's explicit next step, not part of picking.

``fraction`` of the edges online are picked, at least ``min_clients`` and at most
``max_clients``; the others sit the round out. A secure hub always selects (its roster),
even when every edge is wanted. ``newcomers`` (online edges the hub does not know yet,
:mod:`hub.presence`) are not candidates: up to ``newcomer_slots`` of them are added on top,
so that a new gateway of a federation that selects can get its first update accepted, while
fake ones take no member's place.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["SelectionPolicy", "select_clients"]


@dataclass(frozen=True)
class SelectionPolicy:
    """How many of the online edges a round takes; ``always``: select even when all are wanted."""

    min_clients: int = 2
    fraction: float = 1.0
    max_clients: int | None = None
    always: bool = False
    newcomer_slots: int = 2

    @property
    def selects(self) -> bool:
        """Whether rounds name their clients (False: every edge online takes part)."""
        return self.fraction < 1.0 or self.max_clients is not None or self.always


def select_clients(round_number: int, online: Iterable[str], policy: SelectionPolicy,
                   newcomers: Iterable[str] = ()) -> tuple[str, ...] | None:
    """The clients picked for ``round_number``, sorted.

    None: the policy selects no one in particular (every edge takes part); empty: fewer
    than ``min_clients`` are online, so the choice waits for more.
    """
    if not policy.selects:
        return None
    candidates = sorted(online)
    if len(candidates) < policy.min_clients:
        return ()
    draw = random.Random(round_number)
    k = max(math.ceil(policy.fraction * len(candidates)), policy.min_clients)
    k = min(k, policy.max_clients or k, len(candidates))
    chosen = draw.sample(candidates, k)
    others = sorted(set(newcomers) - set(candidates))
    chosen += draw.sample(others, min(policy.newcomer_slots, len(others)))
    return tuple(sorted(chosen))
