"""Intake: every way an update can be refused gets a typed, counted reason and a receipt."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from hub_helpers import SHAPES, delta_of, make_update
from safetensors.numpy import save

from hub.intake import Intake
from hub.round_state import OpenRound
from hub.store import HubStore
from models.protocol.codec import UpdateCodec
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.identity import public_hex
from models.protocol.signed import sign_tensors
from models.protocol.topics import Topics

TOPICS = Topics("fed")


@pytest.fixture
def store(hub_state):
    with HubStore(hub_state) as s:
        yield s


ROUND_1 = OpenRound(1, 0)  # the open round, as the hub hands it to the intake (read only)


def _intake(store, **kw) -> Intake:
    return Intake(store, TOPICS, UpdateCodec(SHAPES), **kw)


def _reject_reason(intake, topic, payload, current=ROUND_1):
    receipt, accepted = intake.process(topic, payload, current)
    assert accepted is None and receipt.status == "rejected"
    return receipt


def test_a_good_update_is_accepted_stored_and_decoded(store):
    intake, key = _intake(store), Ed25519PrivateKey.generate()
    delta = delta_of(SHAPES, seed=4)

    receipt, accepted = intake.process(TOPICS.update("edge-a"), make_update(key, "edge-a", sequence=3, delta=delta),
                                       ROUND_1)

    assert (receipt.client, receipt.sequence, receipt.status, receipt.reason) == ("edge-a", 3, "accepted", None)
    assert (receipt.round, receipt.model_version) == (1, 0)
    assert accepted is not None and accepted.num_examples == 10
    for k in SHAPES:
        np.testing.assert_array_equal(accepted.delta[k], delta[k])
    assert store.stored_update("edge-a", 3) is not None
    assert store.status()["clients"]["edge-a"]["accepted"] == 1


def test_garbage_bytes_are_malformed_with_sequence_minus_one(store):
    intake, key = _intake(store), Ed25519PrivateKey.generate()
    # from a client the hub does not know: counted, never answered (junk must not make the hub publish)
    receipt = _reject_reason(intake, TOPICS.update("junk-1"), b"\x00garbage" * 20)
    assert (receipt.reason, receipt.sequence, receipt.client) == ("malformed", -1, "")
    intake.process(TOPICS.update("edge-a"), make_update(key, "edge-a", sequence=0), ROUND_1)
    receipt = _reject_reason(intake, TOPICS.update("edge-a"), b"\x00garbage" * 20)
    assert (receipt.reason, receipt.sequence, receipt.client) == ("malformed", -1, "edge-a")
    assert store.status()["updates_rejected"]["malformed"] == 2


def test_a_topic_without_a_valid_client_is_malformed_and_has_no_receipt_address(store):
    receipt = _reject_reason(_intake(store), TOPICS.root + "/update/bad client!", b"x" * 200)
    assert (receipt.reason, receipt.sequence, receipt.client) == ("malformed", -1, "")


def test_an_oversized_update_is_refused_before_parsing(store):
    intake = _intake(store, max_update_bytes=2048)
    payload = make_update(Ed25519PrivateKey.generate(), "edge-a", shapes={"w": (1000,)})
    intake.codec = UpdateCodec({"w": (1000,)})
    assert _reject_reason(intake, TOPICS.update("edge-a"), payload).reason == "oversize"


def test_a_bad_signature_is_refused(store):
    payload = bytearray(make_update(Ed25519PrivateKey.generate(), "edge-a"))
    payload[len(payload) // 2] ^= 0xFF
    receipt = _reject_reason(_intake(store), TOPICS.update("edge-a"), bytes(payload))
    assert (receipt.reason, receipt.sequence) == ("bad_signature", -1)


def test_another_key_after_pinning_is_a_key_mismatch(store):
    intake = _intake(store)
    intake.process(TOPICS.update("edge-a"), make_update(Ed25519PrivateKey.generate(), "edge-a", sequence=0), ROUND_1)
    receipt = _reject_reason(intake, TOPICS.update("edge-a"),
                             make_update(Ed25519PrivateKey.generate(), "edge-a", sequence=1))
    assert receipt.reason == "key_mismatch"


def test_the_pin_survives_a_restart(store):
    key = Ed25519PrivateKey.generate()
    _intake(store).process(TOPICS.update("edge-a"), make_update(key, "edge-a", sequence=0), ROUND_1)
    fresh = _intake(store)
    assert _reject_reason(fresh, TOPICS.update("edge-a"),
                          make_update(Ed25519PrivateKey.generate(), "edge-a", sequence=1)).reason == "key_mismatch"
    receipt, _ = fresh.process(TOPICS.update("edge-a"), make_update(key, "edge-a", sequence=1, round_number=2),
                               OpenRound(2, 0))
    assert receipt.status == "accepted"


def test_with_a_keyring_unknown_clients_and_foreign_keys_are_refused(store):
    known = Ed25519PrivateKey.generate()
    intake = _intake(store, keyring={"edge-a": bytes.fromhex(public_hex(known))})

    assert _reject_reason(intake, TOPICS.update("edge-z"),
                          make_update(Ed25519PrivateKey.generate(), "edge-z")).reason == "unknown_client"
    assert _reject_reason(intake, TOPICS.update("edge-a"),
                          make_update(Ed25519PrivateKey.generate(), "edge-a")).reason == "key_mismatch"
    assert intake.process(TOPICS.update("edge-a"), make_update(known, "edge-a"), ROUND_1)[0].status == "accepted"


def test_an_update_naming_another_client_is_a_client_mismatch(store):
    intake = _intake(store)
    receipt = _reject_reason(intake, TOPICS.update("edge-a"),
                             make_update(Ed25519PrivateKey.generate(), "edge-a", sequence=9, meta_client="edge-b"))
    assert (receipt.reason, receipt.sequence) == ("client_mismatch", 9)
    assert store.pinned_keys() == {}  # a key is pinned only for a self-consistent message


def test_an_update_on_an_old_model_is_stale(store):
    receipt = _reject_reason(_intake(store), TOPICS.update("edge-a"),
                             make_update(Ed25519PrivateKey.generate(), "edge-a", base_version=7, sequence=2))
    assert (receipt.reason, receipt.sequence) == ("stale", 2)


def test_updates_for_another_or_a_closed_round_are_round_closed(store):
    intake, key, current = _intake(store), Ed25519PrivateKey.generate(), OpenRound(1, 0)
    assert _reject_reason(intake, TOPICS.update("edge-a"),
                          make_update(key, "edge-a", sequence=0, round_number=2), current).reason == "round_closed"
    current.close()
    assert _reject_reason(intake, TOPICS.update("edge-a"), make_update(key, "edge-a", sequence=1), current).reason \
        == "round_closed"


def test_a_delta_of_another_layout_is_wrong_shape(store):
    payload = make_update(Ed25519PrivateKey.generate(), "edge-a", shapes={"w": (5, 5)}, scheme="int8")
    assert _reject_reason(_intake(store), TOPICS.update("edge-a"), payload).reason == "wrong_shape"


def test_nan_values_are_non_finite(store):
    delta = delta_of(SHAPES)
    delta["fc.bias"][0] = np.nan
    payload = make_update(Ed25519PrivateKey.generate(), "edge-a", delta=delta)
    assert _reject_reason(_intake(store), TOPICS.update("edge-a"), payload).reason == "non_finite"


def test_a_delta_over_the_norm_bound_is_refused(store):
    intake = _intake(store, max_update_norm=0.5)
    big = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}  # norm sqrt(78)
    assert _reject_reason(intake, TOPICS.update("edge-a"),
                          make_update(Ed25519PrivateKey.generate(), "edge-a", delta=big)).reason == "norm_bound"
    small = make_update(Ed25519PrivateKey.generate(), "edge-b", delta=delta_of(SHAPES, scale=0.01))
    assert intake.process(TOPICS.update("edge-b"), small, ROUND_1)[0].status == "accepted"


def test_a_repeated_update_is_a_duplicate_not_a_second_acceptance(store):
    intake, payload = _intake(store), make_update(Ed25519PrivateKey.generate(), "edge-a", sequence=4)
    first, _ = intake.process(TOPICS.update("edge-a"), payload, ROUND_1)
    again, accepted = intake.process(TOPICS.update("edge-a"), payload, ROUND_1)
    assert first.status == "accepted" and (again.status, again.sequence, again.reason) == ("duplicate", 4, None)
    assert accepted is None
    status = store.status()
    assert status["updates_accepted"] == 1 and status["duplicates_dropped"] == 1
    assert sum(status["updates_rejected"].values()) == 0


def test_an_unsigned_update_is_refused_as_unsigned(store):
    payload = save({"delta": np.zeros(78, np.float32)}, metadata={"wearfl": json.dumps({"client": "edge-a"})})
    receipt = _reject_reason(_intake(store), TOPICS.update("edge-a"), payload)
    assert (receipt.reason, receipt.sequence) == ("unsigned", -1)


def test_a_copy_of_an_update_from_a_closed_round_is_replayed(store):
    intake, key = _intake(store), Ed25519PrivateKey.generate()
    old = make_update(key, "edge-a", sequence=4)
    assert intake.process(TOPICS.update("edge-a"), old, ROUND_1)[0].status == "accepted"
    receipt = _reject_reason(intake, TOPICS.update("edge-a"), old, OpenRound(2, 1))
    assert (receipt.reason, receipt.sequence) == ("replayed", 4) and "round 1" in receipt.detail
    status = store.status()
    assert status["updates_accepted"] == 1 and status["updates_rejected"]["replayed"] == 1


def test_a_used_or_lower_sequence_number_is_replayed_even_with_new_bytes(store):
    intake, key = _intake(store), Ed25519PrivateKey.generate()
    receipt, _ = intake.process(TOPICS.update("edge-a"), make_update(key, "edge-a", sequence=7), ROUND_1)
    assert receipt.status == "accepted"
    reused = _reject_reason(intake, TOPICS.update("edge-a"), make_update(key, "edge-a", sequence=7, seed=1))
    lower = _reject_reason(intake, TOPICS.update("edge-a"), make_update(key, "edge-a", sequence=6, seed=2))
    assert (reused.reason, lower.reason) == ("replayed", "replayed")
    receipt, _ = intake.process(TOPICS.update("edge-a"), make_update(key, "edge-a", sequence=8, round_number=2),
                                OpenRound(2, 0))
    assert receipt.status == "accepted"
    assert store.status()["updates_accepted"] == 2


def test_the_sequence_floor_survives_a_restart(hub_state):
    key = Ed25519PrivateKey.generate()
    with HubStore(hub_state) as store:
        _intake(store).process(TOPICS.update("edge-a"), make_update(key, "edge-a", sequence=9), ROUND_1)
    with HubStore(hub_state) as store:
        receipt = _reject_reason(_intake(store), TOPICS.update("edge-a"), make_update(key, "edge-a", sequence=3))
    assert receipt.reason == "replayed"


def test_forged_unsigned_replayed_and_tampered_updates_each_have_their_own_reason(store):
    intake, key = _intake(store), Ed25519PrivateKey.generate()
    good = make_update(key, "edge-a", sequence=1)
    assert intake.process(TOPICS.update("edge-a"), good, ROUND_1)[0].status == "accepted"
    round_2 = OpenRound(2, 0)
    forged = make_update(Ed25519PrivateKey.generate(), "edge-a", sequence=2, round_number=2)
    tampered = bytearray(make_update(key, "edge-a", sequence=3, round_number=2))
    tampered[100] ^= 0x01
    unsigned = save({"delta": np.zeros(78, np.float32)})
    reasons = [_reject_reason(intake, TOPICS.update("edge-a"), p, round_2).reason
               for p in (forged, unsigned, good, bytes(tampered))]
    assert reasons == ["key_mismatch", "unsigned", "replayed", "bad_signature"]


def test_a_client_not_selected_for_the_round_is_refused(store):
    intake, current = _intake(store), OpenRound(1, 0)
    current.select(("edge-a",))
    chosen = intake.process(TOPICS.update("edge-a"), make_update(Ed25519PrivateKey.generate(), "edge-a"), current)[0]
    other = _reject_reason(intake, TOPICS.update("edge-b"), make_update(Ed25519PrivateKey.generate(), "edge-b"),
                           current)
    assert chosen.status == "accepted" and (other.reason, other.sequence) == ("not_selected", 0)
    current.close()
    late = intake.process(TOPICS.update("edge-c"), make_update(Ed25519PrivateKey.generate(), "edge-c",
                                                                round_number=2), OpenRound(2, 0))[0]
    assert late.status == "accepted"  # a new round: no selection until the hub makes one
    secure = OpenRound(3, 0)
    secure.select(("edge-d",), plain_updates=False)  # a secure round: its clients send no plain updates
    refused = _reject_reason(intake, TOPICS.update("edge-d"), make_update(Ed25519PrivateKey.generate(), "edge-d",
                                                                          round_number=3), secure)
    assert refused.reason == "not_selected"
    for selection in ((), None):  # a secure hub still waiting for enough edges to select: no plain updates either
        waiting = OpenRound(4, 0)
        waiting.select(selection, plain_updates=False)
        anyone = _reject_reason(intake, TOPICS.update("edge-e"), make_update(Ed25519PrivateKey.generate(), "edge-e",
                                                                             round_number=4), waiting)
        assert anyone.reason == "not_selected"


def test_hostile_metadata_gives_a_receipt_not_a_traceback(store):
    key = Ed25519PrivateKey.generate()
    meta = {"format": "wearfl-update/1", "client": "edge-a", "round": float("inf"), "base_version": 0,
            "base_hash": "", "num_examples": 1, "sequence": 10**30, "codec": {"scheme": "none", "n": float("nan")}}
    payload = sign_tensors({"delta": np.zeros(78, np.float32)}, meta, key)
    assert _reject_reason(_intake(store), TOPICS.update("edge-a"), payload).reason == "malformed"
    meta.update(round=1, sequence=10**30)
    payload = sign_tensors({"delta": np.zeros(78, np.float32)}, meta, key)
    assert _reject_reason(_intake(store), TOPICS.update("edge-a"), payload).reason == "malformed"


def test_every_rejection_is_counted_by_reason(store):
    intake = _intake(store)
    intake.process(TOPICS.update("edge-a"), b"junk" * 40, ROUND_1)
    for _ in range(2):
        intake.process(TOPICS.update("edge-a"), make_update(Ed25519PrivateKey.generate(), "edge-a", base_version=3),
                       ROUND_1)
    rejected = store.status()["updates_rejected"]
    # a stale update pins nothing: the second key is not a key_mismatch, the id is not squatted
    assert rejected["malformed"] == 1 and rejected["stale"] == 2 and rejected["key_mismatch"] == 0
    assert "edge-a" not in store.status()["clients"]
    assert json.loads(intake.process(TOPICS.update("edge-a"), b"", ROUND_1)[0].to_bytes())["status"] == "rejected"


def test_a_batch_is_one_transaction_and_sees_its_own_writes(store):
    intake, key = _intake(store), Ed25519PrivateKey.generate()
    payload = make_update(key, "edge-a", sequence=1)
    results = intake.process_batch([(TOPICS.update("edge-a"), payload)] * 3 +
                                   [(TOPICS.update("edge-b"), make_update(key, "edge-b", sequence=1))], ROUND_1)
    assert [r.status for r, _ in results] == ["accepted", "duplicate", "duplicate", "accepted"]
    assert store.status()["updates_accepted"] == 2


def test_the_first_key_of_a_client_is_logged(store, caplog):
    intake, key = _intake(store), Ed25519PrivateKey.generate()
    # the store's own logger: a simulation run earlier in this process quiets it (wearfl.simulate)
    with caplog.at_level(logging.INFO, logger="hub.store"):
        intake.process(TOPICS.update("edge-a"), make_update(key, "edge-a", sequence=0), ROUND_1)
        intake.process(TOPICS.update("edge-a"), make_update(key, "edge-a", sequence=1), ROUND_1)
    assert sum("pinned key for client edge-a" in r.getMessage() for r in caplog.records) == 1


def test_a_stored_update_decodes_again_for_a_resumed_round(store):
    intake, key = _intake(store), Ed25519PrivateKey.generate()
    payload = make_update(key, "edge-a", sequence=0, delta=delta_of(SHAPES, seed=8))
    _, accepted = intake.process(TOPICS.update("edge-a"), payload, ROUND_1)
    again = _intake(store).decode_stored(payload, 0)
    assert again is not None and accepted is not None
    for k in SHAPES:
        np.testing.assert_array_equal(again.delta[k], accepted.delta[k])
    assert _intake(store).decode_stored(b"junk" * 50, 0) is None


def test_one_update_per_client_per_round_whatever_its_sequence(store):
    intake, key = _intake(store), Ed25519PrivateKey.generate()
    first = make_update(key, "edge-a", sequence=10, num_examples=5)
    assert intake.process(TOPICS.update("edge-a"), first, ROUND_1)[0].status == "accepted"
    for seq in (11, 12):
        receipt = _reject_reason(intake, TOPICS.update("edge-a"), make_update(key, "edge-a", sequence=seq, seed=seq))
        assert (receipt.reason, receipt.sequence) == ("duplicate_round", seq)
    assert intake.process(TOPICS.update("edge-a"), first, ROUND_1)[0].status == "duplicate"  # the same bytes again
    assert store.round_totals(1) == (1, 5)


def test_num_examples_is_bounded_before_it_weights_anything(store):
    intake, key = _intake(store, max_examples=1000), Ed25519PrivateKey.generate()
    receipt = _reject_reason(intake, TOPICS.update("edge-a"),
                             make_update(key, "edge-a", sequence=10, num_examples=4611686018427387000))
    assert receipt.reason == "too_many_examples" and "edge-a" not in store.status()["clients"]
    assert intake.process(TOPICS.update("edge-a"), make_update(key, "edge-a", sequence=11, num_examples=1000),
                          ROUND_1)[0].status == "accepted"


def test_max_pinned_bounds_the_clients_a_hub_without_keyring_trusts(store):
    intake = _intake(store, max_pinned=2)
    for i, client in enumerate(("edge-a", "edge-b")):
        assert intake.process(TOPICS.update(client), make_update(Ed25519PrivateKey.generate(), client, sequence=i),
                              ROUND_1)[0].status == "accepted"
    third = _reject_reason(intake, TOPICS.update("edge-c"), make_update(Ed25519PrivateKey.generate(), "edge-c"))
    assert third.reason == "too_many_clients" and sorted(store.pinned_keys()) == ["edge-a", "edge-b"]


def test_a_receipt_names_its_federation_and_the_digest_of_the_update(store):
    import hashlib

    intake, key = _intake(store), Ed25519PrivateKey.generate()
    payload = make_update(key, "edge-a", sequence=1)
    receipt, _ = intake.process(TOPICS.update("edge-a"), payload, ROUND_1)
    assert (receipt.federation, receipt.digest) == ("fed", hashlib.sha256(payload).hexdigest())


def test_replicas_intake_sees_what_the_others_stored_and_stops_at_the_closing_mark(postgres_url):
    """Two replicas' intakes on one PostgreSQL store: a copy one stored is a duplicate at the other, a round
    marked closing takes nothing more, and a round the store has left raises StaleRound."""
    from hub.intake import StaleRound

    key = Ed25519PrivateKey.generate()
    with HubStore(postgres_url) as a_store, HubStore(postgres_url) as b_store:
        a_store.put("round", 1)
        a, b = _intake(a_store, shared=True), _intake(b_store, shared=True)
        update = make_update(key, "edge-a", sequence=4)
        assert a.process(TOPICS.update("edge-a"), update, ROUND_1)[0].status == "accepted"
        assert b.process(TOPICS.update("edge-a"), update, ROUND_1)[0].status == "duplicate"
        assert _reject_reason(b, TOPICS.update("edge-a"), make_update(key, "edge-a", sequence=3)).reason == "replayed"

        a_store.mark_closing(1)
        late = make_update(Ed25519PrivateKey.generate(), "edge-b", sequence=0)
        assert _reject_reason(b, TOPICS.update("edge-b"), late).reason == "round_closed"

        a_store.put("round", 2)
        with pytest.raises(StaleRound):
            b.process(TOPICS.update("edge-b"), late, ROUND_1)
        assert b_store.status()["updates_accepted"] == 1
