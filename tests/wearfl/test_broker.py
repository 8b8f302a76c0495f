"""The test broker itself: a retained QoS 1 message round-trips through it with paho."""

from __future__ import annotations

import os
import queue

import paho.mqtt.client as mqtt


def test_broker_fixture_delivers_a_retained_message(mqtt_broker, topic_prefix):
    if os.environ.get("CI", "").lower() == "true":
        assert mqtt_broker.kind == "mosquitto"
    received: queue.Queue[bytes] = queue.Queue()
    topic = f"{topic_prefix}/model"
    protocol = mqtt.MQTTv5 if mqtt_broker.kind == "mosquitto" else mqtt.MQTTv311

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    pub.connect(mqtt_broker.host, mqtt_broker.port)
    pub.loop_start()
    pub.publish(topic, b"global model v1", qos=1, retain=True).wait_for_publish(5)

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    sub.on_message = lambda client, userdata, msg: received.put(msg.payload)
    sub.on_connect = lambda client, userdata, flags, rc, props=None: client.subscribe(topic, qos=1)
    sub.connect(mqtt_broker.host, mqtt_broker.port)
    sub.loop_start()
    try:
        assert received.get(timeout=5) == b"global model v1"
    finally:
        for client in (pub, sub):
            client.loop_stop()
            client.disconnect()
