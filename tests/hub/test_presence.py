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


def test_only_members_count_online_and_newcomers_are_bounded():
    from hub.presence import MAX_NEWCOMERS

    members = {"a"}
    presence = Presence(lambda c: c in members)
    assert presence.update("a", status()) == (True, None)
    for i in range(MAX_NEWCOMERS + 500):  # a flood of fake "online" statuses
        assert presence.update(f"ghost-{i}", status(declined={"round": 1, "reason": "no_data"})) == (False, None)

    assert presence.online == {"a"} and presence.declined(1) == {}
    assert len(presence.newcomers) == MAX_NEWCOMERS and presence.newcomers[0] == "ghost-500"
    assert "ghost-600" not in presence.doing and presence.waiting(1, None, set()) == {"a": "idle"}

    members.add("ghost-900")  # its first update was accepted
    assert presence.admit("ghost-900") and not presence.admit("ghost-900")
    assert presence.online == {"a", "ghost-900"} and "ghost-900" not in presence.newcomers
    presence.update("ghost-901", b"")  # a cleared retained status
    assert "ghost-901" not in presence.newcomers


def test_selection_takes_members_and_tries_a_few_newcomers_on_top():
    from hub.selection import SelectionPolicy, select_clients

    policy = SelectionPolicy(min_clients=2, fraction=0.5)
    ghosts = [f"ghost-{i}" for i in range(50)]
    chosen = select_clients(7, ["a", "b", "c", "d"], policy, ghosts)
    assert chosen is not None and len(chosen) == 4
    assert len([c for c in chosen if c.startswith("ghost")]) == policy.newcomer_slots
    assert chosen == select_clients(7, ["d", "c", "b", "a"], policy, reversed(ghosts))  # seeded by the round
    assert select_clients(7, ["a"], policy, ghosts) == ()  # newcomers never make up the minimum
    assert select_clients(7, ["a", "b"], SelectionPolicy(fraction=1.0), ghosts) is None  # no selection at all
