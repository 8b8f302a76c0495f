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
import logging
from dataclasses import dataclass, field

from models.transport.link import Link

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


async def wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds.

    ``asyncio.timeout`` rather than ``asyncio.wait_for``: on Python 3.11 the latter can swallow
    a cancellation that arrives as the event fires, and a stopping edge would hang.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
