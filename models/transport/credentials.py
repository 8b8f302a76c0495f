"""A credentials folder, as ``wearfl keys`` writes it: who a device or the hub is, and how it reaches the broker.

Both sides read the same layout, so a folder made by ``wearfl keys add-device`` (or
``keys init`` for the hub) is all a process needs:

============== ================================================================
``mqtt.json``  ``{"username": ..., "password": ...}`` for the broker's password file
``client.crt`` the client certificate (signed by the federation's CA) for mutual TLS
``client.key`` its private key
``ca.crt``     the CA that signed the broker's certificate
``device.key`` (device) the Ed25519 key that signs its updates
``hub.key``    (hub) the Ed25519 key that signs global models
``hub.pub``    the hub's public key, 64 hex digits: a device pins it from the start
``keyring``    (hub) ``client_id public_key_hex`` a line: the only devices accepted
============== ================================================================
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass, replace
from pathlib import Path

from models.errors import ConfigError
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.identity import load_or_create_key
from models.transport.mqtt import BrokerAddress

__all__ = ["Credentials", "read_mqtt_json"]


@dataclass(frozen=True)
class Credentials:
    """The files of one credentials folder; :meth:`load` checks they are there and readable."""

    folder: Path
    username: str
    password: str
    signing_key_path: Path
    hub_public_key: str | None
    keyring_path: Path | None

    @classmethod
    def load(cls, folder: str | os.PathLike[str], role: str) -> Credentials:
        """Read a ``role`` ("device" or "hub") folder; ConfigError naming the missing or bad file."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"credentials folder {folder} does not exist; make it with `wearfl keys "
                              f"{'add-device ID' if role == 'device' else 'init'} --state DIR`.")
        signing = folder / ("device.key" if role == "device" else "hub.key")
        for path in (signing, folder / "mqtt.json", folder / "ca.crt", folder / "client.crt", folder / "client.key"):
            if not path.is_file():
                raise ConfigError(f"{path} is missing from the credentials folder; make the folder again with "
                                  "`wearfl keys`.")
        username, password = read_mqtt_json(folder / "mqtt.json")
        hub_pub = folder / "hub.pub"
        keyring = folder / "keyring"
        return cls(
            folder=folder,
            username=username,
            password=password,
            signing_key_path=signing,
            hub_public_key=hub_pub.read_text().strip() if hub_pub.is_file() else None,
            keyring_path=keyring if role == "hub" and keyring.is_file() else None,
        )

    def signing_key(self) -> Ed25519PrivateKey:
        """The Ed25519 key of this folder (never created here: a missing key is checked in :meth:`load`)."""
        return load_or_create_key(self.signing_key_path)

    def ssl_context(self) -> ssl.SSLContext:
        """TLS 1.2+ that checks the broker against ``ca.crt`` and presents ``client.crt``."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.folder / "ca.crt"))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.folder / "client.crt", self.folder / "client.key")
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load {self.folder / 'client.crt'} with its key ({exc}); make the folder "
                              "again with `wearfl keys`.") from None
        return context

    def apply(self, address: BrokerAddress) -> BrokerAddress:
        """``address`` with this folder's username and password, and its TLS context for ``mqtts://``.

        The address also names the folder's ``ca.crt``, so a broker certificate that fails
        verification is reported with the CA it was checked against.
        """
        tls = address.tls
        return replace(address, username=self.username, password=self.password,
                       ssl_context=self.ssl_context() if tls else None,
                       ca_file=str(self.folder / "ca.crt") if tls else None)


def read_mqtt_json(path: Path) -> tuple[str, str]:
    """The username and password of an ``mqtt.json``; ConfigError naming the file."""
    try:
        data = json.loads(path.read_text())
        username, password = data["username"], data["password"]
        if not (isinstance(username, str) and isinstance(password, str) and username and password):
            raise TypeError("username and password must be non-empty strings")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not an MQTT credentials file ({exc}); it holds "
                          '{"username": ..., "password": ...}.') from None
    return username, password
