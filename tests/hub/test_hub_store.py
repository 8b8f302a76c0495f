"""HubStore: deduplication, atomic transactions, the status contract, rounds, reopening; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging

import pytest

from hub.store import HubStore, RoundRecord
from models.errors import ConfigError
from models.protocol.messages import REJECT_REASONS

KEY_A, KEY_B = b"a" * 32, b"b" * 32


def test_a_client_sequence_is_stored_once(hub_state):
    store = HubStore(hub_state)
    store.pin_key("edge-a", KEY_A)
    store.record_update("edge-a", 0, 1, 0, 10, b"payload")
    assert store.stored_update("edge-a", 0) is not None and store.stored_update("edge-a", 1) is None
    with pytest.raises(store.integrity_error):
        store.record_update("edge-a", 0, 1, 0, 10, b"payload")
    assert store.status()["clients"]["edge-a"]["accepted"] == 1


def test_a_failed_transaction_leaves_nothing_behind(hub_state):
    store = HubStore(hub_state)
    store.pin_key("edge-a", KEY_A)
    with pytest.raises(RuntimeError), store.transaction():
        store.record_update("edge-a", 0, 1, 0, 10, b"x")
        store.count_rejection("stale")
        store.count_duplicate()
        raise RuntimeError("crash in the middle of a batch")
    status = store.status()
    assert status["updates_accepted"] == 0 and status["clients"]["edge-a"]["accepted"] == 0
    assert status["updates_rejected"]["stale"] == 0 and status["duplicates_dropped"] == 0


def test_status_contract_and_accepted_equals_sum_over_clients(hub_state):
    store = HubStore(hub_state)
    with store.transaction():
        store.pin_key("edge-a", KEY_A, now=100.0)
        store.pin_key("edge-b", KEY_B, now=100.0)
        for seq in (0, 1, 5):
            store.record_update("edge-a", seq, 1, 0, 10, b"x", received_at=200.0 + seq)
        store.record_update("edge-b", 3, 1, 0, 10, b"y", received_at=300.0)
        store.count_rejection("stale", 2)
        store.count_duplicate()
    store.put("model_version", 4)

    status = store.status()

    assert set(status) == {"model_version", "rounds_completed", "updates_accepted", "updates_rejected",
                           "duplicates_dropped", "messages_shed", "declined", "clients", "personalization", "privacy",
                           "waiting", "global_metrics", "upstream", "sites", "leader", "replicas", "explanation"}
    assert status["model_version"] == 4 and status["rounds_completed"] == 0
    assert status["updates_accepted"] == 4 == sum(c["accepted"] for c in status["clients"].values())
    assert status["updates_rejected"] == {**dict.fromkeys(REJECT_REASONS, 0), "stale": 2}
    assert status["duplicates_dropped"] == 1
    assert status["clients"]["edge-a"] == {"accepted": 3, "last_sequence": 5, "last_seen": 205.0, "rejected": 0,
                                           "declined": 0}
    assert status["clients"]["edge-b"] == {"accepted": 1, "last_sequence": 3, "last_seen": 300.0, "rejected": 0,
                                           "declined": 0}
    json.dumps(status)  # plain JSON


def test_pinning_is_logged_once_per_client(hub_state, caplog):
    store = HubStore(hub_state)
    with caplog.at_level(logging.INFO, logger="hub.store"):
        assert store.pin_key("edge-a", KEY_A) is True
        assert store.pin_key("edge-a", KEY_A) is False
    assert [r.getMessage().startswith("pinned key for client edge-a") for r in caplog.records] == [True]
    assert store.pinned_keys() == {"edge-a": KEY_A}
    assert store.status()["clients"]["edge-a"]["last_sequence"] is None


def test_record_round_moves_state_on_and_drops_closed_payloads(hub_state):
    store = HubStore(hub_state)
    store.pin_key("edge-a", KEY_A)
    store.record_update("edge-a", 0, 1, 0, 10, b"round one")
    store.record_update("edge-a", 1, 2, 1, 10, b"round two")
    store.record_round(RoundRecord(1, 0, 1, 10.0, 20.0, 1, 10, metrics={"accuracy": 0.5}), next_round=2)
    assert store.get("round") == 2 and store.get("model_version") == 1
    assert [u.payload for u in store.iter_round_updates(1)] == [None]
    assert [u.payload for u in store.iter_round_updates(2)] == [b"round two"]
    assert store.rounds()[0].metrics == {"accuracy": 0.5} and store.rounds_completed() == 1


def test_state_survives_reopening(hub_state, tmp_path):
    with HubStore(hub_state) as store:
        store.pin_key("edge-a", KEY_A)
        store.record_update("edge-a", 7, 1, 0, 10, b"x")
        store.count_rejection("bad_signature")
    with HubStore(hub_state, create=False) as again:
        status = again.status()
        assert again.pinned_keys() == {"edge-a": KEY_A}
    assert status["updates_accepted"] == 1 and status["updates_rejected"]["bad_signature"] == 1
    assert hub_state.startswith("postgresql://") or (tmp_path / "hub.db").is_file()


def test_missing_state_is_a_clear_error(hub_state, tmp_path):
    with pytest.raises(ConfigError, match="no hub state"):
        HubStore(hub_state if hub_state.startswith("postgresql://") else tmp_path / "nowhere", create=False)


def test_unknown_rejection_reason_is_a_bug(hub_state):
    with pytest.raises(ValueError):
        HubStore(hub_state).count_rejection("because")


def test_a_state_belongs_to_one_federation(hub_state):
    with HubStore(hub_state) as store:
        store.claim("ward-7")
        store.claim("ward-7")
        with pytest.raises(ConfigError, match="belongs to federation 'ward-7', not 'ward-8'"):
            store.claim("ward-8")


def test_a_state_written_by_a_newer_layout_is_refused(hub_state):
    with HubStore(hub_state) as store:
        store.put("schema", 99)
    with pytest.raises(ConfigError, match="newer wearfl"):
        HubStore(hub_state, create=False)
