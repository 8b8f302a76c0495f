"""What the hub sends: signed receipts, the retained model and task, secure-round messages.

Receipts go out once the intake batch they answer has committed, signed with the hub's
key, a few in flight at once.

The model (signed, retained) and then the task that points at it are published under one
lock, and composed only once the lock is held: two announcements (a round's close and a
reconnect's) never interleave, and neither goes out stale. After every reconnect both go
out again (:meth:`Publisher.reannouncing`): a broker that restarted may have lost them,
and the hub's subscription with whatever edges sent meanwhile (they re-send on hearing
the task). Sends nothing waits for run as background tasks, which :meth:`Publisher.drain`
waits for when the hub stops.

Anyone who can publish on ``model`` or ``task`` can replace what the broker retains there.
Edges ignore what the hub did not sign, but an edge that connects later would find nothing
usable; so the hub reads both topics and, when the retained copy is not what it published,
publishes its own again (:meth:`Publisher.check_retained`, at most every :data:`RESTORE_SPACING_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from models.errors import BrokerUnavailable, SigningError
from models.protocol.messages import MAX_MODEL_BYTES, Task
from models.protocol.signed import public_key_bytes, verify_and_parse

if TYPE_CHECKING:
    from models.protocol.ed25519 import Ed25519PrivateKey
    from models.protocol.messages import Receipt
    from models.protocol.topics import Topics
    from models.transport.mqtt import MqttSession

__all__ = ["RECEIPTS_IN_FLIGHT", "RECONNECT_POLL_S", "RESTORE_SPACING_S", "Announcement", "Publisher"]

log = logging.getLogger(__name__)

RECEIPTS_IN_FLIGHT = 32
RECONNECT_POLL_S = 0.5
RESTORE_SPACING_S = 10.0


@dataclass(frozen=True)
class Announcement:
    """A model message for round ``round`` (model ``version``) and the task that follows it (None: none)."""

    model: bytes
    version: int
    round: int
    task: bytes | None = None


class Publisher:
    """The hub's outgoing messages over ``session``, signed with ``key`` where the protocol signs them."""

    def __init__(self, session: MqttSession, topics: Topics, key: Ed25519PrivateKey) -> None:
        self.session, self.topics, self.key = session, topics, key
        self._receipt_slots = asyncio.Semaphore(RECEIPTS_IN_FLIGHT)
        self._announcing = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self._retained: dict[str, bytes] = {}  # topic -> what this hub last published there, retained
        self._restored_at = -RESTORE_SPACING_S
        self._restoring: asyncio.Task[None] | None = None
        self._restore_again = False

    # -- background sends -----------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background (kept until it is done, drained at the stop)."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the background sends; cancel what is left."""
        if self._background:
            _, pending = await asyncio.wait(set(self._background), timeout=timeout)
            for task in pending:
                task.cancel()

    # -- messages -------------------------------------------------------------------

    def receipts(self, receipts: Sequence[Receipt]) -> None:
        """Send the receipts of a committed batch, signed, in the background."""
        if receipts:
            self.spawn(self._send_receipts(receipts))

    async def _send_receipts(self, receipts: Sequence[Receipt]) -> None:
        async def publish(receipt: Receipt) -> None:
            async with self._receipt_slots:
                await self.session.publish(self.topics.receipt(receipt.client), receipt.signed(self.key).to_bytes(),
                                           qos=1)

        results = await asyncio.gather(*(publish(r) for r in receipts), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.warning("%d of %d receipts were not confirmed by the broker: %s", len(failed), len(receipts), failed[0])

    def secagg(self, outgoing: Mapping[str, bytes]) -> None:
        """A secure round's messages to its clients (``secagg-to/<client>``), in the background."""
        for client, payload in outgoing.items():
            self.spawn(self.session.publish(self.topics.secagg_down(client), payload, qos=1))

    async def task(self, task: Task) -> None:
        """Publish ``task`` (retained) on its own: the round's model is out already."""
        await self._retain(self.topics.task, task.to_bytes())

    async def grant(self, payload: bytes) -> None:
        """Publish the consortium's grant for this site hub's key (retained): its gateways believe its tasks."""
        await self._retain(self.topics.grant, payload)

    async def _retain(self, topic: str, payload: bytes) -> None:
        self._retained[topic] = payload
        await self.session.publish(topic, payload, qos=1, retain=True)

    def check_retained(self, topic: str, payload: bytes) -> None:
        """A message seen on ``model`` or ``task``: when it is not this hub's, publish the hub's own again."""
        ours = self._retained.get(topic)
        if ours is None or payload == ours:
            return
        if self._signed_by_us(topic, payload):  # an older copy of ours (one the broker queued while we were away)
            log.debug("an older %s of this hub's on %s: publishing the current one again", topic, topic)
        else:
            log.warning("a message on %s that this hub did not publish (%d bytes): publishing the hub's own again",
                        topic, len(payload))
        if self._restoring is not None and not self._restoring.done():
            self._restore_again = True  # once more after the spacing: it may have come after our restore
            return
        self._restoring = asyncio.create_task(self._restore())
        self._background.add(self._restoring)
        self._restoring.add_done_callback(self._background.discard)

    def _signed_by_us(self, topic: str, payload: bytes) -> bool:
        own = public_key_bytes(self.key)
        try:
            if topic == self.topics.task:
                return Task.from_bytes(payload).verify(own)
            verify_and_parse(payload, MAX_MODEL_BYTES, own)
        except SigningError:
            return False
        return True

    async def _restore(self) -> None:
        while True:
            await asyncio.sleep(max(0.0, self._restored_at + RESTORE_SPACING_S - time.monotonic()))
            self._restore_again = False
            self._restored_at = time.monotonic()
            async with self._announcing:
                for topic in (self.topics.model, self.topics.task):  # the model first: the task points at it
                    if topic in self._retained:
                        with contextlib.suppress(BrokerUnavailable):
                            await self.session.publish(topic, self._retained[topic], qos=1, retain=True)
            if not self._restore_again:
                return

    async def announce(self, compose: Callable[[], Announcement | None]) -> None:
        """Publish the model (retained) and then its task, as ``compose`` makes them once no other announcement runs."""
        async with self._announcing:
            announcement = compose()
            if announcement is None:
                return
            await self._retain(self.topics.model, announcement.model)
            if announcement.task is not None:
                await self._retain(self.topics.task, announcement.task)
                log.info("published model v%d (%d bytes) and the task for round %d", announcement.version,
                         len(announcement.model), announcement.round)
            else:
                log.info("published the final model v%d (%d bytes)", announcement.version, len(announcement.model))

    @contextlib.asynccontextmanager
    async def reannouncing(self, announce: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
        """While inside, ``announce()`` runs again after every reconnect of the session."""
        watcher = asyncio.create_task(self._watch_reconnects(announce), name="hub-reannounce")
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch_reconnects(self, announce: Callable[[], Awaitable[None]]) -> None:
        session = self.session
        connection = session.connection
        while True:
            await asyncio.sleep(RECONNECT_POLL_S)
            if not session.connected or session.connection == connection:
                continue
            connection = session.connection
            log.info("reconnected to the broker; publishing the model and task again")
            with contextlib.suppress(BrokerUnavailable):
                await announce()
