"""Device and hub identities: Ed25519 keys on disk, and the hub's keyring of devices.

Each device makes its key on first start (``device.key``, PEM, owner-only); the hub
pins a device's public key the first time it sees it, or takes the allowed keys from
a keyring file (one ``client_id public_key_hex`` a line).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from models.errors import ConfigError
from models.files import write_atomic
from models.protocol.topics import check_name

__all__ = ["load_keyring", "load_or_create_key", "public_hex"]


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def load_or_create_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The Ed25519 key at ``path``, created (owner-only, atomically) when absent."""
    path = Path(path)
    if path.exists():
        try:
            key = load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path} is not a PEM Ed25519 private key ({exc}); restore it or remove it.") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 key.")
        return key
    key = Ed25519PrivateKey.generate()
    write_atomic(path, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    os.chmod(path, 0o600)
    return key


def load_keyring(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """``{client_id: raw public key}`` from a keyring file; errors name the line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read keyring {path}: {exc.strerror}.") from exc
    ring: dict[str, bytes] = {}
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 'client_id public_key_hex'")
            key = bytes.fromhex(parts[1])
            if len(key) != 32:
                raise ValueError("an Ed25519 public key is 64 hex digits")
            ring[check_name("client id", parts[0])] = key
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{path} line {number}: {exc}.") from exc
    return ring
