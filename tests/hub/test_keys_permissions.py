"""`wearfl keys broker-config` writes files the broker can read: Mosquitto started as root drops to its
`user` account (``mosquitto`` by default) before it opens the password file and writes its persistence.

The main test does what the printed next steps say, as root: ``mosquitto -c OUT/mosquitto.conf``
from the folder the command ran in, and an enrolled device then publishes through it.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.keys import add_device, broker_config, broker_next_steps, init_keys, mosquitto_account
from models.protocol.topics import Topics
from models.transport.credentials import Credentials
from models.transport.mqtt import BrokerAddress, MqttSession
from wearfl.broker import free_port, mosquitto_binary, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
FED = "clinic"
DEVICE = "gateway-01"
WAIT_S = 20.0
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

needs_root = pytest.mark.skipif(not AS_ROOT, reason="Mosquitto drops privileges only when started as root")


def wearfl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    return subprocess.run([sys.executable, "-m", "wearfl", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder the broker's account may enter (pytest's own temporary folders are root's, mode 700)."""
    folder = Path(tempfile.mkdtemp(prefix="wearfl-keys-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def enrolled(state: Path) -> Path:
    init_keys(state)
    return add_device(state, DEVICE)


def owner(path: Path) -> str:
    return pwd.getpwuid(path.stat().st_uid).pw_name


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def device_publishes(port: int, folder: Path) -> None:
    """An enrolled device connects over TLS with its folder and the broker acknowledges its status."""
    topics = Topics(FED)
    address = Credentials.load(folder, "device").apply(BrokerAddress.parse(f"mqtts://127.0.0.1:{port}"))

    async def scenario() -> None:
        session = MqttSession(address, f"wearfl-edge-{FED}-{DEVICE}", protocol="5", clean_start=True)
        await session.connect(timeout=WAIT_S)
        try:
            await session.subscribe(topics.model, qos=1)
            await session.publish(topics.status(DEVICE), b'{"state": "online"}', qos=1)
        finally:
            await session.disconnect()

    asyncio.run(asyncio.wait_for(scenario(), WAIT_S * 2))


@needs_root
def test_as_root_mosquitto_runs_the_config_as_the_next_steps_say_and_admits_an_enrolled_device(open_folder):
    if mosquitto_binary() is None:
        pytest.skip("needs the mosquitto binary (`apt-get install mosquitto`)")
    device = enrolled(open_folder / "hub")
    port = free_port()
    made = wearfl("keys", "broker-config", "--state", "hub", "--out", "broker", "--port", str(port),
                  "--bind", "127.0.0.1", "--federation", FED, cwd=open_folder)
    assert made.returncode == 0, made.stderr
    steps = made.stdout.splitlines()
    account = mosquitto_account()
    assert any(f"runs as {account!r}" in line for line in steps), steps
    start = steps[-1]
    assert start == "start it: mosquitto -c broker/mosquitto.conf", steps

    out = open_folder / "broker"
    for name in ("passwords", "server.key"):
        assert (owner(out / name), mode(out / name)) == (account, 0o600), name
    assert owner(out / "data") == account
    for name in ("acl", "ca.crt", "server.crt", "mosquitto.conf"):
        assert (owner(out / name), mode(out / name)) == ("root", 0o644), name
    assert f"user {account}" in (out / "mosquitto.conf").read_text().splitlines()

    argv = shlex.split(start.removeprefix("start it: "))
    log_path = open_folder / "mosquitto.log"
    with log_path.open("wb") as log:
        broker = subprocess.Popen([mosquitto_binary() or "mosquitto", *argv[1:]], cwd=open_folder,
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port("127.0.0.1", port, WAIT_S, broker)
            device_publishes(port, device)
        finally:
            broker.terminate()
            code = broker.wait(timeout=WAIT_S)
    text = log_path.read_text()
    assert code == 0, text  # it saved its persistence as the account it dropped to
    assert "Error" not in text and "Warning" not in text, text  # no "Unable to open pwfile", no ACL pattern warning
    assert owner(out / "data" / "mosquitto.db") == account


@needs_root
def test_the_next_steps_name_a_folder_the_broker_account_may_not_enter(tmp_path):
    enrolled(tmp_path / "hub")
    made = wearfl("keys", "broker-config", "--state", "hub", "--out", "broker", cwd=tmp_path)

    assert made.returncode == 0, made.stderr
    closed = next(p for p in (*reversed(tmp_path.parents), tmp_path) if not p.stat().st_mode & stat.S_IXOTH)
    assert f"{mosquitto_account()!r} may not enter {closed} (mode 700)" in made.stdout, made.stdout
    assert f"chmod o+x {closed}" in made.stdout


@needs_root
def test_an_account_that_does_not_exist_is_refused_before_anything_is_written(tmp_path):
    enrolled(tmp_path / "hub")
    made = wearfl("keys", "broker-config", "--state", "hub", "--out", "broker", "--user", "no-such-account-x",
                  cwd=tmp_path)

    assert made.returncode == 2 and "Traceback" not in made.stderr, made.stderr
    assert made.stderr.startswith("error: there is no account 'no-such-account-x'"), made.stderr
    assert not (tmp_path / "broker").exists()


def test_without_root_the_next_steps_say_how_to_hand_the_files_over(tmp_path, monkeypatch):
    enrolled(tmp_path / "hub")
    monkeypatch.setattr("hub.keys._running_as_root", lambda: False)
    monkeypatch.setattr("hub.keys._me", lambda: "operator")
    monkeypatch.chdir(tmp_path)
    config = broker_config(Path("hub"), Path("broker"), user="mosquitto")

    steps = broker_next_steps(config, "mosquitto")

    assert "sudo chown -R mosquitto broker/passwords broker/server.key broker/data" in steps[0]
    assert "start it as 'operator'" in steps[0]
    assert steps[-1] == "start it: mosquitto -c broker/mosquitto.conf"


def test_the_acl_needs_no_pattern_without_a_client_placeholder(tmp_path):
    """Mosquitto warns at every start about a `pattern` line without %u or %c; the model and task are per user."""
    enrolled(tmp_path / "hub")
    acl = (broker_config(tmp_path / "hub", tmp_path / "broker", user="root" if AS_ROOT else None).parent
           / "acl").read_text().splitlines()

    patterns = [line for line in acl if line.startswith("pattern ")]
    assert patterns and all("%u" in line or "%c" in line for line in patterns), patterns
    device_block = acl[acl.index(f"user {DEVICE}"):][:3]
    assert device_block == [f"user {DEVICE}", "topic read wearfl/v1/+/model", "topic read wearfl/v1/+/task"]
