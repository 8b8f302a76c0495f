"""Test brokers: the launchers of :mod:`wearfl.broker`, re-exported for the fixtures.

``conftest.mqtt_broker`` starts a real Mosquitto on a free loopback port (stopped by PID);
under ``CI=true`` a missing Mosquitto fails the run, elsewhere the in-process amqtt broker
(MQTT 3.1.1 only) stands in.
"""

from __future__ import annotations

from pathlib import Path

from wearfl.broker import EmbeddedBroker, MosquittoBroker, free_port, mosquitto_binary, start_broker

Broker = MosquittoBroker | EmbeddedBroker  # what the fixture yields: .host, .port, .url, .kind, .stop()

__all__ = ["Broker", "EmbeddedBroker", "MosquittoBroker", "free_port", "mosquitto_binary", "mosquittos_under",
           "start_broker"]


def mosquittos_under(folder: Path) -> list[int]:
    """PIDs of the ``mosquitto`` processes whose command line names a path in ``folder``: a run's own broker."""
    needle = str(folder).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if argv[0].endswith(b"mosquitto") and any(needle in arg for arg in argv[1:]):
            pids.append(int(entry.name))
    return pids
