"""`wearfl keys add-site` and `keys init --consortium`: provisioning a federation of sites, no broker needed.

On the consortium's keys a site is a client like a device, with the consortium's grant of its
key; on the site's own keys the hub signs with that granted key and its gateways pin the
consortium's key.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from hub.keys import add_device, add_site, broker_config, init_keys
from models.errors import ConfigError
from models.protocol.identity import load_keyring, load_or_create_key, public_hex
from models.protocol.messages import Grant
from models.transport.credentials import Credentials
from wearfl.cli import main

FED = "consortium"
SITE = "site-a"


@pytest.fixture
def consortium(tmp_path: Path) -> Path:
    """The consortium hub's state, with its CA and hub credentials."""
    state = tmp_path / "consortium"
    init_keys(state)
    return state


def hub_pub(state: Path) -> str:
    return (state / "keys" / "hub" / "hub.pub").read_text().strip()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_add_site_makes_the_folder_with_a_device_s_files_and_the_grant(consortium: Path) -> None:
    folder = add_site(consortium, SITE, FED)
    assert folder == consortium / "keys" / "sites" / SITE
    for name in ("device.key", "mqtt.json", "client.key"):
        assert mode(folder / name) == 0o600, name
    for name in ("client.crt", "ca.crt", "hub.pub", "grant.json"):
        assert mode(folder / name) == 0o644, name
    assert (folder / "hub.pub").read_text().strip() == hub_pub(consortium)
    assert (folder / "ca.crt").read_bytes() == (consortium / "keys" / "ca.crt").read_bytes()


def test_the_grant_names_the_site_its_key_and_the_federation_signed_by_the_consortium(consortium: Path) -> None:
    folder = add_site(consortium, SITE, FED)
    grant = Grant.from_bytes((folder / "grant.json").read_bytes())
    site_key = public_hex(load_or_create_key(folder / "device.key"))
    assert (grant.federation, grant.site, grant.key) == (FED, SITE, site_key)
    assert grant.verify(bytes.fromhex(hub_pub(consortium)))
    other = load_or_create_key(consortium / "other.key")
    assert not grant.verify(other.public_key().public_bytes_raw())


def test_the_site_s_key_joins_the_consortium_hub_s_keyring(consortium: Path) -> None:
    add_device(consortium, "gateway-01")
    folder = add_site(consortium, SITE, FED)
    ring = load_keyring(consortium / "keys" / "hub" / "keyring")
    assert set(ring) == {"gateway-01", SITE}
    assert ring[SITE].hex() == public_hex(load_or_create_key(folder / "device.key"))


def test_the_site_folder_loads_as_device_credentials(consortium: Path) -> None:
    folder = add_site(consortium, SITE, FED)
    creds = Credentials.load(folder, "device")
    assert creds.username == SITE
    assert creds.hub_public_key == hub_pub(consortium)
    assert public_hex(creds.signing_key()) == Grant.from_bytes((folder / "grant.json").read_bytes()).key
    creds.ssl_context()


@pytest.mark.parametrize(("first", "match"), [
    ("site", "already enrolled"),
    ("device", "already the id of a device"),
])
def test_an_id_already_used_is_refused(consortium: Path, first: str, match: str) -> None:
    if first == "site":
        add_site(consortium, SITE, FED)
    else:
        add_device(consortium, SITE)
    ring = (consortium / "keys" / "hub" / "keyring").read_text()
    with pytest.raises(ConfigError, match=match):
        add_site(consortium, SITE, FED)
    assert (consortium / "keys" / "hub" / "keyring").read_text() == ring


def test_a_device_may_not_take_a_site_s_id(consortium: Path) -> None:
    add_site(consortium, SITE, FED)
    with pytest.raises(ConfigError, match="already the id of a site"):
        add_device(consortium, SITE)


@pytest.mark.parametrize(("site", "federation", "match"), [
    ("wearfl-hub", FED, "hub's broker username"),
    ("bad/site", FED, "site id"),
    (SITE, "bad fed", "federation"),
])
def test_bad_names_are_refused(consortium: Path, site: str, federation: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        add_site(consortium, site, federation)
    assert not (consortium / "keys" / "sites").exists()


def test_add_site_without_a_ca_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="keys init"):
        add_site(tmp_path, SITE, FED)


def test_broker_config_admits_sites_like_devices(consortium: Path, tmp_path: Path) -> None:
    add_device(consortium, "gateway-01")
    add_site(consortium, SITE, FED)
    out = tmp_path / "broker"
    broker_config(consortium, out, federation=FED, user="nobody")
    users = [line.split(":", 1)[0] for line in (out / "passwords").read_text().splitlines()]
    assert users == ["wearfl-hub", "gateway-01", SITE]
    acl = (out / "acl").read_text().splitlines()
    block = acl[acl.index(f"user {SITE}"):][:4]
    assert block == [f"user {SITE}", *(f"topic read wearfl/v1/{FED}/{kind}" for kind in ("model", "task", "grant"))]


def site_state(tmp_path: Path, consortium: Path) -> tuple[Path, Path]:
    """(the site's state provisioned with --consortium, the add-site folder it came from)."""
    folder = add_site(consortium, SITE, FED)
    state = tmp_path / SITE
    init_keys(state, consortium=folder)
    return state, folder


def test_init_consortium_signs_with_the_granted_key_and_gateways_pin_the_consortium(consortium: Path,
                                                                                      tmp_path: Path) -> None:
    state, folder = site_state(tmp_path, consortium)
    hub = state / "keys" / "hub"
    site_key = public_hex(load_or_create_key(folder / "device.key"))
    assert public_hex(load_or_create_key(hub / "hub.key")) == site_key
    assert mode(hub / "hub.key") == 0o600
    assert (hub / "hub.pub").read_text().strip() == site_key
    assert (hub / "consortium.pub").read_text().strip() == hub_pub(consortium)
    device = add_device(state, "gateway-01")
    assert (device / "hub.pub").read_text().strip() == hub_pub(consortium)
    assert Credentials.load(hub, "hub").signing_key().public_key().public_bytes_raw().hex() == site_key


def test_a_plain_hub_s_devices_still_pin_its_own_key(consortium: Path) -> None:
    device = add_device(consortium, "gateway-01")
    assert (device / "hub.pub").read_text().strip() == hub_pub(consortium)
    assert not (consortium / "keys" / "hub" / "consortium.pub").exists()


@pytest.mark.parametrize("lacking", ["device.key", "hub.pub", "grant.json"])
def test_init_consortium_refuses_an_incomplete_folder(consortium: Path, tmp_path: Path, lacking: str) -> None:
    folder = add_site(consortium, SITE, FED)
    (folder / lacking).unlink()
    with pytest.raises(ConfigError, match=f"lacks {lacking}"):
        init_keys(tmp_path / SITE, consortium=folder)
    assert not (tmp_path / SITE / "keys").exists()


def test_init_consortium_refuses_a_grant_of_another_key(consortium: Path, tmp_path: Path) -> None:
    folder = add_site(consortium, SITE, FED)
    other = add_site(consortium, "site-b", FED)
    (folder / "grant.json").write_bytes((other / "grant.json").read_bytes())
    with pytest.raises(ConfigError, match="does not grant"):
        init_keys(tmp_path / SITE, consortium=folder)


def test_cli_add_site_and_init_consortium(consortium: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "add-site", SITE, "--state", str(consortium), "--federation", FED]) == 0
    out = capsys.readouterr().out
    folder = consortium / "keys" / "sites" / SITE
    assert str(folder) in out and "--upstream-credentials" in out and "broker-config" in out
    assert main(["keys", "init", "--state", str(tmp_path / SITE), "--consortium", str(folder)]) == 0
    assert "pin the consortium's key" in capsys.readouterr().out


def test_cli_refuses_a_duplicate_site_with_a_message_and_no_traceback(consortium: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    args = ["keys", "add-site", SITE, "--state", str(consortium), "--federation", FED]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) != 0
    err = capsys.readouterr().err
    assert f"site {SITE} is already enrolled" in err
    assert "Traceback" not in err
