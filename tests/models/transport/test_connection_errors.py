"""What an operator reads when the session cannot connect, or the broker's access rules refuse it.

Each case crosses a real Mosquitto this module starts: the locked-down TLS broker that
``wearfl keys broker-config`` writes, and, for a refused subscription, a Mosquitto whose
dynamic-security plugin denies subscriptions (its ``acl_file`` never refuses one: it grants
the subscription and then delivers nothing). One case is a plain HTTP server: what a client
meets when the broker URL names the wrong port. Every message says what happened, where,
and what to do, and paho's own ERROR lines (one "failed to receive on socket" per attempt)
stay out of the output.
"""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import http.server
import json
import logging
import os
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from provisioned import needs_mosquitto, provisioned_broker

from hub.keys import init_keys
from models.errors import BrokerUnavailable, ConfigError
from models.protocol.topics import Topics
from models.transport.credentials import Credentials
from models.transport.mqtt import BrokerAddress, MqttSession
from wearfl.broker import MosquittoBroker, free_port

T = TypeVar("T")
FED = "clinic"
DEVICE = "wearer-00"
WAIT_S = 30.0  # a bound on each scenario: connect() gives up at once where retrying cannot help
DYNSEC_PLUGINS = ("/usr/lib/*/mosquitto_dynamic_security.so", "/usr/lib/mosquitto*/mosquitto_dynamic_security.so",
                  "/usr/local/lib/mosquitto_dynamic_security.so", "/opt/homebrew/lib/mosquitto_dynamic_security.so")


def run(coro: Coroutine[Any, Any, T], timeout: float = WAIT_S) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@dataclasses.dataclass
class Federation:
    """A `wearfl keys` state and the locked-down broker its config runs."""

    state: Path
    broker: MosquittoBroker

    def folder(self, who: str) -> Path:
        return self.state / "keys" / ("hub" if who == "hub" else f"devices/{who}")

    def address(self, who: str, scheme: str = "mqtts", credentials: Path | None = None) -> BrokerAddress:
        url = f"{scheme}://{self.broker.host}:{self.broker.port}"
        return Credentials.load(credentials or self.folder(who), "hub" if who == "hub" else "device").apply(
            BrokerAddress.parse(url))


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    with provisioned_broker(tmp_path_factory, [DEVICE], FED) as (state, broker):
        yield Federation(state, broker)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hub folder of another federation: its CA did not sign the broker's certificate."""
    state = tmp_path_factory.mktemp("other-state")
    return init_keys(state)


@pytest.fixture
def transport_log() -> Iterator[list[logging.LogRecord]]:
    """Every record of the session's loggers (paho's included), whatever the level."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("models.transport.mqtt")
    handler, level = Keep(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def connect_error(address: BrokerAddress, timeout: float = 20.0) -> str:
    """The BrokerUnavailable of a session that cannot connect to ``address``."""

    async def scenario() -> str:
        session = MqttSession(address, "first-hour-probe", protocol="5")
        with pytest.raises(BrokerUnavailable) as caught:
            await session.connect(timeout=timeout)
        assert caught.value.url == address.url
        return str(caught.value)

    return run(scenario())


def assert_quiet(records: list[logging.LogRecord], paho_spoke: bool = False) -> None:
    """Nothing at WARNING or above: the error says it all. ``paho_spoke``: paho did log (at DEBUG now)."""
    loud = [f"{r.name} {r.levelname}: {r.getMessage()}" for r in records if r.levelno >= logging.WARNING]
    assert loud == [], loud
    if paho_spoke:
        assert any("failed to receive on socket" in r.getMessage() for r in records if r.name.endswith(".paho"))


# -- the four ways a first connect fails ------------------------------------------------------------


def test_a_broker_certificate_from_another_federations_ca_names_the_ca_and_gives_up_at_once(
        federation, other_ca, transport_log):
    address = federation.address("hub", credentials=other_ca)

    message = connect_error(address, timeout=60.0)  # given up at once: well inside run()'s bound

    assert f"cannot connect to the MQTT broker at mqtts://127.0.0.1:{federation.broker.port}: " in message
    assert f"TLS certificate is not signed by the CA in {other_ca / 'ca.crt'}" in message
    assert "different federations" in message and "--credentials" in message
    assert_quiet(transport_log)


def test_plain_mqtt_to_the_tls_port_says_to_use_mqtts(federation, transport_log):
    address = federation.address("hub", scheme="mqtt")

    message = connect_error(address, timeout=60.0)

    port = federation.broker.port
    assert f"port {port} expects TLS" in message and f"Use mqtts://127.0.0.1:{port}" in message
    assert_quiet(transport_log, paho_spoke=True)  # before: one paho ERROR line per attempt, six in 10 s


def test_nothing_listening_says_connection_refused_not_protocol_error(transport_log):
    port = free_port()

    message = connect_error(BrokerAddress("127.0.0.1", port), timeout=1.0)

    assert f"nothing listens on 127.0.0.1:{port} (connection refused)" in message
    assert "Start the broker" in message and "--broker" in message and "Protocol error" not in message
    assert "(tried for 1 s)" in message
    assert_quiet(transport_log)


def test_a_wrong_password_names_the_user_and_the_password_file(federation, tmp_path, transport_log):
    folder = tmp_path / "device"
    folder.mkdir()
    for path in federation.folder(DEVICE).iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "mqtt.json").write_text(json.dumps({"username": DEVICE, "password": "not-the-password"}))

    message = connect_error(federation.address(DEVICE, credentials=folder), timeout=60.0)

    assert f"refused the login of user {DEVICE!r}" in message
    assert "(Not authorized)" in message or "(Bad user name or password)" in message
    assert "password is wrong" in message and "wearfl keys broker-config" in message
    assert_quiet(transport_log)


def test_the_four_failures_read_differently(federation, other_ca, tmp_path):
    wrong_password = dataclasses.replace(federation.address(DEVICE), password="not-the-password")
    messages = {
        "certificate": connect_error(federation.address("hub", credentials=other_ca), timeout=60.0),
        "plain to TLS": connect_error(federation.address("hub", scheme="mqtt"), timeout=60.0),
        "nothing listening": connect_error(BrokerAddress("127.0.0.1", free_port()), timeout=1.0),
        "password": connect_error(wrong_password, timeout=60.0),
    }
    keys = {"certificate": "not signed by the CA", "plain to TLS": "expects TLS",
            "nothing listening": "connection refused", "password": "refused the login"}

    for case, message in messages.items():
        assert [c for c, key in keys.items() if key in message] == [case], (case, message)


def test_a_server_that_does_not_speak_mqtt_is_named_as_such(transport_log):
    """The broker URL names the wrong port: an HTTP server answers (paho calls it a protocol error)."""

    class BadRequest(http.server.BaseHTTPRequestHandler):
        def handle_one_request(self) -> None:
            self.wfile.write(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), BadRequest)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        message = connect_error(BrokerAddress("127.0.0.1", port), timeout=60.0)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)

    assert (f"the server at 127.0.0.1:{port} answered with something that is not MQTT ('HTTP/1.1 400 Bad Request')"
            in message)
    assert "--broker" in message
    assert_quiet(transport_log)


# -- the broker's access rules refuse the federation --------------------------------------------------


def test_a_publish_the_acl_refuses_is_a_config_error_that_names_the_federation(federation):
    """broker-config's ACL serves one federation: a session on another one is granted its subscriptions
    (Mosquitto's acl_file never refuses one) but its first publish comes back Not authorized."""
    other = Topics("other-federation")

    async def scenario() -> str:
        session = MqttSession(federation.address(DEVICE), "wrong-federation", protocol="5")
        await session.connect(timeout=WAIT_S)
        try:
            await session.subscribe(other.model, qos=1)  # granted: nothing will ever arrive on it
            with pytest.raises(ConfigError) as refused:
                await session.publish(other.status(DEVICE), b"{}", qos=1, retain=True)
            return str(refused.value)
        finally:
            await session.disconnect()

    message = run(scenario())

    assert f"refused a message on {other.status(DEVICE)} (Not authorized)" in message
    assert f"do not let user {DEVICE!r} publish there" in message
    assert "Is --federation right for these credentials?" in message


def dynsec_plugin() -> str | None:
    return next((path for pattern in DYNSEC_PLUGINS for path in sorted(glob.glob(pattern))), None)


@pytest.fixture
def denying_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A Mosquitto whose dynamic-security plugin refuses every subscription (SUBACK 0x87)."""
    needs_mosquitto()
    plugin = dynsec_plugin()
    if plugin is None:
        pytest.skip("needs Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so)")
    (tmp_path / "dynsec.json").write_text(json.dumps({
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True, "subscribe": False,
                             "unsubscribe": True},
        "clients": [], "groups": [], "roles": [],
    }))
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text("\n".join([
        f"listener {port} 127.0.0.1", "allow_anonymous true", f"plugin {plugin}",
        f"plugin_opt_config_file {tmp_path / 'dynsec.json'}", "log_dest stderr",
        *(["user root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []), "",
    ]))
    with MosquittoBroker(port, config_file=config, workdir=tmp_path) as broker:
        yield broker


def test_a_refused_subscription_is_a_config_error_that_names_topic_and_federation(denying_broker, caplog):
    topic = Topics("clinic").model

    async def scenario() -> str:
        session = MqttSession(BrokerAddress.parse(denying_broker.url), "refused-subscriber", protocol="5")
        await session.connect(timeout=WAIT_S)
        try:
            with pytest.raises(ConfigError) as refused:
                await session.subscribe(topic, qos=1, timeout=WAIT_S)
            return str(refused.value)
        finally:
            await session.disconnect()

    with caplog.at_level(logging.WARNING, logger="models.transport.mqtt"):
        message = run(scenario())

    assert message == (f"the broker at {denying_broker.url} refused the subscription to {topic} (Not authorized): "
                       "its access rules do not let a client without username read it. Is --federation right for "
                       "these credentials?")
    assert [r for r in caplog.records if r.name.startswith("models.transport")] == []  # said once, by the error
