"""Presence: the edges' status messages as the hub reads them, declines and the "waiting for" list."""

from __future__ import annotations

import json

from hub.presence import Presence


def status(state: str = "online", training: str = "idle", declined: dict | None = None) -> bytes:
    return json.dumps({"state": state, "training": training, "declined": declined}).encode()


def test_a_decline_counts_once_per_round_and_unknown_reasons_are_other():
    presence = Presence()

    first = presence.update("a", status(declined={"round": 3, "reason": "resources", "detail": "battery 12%"}))
    again = presence.update("a", status(declined={"round": 3, "reason": "resources", "detail": "battery 12%"}))
    odd = presence.update("b", status(declined={"round": 3, "reason": "x" * 500, "detail": "?"}))

    assert first[1] is not None and first[1].reason == "resources"
    assert again[1] is None
    assert odd[1] is not None and odd[1].reason == "other"
    assert set(presence.declined(3)) == {"a", "b"}


def test_the_round_waits_only_for_expected_edges_that_neither_answered_nor_declined():
    presence = Presence()
    presence.update("a", status(training="training round 2"))
    presence.update("b", status(training="waiting: 3 new windows (< 16) until 10:42:07"))
    presence.update("c", status(declined={"round": 2, "reason": "no_data", "detail": "no windows yet"}))
    presence.update("d", status(state="offline"))

    waiting = presence.waiting(2, expected={"a", "b", "c", "d"}, answered={"a"})

    assert waiting == {"b": "waiting: 3 new windows (< 16) until 10:42:07", "d": "offline ()"}


def test_coming_online_is_reported_once_and_garbage_is_ignored():
    presence = Presence()

    assert presence.update("a", status())[0] is True
    assert presence.update("a", status())[0] is False
    assert presence.update("a", b"\xff not json") == (False, None)
    assert presence.online == {"a"}
