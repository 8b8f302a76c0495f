"""The edge's durable outbox: what it keeps across reopening, its sequence counter, its bound."""

from __future__ import annotations

import pytest

from models.errors import WearflError
from models.transport.outbox import Outbox, OutboxFull


def test_pending_updates_survive_reopening_in_sequence_order(tmp_path):
    with Outbox(tmp_path) as outbox:
        first = outbox.add(3, b"update-a")
        second = outbox.add(4, b"update-b")

    with Outbox(tmp_path) as reopened:
        pending = reopened.pending()

    assert [(e.sequence, e.round, e.payload) for e in pending] == [(first, 3, b"update-a"), (second, 4, b"update-b")]
    assert first < second


def test_remove_drops_only_that_sequence_and_reports_unknown_ones(tmp_path):
    with Outbox(tmp_path) as outbox:
        a, b = outbox.add(1, b"a"), outbox.add(1, b"b")

        assert outbox.remove(a) is True
        assert outbox.remove(a) is False  # a second receipt for the same update
        assert [e.sequence for e in outbox.pending()] == [b]
        assert (len(outbox), outbox.nbytes) == (1, 1)


def test_sequence_keeps_growing_across_removal_and_reopening(tmp_path):
    with Outbox(tmp_path) as outbox:
        used = [outbox.add(r, b"x") for r in range(3)]
        for sequence in used:
            outbox.remove(sequence)

    with Outbox(tmp_path) as reopened:
        next_sequence = reopened.add(9, b"y")
        last = reopened.last_sequence

    assert used == sorted(used) and len(set(used)) == 3
    assert next_sequence == max(used) + 1 == last


def test_builder_signs_the_sequence_that_is_stored(tmp_path):
    with Outbox(tmp_path) as outbox:
        sequence = outbox.add(2, lambda seq: f"signed update #{seq}".encode())

        assert outbox.get_entry(sequence).payload == f"signed update #{sequence}".encode()


def test_a_failing_builder_leaves_nothing_behind(tmp_path):
    def broken(sequence: int) -> bytes:
        raise RuntimeError("signing failed")

    with Outbox(tmp_path) as outbox:
        with pytest.raises(RuntimeError):
            outbox.add(1, broken, state={"last_round": b"1"})

        assert outbox.pending() == []
        assert outbox.last_sequence == 0
        assert outbox.get("last_round") is None


def test_state_is_written_with_the_update(tmp_path):
    with Outbox(tmp_path) as outbox:
        outbox.add(5, b"u", state={"last_round": b"5", "residual": b"\x00\x01"})

    with Outbox(tmp_path) as reopened:
        assert reopened.get("last_round") == b"5"
        assert reopened.get("residual") == b"\x00\x01"
        reopened.put("residual", None)
        assert reopened.get("residual") is None


def test_full_outbox_refuses_by_count_without_dropping_or_advancing(tmp_path):
    with Outbox(tmp_path, max_entries=2) as outbox:
        outbox.add(1, b"a")
        outbox.add(2, b"b")

        with pytest.raises(OutboxFull) as refused:
            outbox.add(3, b"c", state={"last_round": b"3"})

        assert isinstance(refused.value, WearflError)
        assert refused.value.entries == 2 and refused.value.max_entries == 2
        assert "full" in str(refused.value)
        assert [e.payload for e in outbox.pending()] == [b"a", b"b"]
        assert outbox.last_sequence == 2
        assert outbox.get("last_round") is None
        assert outbox.full


def test_full_outbox_refuses_by_bytes_and_accepts_again_after_a_receipt(tmp_path):
    with Outbox(tmp_path, max_bytes=10) as outbox:
        first = outbox.add(1, b"123456")

        with pytest.raises(OutboxFull):
            outbox.add(2, b"7890123")
        outbox.remove(first)
        second = outbox.add(2, b"7890123")

        assert second == first + 1
        assert [e.payload for e in outbox.pending()] == [b"7890123"]
