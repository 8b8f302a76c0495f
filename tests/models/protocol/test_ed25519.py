"""wearfl's Ed25519 keys (libsodium) against cryptography's: the same signatures, and refusals that name nothing."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519 as reference

from models.protocol.ed25519 import Ed25519PrivateKey, Ed25519PublicKey, InvalidSignature


def test_a_key_signs_as_cryptography_does_and_each_verifies_the_other():
    ours = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    theirs = reference.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    message = b"wearfl update" * 100
    assert ours.sign(message) == theirs.sign(message)
    assert ours.public_key().public_bytes_raw() == theirs.public_key().public_bytes_raw()
    Ed25519PublicKey.from_public_bytes(theirs.public_key().public_bytes_raw()).verify(theirs.sign(message), message)
    theirs.public_key().verify(ours.sign(message), message)


def test_a_generated_key_round_trips_through_its_seed():
    key = Ed25519PrivateKey.generate()
    again = Ed25519PrivateKey.from_private_bytes(key.private_bytes_raw())
    assert again.public_key() == key.public_key()
    assert again.sign(b"x") == key.sign(b"x")
    assert Ed25519PrivateKey.generate().public_key() != key.public_key()


@pytest.mark.parametrize("change", ["message", "signature", "short signature", "other key"])
def test_verify_raises_invalid_signature_for_anything_but_the_signers_message(change):
    key = Ed25519PrivateKey.generate()
    message, signature = b"round 3", key.sign(b"round 3")
    public = key.public_key()
    if change == "message":
        message = b"round 4"
    elif change == "signature":
        signature = bytes([signature[0] ^ 1]) + signature[1:]
    elif change == "short signature":
        signature = signature[:63]
    else:
        public = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(InvalidSignature):
        public.verify(signature, message)


@pytest.mark.parametrize("size", [0, 31, 33])
def test_keys_of_the_wrong_size_are_value_errors(size):
    with pytest.raises(ValueError, match="32 bytes"):
        Ed25519PublicKey.from_public_bytes(bytes(size))
    with pytest.raises(ValueError, match="32 bytes"):
        Ed25519PrivateKey.from_private_bytes(bytes(size))
