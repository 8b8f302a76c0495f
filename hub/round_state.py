"""The open round: the one place its state lives.

Why one object: the round number, the model version it trains from, whether it still
takes updates, whom it selected, its deadline and its counters are read by the intake,
the round manager, the task and the secure-round driver. Each reads this object (the
intake through the read-only :class:`RoundView`); none keeps a copy to keep in step.
:class:`hub.rounds.RoundManager` opens one (:meth:`~hub.rounds.RoundManager.open`) and
the service records a selection on it once one is made.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from hub.aggregation import StreamingAverage

__all__ = ["OpenRound", "RoundView"]


class RoundView(Protocol):
    """What the intake reads of the open round; it never changes it."""

    @property
    def round(self) -> int: ...

    @property
    def base_version(self) -> int: ...

    @property
    def is_open(self) -> bool: ...

    @property
    def accepting(self) -> frozenset[str] | None: ...


@dataclass
class OpenRound:
    """The round in progress: its number, base model, selection, deadline, running sum and counters.

    ``selection``: the clients the task names (None: every edge, the hub selects none;
    empty: the hub selects but too few edges are online yet). ``accepting``: whose plain
    updates the intake takes (None: anyone's; empty: no one's, in a secure round).
    ``is_open`` turns False when the round starts to close: a late update is then
    ``round_closed``.
    """

    round: int
    base_version: int
    aggregate: StreamingAverage | None = None
    opened_at: float = field(default_factory=time.time)
    deadline: float = 0.0  # time.monotonic()
    deadline_at: float = 0.0  # the same deadline as Unix time (ms precision), for the task message
    is_open: bool = True
    selection: tuple[str, ...] | None = None
    accepting: frozenset[str] | None = None
    participants: set[str] = field(default_factory=set)
    updates_accepted: int = 0
    updates_rejected: int = 0
    num_examples: int = 0
    bytes_up: int = 0

    def set_deadline(self, at: float) -> None:
        """Set the deadline to Unix time ``at`` (kept to the millisecond)."""
        self.deadline_at = round(at, 3)
        self.deadline = time.monotonic() + (self.deadline_at - time.time())

    @property
    def awaiting_selection(self) -> bool:
        """The hub selects clients, and has not picked this round's yet (too few were online)."""
        return self.selection == ()

    def select(self, selection: tuple[str, ...] | None, plain_updates: bool = True) -> None:
        """Record the round's selection; a made one also limits the intake to it. Without plain updates (a
        secure round) the intake takes no one's, whether or not the selection is made yet."""
        self.selection = selection
        if not plain_updates:
            self.accept_only(())
        elif selection:
            self.accept_only(selection)

    def accept_only(self, clients: Iterable[str]) -> None:
        """Take plain updates for this round from these clients only."""
        self.accepting = frozenset(clients)

    def close(self) -> None:
        """Take no more updates: the round is being aggregated."""
        self.is_open = False
