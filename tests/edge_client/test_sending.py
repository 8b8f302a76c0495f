"""Re-sending: which pending updates go out again, and when."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edge_client.config import EdgeConfig
from edge_client.shared import Link, Wakes
from models.protocol.topics import Topics
from models.transport.outbox import Outbox, OutboxEntry
from models.transport.sender import Sender

INTERVAL = 120.0


class RecordingSession:
    """Takes every publish at once on one live connection, and remembers it."""

    connected = True
    connection = 1

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes, **_: object) -> None:
        self.published.append((topic, payload))


def sender_with_outbox(tmp_path: Path) -> tuple[Sender, Outbox, RecordingSession]:
    config = EdgeConfig("mqtt://127.0.0.1:1", "fed", "edge-a", tmp_path, resend_interval_s=INTERVAL)
    link = Link("edge-a", Topics("fed"), 5.0)
    session = RecordingSession()
    link.session = session  # type: ignore[assignment]
    sender = Sender(config, link, Wakes().stop, {"updates_published": 0}, lambda: [])
    outbox = Outbox(tmp_path)
    sender.open(outbox)
    return sender, outbox, session


def entry(sequence: int, created: float) -> OutboxEntry:
    return OutboxEntry(sequence, 1, b"update", created, 0)


def test_a_fresh_update_not_yet_published_is_not_re_sent(tmp_path):
    sender, outbox, _ = sender_with_outbox(tmp_path)
    now = 1000.0

    due = sender.overdue([entry(1, created=now - 5)], loop_now=50.0, wall_now=now)

    assert due == []
    outbox.close()


def test_an_update_stored_long_ago_and_never_published_here_is_re_sent(tmp_path):
    sender, outbox, _ = sender_with_outbox(tmp_path)
    now = 1000.0

    due = sender.overdue([entry(1, created=now - INTERVAL - 1)], loop_now=50.0, wall_now=now)

    assert [e.sequence for e in due] == [1]
    outbox.close()


def test_a_published_update_is_re_sent_only_after_the_interval_without_a_receipt(tmp_path):
    sender, outbox, session = sender_with_outbox(tmp_path)

    async def publish_once() -> float:
        await sender.send(1, b"update")
        return asyncio.get_running_loop().time()

    sent_at = asyncio.run(publish_once())
    old = entry(1, created=0.0)  # stored long ago: only the publish time counts now

    assert len(session.published) == 1
    assert sender.overdue([old], loop_now=sent_at + INTERVAL / 2, wall_now=1e9) == []
    assert sender.overdue([old], loop_now=sent_at + INTERVAL, wall_now=1e9) == [old]
    outbox.close()
