"""Task messages: the selected clients travel with the round."""

import json

import pytest

from models.protocol.messages import Task
from models.protocol.signed import SigningError


def test_a_task_names_its_selected_clients_or_none():
    task = Task(3, 2, {"lr": 0.01}, 12.5, ("a", "b"))
    back = Task.from_bytes(task.to_bytes())
    assert back == task and back.selects("a") and not back.selects("c")
    assert Task.from_bytes(Task(1, 0).to_bytes()).selects("anyone")
    with pytest.raises(SigningError, match="clients"):
        Task.from_bytes(b'{"round": 1, "model_version": 0, "clients": [1, 2]}')


def test_a_name_with_a_trailing_newline_is_refused():
    from models.errors import ConfigError
    from models.protocol.topics import Topics, check_name

    with pytest.raises(ConfigError):
        check_name("client id", "edge-a\n")
    assert Topics("fed").client_from(Topics("fed").update("edge-a") + "\n", "update") is None


def test_a_signed_receipt_verifies_only_unchanged_and_only_with_the_hubs_key():
    from dataclasses import replace

    from models.protocol.ed25519 import Ed25519PrivateKey
    from models.protocol.messages import Receipt
    from models.protocol.signed import SigningError, public_key_bytes

    hub, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    receipt = Receipt("edge-a", 7, "rejected", "stale", "old base", 3, 2).signed(hub)
    again = Receipt.from_bytes(receipt.to_bytes())
    assert again == receipt and again.verify(public_key_bytes(hub))
    assert not again.verify(public_key_bytes(other))
    assert not Receipt("edge-a", 7, "accepted").verify(public_key_bytes(hub))  # unsigned
    for change in ({"status": "accepted"}, {"sequence": 8}, {"client": "edge-b"}, {"reason": None}, {"round": 4}):
        assert not replace(again, **change).verify(public_key_bytes(hub)), change
    with pytest.raises(SigningError):
        Receipt.from_bytes(b'{"client": "edge-a", "sequence": 1, "status": "accepted", "signature": 5}')


def test_a_task_of_wearfl_0_1_is_read_under_todays_key_names() -> None:
    old = json.dumps({"round": 3, "model_version": 2, "config": {"clip_norm": 1.5, "update_clip_norm": 0.5}}).encode()

    task = Task.from_bytes(old)

    assert task.config == {"grad_clip": 1.5, "update_clip": 0.5}


def test_a_task_carries_the_old_key_names_too_for_edges_of_the_last_release() -> None:
    task = Task(1, 0, {"grad_clip": 2.0, "update_clip": 0.25, "lr": 0.01})

    sent = json.loads(task.to_bytes())["config"]

    assert sent["clip_norm"] == 2.0 and sent["update_clip_norm"] == 0.25
    assert Task.from_bytes(task.to_bytes()) == task


def test_a_signed_task_verifies_only_unchanged_and_only_with_the_hubs_key():
    from dataclasses import replace

    from models.protocol.ed25519 import Ed25519PrivateKey
    from models.protocol.signed import public_key_bytes

    hub = Ed25519PrivateKey.generate()
    task = Task(4, 3, {"lr": 0.01, "grad_clip": 1.0}, 99.5, ("a",), "ward-7").signed(hub)
    parsed = Task.from_bytes(task.to_bytes())  # the legacy key names written beside it do not break it
    assert parsed == task and parsed.verify(public_key_bytes(hub))
    assert not parsed.verify(public_key_bytes(Ed25519PrivateKey.generate()))
    for altered in (replace(task, round=5), replace(task, federation="ward-8"), replace(task, config={"lr": -1.0}),
                    replace(task, clients=None), replace(task, signature=None)):
        assert not altered.verify(public_key_bytes(hub))


@pytest.mark.parametrize("body", [
    {"round": 2 ** 70, "model_version": 0},
    {"round": -1, "model_version": 0},
    {"round": 1, "model_version": 0, "deadline": 1e400},
    {"round": 1, "model_version": 0, "config": {"nested": {"a": 1}}},
    {"round": 1, "model_version": 0, "config": {f"k{i}": i for i in range(65)}},
    {"round": 1, "model_version": 0, "signature": "abc"},
    {"round": 1, "model_version": 0, "federation": 7},
])
def test_a_task_out_of_bounds_is_malformed(body):
    with pytest.raises(SigningError) as err:
        Task.from_bytes(json.dumps(body).encode())
    assert err.value.reason == "malformed"


def test_a_task_with_nan_in_its_config_is_malformed():
    with pytest.raises(SigningError):
        Task.from_bytes(b'{"round": 1, "model_version": 0, "config": {"lr": NaN}}')


def test_a_grant_round_trips_verifies_only_unchanged_and_never_as_another_message():
    from dataclasses import replace

    from models.protocol.ed25519 import Ed25519PrivateKey
    from models.protocol.messages import Grant
    from models.protocol.signed import public_key_bytes

    hub, site = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    grant = Grant("ward-7", "site-a", public_key_bytes(site).hex()).signed(hub)
    again = Grant.from_bytes(grant.to_bytes())
    assert again == grant and again.verify(public_key_bytes(hub)) and again.public_key == public_key_bytes(site)
    assert not replace(grant, site="site-b").verify(public_key_bytes(hub))
    assert not replace(grant, key=public_key_bytes(hub).hex()).verify(public_key_bytes(hub))
    assert not grant.verify(public_key_bytes(site))
    task = Task(1, 1, federation="ward-7", signature=grant.signature)  # the same signature under another domain
    assert not task.verify(public_key_bytes(hub))
    for junk in (b'{"federation": "f", "site": "s"}', b'{"federation": "f", "site": "s", "key": "abcd"}',
                 b'{"federation": 1, "site": "s", "key": "' + b"00" * 32 + b'"}'):
        with pytest.raises(SigningError):
            Grant.from_bytes(junk)


def test_a_task_carries_its_hubs_task_only_when_it_has_one():
    from models.protocol.ed25519 import Ed25519PrivateKey
    from models.protocol.signed import public_key_bytes

    key = Ed25519PrivateKey.generate()
    plain = Task(2, 1, {"lr": 0.001}, federation="f").signed(key)
    assert b"upstream" not in plain.to_bytes()  # tasks as before sites: older edges verify them alike
    assert b"upstream" not in plain._signed_bytes()
    site = Task(2, 1, {"lr": 0.001}, federation="f", upstream=plain.to_bytes().decode()).signed(key)
    again = Task.from_bytes(site.to_bytes())
    assert again == site and again.verify(public_key_bytes(key))
    assert Task.from_bytes(again.upstream.encode()) == plain
    with pytest.raises(SigningError, match="upstream"):
        Task.from_bytes(json.dumps({"round": 1, "model_version": 1, "upstream": 5}).encode())
