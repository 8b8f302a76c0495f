"""Who is online, what each edge last said it was doing, and which edges declined the open round.

Every edge publishes a retained ``status/<client>``: ``state`` (online or offline), its
``training`` state in words ("training round 3", "waiting: 2 new windows (< 16) until
10:42:07", "paused: outbox full") and, when it sits a round out, ``declined`` with the
round, a reason code (:data:`DECLINE_REASONS`) and a detail. The hub keeps the latest of
each so that a round that waits can say for whom and why (:meth:`Presence.waiting`), and
so that a declined edge is neither waited for nor counted as lost: the round closes once
every other expected edge answered.

Anyone who can publish on ``status/<id>`` can claim to be an edge. Only edges that belong
(``belongs``: in the hub's keyring, or with a pinned key) count as online: they are selected,
waited for and reported. Others are newcomers, kept in a bounded list (:data:`MAX_NEWCOMERS`,
oldest dropped first) from which a round may try a few (:mod:`hub.selection`) without waiting
for them (in the first round of a hub that pins keys, every edge is new, and that round waits
for them); an edge moves over once its first update is accepted (:meth:`Presence.admit`).
A thousand fake statuses therefore cost list entries, never a round that waits for ghosts.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from models.protocol.messages import parse_json
from models.protocol.signed import SigningError

__all__ = ["DECLINE_REASONS", "MAX_NEWCOMERS", "Decline", "Presence"]

log = logging.getLogger(__name__)

DECLINE_REASONS = ("resources", "no_data", "outbox_full", "other")
"""What a declined round is counted under; an edge's unknown code counts as ``other``."""

MAX_DETAIL = 200
MAX_NEWCOMERS = 1000
"""Online edges that do not belong (yet) that the hub remembers; past this, the oldest are forgotten."""


@dataclass(frozen=True)
class Decline:
    """One edge sitting one round out."""

    client: str
    round: int
    reason: str
    detail: str


def _everyone(client: str) -> bool:
    return True


@dataclass
class Presence:
    """The edges' latest status messages, as the hub needs them; ``belongs`` tells members from newcomers."""

    belongs: Callable[[str], bool] = _everyone
    _online: set[str] = field(default_factory=set)
    doing: dict[str, str] = field(default_factory=dict)  # client -> its last published training state
    _declines: dict[tuple[str, int], Decline] = field(default_factory=dict)
    _newcomers: OrderedDict[str, None] = field(default_factory=OrderedDict)
    sites: set[str] = field(default_factory=set)  # members whose status says they are site hubs
    changes: int = 0  # grows whenever who is online or a newcomer may have changed (not on a mere progress status)

    @property
    def online(self) -> set[str]:
        """The edges that belong and whose latest status says online."""
        return {c for c in self._online if self.belongs(c)}

    @property
    def newcomers(self) -> list[str]:
        """Online edges that do not belong yet, oldest first (at most :data:`MAX_NEWCOMERS`)."""
        return [c for c in self._newcomers if not self.belongs(c)]

    def admit(self, client: str) -> bool:
        """A newcomer whose update was accepted now belongs: count it online; True when it was a newcomer."""
        if client not in self._newcomers:
            return False
        del self._newcomers[client]
        self._online.add(client)
        self.changes += 1
        return True

    def update(self, client: str, payload: bytes) -> tuple[bool, Decline | None]:
        """Take one ``status/<client>`` message: (whether it came online now, a new decline or None)."""
        before = (client in self._online, client in self._newcomers, len(self._newcomers))
        try:
            return self._update(client, payload)
        finally:
            if (client in self._online, client in self._newcomers, len(self._newcomers)) != before:
                self.changes += 1

    def _update(self, client: str, payload: bytes) -> tuple[bool, Decline | None]:
        if not payload:  # a cleared retained status
            self._online.discard(client)
            self._newcomers.pop(client, None)
            return False, None
        if not self.belongs(client):
            self._online.discard(client)
            self.doing.pop(client, None)
            self._newcome(client, payload)
            return False, None
        try:
            body = parse_json(payload, "status")
        except SigningError as exc:
            log.info("ignored status of %s: %s", client, exc)
            return False, None
        state = body.get("state")
        self._newcomers.pop(client, None)
        if state == "offline":
            self._online.discard(client)
            self.doing[client] = f"offline ({str(body.get('reason', ''))[:MAX_DETAIL]})"
            return False, None
        if state != "online":
            return False, None
        came = client not in self._online
        self._online.add(client)
        if body.get("role") == "site":
            self.sites.add(client)
        if isinstance(body.get("training"), str):
            self.doing[client] = body["training"][:MAX_DETAIL]
        return came, self._decline_of(client, body.get("declined"))

    def _newcome(self, client: str, payload: bytes) -> None:
        try:
            online = parse_json(payload, "status").get("state") == "online"
        except SigningError:
            online = False
        if not online:
            self._newcomers.pop(client, None)
            return
        self._add_newcomer(client)

    def _add_newcomer(self, client: str) -> None:
        self._newcomers[client] = None
        self._newcomers.move_to_end(client)
        while len(self._newcomers) > MAX_NEWCOMERS:
            self._newcomers.popitem(last=False)

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
        """Drop the declines of earlier rounds; edges that no longer belong (the first round of a hub without
        keyring took every edge) become newcomers again."""
        self._declines = {k: d for k, d in self._declines.items() if k[1] >= round_number}
        self.changes += 1
        for client in [c for c in self._online if not self.belongs(c)]:
            self._online.discard(client)
            self.doing.pop(client, None)
            self._add_newcomer(client)

    def waiting(self, round_number: int, expected: set[str] | None, answered: set[str]) -> dict[str, str]:
        """The edges the open round still waits for, each with the last thing it said (``expected`` None: online)."""
        declined = self.declined(round_number)
        wanted = self.online if expected is None else expected
        return {c: self.doing.get(c, "no status yet") for c in sorted(wanted)
                if c not in answered and c not in declined}
