"""The MQTT transport against a real broker: delivery, shared intake, acks, wills, scale, reconnects.

Everything crosses a real Mosquitto (the ``mqtt_broker`` fixture, or a broker a test starts
itself); only the MQTT 3.1.1 fallback test uses the embedded amqtt broker on purpose. No test
asserts on timing: every wait is bounded and a timeout is a failure.
"""

from __future__ import annotations

import asyncio
import resource
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from waiting import until

from models.errors import BrokerUnavailable, ConfigError
from models.transport.mqtt import BrokerAddress, Message, MqttSession, Will
from wearfl.broker import EmbeddedBroker, MosquittoBroker, free_port, mosquitto_binary

T = TypeVar("T")
WAIT_S = 10.0


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run one test coroutine on a fresh loop, bounded as a whole."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def next_message(session: MqttSession, timeout: float = WAIT_S) -> Message:
    return await asyncio.wait_for(anext(session.messages()), timeout)


def uid(name: str) -> str:
    """A client id of this test's own: persistent sessions on the shared broker never collide."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def session(broker: Any, client_id: str, **options: Any) -> MqttSession:
    """A session on ``broker`` in the MQTT version it speaks (no protocol probing in the tests)."""
    return MqttSession(BrokerAddress.parse(broker.url), client_id, protocol=broker.protocol, **options)


async def closing(*sessions: MqttSession) -> None:
    await asyncio.gather(*(s.disconnect() for s in sessions))


def needs_mqtt5(broker: Any) -> None:
    if broker.kind != "mosquitto":
        pytest.skip("needs MQTT 5 (shared subscriptions / session expiry); the amqtt fallback speaks 3.1.1")


# -- addresses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1884", BrokerAddress("127.0.0.1", 1884)),
        ("127.0.0.1:1884", BrokerAddress("127.0.0.1", 1884)),
        ("broker.local", BrokerAddress("broker.local", 1883)),
        ("mqtts://broker.example", BrokerAddress("broker.example", 8883, tls=True)),
        ("mqtt://hub:s%40cret@[::1]:1883", BrokerAddress("::1", 1883, "hub", "s@cret")),
    ],
)
def test_broker_address_parses_the_usual_forms(url: str, expected: BrokerAddress) -> None:
    address = BrokerAddress.parse(url)

    assert address == expected
    assert address.password == expected.password


@pytest.mark.parametrize(
    "url", ["", "   ", "http://127.0.0.1:1883", "mqtt://:1883", "mqtt://host:99999", "mqtt://host:port", "mqtt://h/x"]
)
def test_broker_address_rejects_unusable_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        BrokerAddress.parse(url)


def test_connect_to_a_closed_port_raises_broker_unavailable() -> None:
    nobody = MqttSession(BrokerAddress("127.0.0.1", free_port()), uid("nobody"))

    with pytest.raises(BrokerUnavailable) as caught:
        run(nobody.connect(timeout=1.0))

    assert caught.value.url == nobody.address.url


# -- delivery ----------------------------------------------------------------------------------


def test_qos1_round_trip_and_retained_message(mqtt_broker, topic_prefix) -> None:

    async def scenario() -> list[Message]:
        hub = session(mqtt_broker, uid("hub"), clean_start=True)
        edge = session(mqtt_broker, uid("edge"), clean_start=True)
        await asyncio.gather(hub.connect(), edge.connect())
        await hub.publish(f"{topic_prefix}/model", b"global v1", qos=1, retain=True)  # before anyone listens
        await edge.subscribe(f"{topic_prefix}/#", qos=1)
        retained = await next_message(edge)
        await hub.publish(f"{topic_prefix}/task", b"round 1", qos=1)
        live = await next_message(edge)
        await hub.publish(f"{topic_prefix}/model", b"", qos=1, retain=True)  # clear the retained message
        await closing(hub, edge)
        return [retained, live]

    retained, live = run(scenario())

    assert (retained.topic, retained.payload, retained.qos, retained.retain) == (
        f"{topic_prefix}/model",
        b"global v1",
        1,
        True,
    )
    assert (live.topic, live.payload, live.qos, live.retain) == (f"{topic_prefix}/task", b"round 1", 1, False)


def test_shared_subscription_splits_messages_between_hub_workers(mqtt_broker, topic_prefix) -> None:
    needs_mqtt5(mqtt_broker)
    n = 20

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        workers = [session(mqtt_broker, uid(f"hub{i}"), clean_start=True, session_expiry_s=0) for i in range(2)]
        edge = session(mqtt_broker, uid("edge"), clean_start=True)
        await asyncio.gather(edge.connect(), *(w.connect() for w in workers))
        for worker in workers:
            await worker.subscribe(f"$share/hub/{topic_prefix}/update/+")
        for i in range(n):
            await edge.publish(f"{topic_prefix}/update/edge", str(i).encode())
        received: list[list[bytes]] = [[], []]
        all_in = asyncio.Event()

        async def drain(k: int) -> None:
            async for message in workers[k].messages():
                received[k].append(message.payload)
                if len(received[0]) + len(received[1]) >= n:
                    all_in.set()

        drains = [asyncio.create_task(drain(k)) for k in range(2)]
        await asyncio.wait_for(all_in.wait(), WAIT_S)
        await closing(edge, *workers)  # ends both iterators
        await asyncio.gather(*drains)
        return received[0], received[1]

    first, second = run(scenario())

    assert sorted(first + second, key=int) == [str(i).encode() for i in range(n)]  # each exactly once
    assert first and second  # and both workers took part


def test_unacked_message_is_redelivered_to_the_resumed_session(mqtt_broker, topic_prefix) -> None:
    if mqtt_broker.kind != "mosquitto":
        pytest.skip("amqtt 0.12 resumes the session but delivers neither in-flight nor queued QoS 1 messages")
    hub_id = uid("hub")
    topic = f"{topic_prefix}/update/edge-1"

    async def scenario() -> tuple[Message, Message, Message, bool]:
        edge = session(mqtt_broker, uid("edge"), clean_start=True)
        hub = session(mqtt_broker, hub_id, manual_ack=True)
        await asyncio.gather(edge.connect(), hub.connect())
        await hub.subscribe(topic)
        await edge.publish(topic, b"update 1")
        first = await next_message(hub)
        await hub.disconnect()  # crashed before persisting: no ack

        hub = session(mqtt_broker, hub_id, manual_ack=True)
        await hub.connect()
        resumed = hub.session_present
        again = await next_message(hub)  # the broker redelivers without a new SUBSCRIBE
        hub.ack(again)  # persisted now
        await hub.disconnect()

        hub = session(mqtt_broker, hub_id, manual_ack=True, clean_start=False)
        await hub.connect()
        await edge.publish(topic, b"update 2")
        after_ack = await next_message(hub)  # the acked message does not come back first
        hub.ack(after_ack)
        await closing(hub, edge)
        return first, again, after_ack, resumed

    first, again, after_ack, resumed = run(scenario())

    assert resumed
    assert first.payload == again.payload == b"update 1"
    assert again.dup or mqtt_broker.kind != "mosquitto"  # Mosquitto marks the redelivery
    assert after_ack.payload == b"update 2"


def test_a_bounded_session_keeps_reading_at_its_bound_and_sheds_the_rest(mqtt_broker, topic_prefix) -> None:
    """Reads never pause (acks share the socket): past the bound, deliveries are shed and acked
    (more in test_shedding.py); the edges' re-sends recover the updates that matter."""
    needs_mqtt5(mqtt_broker)
    topic = f"{topic_prefix}/update/edge-1"
    bound, sent = 5, 40

    async def scenario() -> tuple[int, int, list[bytes], bytes]:
        edge = session(mqtt_broker, uid("edge"), clean_start=True)
        hub = session(mqtt_broker, uid("hub"), manual_ack=True, clean_start=True, max_buffered=bound)
        await asyncio.gather(edge.connect(), hub.connect())
        await hub.subscribe(topic)
        for i in range(sent):  # every PUBACK back; nobody consumes
            await edge.publish(topic, f"update {i}".encode())
        await until(lambda: hub.shed + hub.buffered == sent, lambda: f"{sent} messages at the hub, kept or shed "
                    f"(kept {hub.buffered}, shed {hub.shed})", WAIT_S)
        most = hub.buffered
        stream = hub.messages()
        received = []
        for _ in range(most):
            message = await asyncio.wait_for(anext(stream), WAIT_S)
            hub.ack(message)
            received.append(message.payload)
        await edge.publish(topic, b"re-sent")  # the consumer caught up: delivered again
        later = await asyncio.wait_for(anext(stream), WAIT_S)
        await closing(hub, edge)
        return most, hub.shed, received, later.payload

    most, shed, received, later = run(scenario())

    assert most == bound and shed == sent - bound
    assert received == [f"update {i}".encode() for i in range(bound)]
    assert later == b"re-sent"


def test_last_will_is_published_when_the_connection_dies(mqtt_broker, topic_prefix) -> None:
    status = f"{topic_prefix}/status/edge-1"

    async def scenario() -> tuple[list[Message], Message]:
        watcher = session(mqtt_broker, uid("watcher"), clean_start=True)
        edge = session(mqtt_broker, uid("edge"), clean_start=True, will=Will(status, b'{"online": false}'))
        await asyncio.gather(watcher.connect(), edge.connect())
        await watcher.subscribe(status)
        await edge.publish(status, b'{"online": true}', retain=True)
        seen = [await next_message(watcher)]
        await edge.abort()  # no DISCONNECT: the broker sends the will
        seen.append(await next_message(watcher))
        late = session(mqtt_broker, uid("late"), clean_start=True)
        await late.connect()
        await late.subscribe(status)
        retained = await next_message(late)
        await watcher.publish(status, b"", retain=True)
        await closing(watcher, late)
        return seen, retained

    seen, retained = run(scenario())

    assert [m.payload for m in seen] == [b'{"online": true}', b'{"online": false}']
    assert retained.payload == b'{"online": false}' and retained.retain


# -- scale -------------------------------------------------------------------------------------


def test_500_sessions_share_one_event_loop(mqtt_broker, topic_prefix) -> None:
    """Past paho's select() ceiling (~340 sockets): every session connects, subscribes, receives."""
    n = 500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = n + 200
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else hard, hard))
    run_id = uuid.uuid4().hex[:8]

    async def scenario() -> list[bytes]:
        sessions = [
            session(mqtt_broker, f"sim-{run_id}-{i}", clean_start=True, session_expiry_s=0, keepalive=60)
            for i in range(n)
        ]
        hub = session(mqtt_broker, uid("hub"), clean_start=True)
        await asyncio.gather(hub.connect(), *(s.connect(timeout=20) for s in sessions))
        await asyncio.gather(*(s.subscribe(f"{topic_prefix}/edge/{i}", timeout=20) for i, s in enumerate(sessions)))
        await asyncio.gather(*(hub.publish(f"{topic_prefix}/edge/{i}", f"hello {i}".encode()) for i in range(n)))
        received = await asyncio.gather(*(next_message(s, timeout=20) for s in sessions))
        await closing(hub, *sessions)
        return [m.payload for m in received]

    payloads = run(scenario(), timeout=60)

    assert payloads == [f"hello {i}".encode() for i in range(n)]


# -- broker faults -----------------------------------------------------------------------------


needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="this test starts its own Mosquitto")


@needs_mosquitto
def test_session_reconnects_and_resubscribes_after_a_broker_restart(tmp_path, topic_prefix) -> None:
    topic = f"{topic_prefix}/model"

    async def scenario() -> tuple[Message, bool]:
        with MosquittoBroker(workdir=tmp_path) as broker:  # no persistence: the restart forgets sessions
            edge = session(broker, "edge-1")
            hub = session(broker, "hub")
            await asyncio.gather(edge.connect(), hub.connect())
            await edge.subscribe(topic)

            await asyncio.to_thread(broker.kill)
            # published during the outage: waits for the connection, or is re-sent by paho after it
            publishing = asyncio.create_task(hub.publish(topic, b"global v2", retain=True, timeout=WAIT_S * 2))
            await asyncio.to_thread(broker.start)
            await publishing
            # retained, so it reaches the edge whether the edge re-subscribes before or after it arrives
            message = await next_message(edge, timeout=WAIT_S * 2)
            session_present = edge.session_present
            await closing(edge, hub)
            return message, session_present

    message, session_present = run(scenario(), timeout=45)

    assert message.payload == b"global v2"
    assert not session_present  # a fresh broker: the subscription came from the re-subscribe


@needs_mosquitto
def test_a_message_over_the_brokers_packet_limit_is_refused_before_sending(tmp_path) -> None:
    async def scenario() -> bool:
        with MosquittoBroker(workdir=tmp_path, max_packet_size=1000) as broker:
            edge = session(broker, uid("edge"), clean_start=True)
            await edge.connect()
            await edge.publish("t/ok", b"x" * 900)
            with pytest.raises(ConfigError, match="max_packet_size"):
                await edge.publish("t/big", b"x" * 2000)
            await edge.publish("t/ok", b"still fine")  # the session survived: nothing poisonous was sent
            still_connected = edge.connected
            await edge.disconnect()
            return still_connected

    assert run(scenario())


@needs_mosquitto
def test_disconnect_ends_waiting_publishes_and_the_message_stream(tmp_path) -> None:
    async def scenario() -> tuple[BaseException | None, list[Message]]:
        with MosquittoBroker(workdir=tmp_path) as broker:
            edge = session(broker, uid("edge"), clean_start=True)
            await edge.connect()
            consumed: list[Message] = []

            async def consume() -> None:
                consumed.extend([m async for m in edge.messages()])

            consumer = asyncio.create_task(consume())
            await asyncio.to_thread(broker.kill)
            waiting = asyncio.create_task(edge.publish("t/x", b"never", timeout=WAIT_S * 3))
            await asyncio.sleep(0)  # let it start waiting for the connection
            await edge.disconnect()
            await asyncio.wait_for(consumer, WAIT_S)
            (error,) = await asyncio.gather(waiting, return_exceptions=True)
            return error, consumed

    error, consumed = run(scenario())

    assert isinstance(error, BrokerUnavailable)
    assert consumed == []


def test_auto_protocol_falls_back_to_mqtt311_on_a_broker_without_mqtt5(topic_prefix) -> None:
    pytest.importorskip("amqtt")

    async def scenario() -> tuple[str, Message]:
        with EmbeddedBroker() as broker:
            address = BrokerAddress.parse(broker.url)
            hub = MqttSession(address, uid("hub"), clean_start=True)
            edge = MqttSession(address, uid("edge"), clean_start=True)
            await asyncio.gather(hub.connect(), edge.connect())
            with pytest.raises(ConfigError, match="MQTT 5"):
                await hub.subscribe(f"$share/hub/{topic_prefix}/update/+")
            await hub.subscribe(f"{topic_prefix}/update/+")
            await edge.publish(f"{topic_prefix}/update/edge", b"delta")
            message = await next_message(hub)
            await closing(hub, edge)
            return hub.protocol, message

    protocol, message = run(scenario())

    assert protocol == "3.1.1"
    assert message.payload == b"delta"
