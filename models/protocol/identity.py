"""Device and hub identities: Ed25519 keys on disk, and the hub's keyring of devices.

Each device makes its key on first start (``device.key``, PEM, owner-only); the hub
pins a device's public key the first time it sees it, or takes the allowed keys from
a keyring file (one ``client_id public_key_hex`` a line).
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from models.errors import ConfigError
from models.files import write_atomic
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.topics import check_name

__all__ = ["load_keyring", "load_or_create_key", "private_pem", "public_hex", "read_private_pem"]

_PEM_HEAD, _PEM_TAIL = b"-----BEGIN PRIVATE KEY-----", b"-----END PRIVATE KEY-----"
_PKCS8_ED25519 = bytes.fromhex("302e020100300506032b657004220420")
"""The DER of an unencrypted PKCS#8 Ed25519 private key (RFC 8410) up to its 32 key bytes."""


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes_raw().hex()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM, byte for byte what OpenSSL (and cryptography) write."""
    return b"%s\n%s\n%s\n" % (_PEM_HEAD, base64.b64encode(_PKCS8_ED25519 + key.private_bytes_raw()), _PEM_TAIL)


def read_private_pem(data: bytes, where: str) -> Ed25519PrivateKey:
    """The Ed25519 key in PEM ``data``; ConfigError naming ``where`` when it is none."""
    try:
        return _read_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where} is not a PEM Ed25519 private key ({exc}); restore it or remove it.") from exc


def _read_key(data: bytes) -> Ed25519PrivateKey:
    """The Ed25519 key in PEM ``data``. The form :func:`load_or_create_key` writes is read directly;
    any other PEM goes through cryptography (imported only then: ~8 MB resident that a gateway, which
    only ever reads its own key, does not carry). ValueError/TypeError when it is no Ed25519 key."""
    lines = data.strip().splitlines()
    if len(lines) == 3 and lines[0] == _PEM_HEAD and lines[2] == _PEM_TAIL:
        try:
            der = base64.b64decode(lines[1], validate=True)
        except binascii.Error:
            der = b""
        if len(der) == 48 and der.startswith(_PKCS8_ED25519):
            return Ed25519PrivateKey.from_private_bytes(der[16:])
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(data, password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise TypeError(f"it holds a {type(key).__name__}, not an Ed25519 key")
    return Ed25519PrivateKey.from_private_bytes(key.private_bytes_raw())


def load_or_create_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The Ed25519 key at ``path``, created (owner-only, atomically) when absent."""
    path = Path(path)
    if path.exists():
        try:
            key = _read_key(path.read_bytes())
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path} is not a PEM Ed25519 private key ({exc}); restore it or remove it.") from exc
        return key
    key = Ed25519PrivateKey.generate()
    write_atomic(path, private_pem(key))
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
