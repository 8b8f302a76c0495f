"""The hub's incoming messages: read from the session into a bounded queue, taken in batches.

One asyncio task reads the session's messages into a queue of at most ``limit``; the hub's
loop takes them in batches of up to ``limit`` (one intake transaction each). The session
buffers no more than its ``max_buffered`` either: past it the session sheds (drops and acks)
what arrives rather than stop reading, so a burst of updates cannot fill the hub's memory
nor hold up the hub's own acks, and an edge re-sends an update until its receipt comes.
Setting ``stop``, or the session ending, ends the batches.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.transport.mqtt import Message, MqttSession

__all__ = ["Inbox"]


class Inbox:
    """``async with Inbox(session, limit, stop) as inbox``: then ``await inbox.next_batch(timeout)``."""

    def __init__(self, session: MqttSession, limit: int, stop: asyncio.Event) -> None:
        self.session, self.limit, self.stop = session, int(limit), stop
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue(maxsize=self.limit)
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Inbox:
        self._tasks = [asyncio.create_task(self._pump(), name="hub-pump"),
                       asyncio.create_task(self._wake_on_stop(), name="hub-stop")]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def next_batch(self, timeout: float) -> list[Message] | None:
        """Up to ``limit`` messages, waiting at most ``timeout`` s for the first ([] if none came); None: stopped."""
        try:
            first = await asyncio.wait_for(self._queue.get(), max(0.0, timeout))
        except TimeoutError:
            return []
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.limit and not self._queue.empty():
            item = self._queue.get_nowait()
            if item is None:
                self._queue.put_nowait(None)  # the end, for the next call
                break
            batch.append(item)
        return batch

    async def _pump(self) -> None:
        async for message in self.session.messages():
            await self._queue.put(message)
        await self._queue.put(None)

    async def _wake_on_stop(self) -> None:
        await self.stop.wait()
        await self._queue.put(None)
