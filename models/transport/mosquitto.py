"""The Mosquitto settings every config wearfl writes or documents shares: queue and packet limits.

Mosquitto's defaults drop QoS 1 messages silently past 1000 queued for one client, which a
hub catching up after a restart hits at once; so every config raises
``max_queued_messages`` and caps ``max_queued_bytes``. ``max_packet_size`` is used instead
of ``message_size_limit`` (which Mosquitto 2.0 itself deprecates): the broker announces it
to MQTT 5 clients in CONNACK and :class:`~models.transport.mqtt.MqttSession` refuses an
oversized publish before sending it. Under ``message_size_limit`` Mosquitto 2.0.11 answers
an oversized QoS 1 message with a PUBACK reason code paho 2.2 cannot parse; paho drops the
connection and re-sends the same message after every reconnect, forever.

Used by ``wearfl keys broker-config`` (:mod:`hub.keys`) and the laptop/test launcher
(:mod:`wearfl.broker`); ``scripts/deploy/mosquitto.conf`` holds the same values (a test
checks it).
"""

from __future__ import annotations

from models.errors import ConfigError

__all__ = ["MAX_INFLIGHT_MESSAGES", "MAX_PACKET_BYTES", "MAX_QUEUED_BYTES", "MAX_QUEUED_MESSAGES", "limit_lines"]

MAX_QUEUED_MESSAGES = 100_000
MAX_QUEUED_BYTES = 256 * 1024 * 1024
MAX_INFLIGHT_MESSAGES = 100
MAX_PACKET_BYTES = 16 * 1024 * 1024  # a whole MQTT packet; a model package is far smaller


def limit_lines(
    *,
    max_packet_size: int = MAX_PACKET_BYTES,
    max_queued_messages: int = MAX_QUEUED_MESSAGES,
    max_queued_bytes: int = MAX_QUEUED_BYTES,
    max_inflight_messages: int = MAX_INFLIGHT_MESSAGES,
) -> list[str]:
    """The ``mosquitto.conf`` lines for the limits (``max_packet_size`` 0: MQTT's own 256 MiB bound)."""
    if (
        not (max_packet_size == 0 or max_packet_size >= 20)
        or max_queued_messages < 1
        or max_queued_bytes < 0
        or max_inflight_messages < 0
    ):
        raise ConfigError("broker limits must be non-negative, max_packet_size 0 or at least 20 bytes.")
    lines = [
        "max_connections -1",
        f"max_queued_messages {max_queued_messages}",
        f"max_queued_bytes {max_queued_bytes}",
        f"max_inflight_messages {max_inflight_messages}",
    ]
    if max_packet_size:
        lines.append(f"max_packet_size {max_packet_size}")
    return lines
