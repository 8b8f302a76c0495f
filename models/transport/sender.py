"""Sending: the outbox, publishing updates, re-sending them, and the hub's receipts.

A signed update is stored in the :class:`~models.transport.outbox.Outbox` *first* and then
published with QoS 1 (:meth:`Sender.send`). It is removed from the outbox only on a final
receipt that the pinned hub key signed, for this federation and for exactly these bytes (its
SHA-256): a forged or replayed receipt must not empty the outbox (:meth:`Sender.on_receipt`).
Everything pending is re-published after each (re)connect
(:meth:`Sender.connection_loop`) and every ``resend_interval_s`` (:meth:`Sender.resend_loop`);
the hub deduplicates by (client, sequence), so re-sending is always safe. While the outbox
is full, training pauses (:attr:`Sender.full`) until receipts free it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from models.errors import BrokerUnavailable
from models.files import StorageError
from models.protocol.messages import Receipt
from models.protocol.signed import SigningError
from models.transport.link import Link
from models.transport.mqtt import Message
from models.transport.outbox import Outbox, OutboxEntry, OutboxFull, OutboxStats

__all__ = ["Sender", "SenderSettings"]

log = logging.getLogger(__name__)


class SenderSettings(Protocol):
    """What a sender reads of its owner's configuration (an edge's, or a site hub's upstream link)."""

    @property
    def client_id(self) -> str: ...

    @property
    def federation(self) -> str: ...

    @property
    def publish_timeout_s(self) -> float: ...

    @property
    def resend_interval_s(self) -> float: ...


class Sender:
    """Owns the outbox and every copy of an update on its way to the hub.

    ``signers()`` gives the keys a receipt may be signed by (empty: no hub key pinned yet);
    ``on_freed`` runs when a receipt removed an update (room in the outbox, news for the status).
    Used by an edge, and by a site hub for its partials to the consortium.
    """

    def __init__(self, config: SenderSettings, link: Link, stop: asyncio.Event, counters: dict[str, int],
                 signers: Callable[[], list[bytes]], on_freed: Callable[[], None] | None = None) -> None:
        self.config, self.client_id = config, config.client_id
        self._link, self._stop, self._counters, self._signers = link, stop, counters, signers
        self._on_freed = on_freed
        self.outbox: Outbox | None = None
        self.stats: OutboxStats | None = None
        self._last_sent: dict[int, float] = {}  # sequence -> loop time it was last published
        self._sending: set[int] = set()  # sequences whose publish is in flight
        self._sent_on: dict[int, int] = {}  # sequence -> the connection that acknowledged it

    def open(self, outbox: Outbox) -> None:
        """(worker thread) Take the outbox of the state directory."""
        self.outbox = outbox
        self.stats = outbox.stats()
        if self.stats.entries:
            log.info("%s: %d update(s) pending in the outbox from before the restart", self.client_id,
                     self.stats.entries)

    @property
    def full(self) -> bool:
        return self.stats is not None and self.stats.full

    def _outbox(self) -> Outbox:
        if self.outbox is None:
            raise RuntimeError(f"edge {self.client_id!r} is not running")
        return self.outbox

    async def store(self, round_number: int, build: Callable[[int], bytes],
                    state: Mapping[str, bytes]) -> tuple[int, bytes] | None:
        """Add an update (``build(sequence)`` makes its bytes) in one transaction with ``state``.

        Returns (sequence, payload), or None when the outbox is full (nothing was written).
        """
        outbox = self._outbox()
        built: list[bytes] = []

        def build_kept(sequence: int) -> bytes:
            built.append(build(sequence))
            return built[-1]

        try:
            sequence = await asyncio.to_thread(outbox.add, round_number, build_kept, state=state)
        except OutboxFull as exc:
            log.warning("%s: %s", self.client_id, exc)
            return None
        self.stats = await asyncio.to_thread(outbox.stats)
        return sequence, built[-1]

    async def send(self, sequence: int, payload: bytes, again: bool = False) -> bool:
        """Publish one update (QoS 1); it stays in the outbox whatever happens here.

        Once per connection: a copy already on its way, or acknowledged on the current
        connection, is not sent again unless ``again`` (the periodic re-send).
        """
        session = self._link.session
        if sequence in self._sending or (not again and self._sent_on.get(sequence) == session.connection):
            return True
        self._sending.add(sequence)
        self._last_sent[sequence] = asyncio.get_running_loop().time()
        try:
            await session.publish(self._link.topics.update(self.client_id), payload, qos=1,
                                  timeout=self.config.publish_timeout_s)
        except BrokerUnavailable as exc:
            log.info("%s: update %d not acknowledged by the broker yet (%s); it stays in the outbox",
                     self.client_id, sequence, exc)
            return False
        finally:
            self._sending.discard(sequence)
        self._sent_on[sequence] = session.connection
        self._counters["updates_published"] += 1
        try:
            await asyncio.to_thread(self._outbox().mark_published, sequence)
        except StorageError as exc:  # only a count for status and logs: a full disk stops the edge elsewhere
            log.warning("%s: %s", self.client_id, exc)
        log.debug("%s: update %d published", self.client_id, sequence)
        return True

    async def republish_pending(self, again: bool = False) -> None:
        outbox = self._outbox()
        if self.stats is not None and self.stats.entries == 0:
            return
        pending = await asyncio.to_thread(outbox.pending)
        if pending:
            log.info("%s: re-publishing %d pending update(s)", self.client_id, len(pending))
        for entry in pending:
            if self._stop.is_set() or not await self.send(entry.sequence, entry.payload, again):
                return  # the connection dropped again: the next connection starts over

    async def connection_loop(self, poll_s: float, on_connect: Callable[[], Awaitable[None]]) -> None:
        """After every (re)connect: ``on_connect`` (status online), then every pending update again."""
        session = self._link.session
        while not self._stop.is_set():
            await session.connected_event.wait()
            connection = session.connection
            await on_connect()
            await self.republish_pending()
            while session.connected and session.connection == connection:
                await asyncio.sleep(poll_s)

    async def resend_loop(self) -> None:
        """Pending updates without a receipt for ``resend_interval_s`` are published again (the hub dedups)."""
        interval = self.config.resend_interval_s
        if interval <= 0:
            return
        loop = asyncio.get_running_loop()
        session = self._link.session
        while not self._stop.is_set():
            await asyncio.sleep(max(1.0, interval / 4))
            if not session.connected or self.stats is None or self.stats.entries == 0:
                continue
            pending = await asyncio.to_thread(self._outbox().pending)
            for entry in self.overdue(pending, loop.time(), time.time()):
                if self._stop.is_set() or not await self.send(entry.sequence, entry.payload, again=True):
                    break

    def overdue(self, pending: Sequence[OutboxEntry], loop_now: float, wall_now: float) -> list[OutboxEntry]:
        """The pending updates due again: published ``resend_interval_s`` ago (loop time), or stored that long
        ago (wall time) and not published by this process.

        A fresh update is the training part's to publish once its round's metrics are out: counting
        "never published" as overdue sent it during that evaluation, and once more after its receipt.
        """
        interval = self.config.resend_interval_s
        due = []
        for entry in pending:
            sent = self._last_sent.get(entry.sequence)
            age = loop_now - sent if sent is not None else wall_now - entry.created
            if age >= interval:
                due.append(entry)
        return due

    async def on_receipt(self, message: Message) -> None:
        try:
            receipt = Receipt.from_bytes(message.payload)
        except SigningError as exc:
            log.warning("%s: ignoring a malformed receipt (%s)", self.client_id, exc)
            return
        if receipt.client != self.client_id:
            log.warning("%s: ignoring a receipt addressed to %r", self.client_id, receipt.client)
            return
        signers = self._signers()
        if not any(receipt.verify(key) for key in signers):
            log.warning("%s: ignoring a receipt for update %d that the hub did not sign%s", self.client_id,
                        receipt.sequence, "" if signers else " (no hub key is pinned yet)")
            return
        if receipt.federation != self.config.federation:
            log.warning("%s: ignoring a receipt of federation %r", self.client_id, receipt.federation)
            return
        if not receipt.final:
            return
        outbox = self._outbox()
        entry = await asyncio.to_thread(outbox.get_entry, receipt.sequence)
        if entry is not None and receipt.digest != hashlib.sha256(entry.payload).hexdigest():
            log.warning("%s: ignoring a receipt for sequence %d that answers other bytes than the pending update",
                        self.client_id, receipt.sequence)
            return
        removed = await asyncio.to_thread(outbox.remove, receipt.sequence)
        self._last_sent.pop(receipt.sequence, None)
        self._sent_on.pop(receipt.sequence, None)
        self.stats = await asyncio.to_thread(outbox.stats)
        self._counters[f"receipts_{receipt.status}"] = self._counters.get(f"receipts_{receipt.status}", 0) + 1
        if receipt.status == "rejected" and receipt.reason == "replayed":
            # a re-send after its round closed (the first receipt was lost): the hub holds that sequence number
            log.info("%s: the hub already holds sequence %d (%s)", self.client_id, receipt.sequence, receipt.detail)
        elif receipt.status == "rejected":
            log.warning("%s: the hub rejected update %d (round %s): %s%s", self.client_id, receipt.sequence,
                        receipt.round, receipt.reason, f" ({receipt.detail})" if receipt.detail else "")
        else:
            log.info("%s: update %d %s by the hub%s", self.client_id, receipt.sequence, receipt.status,
                     "" if removed else " (already gone from the outbox)")
        if self._on_freed is not None:
            self._on_freed()
