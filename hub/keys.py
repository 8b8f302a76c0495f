"""Provisioning: a federation's test CA, the hub's and each device's credentials, and a locked-down broker config.

Why here: the hub's operator enrols devices, and the broker must know exactly the
identities the hub accepts. Everything lives under ``STATE/keys/``::

    ca.key, ca.crt            the federation's CA (EC P-256): signs the broker's and every client's certificate
    hub/                      hub.key (Ed25519, signs models), hub.pub, mqtt.json, client.crt, client.key,
                              ca.crt, keyring (the device and site keys the hub accepts); on a site
                              (``keys init --consortium``) also consortium.pub, the consortium hub's key
    devices/<ID>/             device.key (Ed25519, signs updates), mqtt.json, client.crt, client.key,
                              ca.crt, hub.pub (the key the device pins: the consortium's on a site)
    sites/<ID>/               (a consortium's) one site hub's upstream credentials: device.key (the site's
                              Ed25519 key, signs its partials), mqtt.json, client.crt, client.key, ca.crt,
                              hub.pub (the consortium's key), grant.json (the consortium's grant of that key)

A site of a federation of sites is a client of the consortium's broker like a device
(:func:`add_site`), and provisions its own broker and gateways with ``init_keys(state,
consortium=FOLDER)``: its hub then signs with the granted key, and its gateways pin the
consortium's key, since the models reach them as the consortium signed them.

:func:`broker_config` writes a Mosquitto config that accepts only those identities: TLS
only, with a client certificate from the CA; a PBKDF2-SHA512 password file in
Mosquitto's own ``$7$`` format; and an ACL under which a device publishes only on its
own ``update/``, ``status/`` and ``metrics/`` topics and reads ``model``, ``task`` and its
own ``receipt/``; a site is one more such client. The CA is a test CA in the sense that wearfl makes it: an
organisation with its own PKI can put its certificates in the same places.

Mosquitto started as root reads its config, then drops to the account of its ``user``
option (``mosquitto`` by default) before it reads the password file and writes its
persistence: :func:`broker_config` hands those files to that account when it runs as root,
and :func:`broker_next_steps` says what is left to do otherwise.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from models.errors import ConfigError, SigningError
from models.files import write_atomic
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.identity import load_keyring, load_or_create_key, private_pem, public_hex
from models.protocol.messages import Grant
from models.protocol.topics import check_name
from models.transport.credentials import read_mqtt_json
from models.transport.mosquitto import MAX_PACKET_BYTES, limit_lines

__all__ = [
    "HUB_USERNAME",
    "add_device",
    "add_site",
    "broker_config",
    "broker_next_steps",
    "init_keys",
    "mosquitto_account",
    "password_hash",
]

HUB_USERNAME = "wearfl-hub"
CERT_DAYS = 825
PBKDF2_ITERATIONS = 101  # Mosquitto's own; the passwords are 256-bit random tokens, so the count adds nothing
MOSQUITTO_USER = "mosquitto"  # the account Mosquitto started as root drops to when its config names none
MOSQUITTO_FALLBACK_USER = "nobody"  # ... where no `mosquitto` account exists
BROKER_PRIVATE = ("passwords", "server.key")  # mode 600: readable by the broker's account only


def init_keys(state: Path, consortium: Path | None = None) -> Path:
    """Make the CA and the hub's credentials under ``state/keys``; returns the hub's folder.

    An existing hub signing key (``keys/hub.key``, from a hub run without credentials)
    is kept, so edges that pinned it keep trusting the hub's models. ``consortium``: this
    hub is a site, and that is its folder from :func:`add_site` on the consortium's keys;
    the hub then signs with the key the consortium granted, and ``hub/consortium.pub`` holds
    the consortium's key for :func:`add_device` to give the site's gateways.
    """
    keys = Path(state) / "keys"
    if (keys / "ca.key").exists():
        raise ConfigError(f"{keys} already holds a CA; its devices' certificates depend on it. Remove {keys / 'ca.key'}"
                          " and every folder under keys/ to start over.")
    granted = _read_site_folder(Path(consortium)) if consortium is not None else None
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"wearfl federation CA ({Path(state).resolve().name})")])
    now = dt.datetime.now(dt.UTC)
    ca_cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=10 * 365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    hub = keys / "hub"
    legacy = keys / "hub.key"
    if granted is not None:
        signing, consortium_hex = granted
        _write_public(hub / "consortium.pub", (consortium_hex + "\n").encode())
    else:
        signing = load_or_create_key(legacy if legacy.exists() else hub / "hub.key")
    _write_private(hub / "hub.key", private_pem(signing))
    _write_public(hub / "hub.pub", (public_hex(signing) + "\n").encode())
    _client_files(hub, HUB_USERNAME, ca_key, ca_cert)
    write_atomic(hub / "keyring", b"# client_id public_key_hex, one device or site a line (wearfl keys add-device, "
                                  b"add-site)\n")
    _write_private(keys / "ca.key", ca_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    _write_public(keys / "ca.crt", ca_cert.public_bytes(Encoding.PEM))
    return hub


def add_device(state: Path, device_id: str) -> Path:
    """Enrol ``device_id``: its credentials folder, and its key in the hub's keyring. Returns the folder.

    The device pins ``hub/consortium.pub`` when there is one (this hub is a site: the models
    reach its gateways as the consortium signed them), else this hub's ``hub.pub``.
    """
    check_name("device id", device_id)
    keys = Path(state) / "keys"
    ca_key, ca_cert = _load_ca(keys)
    _check_new_client(keys, "devices", device_id)
    folder = keys / "devices" / device_id
    device_key = load_or_create_key(folder / "device.key")
    _client_files(folder, device_id, ca_key, ca_cert)
    consortium = keys / "hub" / "consortium.pub"
    _write_public(folder / "hub.pub", (consortium if consortium.is_file() else keys / "hub" / "hub.pub").read_bytes())
    _add_to_keyring(keys, device_id, public_hex(device_key))
    return folder


def add_site(state: Path, site_id: str, federation: str) -> Path:
    """Enrol site ``site_id`` of ``federation`` on the consortium's keys; returns its folder ``keys/sites/<ID>``.

    On the consortium's broker a site hub is a client like a device (username ``site_id``),
    so it gets a device's files: its own Ed25519 key as ``device.key`` (it signs the site's
    partial updates; added to the hub's keyring), broker credentials, and ``hub.pub`` (the
    consortium's key). ``grant.json`` is the consortium hub's signed word that this key may
    sign the site's tasks and receipts, which the site's gateways check.
    """
    check_name("site id", site_id)
    check_name("federation", federation)
    keys = Path(state) / "keys"
    ca_key, ca_cert = _load_ca(keys)
    _check_new_client(keys, "sites", site_id)
    consortium = _hub_signing_key(keys)
    folder = keys / "sites" / site_id
    site_key = load_or_create_key(folder / "device.key")
    _client_files(folder, site_id, ca_key, ca_cert)
    _write_public(folder / "hub.pub", (public_hex(consortium) + "\n").encode())
    grant = Grant(federation, site_id, public_hex(site_key)).signed(consortium)
    _write_public(folder / "grant.json", grant.to_bytes() + b"\n")
    _add_to_keyring(keys, site_id, public_hex(site_key))
    return folder


def _check_new_client(keys: Path, kind: str, client_id: str) -> None:
    """ConfigError unless ``client_id`` is free for a new device or site (``kind``: "devices" or "sites").

    Devices and sites share the broker's usernames and the hub's keyring, so an id may
    name only one of them, and never the hub itself.
    """
    noun = kind[:-1]
    if client_id == HUB_USERNAME:
        raise ConfigError(f"{HUB_USERNAME!r} is the hub's broker username; choose another {noun} id.")
    ring = keys / "hub" / "keyring"
    for other in ("devices", "sites"):
        folder = keys / other / client_id
        if not folder.exists():
            continue
        if other == kind:
            raise ConfigError(f"{noun} {client_id} is already enrolled ({folder}); to re-key it, remove that folder "
                              f"and its line in {ring}, then add it again.")
        raise ConfigError(f"{client_id} is already the id of a {other[:-1]} ({folder}); devices and sites share the "
                          f"broker's usernames, so choose another {noun} id.")
    if ring.is_file() and client_id in load_keyring(ring):
        raise ConfigError(f"{client_id} already has a key in {ring}; remove its line there, or choose another "
                          f"{noun} id.")


def _add_to_keyring(keys: Path, client_id: str, key_hex: str) -> None:
    """Append ``client_id key_hex`` to the hub's keyring: the hub accepts that client's signed updates."""
    ring = keys / "hub" / "keyring"
    lines = ring.read_text() if ring.exists() else ""
    write_atomic(ring, (lines + f"{client_id} {key_hex}\n").encode())


def _hub_signing_key(keys: Path) -> Ed25519PrivateKey:
    """The hub's Ed25519 key ``keys/hub/hub.key`` (never created here: a grant needs the key edges pin)."""
    path = keys / "hub" / "hub.key"
    if not path.is_file():
        raise ConfigError(f"{path} is missing; it is the consortium hub's signing key, made by `wearfl keys init "
                          f"--state {keys.parent}`. Restore it.")
    return load_or_create_key(path)


def _read_site_folder(folder: Path) -> tuple[Ed25519PrivateKey, str]:
    """(the site's granted key, the consortium's public key hex) from an :func:`add_site` folder.

    Checked before anything is written: the files are there, ``hub.pub`` is a key, and
    ``grant.json`` grants this ``device.key`` and is signed by that ``hub.pub``.
    """
    redo = "copy the whole folder from the consortium's `wearfl keys add-site ID --state DIR --federation NAME`"
    missing = [name for name in ("device.key", "hub.pub", "grant.json") if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"{folder} lacks {', '.join(missing)}; --consortium takes the site's folder: {redo}.")
    site_key = load_or_create_key(folder / "device.key")
    consortium_hex = (folder / "hub.pub").read_text().strip()
    try:
        consortium = bytes.fromhex(consortium_hex)
        grant = Grant.from_bytes((folder / "grant.json").read_bytes())
    except (ValueError, SigningError) as exc:
        raise ConfigError(f"{folder}'s hub.pub or grant.json cannot be read ({exc}); {redo}.") from None
    if len(consortium) != 32 or grant.key != public_hex(site_key) or not grant.verify(consortium):
        raise ConfigError(f"{folder / 'grant.json'} does not grant {folder / 'device.key'} under the consortium's "
                          f"key {folder / 'hub.pub'}; the files come from different add-site runs: {redo}.")
    return site_key, consortium.hex()


def broker_config(
    state: Path,
    out: Path,
    *,
    port: int = 8883,
    bind: str = "0.0.0.0",
    hostnames: Sequence[str] = ("localhost", "127.0.0.1"),
    federation: str = "+",
    user: str | None = None,
    persistence_dir: Path | None = None,
    max_packet_size: int = MAX_PACKET_BYTES,
) -> Path:
    """Write ``out/mosquitto.conf`` with its password file, ACL and TLS files beside it; returns the config path.

    ``hostnames``: the names and addresses clients use to reach the broker (they go in
    its certificate). ``federation``: the one federation this broker serves ("+": any).
    ``user``: the account Mosquitto runs as, written as the config's ``user`` option;
    default :func:`mosquitto_account`, the one Mosquitto started as root drops to anyway.
    Run as root, the files that account must read (``passwords``, ``server.key``) and the
    persistence directory it writes are handed to it, so ``mosquitto -c out/mosquitto.conf``
    works as root out of the box; otherwise :func:`broker_next_steps` says what to do.
    """
    keys = Path(state) / "keys"
    ca_key, ca_cert = _load_ca(keys)
    if federation != "+":
        check_name("federation", federation)
    if not 0 < port < 65536:
        raise ConfigError(f"broker port {port} is out of range; use 1-65535.")
    if not hostnames:
        raise ConfigError("give at least one --hostname the clients use to reach the broker.")
    account = mosquitto_account(user)
    owner = _owner(account) if _running_as_root() else None  # checked before anything is written
    out = Path(out)
    server_key = ec.generate_private_key(ec.SECP256R1())
    _write_private(out / "server.key", server_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    _write_public(out / "server.crt", _leaf(hostnames[0], server_key, ca_key, ca_cert, server_names=hostnames))
    _write_public(out / "ca.crt", ca_cert.public_bytes(Encoding.PEM))
    accounts = [read_mqtt_json(keys / "hub" / "mqtt.json")] + [read_mqtt_json(f / "mqtt.json")
                                                                for f in _client_folders(keys)]
    _write_private(out / "passwords", "".join(f"{u}:{password_hash(p)}\n" for u, p in accounts).encode())
    _write_public(out / "acl", _acl(federation, [u for u, _ in accounts[1:]]).encode())
    persistence = Path(persistence_dir) if persistence_dir is not None else out / "data"
    persistence.mkdir(parents=True, exist_ok=True)
    lines = [
        "# generated by `wearfl keys broker-config`: TLS with client certificates, passwords, ACL",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {(out / 'passwords').resolve()}",
        f"acl_file {(out / 'acl').resolve()}",
        f"listener {port} {bind}",
        "protocol mqtt",
        f"cafile {(out / 'ca.crt').resolve()}",
        f"certfile {(out / 'server.crt').resolve()}",
        f"keyfile {(out / 'server.key').resolve()}",
        "require_certificate true",
        "tls_version tlsv1.2",
        *limit_lines(max_packet_size=max_packet_size),
        "persistence true",
        f"persistence_location {persistence.resolve()}/",
        "autosave_interval 30",
        "persistent_client_expiration 14d",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
    ]
    lines.append(f"user {account}")
    config = out / "mosquitto.conf"
    _write_public(config, ("\n".join(lines) + "\n").encode())
    if owner is not None:
        _hand_over([out / name for name in BROKER_PRIVATE], persistence, owner)
    return config


def _client_folders(keys: Path) -> list[Path]:
    """The folders of the broker's clients besides the hub: ``devices/*``, then ``sites/*`` (a site hub is a
    client of the consortium's broker like a device)."""
    return [folder for kind in ("devices", "sites") if (keys / kind).is_dir()
            for folder in sorted((keys / kind).iterdir()) if folder.is_dir()]


def mosquitto_account(user: str | None = None) -> str:
    """The account Mosquitto started as root runs as: ``user``, else Mosquitto's own default.

    Mosquitto's default is ``mosquitto``, or ``nobody`` on a machine without that account
    (its ``user`` option in mosquitto.conf(5)).
    """
    if user:
        return user
    return MOSQUITTO_USER if _passwd(MOSQUITTO_USER) is not None else MOSQUITTO_FALLBACK_USER


def broker_next_steps(config: Path, user: str | None = None, persistence_dir: Path | None = None) -> list[str]:
    """What to do to start the broker of ``config`` (from :func:`broker_config` with ``user``), a line each.

    Names the account Mosquitto will run as, what that account cannot read or reach yet
    (files it does not own when ``broker_config`` could not hand them over, a folder on
    the way it may not enter) and the command that starts the broker.
    """
    out = Path(config).parent
    persistence = Path(persistence_dir) if persistence_dir is not None else out / "data"
    account = mosquitto_account(user)
    private = [out / name for name in BROKER_PRIVATE]
    shown = " ".join(os.path.relpath(p) for p in (*private, persistence))
    steps = []
    if _running_as_root():
        steps.append(f"mosquitto started as root runs as {account!r} (the config's `user` line): "
                     f"{', '.join(BROKER_PRIVATE)} and {os.path.relpath(persistence)}/ now belong to {account!r}")
    elif account != _me():
        steps.append(f"mosquitto started as root (e.g. by systemd) runs as {account!r} (the config's `user` line), "
                     f"which cannot read {' and '.join(BROKER_PRIVATE)} yet: first `sudo chown -R {account} {shown}` "
                     f"(or start it as {_me()!r} yourself)")
    entry = _passwd(account)
    blocked = _first_closed_folder(out.resolve(), entry) if entry is not None else None
    if blocked is not None:
        steps.append(f"{account!r} may not enter {blocked} (mode {stat.S_IMODE(blocked.stat().st_mode):o}), so it "
                     f"cannot read the files in {os.path.relpath(out)}: `chmod o+x {blocked}`, or write the config "
                     "to a folder it can reach with --out")
    steps.append(f"start it: mosquitto -c {os.path.relpath(config)}")
    return steps


def password_hash(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """``password`` as a Mosquitto 2 password-file hash: ``$7$iterations$salt$pbkdf2_sha512``, base64."""
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _acl(federation: str, devices: Sequence[str]) -> str:
    """The ACL: a device's own topics by pattern, the shared model, task and grant per enrolled device, the hub's all.

    The model and task are granted device by device: Mosquitto warns at every start about
    a pattern without ``%u`` or ``%c``, and a ``topic`` line before any ``user`` line is
    for anonymous clients only.
    """
    root = f"wearfl/v1/{federation}"
    shared = [line for device in devices
              for line in (f"user {device}", *(f"topic read {root}/{kind}" for kind in ("model", "task", "grant")))]
    return "\n".join([
        "# generated by `wearfl keys broker-config`. %u is the connecting username: a device's (or site's) id.",
        "# A device publishes only its own updates, status (and will) and metrics,",
        "# and reads the model, the task, a site's grant and its own receipts.",
        f"pattern write {root}/update/%u",
        f"pattern write {root}/status/%u",
        f"pattern write {root}/metrics/%u",
        f"pattern read {root}/receipt/%u",
        "# Secure aggregation: its own messages to the hub, and the hub's to it.",
        f"pattern write {root}/secagg/%u",
        f"pattern read {root}/secagg-to/%u",
        "",
        "# Every enrolled device and site reads the model and the task (run broker-config again after add-device"
        " or add-site).",
        *shared,
        "",
        "# The hub reads every update, status and metrics message and writes models, tasks and receipts.",
        f"user {HUB_USERNAME}",
        f"topic readwrite {root}/#",
        "",
    ])


def _running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _passwd(account: str) -> Any:
    """The ``pwd`` entry of ``account``, or None (no such account, or no ``pwd`` on this system)."""
    try:
        import pwd
    except ImportError:  # Windows: Mosquitto has no `user` option there
        return None
    try:
        return pwd.getpwnam(account)
    except KeyError:
        return None


def _me() -> str:
    """The name of the account running this process."""
    import getpass

    return getpass.getuser()


def _owner(account: str) -> tuple[int, int]:
    """(uid, gid) of ``account``; ConfigError when this machine has no such account."""
    entry = _passwd(account)
    if entry is None:
        raise ConfigError(f"there is no account {account!r} on this machine for Mosquitto to run as; create it, or "
                          "give --user an account that exists.")
    return entry.pw_uid, entry.pw_gid


def _hand_over(files: Sequence[Path], folder: Path, owner: tuple[int, int]) -> None:
    """Make ``files`` (mode 600) and ``folder`` with what it holds belong to ``owner``: Mosquitto reads and
    writes them after it dropped root."""
    for path in (*files, folder, *folder.iterdir()):
        os.chown(path, *owner)


def _first_closed_folder(path: Path, entry: Any) -> Path | None:
    """The first folder from ``/`` down to ``path`` that the account of ``entry`` may not enter, or None."""
    if entry.pw_uid == 0:
        return None
    import grp

    groups = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem}
    for folder in (*reversed(path.parents), path):
        info = folder.stat()
        if info.st_uid == entry.pw_uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in groups:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return folder
    return None


def _client_files(folder: Path, username: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> None:
    """mqtt.json, client.crt, client.key and ca.crt of one client."""
    tls_key = ec.generate_private_key(ec.SECP256R1())
    _write_private(folder / "client.key", tls_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    _write_public(folder / "client.crt", _leaf(username, tls_key, ca_key, ca_cert))
    _write_public(folder / "ca.crt", ca_cert.public_bytes(Encoding.PEM))
    account = {"username": username, "password": secrets.token_urlsafe(32)}
    _write_private(folder / "mqtt.json", (json.dumps(account, indent=2) + "\n").encode())


def _leaf(common_name: str, key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey,
          ca_cert: x509.Certificate, server_names: Sequence[str] = ()) -> bytes:
    """A certificate for ``key`` signed by the CA: a server's (with ``server_names``) or a client's."""
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server_names
                                              else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if server_names:
        builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(n) for n in server_names]),
                                        critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(Encoding.PEM)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _load_ca(keys: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if not (keys / "ca.key").is_file() or not (keys / "ca.crt").is_file():
        raise ConfigError(f"{keys} holds no CA yet; run `wearfl keys init --state {keys.parent}` first.")
    try:
        key = load_pem_private_key((keys / "ca.key").read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((keys / "ca.crt").read_bytes())
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the CA in {keys} cannot be read ({exc}); restore ca.key and ca.crt.") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{keys / 'ca.key'} is not an EC key as `wearfl keys init` makes it.")
    return key, cert


def _write_private(path: Path, data: bytes) -> None:
    write_atomic(path, data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    write_atomic(path, data)
    os.chmod(path, 0o644)
