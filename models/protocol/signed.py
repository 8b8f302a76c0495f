"""Signed safetensors: one message format for models and updates, checkable before parsing.

A signed message is an ordinary safetensors file (so any safetensors reader can load
it) whose last tensor, ``~signature`` (uint8, 96 bytes), holds the signer's Ed25519
public key (32 bytes) and a signature (64 bytes) over every byte before the
signature itself: header, metadata, all tensors and the key. Safetensors stores
uint8 tensors last and sorts them by name, and ``~`` sorts after every other name
wearfl uses, so the key and signature are the file's last 96 bytes. A receiver can
therefore bound the size, find the key and verify the signature by slicing bytes,
and only then parse anything.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from models.errors import SigningError
from models.protocol.ed25519 import Ed25519PrivateKey, Ed25519PublicKey, InvalidSignature

__all__ = ["SIGNATURE_TENSOR", "TRAILER_BYTES", "SignedMessage", "SigningError", "sign_tensors", "verify_and_parse"]

SIGNATURE_TENSOR = "~signature"
KEY_BYTES, SIG_BYTES = 32, 64
TRAILER_BYTES = KEY_BYTES + SIG_BYTES
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 256
"""Tensors a message may hold (a model has a few dozen): bounds the objects a header makes."""

# Small-order Ed25519 points (and non-canonical encodings of them), sign bit cleared, as in
# libsodium: with such a key, a signature can be forged for any message without a secret.
_SMALL_ORDER = frozenset(bytes.fromhex(h) for h in (
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
))


def is_weak_key(key: bytes) -> bool:
    """True for a public key of small order, under which anyone can forge signatures."""
    return len(key) == 32 and (key[:31] + bytes([key[31] & 0x7F])) in _SMALL_ORDER


@dataclass(frozen=True)
class SignedMessage:
    """A verified message: the signer's raw public key, its metadata and its tensors."""

    public_key: bytes
    metadata: dict[str, Any]
    tensors: dict[str, np.ndarray]


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def sign_tensors(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, Any], key: Ed25519PrivateKey, meta_key: str = "wearfl"
) -> bytes:
    """Serialize ``tensors`` with ``metadata`` (JSON under ``meta_key``) and sign them with ``key``."""
    if SIGNATURE_TENSOR in tensors:
        raise ValueError(f"{SIGNATURE_TENSOR!r} is reserved")
    placeholder = np.zeros(TRAILER_BYTES, np.uint8)
    data = bytearray(st_save({**tensors, SIGNATURE_TENSOR: placeholder},
                             metadata={meta_key: json.dumps(metadata, sort_keys=True, separators=(",", ":"))}))
    _check_trailer_is_last(bytes(data))
    data[-TRAILER_BYTES:-SIG_BYTES] = public_key_bytes(key)
    data[-SIG_BYTES:] = key.sign(bytes(data[:-SIG_BYTES]))
    return bytes(data)


def _check_trailer_is_last(data: bytes) -> None:
    (n,) = struct.unpack("<Q", data[:8])
    entry = json.loads(data[8 : 8 + n])[SIGNATURE_TENSOR]
    if entry["data_offsets"][1] != len(data) - 8 - n or entry["data_offsets"][0] != len(data) - 8 - n - TRAILER_BYTES:
        raise RuntimeError("the signature tensor is not the last 96 bytes; safetensors changed its layout")


def read_public_key(data: bytes, max_bytes: int) -> bytes:
    """The signer's claimed key, from the trailer alone (nothing is parsed)."""
    if len(data) > max_bytes:
        raise SigningError("oversize", f"{len(data)} bytes exceeds the {max_bytes}-byte bound")
    if len(data) < 8 + TRAILER_BYTES + 2:
        raise SigningError("malformed", f"{len(data)} bytes is too short to be a signed message")
    return bytes(data[-TRAILER_BYTES:-SIG_BYTES])


def verify_and_parse(
    data: bytes, max_bytes: int, expected_key: bytes | None = None, meta_key: str = "wearfl"
) -> SignedMessage:
    """Bound the size, verify the signature (against ``expected_key`` when given), then parse.

    Raises :class:`SigningError` with reason ``oversize``, ``malformed``,
    ``key_mismatch`` or ``bad_signature``.
    """
    key = read_public_key(data, max_bytes)
    if is_weak_key(key):
        raise SigningError("bad_signature", "the message is signed with a small-order key, which anyone can forge")
    if expected_key is not None and key != expected_key:
        raise SigningError("key_mismatch", "the message is signed by another key than the one pinned for its sender")
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(bytes(data[-SIG_BYTES:]), bytes(data[:-SIG_BYTES]))
    except InvalidSignature:
        raise SigningError("bad_signature", "the signature does not match the message") from None
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(MAX_HEADER_BYTES, len(data) - 8):
        raise SigningError("malformed", "the header length is out of bounds")
    if data.count(b'"dtype"', 8, 8 + n) > MAX_TENSORS:
        raise SigningError("malformed", f"the message lists more than {MAX_TENSORS} tensors")
    try:
        header = json.loads(data[8 : 8 + n])
        metadata = json.loads(header["__metadata__"][meta_key])
        tensors = st_load(bytes(data))
    except (ValueError, KeyError, TypeError, RecursionError, SafetensorError) as exc:
        raise SigningError("malformed", f"not a readable signed safetensors message ({exc})") from None
    if not isinstance(metadata, dict):
        raise SigningError("malformed", "the metadata is not a JSON object")
    tensors.pop(SIGNATURE_TENSOR, None)
    return SignedMessage(key, metadata, tensors)
