"""Test brokers: the launchers of :mod:`wearfl.broker`, re-exported for the fixtures.

``conftest.mqtt_broker`` starts a real Mosquitto on a free loopback port (stopped by PID);
under ``CI=true`` a missing Mosquitto fails the run, elsewhere the in-process amqtt broker
(MQTT 3.1.1 only) stands in.
"""

from __future__ import annotations

from wearfl.broker import EmbeddedBroker, MosquittoBroker, free_port, mosquitto_binary, start_broker

Broker = MosquittoBroker | EmbeddedBroker  # what the fixture yields: .host, .port, .url, .kind, .stop()

__all__ = ["Broker", "EmbeddedBroker", "MosquittoBroker", "free_port", "mosquitto_binary", "start_broker"]
