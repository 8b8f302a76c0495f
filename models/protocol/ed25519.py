"""Ed25519 keys, on libsodium (PyNaCl): what signs and checks every model, update, task and receipt.

A gateway signs and verifies and does nothing else with public-key cryptography, so it loads
libsodium (about 1.3 MiB resident) rather than cryptography's Rust extension (about 7 MiB of a
60 MB budget). The classes offer the part of cryptography's Ed25519 interface that wearfl uses
(``generate``, ``from_private_bytes``, ``sign``, ``public_key``, ``verify`` raising
:class:`InvalidSignature`), and Ed25519 signatures are deterministic, so a key of either library
signs every message byte for byte alike. cryptography stays for what only the hub and secure
rounds need: TLS certificates, X25519, AEAD.
"""

from __future__ import annotations

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

__all__ = ["Ed25519PrivateKey", "Ed25519PublicKey", "InvalidSignature"]


class InvalidSignature(Exception):
    """The signature does not match the message under this key."""


class Ed25519PublicKey:
    """An Ed25519 public key (32 bytes)."""

    __slots__ = ("_key",)

    def __init__(self, key: VerifyKey) -> None:
        self._key = key

    @classmethod
    def from_public_bytes(cls, data: bytes) -> Ed25519PublicKey:
        """The key whose raw encoding is ``data``; ValueError unless it is 32 bytes."""
        if len(data) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, not {len(data)}")
        return cls(VerifyKey(bytes(data)))

    def public_bytes_raw(self) -> bytes:
        return bytes(self._key)

    def verify(self, signature: bytes, data: bytes) -> None:
        """Return if ``signature`` is this key's over ``data``; raise :class:`InvalidSignature` otherwise."""
        if len(signature) != 64:
            raise InvalidSignature
        try:
            self._key.verify(bytes(data), bytes(signature))
        except (BadSignatureError, ValueError) as exc:
            raise InvalidSignature from exc

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ed25519PublicKey) and self.public_bytes_raw() == other.public_bytes_raw()

    def __hash__(self) -> int:
        return hash(self.public_bytes_raw())


class Ed25519PrivateKey:
    """An Ed25519 signing key, made from (and saved as) its 32-byte seed."""

    __slots__ = ("_key",)

    def __init__(self, key: SigningKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> Ed25519PrivateKey:
        """A new key from the operating system's random source."""
        return cls(SigningKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> Ed25519PrivateKey:
        """The key whose 32-byte seed is ``data`` (RFC 8032's private key, as PKCS#8 stores it)."""
        if len(data) != 32:
            raise ValueError(f"an Ed25519 private key is 32 bytes, not {len(data)}")
        return cls(SigningKey(bytes(data)))

    def private_bytes_raw(self) -> bytes:
        return bytes(self._key)

    def public_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey(self._key.verify_key)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte signature over ``data``."""
        return self._key.sign(bytes(data)).signature
