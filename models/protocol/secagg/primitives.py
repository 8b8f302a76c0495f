"""Key agreement, key derivation, the mask generator and share encryption.

Every symmetric key is HKDF-SHA256 over a full 32-byte secret (an X25519 shared
secret or a self-mask seed) with an ``info`` naming its purpose, the round (the
config digest) and the clients' roster indices, so no key serves two purposes,
two rounds or two pairs. Masks are ChaCha20 keystreams (the encryption of zeros)
under such a key, read as little-endian uint64 and reduced mod 2^b: since 2^b
divides 2^64 the residues are uniform. Shares travel under ChaCha20-Poly1305 with
a key per direction of a pair and the pair's ids as associated data.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from models.protocol.secagg.errors import SecAggError
from models.protocol.secagg.fixedpoint import ring_mask

__all__ = [
    "KEY_BYTES", "NONCE_BYTES", "TAG_BYTES", "agree", "commit", "derive", "new_x25519", "open_sealed", "prg",
    "private_raw", "public_raw", "seal",
]

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
DOMAIN = b"wearfl-secagg/v1/"


def new_x25519(randbytes: Callable[[int], bytes]) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(randbytes(KEY_BYTES))


def public_raw(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def private_raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The X25519 shared secret; SecAggError ``bad_key`` for a key of small order (all-zero secret)."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise SecAggError("bad_key", "a peer's public key yields a degenerate shared secret.") from None


def derive(secret: bytes, purpose: str, digest: bytes, *indices: int) -> bytes:
    """A 32-byte key for ``purpose`` in the round ``digest`` between clients ``indices``, from the whole ``secret``."""
    info = DOMAIN + purpose.encode() + b"\x00" + digest + struct.pack(f">{len(indices)}I", *indices)
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=info).derive(secret)


def prg(key: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` uniform residues mod 2^``bits`` (uint64): the ChaCha20 keystream under ``key``."""
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    stream = np.frombuffer(encryptor.update(bytes(8 * length)), "<u8")
    return stream.astype(np.uint64) & ring_mask(bits)


def commit(seed: bytes, digest: bytes, index: int) -> bytes:
    """A binding commitment to a self-mask seed, so the hub can tell a correct reconstruction."""
    return hashlib.sha256(DOMAIN + b"commit\x00" + digest + struct.pack(">I", index) + seed).digest()


def seal(key: bytes, plaintext: bytes, aad: bytes, nonce: bytes) -> bytes:
    """``nonce || ChaCha20-Poly1305(plaintext)``, authenticated with ``aad``."""
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The plaintext of :func:`seal`; SecAggError ``bad_ciphertext`` if it was altered or misaddressed."""
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        raise SecAggError("bad_ciphertext", "an encrypted share does not decrypt: altered or misaddressed.") from None
