"""Who is online, what each edge last said it was doing, and which edges declined the open round.

Every edge publishes a retained ``status/<client>``: ``state`` (online or offline), its
``training`` state in words ("training round 3", "waiting: 2 new windows (< 16) until
10:42:07", "paused: outbox full") and, when it sits a round out, ``declined`` with the
round, a reason code (:data:`DECLINE_REASONS`) and a detail. The hub keeps the latest of
each so that a round that waits can say for whom and why (:meth:`Presence.waiting`), and
so that a declined edge is neither waited for nor counted as lost: the round closes once
every other expected edge answered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from models.protocol.messages import parse_json
from models.protocol.signed import SigningError

__all__ = ["DECLINE_REASONS", "Decline", "Presence"]

log = logging.getLogger(__name__)

DECLINE_REASONS = ("resources", "no_data", "outbox_full", "other")
"""What a declined round is counted under; an edge's unknown code counts as ``other``."""

MAX_DETAIL = 200


@dataclass(frozen=True)
class Decline:
    """One edge sitting one round out."""

    client: str
    round: int
    reason: str
    detail: str


@dataclass
class Presence:
    """The edges' latest status messages, as the hub needs them."""

    online: set[str] = field(default_factory=set)
    doing: dict[str, str] = field(default_factory=dict)  # client -> its last published training state
    _declines: dict[tuple[str, int], Decline] = field(default_factory=dict)

    def update(self, client: str, payload: bytes) -> tuple[bool, Decline | None]:
        """Take one ``status/<client>`` message: (whether it came online now, a new decline or None)."""
        if not payload:  # a cleared retained status
            self.online.discard(client)
            return False, None
        try:
            body = parse_json(payload, "status")
        except SigningError as exc:
            log.info("ignored status of %s: %s", client, exc)
            return False, None
        state = body.get("state")
        if state == "offline":
            self.online.discard(client)
            self.doing[client] = f"offline ({str(body.get('reason', ''))[:MAX_DETAIL]})"
            return False, None
        if state != "online":
            return False, None
        came = client not in self.online
        self.online.add(client)
        if isinstance(body.get("training"), str):
            self.doing[client] = body["training"][:MAX_DETAIL]
        return came, self._decline_of(client, body.get("declined"))

    def _decline_of(self, client: str, declined: Any) -> Decline | None:
        if not isinstance(declined, dict):
            return None
        try:
            round_number = int(declined["round"])
        except (KeyError, TypeError, ValueError, OverflowError):
            return None
        if (client, round_number) in self._declines:
            return None  # the retained status again, or a later status of the same round
        reason = declined.get("reason")
        decline = Decline(client, round_number, reason if reason in DECLINE_REASONS else "other",
                          str(declined.get("detail", ""))[:MAX_DETAIL])
        self._declines[(client, round_number)] = decline
        return decline

    def declined(self, round_number: int) -> dict[str, Decline]:
        """The edges that declined ``round_number``, by client."""
        return {c: d for (c, r), d in self._declines.items() if r == round_number}

    def forget_before(self, round_number: int) -> None:
        self._declines = {k: d for k, d in self._declines.items() if k[1] >= round_number}

    def waiting(self, round_number: int, expected: set[str] | None, answered: set[str]) -> dict[str, str]:
        """The edges the open round still waits for, each with the last thing it said (``expected`` None: online)."""
        declined = self.declined(round_number)
        wanted = self.online if expected is None else expected
        return {c: self.doing.get(c, "no status yet") for c in sorted(wanted)
                if c not in answered and c not in declined}
