"""The shared outbox of simulated edges: each client's counter, entries and state, one database."""

from __future__ import annotations

import pytest

from models.errors import OutboxFull
from models.transport.shared_outbox import SharedOutbox


@pytest.fixture
def shared(tmp_path):
    box = SharedOutbox(tmp_path / "outbox.sqlite3", max_entries=2)
    yield box
    box.close()


def test_each_client_has_its_own_sequence_and_state(shared):
    a, b = shared.view("a"), shared.view("b")
    assert a.add(1, b"a1", state={"last_round": b"1"}) == 1
    assert a.add(2, lambda seq: b"a%d" % seq) == 2  # built from the sequence allocated in the transaction
    assert b.add(1, b"b1", state={"last_round": b"1"}) == 1
    assert [e.payload for e in a.pending()] == [b"a1", b"a2"] and [e.payload for e in b.pending()] == [b"b1"]
    assert a.get("last_round") == b"1" and shared.states("last_round") == {"a": b"1", "b": b"1"}
    assert a.stats().entries == 2 and a.stats().last_sequence == 2 and b.stats().bytes == 2
    assert shared.pending_clients() == ["a", "b"]


def test_a_receipt_removes_only_that_clients_entry_and_the_counter_never_goes_back(shared):
    a, b = shared.view("a"), shared.view("b")
    a.add(1, b"x")
    b.add(1, b"y")
    assert a.remove(1) and not a.remove(1)
    assert a.get_entry(1) is None and b.get_entry(1).payload == b"y"
    assert a.add(2, b"z") == 2  # a sequence number is never reused
    a.mark_published(2)
    assert a.get_entry(2).publishes == 1


def test_a_full_outbox_refuses_and_keeps_everything_as_it_was(shared):
    a = shared.view("a")
    a.add(1, b"1", state={"last_round": b"1"})
    a.add(2, b"2", state={"last_round": b"2"})
    with pytest.raises(OutboxFull, match=r"outbox of a .* is full"):
        a.add(3, b"3", state={"last_round": b"3"})
    assert a.stats().entries == 2 and a.stats().last_sequence == 2 and a.get("last_round") == b"2"
    assert shared.view("b").add(1, b"b") == 1  # another client's room is its own


def test_entries_survive_reopening(tmp_path):
    box = SharedOutbox(tmp_path / "o.sqlite3")
    box.view("a").add(4, b"kept", state={"last_round": b"4"})
    box.close()
    again = SharedOutbox(tmp_path / "o.sqlite3")
    try:
        assert [e.payload for e in again.view("a").pending()] == [b"kept"]
        assert again.states("last_round") == {"a": b"4"}
    finally:
        again.close()
