"""What the parts of one edge share: the MQTT link, and the events by which they wake one another.

The parts of an :class:`~edge_client.runtime.EdgeClient` (ingest, model adoption, training,
sending, evaluation, the secure round) each own their state and never reach into another's.
Where one part's change is another's cue (a receipt frees the outbox, so training may go on;
a new model wants evaluating), it sets one of the :class:`Wakes`, and the part that owns the
reaction waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from models.errors import BrokerUnavailable
from models.protocol.topics import Topics
from models.transport.mqtt import MqttSession

__all__ = ["INFERENCE_BUCKETS", "Latencies", "Link", "Wakes", "wait"]

log = logging.getLogger(__name__)

INFERENCE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Upper bounds (seconds) of the live-inference latency histogram: a window takes about a millisecond."""


@dataclass
class Latencies:
    """A histogram of latencies (cumulative counts per bound, their sum), fed by the ingest, read by /metrics."""

    bounds: tuple[float, ...] = INFERENCE_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * len(INFERENCE_BUCKETS))
    count: int = 0
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[i] += 1
        self.count += 1
        self.total += seconds


@dataclass
class Wakes:
    """Events between the parts of one edge; ``stop`` is set once, when the edge stops."""

    train: asyncio.Event = field(default_factory=asyncio.Event)
    evaluate: asyncio.Event = field(default_factory=asyncio.Event)
    status: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def stopping(self) -> bool:
        return self.stop.is_set()


class Link:
    """The edge's topics and, once the edge runs, its MQTT session."""

    def __init__(self, client_id: str, topics: Topics, publish_timeout_s: float) -> None:
        self.client_id, self.topics, self.publish_timeout_s = client_id, topics, publish_timeout_s
        self._session: MqttSession | None = None

    @property
    def session(self) -> MqttSession:
        if self._session is None:
            raise RuntimeError(f"edge {self.client_id!r} is not running")
        return self._session

    @session.setter
    def session(self, session: MqttSession) -> None:
        self._session = session

    @property
    def opened(self) -> MqttSession | None:
        """The session, or None before the edge opened one."""
        return self._session

    async def publish_json(self, topic: str, body: Mapping[str, Any], retain: bool = False) -> bool:
        """Publish ``body`` as JSON with QoS 1; False (logged) when the broker did not take it."""
        try:
            await self.session.publish(topic, json.dumps(body, sort_keys=True).encode(), qos=1, retain=retain,
                                       timeout=self.publish_timeout_s)
        except BrokerUnavailable as exc:
            log.debug("%s: publishing on %s failed (%s)", self.client_id, topic, exc)
            return False
        return True


async def wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds.

    ``asyncio.timeout`` rather than ``asyncio.wait_for``: on Python 3.11 the latter can swallow
    a cancellation that arrives as the event fires, and a stopping edge would hang.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
