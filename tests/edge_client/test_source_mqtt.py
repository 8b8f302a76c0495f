"""``mqtt:TOPIC`` against a real Mosquitto: a bridge's JSON sample batches in, chunks out, bad messages skipped.

The first message of a test is published retained, so it is there when the source subscribes
(opening waits for it); later ones go out after the source is open. Each test has a topic of
its own (``topic_prefix``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest

from edge_client.edge_command import resolve_source
from edge_client.sources import mqtt_source
from edge_client.sources.base import UNKNOWN
from edge_client.sources.live import collect
from edge_client.sources.mqtt_source import MqttSource, parse_payload, parse_spec
from models.errors import BrokerUnavailable, ConfigError, InputError
from wearfl.broker import free_port

WAIT_S = 20.0


class Publisher:
    """The bridge's side: a paho client publishing at QoS 1 and waiting for each PUBACK."""

    def __init__(self, broker: Any) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"bridge-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv311)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, topic: str, message: dict[str, Any] | bytes, *, retain: bool = False) -> None:
        payload = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def bridge(mqtt_broker) -> Iterator[Publisher]:
    publisher = Publisher(mqtt_broker)
    yield publisher
    publisher.close()


def spec_of(broker: Any, topic: str) -> str:
    return f"mqtt://{broker.host}:{broker.port}/{topic}"


def concat(chunks: list[Any], field: str) -> np.ndarray:
    return np.concatenate([getattr(c, field) for c in chunks])


def test_batches_come_out_as_chunks_with_their_times_channels_and_labels(mqtt_broker, bridge, topic_prefix):
    topic = f"{topic_prefix}/wrist-07"
    bridge.send(topic, {"rate": 32, "t": [100.0, 100.03125, 100.0625], "ppg": [51234, 51302, None],
                        "acc_x": [0.01, 0.02, 0.03], "hr_bpm": [72, None, 73]}, retain=True)
    source = resolve_source(spec_of(mqtt_broker, topic), None)  # the client: the topic's last level
    assert isinstance(source, MqttSource)
    assert (source.client_id, source.channels, source.sampling_rate_hz) == ("wrist-07", ("acc_x", "ppg"), 32.0)
    bridge.send(topic, {"rate": 32, "ppg": [51400, 51410], "acc_x": [0.04, 0.05]})  # no t: follows the last sample
    bridge.send(topic, {"rate": 32, "t": [200.0], "acc_x": [0.06], "gyro_x": [1.0]})  # no ppg: missing; gyro: ignored
    chunks = collect(source, 6, WAIT_S)
    bridge.send(topic, b"", retain=True)  # clear the retained message

    assert all(c.client_id == "wrist-07" and c.channels == ("acc_x", "ppg") for c in chunks)
    np.testing.assert_allclose(concat(chunks, "t"), [100.0, 100.03125, 100.0625, 100.09375, 100.125, 200.0])
    data = concat(chunks, "data")
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, np.array([[0.01, 51234], [0.02, 51302], [0.03, np.nan], [0.04, 51400],
                                                  [0.05, 51410], [0.06, np.nan]], np.float32))
    np.testing.assert_array_equal(concat(chunks, "hr_bpm"), [72, np.nan, 73, np.nan, np.nan, np.nan])
    assert (concat(chunks, "activity") == UNKNOWN).all() and source.skipped_messages == 0


def test_bad_messages_are_logged_and_skipped_and_the_stream_goes_on(mqtt_broker, bridge, topic_prefix, caplog,
                                                                    monkeypatch):
    monkeypatch.setattr(mqtt_source, "MAX_PAYLOAD_BYTES", 4096)
    topic = f"{topic_prefix}/band"
    bridge.send(topic, b"not json at all", retain=True)  # seen first: skipped, opening waits on
    bad: list[bytes | dict[str, Any]] = [
        b"[1, 2, 3]",  # not an object
        {"ppg": [1.0]},  # no rate
        {"rate": -5, "ppg": [1.0]},
        {"rate": 32, "ppg": [1.0, 2.0], "acc_x": [1.0]},  # lengths differ
        {"rate": 32, "ppg": ["high", "low"]},
        {"rate": 32, "ppg": [[1.0, 2.0]]},
        {"rate": 32, "battery": [80]},  # no sensor column
        {"rate": 32, "t": [1.0, None], "ppg": [1.0, 2.0]},
        b"\xff\xfe\x00",  # not UTF-8
        json.dumps({"rate": 32, "ppg": [1.0] * 2000}).encode(),  # over the payload bound
    ]
    with caplog.at_level(logging.WARNING, logger="edge_client.sources.mqtt_source"):
        opener = threading.Timer(0.5, lambda: bridge.send(topic, {"rate": 50, "t": [1.0, 1.02], "ppg": [10, 11]}))
        opener.start()  # the first good message: channels ppg, 50 Hz
        source = MqttSource(spec_of(mqtt_broker, topic), timeout_s=WAIT_S)
        opener.join()
        for message in bad:
            bridge.send(topic, message)
        bridge.send(topic, {"rate": 32, "ppg": [99.0]})  # another rate: skipped
        bridge.send(topic, {"rate": 50, "t": [1.04], "ppg": [12]})
        chunks = collect(source, 3, WAIT_S)
    bridge.send(topic, b"", retain=True)

    np.testing.assert_array_equal(concat(chunks, "data")[:, 0], [10, 11, 12])
    assert source.skipped_messages == 1 + len(bad) + 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "not UTF-8 JSON" in warnings[0]  # the first is logged at once, the rest counted


def test_a_pipeline_that_stays_behind_drops_whole_messages_and_counts_them(mqtt_broker, bridge, topic_prefix,
                                                                           monkeypatch):
    monkeypatch.setattr(mqtt_source, "BUFFER_S", 0.1)  # 5 samples at 50 Hz
    monkeypatch.setattr(mqtt_source, "PUSH_TIMEOUT_S", 0.0)
    topic = f"{topic_prefix}/slow"
    bridge.send(topic, {"rate": 50, "ppg": [1, 2, 3]}, retain=True)
    source = MqttSource(spec_of(mqtt_broker, topic), timeout_s=WAIT_S)
    bridge.send(topic, {"rate": 50, "ppg": [4, 5, 6]})  # no room: dropped
    bridge.send(topic, {"rate": 50, "ppg": [7, 8]})  # fits
    deadline = time.monotonic() + WAIT_S  # the drop happens before anything is read, however busy the machine
    while source.dropped_samples < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    chunks = collect(source, 5, WAIT_S)
    bridge.send(topic, b"", retain=True)

    np.testing.assert_array_equal(concat(chunks, "data")[:, 0], [1, 2, 3, 7, 8])
    np.testing.assert_allclose(concat(chunks, "t"), np.array([0, 1, 2, 6, 7]) / 50)  # the drop stays a gap in time
    assert source.dropped_samples == 3


def test_close_ends_a_read_that_waits_for_messages(mqtt_broker, bridge, topic_prefix):
    topic = f"{topic_prefix}/quiet"
    bridge.send(topic, {"rate": 10, "acc_z": [1.0]}, retain=True)
    source = resolve_source(spec_of(mqtt_broker, topic), "gw-3")  # --client-id wins over the topic
    bridge.send(topic, b"", retain=True)
    started = threading.Event()
    got: list[Any] = []

    def read() -> None:
        for chunk in source.chunks():
            got.append(chunk)
            started.set()  # the retained sample arrived; now it waits

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(WAIT_S)
    source.close()
    reader.join(WAIT_S)
    assert not reader.is_alive()
    assert [c.client_id for c in got] == ["gw-3"] and len(got[0]) == 1


def test_no_message_in_time_names_the_topic_and_broker(mqtt_broker, topic_prefix):
    topic = f"{topic_prefix}/silent"
    with pytest.raises(InputError, match="no usable message arrived") as caught:
        MqttSource(spec_of(mqtt_broker, topic), timeout_s=0.5)
    assert topic in str(caught.value) and f"{mqtt_broker.port}" in str(caught.value)


def test_an_unreachable_broker_is_broker_unavailable():
    with pytest.raises(BrokerUnavailable, match="cannot reach the broker") as caught:
        MqttSource(f"mqtt://127.0.0.1:{free_port()}/ble/x", timeout_s=0.5)
    assert "mqtt://HOST:PORT/TOPIC" in str(caught.value)


def test_spec_forms():
    address, topic = parse_spec("mqtt:ble/wrist-07")
    assert (address.url, topic) == ("mqtt://127.0.0.1:1883", "ble/wrist-07")  # the gateway's own broker
    address, topic = parse_spec("mqtt://bridge.local:1884/ble/wrist%2007")
    assert (address.host, address.port, topic) == ("bridge.local", 1884, "ble/wrist 07")
    address, _ = parse_spec("mqtts://user:secret@broker:8883/ble/x")
    assert address.tls and address.username == "user"
    for bad in ("mqtt:", "mqtt://h:1/", "mqtt:ble/+/ppg", "mqtt:ble/#", "mqtts:ble/x", "mqtt://h:1/t?x=1"):
        with pytest.raises(ConfigError):
            parse_spec(bad)


def test_payload_rules():
    batch = parse_payload(b'{"rate": 25.5, "ppg": [1, null, 3], "hr_bpm": [60, 61, 62], "device": "x"}')
    assert batch.rate == 25.5 and batch.t is None and batch.ignored == ("device",)
    np.testing.assert_array_equal(batch.columns["ppg"], [1, np.nan, 3])
    for bad, match in [(b"{}", "rate"), (b'{"rate": true, "ppg": [1]}', "rate"),
                       (b'{"rate": 10, "ppg": 5}', "not an array"), (b'{"rate": 10, "t": [0], "ppg": []}', "length")]:
        with pytest.raises(InputError, match=match):
            parse_payload(bad)
