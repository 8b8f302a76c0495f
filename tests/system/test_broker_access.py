"""Device identity on a real Mosquitto that runs the config `wearfl keys broker-config` writes.

The broker admits only identities made by `wearfl keys`: TLS with a certificate from the
federation's CA, and a password. Each device publishes only on its own topics. The
probes here use paho directly, so they see the broker's own reason codes; the last test runs
a real hub and real edges through the same broker with their credentials folders.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from provisioned import provisioned_broker

from edge_client.edge_command import add_edge_command, config_from_args
from edge_client.evaluation import task_spec
from edge_client.finetune import FineTunePolicy
from edge_client.runtime import EdgeClient, EdgeConfig
from edge_client.sources.simulator import SimulatedDataset
from hub.keys import password_hash
from hub.service import HubConfig, HubService
from hub.store import HubStore
from models.errors import ConfigError
from models.model import Model
from models.protocol.topics import Topics
from models.training import TrainConfig
from models.transport.credentials import Credentials
from models.transport.mqtt import BrokerAddress, MqttSession
from wearfl.broker import MosquittoBroker

WAIT_S = 20.0
FED = "clinic"
TOPICS = Topics(FED)
DEVICES = ("wearer-00", "wearer-01")
DATASET = SimulatedDataset(seed=0, wearers=2, minutes=3, test_wearers=0)
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Provisioned:
    state: Path
    broker: MosquittoBroker

    def folder(self, who: str) -> Path:
        return self.state / "keys" / ("hub" if who == "hub" else f"devices/{who}")


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioned]:
    with provisioned_broker(tmp_path_factory, DEVICES) as (state, broker):
        yield Provisioned(state, broker)


@dataclass
class Probe:
    """A raw paho client and what the broker told it."""

    client: paho.Client
    connack: Any = None
    disconnect: Any = None
    error: str | None = None
    pubacks: dict[int, Any] = field(default_factory=dict)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    events: threading.Condition = field(default_factory=threading.Condition)

    def wait(self, what: str, predicate: Any) -> None:
        with self.events:
            if not self.events.wait_for(predicate, WAIT_S):
                raise AssertionError(f"timed out waiting for {what}")

    def publish(self, topic: str, payload: bytes) -> Any:
        info = self.client.publish(topic, payload, qos=1)
        self.wait(f"the PUBACK of {topic}", lambda: info.mid in self.pubacks or self.disconnect is not None)
        return self.pubacks.get(info.mid)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def probe(p: Provisioned, who: str | None, *, tls: bool = True, cert: bool = True, password: str | None = None,
          client_id: str | None = None) -> Probe:
    """Connect as ``who`` (a device id, "hub", or None for no username) and wait for the broker's answer."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id or f"probe-{who}",
                         protocol=paho.MQTTv5)
    result = Probe(client)
    folder = p.folder(who) if who is not None else p.folder(DEVICES[0])
    if who is not None:
        account = json.loads((folder / "mqtt.json").read_text())
        client.username_pw_set(account["username"], password if password is not None else account["password"])
    if tls:
        context = ssl.create_default_context(cafile=str(p.state / "keys" / "ca.crt"))
        if cert:
            context.load_cert_chain(folder / "client.crt", folder / "client.key")
        client.tls_set_context(context)

    def note(**kw: Any) -> None:
        with result.events:
            for k, v in kw.items():
                if k == "puback":
                    result.pubacks[v[0]] = v[1]
                elif k == "message":
                    result.messages.append(v)
                else:
                    setattr(result, k, v)
            result.events.notify_all()

    client.on_connect = lambda c, u, f, rc, props: note(connack=rc)
    client.on_disconnect = lambda c, u, f, rc, props: note(disconnect=rc)
    client.on_publish = lambda c, u, mid, rc, props: note(puback=(mid, rc))
    client.on_message = lambda c, u, m: note(message=(m.topic, bytes(m.payload)))
    try:
        client.connect(p.broker.host, p.broker.port)
    except (OSError, ssl.SSLError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    client.loop_start()
    result.wait("the broker's answer", lambda: result.connack is not None or result.disconnect is not None)
    return result


def accepted(p: Probe) -> bool:
    return p.connack is not None and not p.connack.is_failure and p.disconnect is None


def subscribe(p: Probe, topic: str) -> None:
    done = threading.Event()
    p.client.on_subscribe = lambda c, u, mid, codes, props: done.set()
    p.client.subscribe(topic, qos=1)
    assert done.wait(WAIT_S), f"no SUBACK for {topic}"


# -- who may connect ----------------------------------------------------------------------------


def test_an_enrolled_device_and_the_hub_connect(provisioned):
    for who in (DEVICES[0], "hub"):
        p = probe(provisioned, who)
        try:
            assert accepted(p), (who, p.connack, p.disconnect, p.error)
        finally:
            p.close()


def test_anonymous_connect_is_refused(provisioned):
    with_cert = probe(provisioned, None)  # a valid client certificate, but no username or password
    without_cert = probe(provisioned, None, cert=False)
    try:
        assert not accepted(with_cert) and not accepted(without_cert)
        assert with_cert.connack is not None and with_cert.connack.is_failure, with_cert.disconnect
        assert with_cert.connack.getName() in ("Not authorized", "Bad user name or password")
    finally:
        with_cert.close()
        without_cert.close()


def test_a_wrong_password_is_refused_with_its_reason_code(provisioned):
    p = probe(provisioned, DEVICES[0], password="not-the-password")
    try:
        assert p.connack is not None and p.connack.getName() in ("Bad user name or password", "Not authorized")
    finally:
        p.close()


def test_tls_is_required(provisioned):
    p = probe(provisioned, DEVICES[0], tls=False)
    try:
        assert not accepted(p) and p.connack is None
    finally:
        p.close()


def test_a_device_without_a_certificate_is_refused(provisioned):
    p = probe(provisioned, DEVICES[0], cert=False)
    try:
        assert not accepted(p)
    finally:
        p.close()


# -- what a device may do -----------------------------------------------------------------------


def test_device_a_publishing_on_device_bs_update_topic_is_refused_with_not_authorized(provisioned):
    hub = probe(provisioned, "hub")
    a = probe(provisioned, DEVICES[0])
    try:
        subscribe(hub, TOPICS.all_of("update"))
        foreign = a.publish(TOPICS.update(DEVICES[1]), b"forged")
        as_hub = a.publish(TOPICS.model, b"forged model")
        own = a.publish(TOPICS.update(DEVICES[0]), b"mine")
        assert (foreign.value, foreign.getName()) == (0x87, "Not authorized")
        assert (as_hub.value, as_hub.getName()) == (0x87, "Not authorized")
        assert own.value == 0
        hub.wait("the device's own update", lambda: len(hub.messages) >= 1)
        assert hub.messages == [(TOPICS.update(DEVICES[0]), b"mine")]
    finally:
        a.close()
        hub.close()


def test_a_device_reads_the_model_and_its_own_receipts_only(provisioned):
    hub = probe(provisioned, "hub")
    a = probe(provisioned, DEVICES[0])
    try:
        subscribe(a, TOPICS.all_of("receipt"))
        subscribe(a, TOPICS.task)
        for device in (DEVICES[1], DEVICES[0]):
            assert not hub.publish(TOPICS.receipt(device), device.encode()).is_failure
        assert not hub.publish(TOPICS.task, b"task").is_failure
        a.wait("its receipt and the task", lambda: len(a.messages) >= 2)
        assert sorted(a.messages) == sorted([(TOPICS.receipt(DEVICES[0]), DEVICES[0].encode()),
                                             (TOPICS.task, b"task")])
    finally:
        a.close()
        hub.close()


def test_an_oversize_publish_is_refused(provisioned):
    hub = probe(provisioned, "hub")
    a = probe(provisioned, DEVICES[0])
    try:
        subscribe(hub, TOPICS.all_of("update"))
        # paho sends it although the broker announced its limit in CONNACK
        a.client.publish(TOPICS.update(DEVICES[0]), b"x" * (16 * 1024 * 1024 + 1), qos=1)
        a.wait("the broker to drop the connection", lambda: a.disconnect is not None)
        assert a.pubacks == {}  # never acknowledged: the broker closed the connection instead
        b = probe(provisioned, DEVICES[1])
        try:
            assert not b.publish(TOPICS.update(DEVICES[1]), b"small").is_failure
            hub.wait("the small update", lambda: len(hub.messages) >= 1)
        finally:
            b.close()
        assert hub.messages == [(TOPICS.update(DEVICES[1]), b"small")]  # the oversize one never arrived
    finally:
        a.close()
        hub.close()


def test_the_project_session_refuses_an_oversize_publish_before_sending(provisioned):
    creds = Credentials.load(provisioned.folder(DEVICES[0]), "device")
    address = creds.apply(BrokerAddress(provisioned.broker.host, provisioned.broker.port, tls=True))

    async def scenario() -> str:
        session = MqttSession(address, "oversize-check", protocol="5")
        await session.connect(timeout=WAIT_S)
        try:
            with pytest.raises(ConfigError) as refused:
                await session.publish(TOPICS.update(DEVICES[0]), b"x" * (16 * 1024 * 1024 + 1))
            return str(refused.value)
        finally:
            await session.disconnect()

    assert "max_packet_size" in asyncio.run(asyncio.wait_for(scenario(), 60))


# -- the files --------------------------------------------------------------------------------


def test_the_password_file_holds_pbkdf2_hashes_never_the_passwords(provisioned):
    text = (provisioned.broker.config_path.parent / "passwords").read_text()
    for who in ("hub", *DEVICES):
        password = json.loads((provisioned.folder(who) / "mqtt.json").read_text())["password"]
        assert password not in text
    assert all(line.split(":", 1)[1].startswith("$7$101$") for line in text.splitlines())
    assert password_hash("secret", b"\x00" * 12).count("$") == 4


def test_private_files_are_owner_only(provisioned):
    keys = provisioned.state / "keys"
    for path in (keys / "ca.key", keys / "hub" / "hub.key", keys / "hub" / "mqtt.json",
                 keys / "devices" / DEVICES[0] / "device.key", keys / "devices" / DEVICES[0] / "client.key"):
        assert path.stat().st_mode & 0o077 == 0, path


def test_keys_commands_give_one_clear_error(tmp_path):
    def wearfl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "wearfl", *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=60)

    early = wearfl("keys", "add-device", "gw-1", "--state", str(tmp_path))
    assert early.returncode == 2 and "keys init" in early.stderr and "Traceback" not in early.stderr
    assert wearfl("keys", "init", "--state", str(tmp_path)).returncode == 0
    again = wearfl("keys", "init", "--state", str(tmp_path))
    assert again.returncode == 2 and "already holds a CA" in again.stderr
    assert wearfl("keys", "add-device", "gw-1", "--state", str(tmp_path)).returncode == 0
    twice = wearfl("keys", "add-device", "gw-1", "--state", str(tmp_path))
    assert twice.returncode == 2 and "already enrolled" in twice.stderr
    bad = wearfl("keys", "add-device", "no such/id", "--state", str(tmp_path))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    ring = (tmp_path / "keys" / "hub" / "keyring").read_text().split()
    assert ring.count("gw-1") == 1


def test_edge_credentials_of_another_device_are_refused(provisioned, tmp_path):
    parser = argparse.ArgumentParser()
    add_edge_command(parser.add_subparsers())
    args = parser.parse_args(["edge", "--broker", "mqtts://127.0.0.1:1", "--federation", FED, "--source", "sim:0",
                              "--state", str(tmp_path), "--client-id", DEVICES[1],
                              "--credentials", str(provisioned.folder(DEVICES[0]))])
    with pytest.raises(ConfigError, match="does not match the credentials"):
        config_from_args(args)
    args.client_id = None
    assert config_from_args(args).client_id == DEVICES[0]


# -- a federation through the locked-down broker ------------------------------------------------


def test_a_round_completes_with_credentials_through_the_locked_down_broker(provisioned, tmp_path):
    url = f"mqtts://{provisioned.broker.host}:{provisioned.broker.port}"
    hub_state = tmp_path / "hub"
    config = HubConfig(broker=url, federation=FED, state_dir=hub_state, credentials=provisioned.folder("hub"),
                       min_clients=2, round_timeout_s=60.0, rounds=1,
                       task_config={"quantize": "int8", "epochs": 1, "batch_size": 32, "lr": 1e-3})
    hub = HubService(config, Model(task_spec("activity", DATASET), seed=0))
    policy = FineTunePolicy(train=TrainConfig(epochs=1, batch_size=32))
    edges = [EdgeClient(EdgeConfig(broker=url, federation=FED, client_id=d, state_dir=tmp_path / d, policy=policy,
                                   credentials=provisioned.folder(d), protocol="5"), DATASET.source(d))
             for d in DEVICES]

    async def scenario() -> None:
        stop_edges = asyncio.Event()
        hub_task = asyncio.create_task(hub.run())
        await asyncio.wait_for(hub.ready.wait(), WAIT_S)
        edge_tasks = [asyncio.create_task(e.run(stop_edges)) for e in edges]
        await asyncio.wait_for(hub_task, 90)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while not all(e.model_version == 1 for e in edges) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        stop_edges.set()
        await asyncio.wait_for(asyncio.gather(*edge_tasks), WAIT_S)

    asyncio.run(asyncio.wait_for(scenario(), 150))
    with HubStore(hub_state, create=False) as store:
        status = store.status()
    assert status["model_version"] == 1 and status["updates_accepted"] == 2
    assert sorted(status["clients"]) == sorted(DEVICES)
    assert all(e.model_version == 1 for e in edges)
    hub_pub = (provisioned.folder("hub") / "hub.pub").read_text().strip()
    assert all((tmp_path / d / "hub.pub").read_text().strip() == hub_pub for d in DEVICES)


def unit_command(unit: Path, environment: dict[str, str]) -> list[str]:
    """The unit's ExecStart, split, its ``${VAR}`` filled from its Environment lines (``environment`` overrides)."""
    env: dict[str, str] = {}
    command = None
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = line.removeprefix("Environment=").partition("=")
            env[key] = value
        elif line.startswith("ExecStart="):
            command = line.removeprefix("ExecStart=")
    assert command is not None, f"{unit} has no ExecStart"
    assert set(environment) <= set(env), f"{sorted(set(environment) - set(env))} are not variables of {unit}"
    env.update(environment)
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word) for word in shlex.split(command)]


def test_the_systemd_unit_as_written_takes_part_in_a_round(provisioned, tmp_path):
    """scripts/deploy/wearfl-edge.service with its Environment lines set for this machine (as its comment says
    to do): the edge it starts, on a recording, through the locked-down broker, is accepted in a heart-rate round."""
    from edge_client.sources.recorder import record_source

    device = DEVICES[0]
    record_source(DATASET.source(device), tmp_path / "recordings")
    hub_probe = probe(provisioned, "hub")  # a fresh hub state: clear what earlier tests' hubs left retained
    try:
        for topic in (TOPICS.model, TOPICS.task):
            info = hub_probe.client.publish(topic, b"", qos=1, retain=True)
            hub_probe.wait(f"the PUBACK clearing {topic}", lambda info=info: info.mid in hub_probe.pubacks)
    finally:
        hub_probe.close()
    url = f"mqtts://{provisioned.broker.host}:{provisioned.broker.port}"
    argv = unit_command(ROOT / "scripts/deploy/wearfl-edge.service", {
        "WEARFL_BROKER": url, "WEARFL_FEDERATION": FED, "WEARFL_CLIENT": device,
        "WEARFL_SOURCE": f"recordings:{tmp_path}/recordings/{device}",
        "WEARFL_CREDENTIALS": str(provisioned.folder(device))})
    assert argv[0] == "/opt/wearfl/.venv/bin/wearfl" and "/var/lib/wearfl/edge" in argv
    edge_argv = [sys.executable, "-m", "wearfl", *(str(tmp_path / "edge") if a == "/var/lib/wearfl/edge" else a
                                                   for a in argv[1:])]
    hub_state = tmp_path / "hub"
    hub_argv = [sys.executable, "-m", "wearfl", "hub", "--broker", url, "--federation", FED, "--state", str(hub_state),
                "--credentials", str(provisioned.folder("hub")), "--task", "heart-rate", "--rounds", "1",
                "--min-clients", "1", "--clients-per-round", "1", "--round-timeout", "120"]
    with (tmp_path / "hub.log").open("w") as hub_log, (tmp_path / "edge.log").open("w") as edge_log:
        hub = subprocess.Popen(hub_argv, stdout=hub_log, stderr=subprocess.STDOUT)
        edge = subprocess.Popen(edge_argv, stdout=edge_log, stderr=subprocess.STDOUT)
        try:
            assert hub.wait(timeout=180) == 0, (tmp_path / "hub.log").read_text()[-3000:]
            assert edge.poll() is None, (tmp_path / "edge.log").read_text()[-3000:]
            edge.send_signal(signal.SIGTERM)  # the unit's KillSignal
            assert edge.wait(timeout=30) == 0, (tmp_path / "edge.log").read_text()[-3000:]
        finally:
            for process in (edge, hub):
                if process.poll() is None:
                    process.kill()
                    process.wait()
    with HubStore(hub_state, create=False) as store:
        status = store.status()
    assert status["updates_accepted"] == 1 and status["clients"][device]["accepted"] == 1
