"""A session whose consumer is behind sheds deliveries instead of pausing its reads (issue 20).

A flood of publishes to a hub's subscription used to make its session stop reading the
socket; the PUBACKs and SUBACKs of the hub's own publishes and subscriptions then sat unread
behind the flood and the hub died. Now reading never stops: past ``max_buffered`` /
``max_buffered_bytes`` a message is dropped (counted in ``shed``, acked at once on a
manual-ack session), and ``max_packet_size_in`` keeps large packets away. Everything crosses
a real Mosquitto; no test asserts on timing: every wait is bounded and a timeout is a failure.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from waiting import until

from models.errors import ConfigError
from models.transport.mqtt import BrokerAddress, Message, MqttSession

T = TypeVar("T")
WAIT_S = 10.0
ACK_S = 5.0  # publish/subscribe under a flood: before the fix these waited for acks that were never read


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def uid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def session(broker: Any, client_id: str, **options: Any) -> MqttSession:
    options.setdefault("protocol", broker.protocol)
    return MqttSession(BrokerAddress.parse(broker.url), client_id, **options)


def needs_mosquitto(broker: Any) -> None:
    if broker.kind != "mosquitto":
        pytest.skip("needs Mosquitto (MQTT 5, persistent sessions that queue QoS 1 messages)")


async def burst(sender: MqttSession, topic: str, n: int, size: int = 1) -> None:
    """``n`` QoS 1 messages, all in flight at once as far as paho allows; returns when every one is PUBACKed."""
    await asyncio.gather(*(sender.publish(topic, str(i).encode().ljust(size, b".")) for i in range(n)))


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def capture(name: str) -> tuple[logging.Logger, Records]:
    logger = logging.getLogger(f"test.shedding.{name}")
    logger.setLevel(logging.DEBUG)
    records = Records()
    logger.addHandler(records)
    return logger, records


# -- the flood ---------------------------------------------------------------------------------


def test_a_flooded_session_keeps_publishing_and_subscribing_and_sheds_the_excess(mqtt_broker, topic_prefix) -> None:
    needs_mosquitto(mqtt_broker)
    bound, sent = 10, 2000
    topic, hub_id = f"{topic_prefix}/update/junk", uid("hub")
    logger, records = capture(hub_id)

    async def scenario() -> dict[str, Any]:
        attacker = session(mqtt_broker, uid("attacker"), clean_start=True, max_inflight=100)
        hub = session(mqtt_broker, hub_id, manual_ack=True, clean_start=True, session_expiry_s=60,
                      max_buffered=bound, logger=logger)
        await asyncio.gather(attacker.connect(), hub.connect())
        await hub.subscribe(topic)
        most = 0

        def watch() -> int:
            nonlocal most
            most = max(most, hub.buffered)
            return hub.shed

        flood = asyncio.create_task(burst(attacker, topic, sent))
        await until(watch, "the hub to shed a message", WAIT_S)
        # nobody consumes, the buffer is full: the hub's own acks must still come through
        await hub.publish(f"{topic_prefix}/model", b"round 1 model", qos=1, timeout=ACK_S)
        await hub.subscribe(f"{topic_prefix}/status/+", timeout=ACK_S)
        await asyncio.wait_for(flood, WAIT_S)
        # every message reached the hub: kept (unacked, in the broker's inflight window) or shed (acked)
        await until(lambda: watch() + hub.buffered == sent, lambda: f"all {sent} messages at the hub "
                    f"(shed {hub.shed}, buffered {hub.buffered})", WAIT_S)
        kept_before = hub.buffered

        received: list[Message] = []
        stream = hub.messages()
        while len(received) < kept_before:  # the consumer catches up
            received.append(await asyncio.wait_for(anext(stream), WAIT_S))
            hub.ack(received[-1])
        await attacker.publish(topic, b"marker", qos=1)  # the broker still delivers: nothing stalled it
        marker = await asyncio.wait_for(anext(stream), WAIT_S)
        hub.ack(marker)
        shed = hub.shed
        # the broker handles a session's packets in order: once this PUBACK is back it has every ack before it.
        # Without it a loaded broker could still hold the last acks unread when the socket closed (the full
        # suite saw "0", the first kept message, delivered again on resuming)
        await hub.publish(f"{topic_prefix}/barrier", b"", qos=1, timeout=ACK_S)
        await hub.disconnect()
        lines = [r for r in records.records if r.levelno == logging.WARNING and "shed" in r.msg]

        # the same session again: had a shed message gone unacked, the broker would redeliver it first
        hub = session(mqtt_broker, hub_id, manual_ack=True, session_expiry_s=0, max_buffered=bound)
        await hub.connect()
        resumed = hub.session_present
        await attacker.publish(topic, b"after", qos=1)
        after = await asyncio.wait_for(anext(hub.messages()), WAIT_S)
        await asyncio.gather(attacker.disconnect(), hub.disconnect())
        return dict(most=most, kept=[m.payload for m in received], marker=marker.payload, shed=shed,
                    lines=lines, resumed=resumed, after=after.payload)

    result = run(scenario())

    assert result["most"] <= bound
    assert result["kept"] == [str(i).encode() for i in range(bound)]  # the first ones, in order
    assert result["shed"] == sent - bound
    assert result["marker"] == b"marker"
    assert result["resumed"]
    assert result["after"] == b"after"  # every shed message was acknowledged
    # a line for the first shed message, then summaries (one at the latest at disconnect) covering the rest
    first, *summaries = result["lines"]
    assert first.msg.startswith("%s: shed a message") and first.levelno == logging.WARNING
    assert summaries and all("the consumer is behind" in (s.msg % s.args) for s in summaries)
    assert 1 + sum(s.args[1] for s in summaries) == result["shed"]
    assert len(result["lines"]) < 10  # never a line per message


def test_the_byte_bound_sheds_large_payloads(mqtt_broker, topic_prefix) -> None:
    topic, size, sent = f"{topic_prefix}/update/big", 100_000, 10
    bound = 250_000  # reached by the third message: three are kept, the rest shed

    async def scenario() -> tuple[int, int, int, int, list[bytes], int]:
        sender = session(mqtt_broker, uid("edge"), clean_start=True)
        hub = session(mqtt_broker, uid("hub"), clean_start=True, max_buffered_bytes=bound)  # auto-ack
        await asyncio.gather(sender.connect(), hub.connect())
        await hub.subscribe(topic)
        most = 0

        def arrived() -> int:
            nonlocal most
            most = max(most, hub.buffered_bytes)
            return hub.shed + hub.buffered

        await burst(sender, topic, sent, size)
        await until(lambda: arrived() == sent, lambda: f"{sent} messages at the hub (got {arrived()})", WAIT_S)
        kept, held, shed = hub.buffered, hub.buffered_bytes, hub.shed
        stream = hub.messages()
        payloads = [(await asyncio.wait_for(anext(stream), WAIT_S)).payload for _ in range(kept)]
        left = hub.buffered_bytes
        await asyncio.gather(sender.disconnect(), hub.disconnect())
        return kept, held, shed, most, payloads, left

    kept, held, shed, most, payloads, left = run(scenario())

    assert (kept, shed) == (3, sent - 3)
    assert held == 3 * size and most <= bound + size
    assert [p[:1] for p in payloads] == [b"0", b"1", b"2"] and all(len(p) == size for p in payloads)
    assert left == 0  # taking a message gives its bytes back


# -- large packets -----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_packet_over_max_packet_size_in_never_reaches_the_consumer(mqtt_broker, topic_prefix, protocol) -> None:
    needs_mosquitto(mqtt_broker)
    topic, client_id = f"{topic_prefix}/model", uid("edge")

    async def scenario() -> tuple[bytes, int, bytes]:
        hub = session(mqtt_broker, uid("hub"), clean_start=True)
        edge = session(mqtt_broker, client_id, protocol=protocol, session_expiry_s=60,
                       manual_ack=True, max_packet_size_in=1024)
        await asyncio.gather(hub.connect(), edge.connect())
        await edge.subscribe(topic)
        await hub.publish(topic, b"x" * 100_000)
        await hub.publish(topic, b"small")
        message = await asyncio.wait_for(anext(edge.messages()), WAIT_S)
        edge.ack(message)
        shed = edge.shed
        await edge.disconnect()
        # had the big one stayed unacked (3.1.1 sheds it locally), the broker would redeliver it first
        edge = session(mqtt_broker, client_id, protocol=protocol, session_expiry_s=0, manual_ack=True,
                       max_packet_size_in=1024)
        await edge.connect()
        await hub.publish(topic, b"after")
        after = await asyncio.wait_for(anext(edge.messages()), WAIT_S)
        edge.ack(after)
        await asyncio.gather(hub.disconnect(), edge.disconnect())
        return message.payload, shed, after.payload

    payload, shed, after = run(scenario())

    assert payload == b"small"
    assert shed == (0 if protocol == "5" else 1)  # MQTT 5: the broker dropped it; 3.1.1: the session did
    assert after == b"after"


# -- reconnecting ------------------------------------------------------------------------------


def test_a_session_resumed_against_a_backlog_can_subscribe_and_publish(mqtt_broker, topic_prefix) -> None:
    needs_mosquitto(mqtt_broker)
    topic, hub_id, backlog = f"{topic_prefix}/update/edge", uid("hub"), 5000

    async def scenario() -> tuple[bool, int, int]:
        options = dict(manual_ack=True, max_buffered=100)
        hub = session(mqtt_broker, hub_id, clean_start=True, session_expiry_s=60, **options)
        edge = session(mqtt_broker, uid("edge"), clean_start=True, max_inflight=100)
        await asyncio.gather(hub.connect(), edge.connect())
        await hub.subscribe(topic)
        await hub.disconnect()
        await burst(edge, topic, backlog)  # queued by the broker for the absent hub

        hub = session(mqtt_broker, hub_id, session_expiry_s=0, **options)
        await hub.connect()
        resumed = hub.session_present
        # the backlog pours in on connect; the SUBACK and PUBACK must get through it
        await hub.subscribe(f"{topic_prefix}/status/+", timeout=ACK_S)
        await hub.publish(f"{topic_prefix}/model", b"model", qos=1, timeout=ACK_S)
        buffered = hub.buffered
        first = await asyncio.wait_for(anext(hub.messages()), WAIT_S)
        hub.ack(first)
        await asyncio.gather(edge.disconnect(), hub.disconnect())
        return resumed, buffered, int(first.payload)

    resumed, buffered, first = run(scenario())

    assert resumed
    assert buffered <= 100
    assert first == 0


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options", [{"max_buffered": -1}, {"max_buffered_bytes": -1}, {"max_packet_size_in": 0}, {"max_packet_size_in": -5}]
)
def test_unusable_bounds_are_refused(options: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        MqttSession(BrokerAddress("127.0.0.1"), "hub", **options)


def test_a_new_session_has_shed_nothing() -> None:
    fresh = MqttSession(BrokerAddress("127.0.0.1"), "hub", max_buffered=1, max_buffered_bytes=10, max_packet_size_in=64)

    assert (fresh.shed, fresh.buffered, fresh.buffered_bytes) == (0, 0, 0)


def test_the_broker_sends_no_more_unacknowledged_messages_than_the_receive_maximum(mqtt_broker):
    needs_mosquitto(mqtt_broker)
    topic = f"wearfl-test/{uid('recvmax')}"

    async def scenario() -> tuple[int, int]:
        slow = session(mqtt_broker, uid("slow"), manual_ack=True, clean_start=True, receive_maximum=5)
        sender = session(mqtt_broker, uid("sender"), clean_start=True)
        await slow.connect(timeout=WAIT_S)
        await sender.connect(timeout=WAIT_S)
        await slow.subscribe(topic)
        await burst(sender, topic, 50)
        await until(lambda: slow.buffered >= 5, "the first five deliveries", WAIT_S)
        await asyncio.sleep(0.5)  # the broker's chance to send more than it may (it must not)
        held = slow.buffered
        received = 0
        async for message in slow.messages():  # acking one lets the broker send one more
            slow.ack(message)
            received += 1
            if received == 50:
                break
        await sender.disconnect()
        await slow.disconnect()
        return held, received

    held, received = run(scenario())
    assert held == 5 and received == 50
