"""What an edge checks of a model's ledger entry before adopting it."""

import hashlib

from hub.ledger import Ledger
from models import Model, activity_spec
from models.package import package_bytes
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.ledger import check_entry
from models.protocol.messages import build_model, parse_model


def test_an_entry_vouches_for_its_own_model_only_and_links_to_the_last(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    models = [Model(activity_spec(), seed=s, version=v) for v, s in ((0, 1), (1, 2))]
    digests = [hashlib.sha256(package_bytes(m)).hexdigest() for m in models]
    e0 = ledger.append(0, 0, {"model.safetensors": digests[0]}, [], time=1.0)
    e1 = ledger.append(1, 1, {"model.safetensors": digests[1]}, ["a" * 64], time=2.0)
    key = Ed25519PrivateKey.generate()
    parsed = parse_model(build_model(models[1], 2, key, e1))
    assert parsed.ledger == e1
    head = {"version": 0, "hash": e0["hash"]}
    assert check_entry(parsed.ledger, 1, digests[1], head) is None
    assert check_entry(parsed.ledger, 1, digests[1], None) is None  # nothing adopted before: no link to check
    assert "another model package" in check_entry(e1, 1, digests[0], head)
    assert "is for v1" in check_entry(e1, 2, digests[1], head)
    assert "does not link" in check_entry(e1, 1, digests[1], {"version": 0, "hash": "b" * 64})
    assert "match its hash" in check_entry({**e1, "updates": []}, 1, digests[1], head)
    assert "missing" in check_entry(None, 1, digests[1], head)
