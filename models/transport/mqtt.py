"""One MQTT session on asyncio, many sessions on one event loop: the transport of hub and edges.

:class:`MqttSession` wraps a paho-mqtt 2.x client the way aiomqtt v2 does: paho's socket
callbacks register the client's socket with the asyncio loop (``add_reader`` ->
``loop_read``, ``add_writer`` -> ``loop_write``) and a small task calls ``loop_misc`` once a
second for keepalive. No paho thread and no ``select()``: paho's own loop helpers call
``select()``, which cannot watch descriptors past ``FD_SETSIZE`` (1024), and each threaded paho
client holds three of them, so a process stops near 340 clients. Here a session costs one
descriptor and one loop drives thousands (2000 measured on a 2-core laptop). The loop must
support ``add_reader`` (any selector loop; not Windows' default proactor loop).

Rules the code keeps:

- paho callbacks only hand data to the loop (futures, an ``asyncio.Queue``); all logic runs in
  coroutines. The blocking TCP connect runs in the loop's executor; callbacks paho makes
  from that thread are forwarded with ``call_soon_threadsafe`` in order.
- Every wait has a timeout and ends in :class:`~models.errors.BrokerUnavailable`.
- A failed connect says what happened, where, and what to do: nothing listening, a TLS port
  reached with ``mqtt://`` (probed: it answers a TLS hello), a broker certificate from another
  CA, a refused login, a server that is not MQTT. Retrying cannot fix the last four, so
  :meth:`MqttSession.connect` gives up on them at once. paho's own log lines (an ERROR per
  failed socket read) go to DEBUG. A refusal by the broker's access rules (SUBACK or PUBACK
  *Not authorized*) is a :class:`~models.errors.ConfigError`: callers retry a
  BrokerUnavailable, and no retry lets a session into another federation's topics.
- Sessions are persistent by default (MQTT 5 ``clean_start=False`` plus a session expiry;
  3.1.1 ``clean_session=False``), so QoS 1 messages queued while a client was away arrive
  when it returns. ``protocol="auto"`` falls back to 3.1.1 when the broker refuses MQTT 5
  or does not answer an MQTT 5 CONNECT within ``AUTO_PROBE_S`` (amqtt hangs on one).
- Reconnection is one loop with exponential backoff (0.5 s doubling to 30 s, jittered).
  Subscriptions are re-sent when the broker did not resume the session, shared ones on
  every reconnect (Mosquitto 2.0.11 resumes a session from its persistence file without
  them); unacknowledged QoS 1 publishes are re-sent by paho on every reconnect.
- With ``manual_ack=True`` a QoS 1 message is acknowledged only by :meth:`MqttSession.ack`,
  which the application calls after it has persisted the message; a message never acked is
  redelivered by the broker on the next connection of the same persistent session.
- A publish larger than the packet size the broker announced is refused before it is sent
  (paho 2.2 would send it, the broker would disconnect, paho would re-send it forever).
- Reading never pauses: acknowledgements (PUBACK, SUBACK, PINGRESP) share the socket with
  deliveries, so a session that stopped reading because its consumer was behind could no
  longer publish, subscribe or keep alive (a flood of junk publishes killed the hub that way).
  Instead a session with ``max_buffered`` / ``max_buffered_bytes`` sheds: a message arriving
  while the consumer's backlog is at a bound is dropped, counted in :attr:`MqttSession.shed`
  and, on a manual-ack session, acknowledged at once so the broker's inflight window moves
  on. Senders that need delivery retry at the application level (wearfl edges re-send an
  update until the hub's receipt arrives). ``max_packet_size_in`` caps what the broker may
  send this client (MQTT 5 CONNECT property; on 3.1.1 larger messages are shed on arrival).

Example::

    session = MqttSession(BrokerAddress.parse("mqtt://127.0.0.1:1883"), "hub-1", manual_ack=True)
    await session.connect()
    await session.subscribe("$share/hub/wearfl/v1/fed/update/+")
    async for message in session.messages():
        store(message)
        session.ack(message)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from models.errors import BrokerUnavailable, ConfigError

__all__ = ["BrokerAddress", "Message", "MqttSession", "Will"]

log = logging.getLogger(__name__)

SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True, "tls": True}
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
ATTEMPT_TIMEOUT_S = 10.0  # one connect attempt inside the reconnect loop
AUTO_PROBE_S = 3.0  # protocol="auto": wait this long for an MQTT 5 CONNACK before trying 3.1.1
TCP_CONNECT_TIMEOUT_S = 5.0  # the blocking TCP (+TLS) connect in the executor; paho's default
MISC_INTERVAL_S = 1.0
SHED_LOG_INTERVAL_S = 10.0  # at most one summary line this often while a session sheds messages
MQTT_MAX_PACKET_BYTES = 268_435_460  # MQTT's own bound: 1 + 4 length bytes + 268,435,455
UNSUPPORTED_PROTOCOL = (0x01, 0x84)  # CONNACK: 3.1.1 return code, MQTT 5 reason code
BAD_LOGIN = (0x04, 0x05, 0x86, 0x87)  # CONNACK: bad user name or password, not authorized (3.1.1, MQTT 5)
BAD_CLIENT_ID = (0x02, 0x85)
RETRY_CONNACK = (0x03, 0x88, 0x89, 0x97, 0x9F)  # server unavailable / busy, quota, rate: worth another attempt
NOT_AUTHORIZED = 0x87  # SUBACK / PUBACK reason code of a refusal by the broker's access rules
PROTOCOL_ERROR = 0x82  # paho's reason when the server sent bytes that are no MQTT packet
PROBE_S = 3.0  # the probe of what listens on a port that closed a connection unanswered (error messages only)
PROBE_CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x1e\x00\x00"  # MQTT 3.1.1 CONNECT: clean, empty client id
X509_HOSTNAME_MISMATCH = 62  # OpenSSL verify codes
X509_NOT_YET_VALID, X509_EXPIRED = 9, 10


@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker listens: ``mqtt://[user[:password]@]host[:port]`` (``mqtts://`` for TLS).

    ``ssl_context`` is the hook for TLS beyond the system defaults (client certificates,
    private CAs); with ``tls=True`` and no context, the system trust store verifies the broker.
    ``ca_file`` names the CA file that context trusts, for the error when the broker's
    certificate fails verification.
    """

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    ca_file: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Read ``mqtt://host:port``, ``mqtts://host``, ``host:port`` or ``host``; ConfigError otherwise."""
        text = url.strip()
        if not text:
            raise ConfigError("the broker URL is empty; use e.g. mqtt://127.0.0.1:1883.")
        if "://" not in text:
            text = f"mqtt://{text}"
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"cannot read broker URL {url!r} ({exc}); use e.g. mqtt://127.0.0.1:1883.") from None
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise ConfigError(f"broker URL {url!r} has scheme {scheme!r}; use mqtt:// or mqtts://.")
        if not parts.hostname:
            raise ConfigError(f"broker URL {url!r} names no host; use e.g. mqtt://127.0.0.1:1883.")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"broker URL {url!r} has a path or query; give only scheme, host and port.")
        tls = SCHEMES[scheme]
        if port == 0:
            raise ConfigError(f"broker URL {url!r} has port 0; give the port the broker listens on.")
        return cls(
            host=parts.hostname,
            port=port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
        )

    @property
    def url(self) -> str:
        """The address as a URL, without credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class Message:
    """One received PUBLISH. ``connection`` counts the session's connections; an ack goes
    back only on the connection that delivered the message (the broker redelivers otherwise)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    dup: bool = False
    connection: int = field(default=0, compare=False)


class Will(NamedTuple):
    """The last will: published by the broker when the connection ends without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class _AttemptFailed(Exception):
    """One connect attempt did not end in an accepted CONNACK.

    ``str()`` is a short reason for the debug log; ``advice`` the sentence an operator reads:
    what happened, where, and what to do. ``final``: another attempt cannot help (a refused
    login, a certificate that fails verification), so :meth:`MqttSession.connect` gives up at
    once. ``closed``: the server closed the connection without an answer (a TLS port does
    that to a plain MQTT connection).
    """

    def __init__(self, reason: str, advice: str = "", *, final: bool = False, unsupported_protocol: bool = False,
                 closed: bool = False) -> None:
        super().__init__(reason)
        self.advice = advice or reason
        self.final = final
        self.unsupported_protocol = unsupported_protocol
        self.closed = closed


class MqttSession:
    """An MQTT client session driven by the running asyncio loop; see the module docstring.

    - ``client_id`` keys the broker-side session; ``clean_start=False`` resumes it, and the
      broker keeps it ``session_expiry_s`` seconds after the connection ends (MQTT 5).
    - ``will``: published by the broker (e.g. ``status/<client>`` offline, retained) when the
      connection ends without DISCONNECT.
    - ``manual_ack``: QoS 1 messages are acknowledged only by :meth:`ack`. The broker then
      holds at most its inflight limit unacknowledged; without it, received messages queue
      in memory until :meth:`messages` takes them.
    - ``protocol``: ``"5"``, ``"3.1.1"`` or ``"auto"`` (5, else 3.1.1).
    - ``max_inflight`` / ``max_queued``: paho's bounds on outgoing QoS 1 messages awaiting
      PUBACK / waiting in all (0 = unbounded).
    - ``max_buffered`` / ``max_buffered_bytes``: bounds on the received messages (count /
      payload bytes) waiting for :meth:`messages` (0 = unbounded). A message that arrives
      while either bound is reached is shed: dropped, counted in :attr:`shed` and, with
      ``manual_ack``, acknowledged at once. The session never stops reading instead, because
      acknowledgements share the socket with deliveries: paused reads would leave this
      session's own PUBACKs and SUBACKs unread, and its publishes and subscriptions would
      time out behind a burst it cannot refuse. A burst therefore costs at most the bounds
      in memory; the sender's application-level retry recovers the messages that matter.
      The first shed message of a quiet spell is logged at WARNING, then at most one
      summary line every ``SHED_LOG_INTERVAL_S`` seconds.
    - ``max_packet_size_in``: the largest packet (bytes) the broker may send this session.
      MQTT 5 sends it in CONNECT (Maximum Packet Size): a broker that honours it, as
      Mosquitto does, drops a larger message for this client. On 3.1.1 the broker cannot be
      told; a larger message is then shed on arrival (paho has read it, but the consumer
      never holds it). None: no bound beyond MQTT's own.
    - ``receive_maximum``: MQTT 5's Receive Maximum in CONNECT, the unacknowledged QoS 1
      deliveries the broker may have out to this session at once: with ``manual_ack``, a
      consumer that is busy (a hub closing a round) holds the broker back instead of
      filling the buffer. Mosquitto 2.0 honours it while no acknowledgements flow, and less
      strictly once they do; the buffer bounds stay the guarantee.
    - ``misc_interval_s``: how often paho's keepalive bookkeeping runs (a ping goes out within
      this of ``keepalive`` seconds of silence). Ten thousand simulated sessions in one process
      use a few seconds, not one, so that their timers do not take a core.

    One consumer should iterate :meth:`messages`. All methods must be called from the loop
    that ran :meth:`connect`.
    """

    def __init__(
        self,
        address: BrokerAddress,
        client_id: str,
        *,
        clean_start: bool = False,
        session_expiry_s: int = 3600,
        will: Will | tuple[str, bytes, int, bool] | None = None,
        manual_ack: bool = False,
        protocol: Literal["auto", "5", "3.1.1"] = "auto",
        keepalive: int = 30,
        max_inflight: int = 20,
        max_queued: int = 0,
        max_buffered: int = 0,
        max_buffered_bytes: int = 0,
        max_packet_size_in: int | None = None,
        receive_maximum: int | None = None,
        logger: logging.Logger | None = None,
        misc_interval_s: float = MISC_INTERVAL_S,
    ) -> None:
        if not client_id:
            raise ConfigError("an MQTT session needs a non-empty client id (persistent sessions are keyed by it).")
        if protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"unknown MQTT protocol {protocol!r}; use 'auto', '5' or '3.1.1'.")
        if min(keepalive, session_expiry_s, max_inflight, max_queued, max_buffered, max_buffered_bytes) < 0:
            raise ConfigError("keepalive, session_expiry_s, max_inflight, max_queued, max_buffered and "
                              "max_buffered_bytes must be non-negative.")
        if receive_maximum is not None and not 0 < receive_maximum <= 65535:
            raise ConfigError(f"receive_maximum must be 1 .. 65535, not {receive_maximum}.")
        if max_packet_size_in is not None and not 0 < max_packet_size_in <= MQTT_MAX_PACKET_BYTES:
            raise ConfigError(f"max_packet_size_in must be between 1 and {MQTT_MAX_PACKET_BYTES} bytes "
                              f"(or None for no bound), not {max_packet_size_in}.")
        self.address = address
        self.client_id = client_id
        self.clean_start = clean_start
        self.session_expiry_s = session_expiry_s
        self.will = Will(*will) if will is not None else None
        self.manual_ack = manual_ack
        self.keepalive = keepalive
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.max_buffered = max_buffered
        self.receive_maximum = receive_maximum
        self.max_buffered_bytes = max_buffered_bytes
        self.max_packet_size_in = max_packet_size_in
        self.misc_interval_s = float(misc_interval_s)
        self._buffered_bytes = 0  # payload bytes of the messages in self._messages
        self._shed = 0  # messages dropped since the session was made
        self._shed_oversize = 0  # of which over max_packet_size_in
        self._shed_logged = (0, 0)  # (_shed, _shed_oversize) when the last log line went out
        self._shed_summary: asyncio.TimerHandle | None = None  # the next summary line, while shedding goes on
        self.log = logger or log
        self._protocol_choice = protocol
        self._mqtt_version = paho.MQTTv311 if protocol == "3.1.1" else paho.MQTTv5
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._connected = False
        self._connected_event = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = False
        self._connecting = False
        self._connack: asyncio.Future[tuple[ReasonCode, bool, int | None]] | None = None
        self._generation = 0
        self._messages: asyncio.Queue[Message | None] = asyncio.Queue()
        self._publishes: dict[int, asyncio.Future[ReasonCode]] = {}
        self._subscriptions: dict[str, int] = {}
        self._sub_waiters: dict[str, asyncio.Future[ReasonCode]] = {}
        self._sub_mids: dict[int, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._disconnect_waiter: asyncio.Future[None] | None = None
        self._ever_connected = False
        self._closed: asyncio.Future[None] | None = None  # resolved when disconnect() or abort() ends it
        self.session_present = False
        self.max_packet_size: int | None = None  # announced by an MQTT 5 broker in CONNACK

    # -- public API --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the broker has accepted the current connection."""
        return self._connected

    @property
    def connected_event(self) -> asyncio.Event:
        """Set while connected; cleared when the connection drops."""
        return self._connected_event

    @property
    def connection(self) -> int:
        """Counts the session's connections, as :attr:`Message.connection` does: a publish made while
        this number stays the same went out on one connection."""
        return self._generation

    @property
    def buffered(self) -> int:
        """Received messages waiting for :meth:`messages` (at most ``max_buffered`` when that is set)."""
        return self._messages.qsize()

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes of the messages waiting for :meth:`messages`; below ``max_buffered_bytes`` plus one
        message's payload when that is set (the message that reaches the bound is kept)."""
        return self._buffered_bytes

    @property
    def shed(self) -> int:
        """Received messages dropped since the session was made: the consumer's backlog was at
        ``max_buffered`` / ``max_buffered_bytes``, or the message was over ``max_packet_size_in``."""
        return self._shed

    @property
    def protocol(self) -> str:
        """The MQTT version in use: ``"5"`` or ``"3.1.1"`` (after a fallback, the latter)."""
        return "5" if self._mqtt_version == paho.MQTTv5 else "3.1.1"

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect, retrying with backoff until ``timeout``; then keep reconnecting in the background.

        Raises BrokerUnavailable when no attempt succeeds in time, or at once when another
        attempt cannot help: the broker refuses the login, its TLS certificate fails
        verification, or the port wants TLS and the URL says ``mqtt://``. The message says
        what happened, where, and what to do.
        """
        if self._closing:
            raise BrokerUnavailable(f"session {self.client_id!r} was closed; create a new one.", url=self.address.url)
        if self._tasks:  # connected before: the reconnect loop owns the connection
            await self._wait_connected(self._running_loop().time() + timeout, "connect")
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._closed = self._loop.create_future()
        deadline = self._loop.time() + timeout
        delay = BACKOFF_FIRST_S
        probed = False
        while True:
            remaining = deadline - self._loop.time()
            try:
                await self._attempt(min(remaining, ATTEMPT_TIMEOUT_S))
                break
            except _AttemptFailed as exc:
                failure = exc
                if exc.closed and not self.address.tls and not probed:  # a TLS port? not MQTT at all?
                    probed = True
                    failure = await self._explain_closed(exc)
                if failure.final or deadline - self._loop.time() <= 0:
                    tried = "" if failure.final else f" (tried for {timeout:g} s)"
                    raise BrokerUnavailable(
                        f"cannot connect to the MQTT broker at {self.address.url}{tried}: {failure.advice}",
                        url=self.address.url,
                    ) from None
                self.log.debug("%s: connect attempt failed (%s); retrying", self.client_id, exc)
            await asyncio.sleep(min(_jitter(delay), max(0.0, deadline - self._loop.time())))
            delay = min(delay * 2, BACKOFF_MAX_S)
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._reconnect_loop(), name=f"mqtt-reconnect-{self.client_id}"),
                asyncio.create_task(self._misc_loop(), name=f"mqtt-misc-{self.client_id}"),
            ]

    async def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0) -> None:
        """Subscribe and wait for the SUBACK; kept across reconnects. ``$share/<group>/...`` needs MQTT 5."""
        if qos not in (0, 1, 2):
            raise ConfigError(f"QoS must be 0, 1 or 2, not {qos}.")
        if topic.startswith("$share/") and self._mqtt_version != paho.MQTTv5:
            raise ConfigError(
                f"shared subscription {topic!r} needs MQTT 5, but {self.address.url} speaks only 3.1.1; "
                "use a broker with MQTT 5 (Mosquitto) or subscribe to the plain topic with one worker."
            )
        loop = self._running_loop()
        deadline = loop.time() + timeout
        self._subscriptions[topic] = qos
        waiter = self._sub_waiters.get(topic)
        if waiter is None:
            waiter = self._sub_waiters[topic] = loop.create_future()
            await self._wait_connected(deadline, f"subscribe to {topic!r}")
            if not waiter.done() and topic not in self._sub_mids.values():  # a reconnect may have sent it
                self._send_subscribe(topic, qos)
        try:
            reason = await asyncio.wait_for(asyncio.shield(waiter), max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise BrokerUnavailable(
                f"the broker at {self.address.url} did not confirm the subscription to {topic!r} in {timeout:g} s.",
                url=self.address.url,
            ) from None
        finally:
            if waiter.done() and self._sub_waiters.get(topic) is waiter:
                del self._sub_waiters[topic]
        if reason.is_failure:
            self._subscriptions.pop(topic, None)
            if self._not_authorized(reason):  # waiting on would be waiting for messages that never come
                raise ConfigError(
                    f"the broker at {self.address.url} refused the subscription to {topic} ({reason}): its access "
                    f"rules do not let {self._who} read it. Is --federation right for these credentials?"
                )
            raise BrokerUnavailable(
                f"the broker at {self.address.url} refused the subscription to {topic} ({reason}).",
                url=self.address.url,
            )

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 30.0
    ) -> None:
        """Publish; with QoS 1 or 2, return once the broker acknowledged (PUBACK / PUBCOMP).

        Waits for a connection first. On a timeout the message may still reach the broker
        later (paho keeps it and re-sends it on reconnect); callers that need certainty keep
        their own copy until an application-level receipt arrives.
        """
        if qos not in (0, 1, 2):
            raise ConfigError(f"QoS must be 0, 1 or 2, not {qos}.")
        loop = self._running_loop()
        deadline = loop.time() + timeout
        await self._wait_connected(deadline, f"publish on {topic!r}")
        size = _publish_packet_size(topic, payload, qos, self._mqtt_version == paho.MQTTv5)
        if self.max_packet_size is not None and size > self.max_packet_size:
            # paho 2.2 sends it anyway; the broker would disconnect us, and paho would re-send it forever
            raise ConfigError(
                f"a {len(payload)}-byte message on {topic!r} makes a {size}-byte packet, over the "
                f"{self.max_packet_size} bytes the broker at {self.address.url} accepts; raise its max_packet_size."
            )
        client = self._require_client()
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:  # bad topic, payload over MQTT's 256 MiB
            raise ConfigError(f"cannot publish on {topic!r}: {exc}.") from None
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            raise BrokerUnavailable(
                f"{self.client_id}: {self.max_queued} messages already wait for the broker; publish later.",
                url=self.address.url,
            )
        if info.rc == paho.MQTT_ERR_PAYLOAD_SIZE:
            raise ConfigError(f"a {len(payload)}-byte message on {topic!r} exceeds the broker's maximum packet size.")
        if qos == 0:
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise BrokerUnavailable(f"QoS 0 message on {topic!r} was not sent ({info.rc}).", url=self.address.url)
            return
        future: asyncio.Future[ReasonCode] = loop.create_future()
        self._publishes[info.mid] = future
        try:
            reason = await asyncio.wait_for(future, max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise BrokerUnavailable(
                f"the broker at {self.address.url} did not acknowledge a message on {topic!r} in {timeout:g} s.",
                url=self.address.url,
            ) from None
        finally:
            if self._publishes.get(info.mid) is future:
                del self._publishes[info.mid]
        if reason.is_failure:
            if self._not_authorized(reason):  # a ConfigError: retrying (as callers do on BrokerUnavailable) cannot help
                raise ConfigError(
                    f"the broker at {self.address.url} refused a message on {topic} ({reason}): its access rules do "
                    f"not let {self._who} publish there. Is --federation right for these credentials?"
                )
            raise BrokerUnavailable(
                f"the broker at {self.address.url} refused a {len(payload)}-byte message on {topic!r} ({reason}); "
                "check its message_size_limit.",
                url=self.address.url,
            )

    async def messages(self) -> AsyncIterator[Message]:
        """Received messages in arrival order; ends after :meth:`disconnect` or :meth:`abort`."""
        while True:
            message = await self._messages.get()
            if message is None:
                self._messages.put_nowait(None)  # let any other iterator end too
                return
            self._buffered_bytes -= len(message.payload)
            yield message
            del message  # not held while waiting for the next one: a model message per session adds up

    def ack(self, message: Message) -> None:
        """Acknowledge a QoS 1/2 message (manual-ack sessions only): call after persisting it.

        A message delivered on an earlier connection is not acked here; the broker redelivers
        it on the current one (the application deduplicates).
        """
        if not self.manual_ack or message.qos == 0:
            return
        client = self._client
        if client is None or client.socket() is None or message.connection != self._generation:
            self.log.debug("%s: not acking mid %d from an earlier connection", self.client_id, message.mid)
            return
        client.ack(message.mid, message.qos)

    async def disconnect(self, timeout: float = 5.0) -> None:
        """Send DISCONNECT (no last will), stop reconnecting, end :meth:`messages`.

        The broker keeps a persistent session for ``session_expiry_s``: QoS 1 messages for it
        are queued until the same client id connects again.
        """
        self._closing = True
        await self._stop_tasks()
        client = self._client
        if client is not None and self._connected and client.socket() is not None:
            gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._disconnect_waiter = gone
            client.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone, timeout)
        self._close_socket()
        self._finish("the session was disconnected")

    async def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT, as a crash would (the broker publishes the will)."""
        self._closing = True
        await self._stop_tasks()
        self._close_socket()
        self._finish("the session was aborted")

    # -- connecting --------------------------------------------------------------------------

    async def _attempt(self, timeout: float) -> None:
        """One TCP connect + CONNACK. On success: connected, subscriptions restored if needed."""
        loop = self._running_loop()
        deadline = loop.time() + max(timeout, 0.1)
        if self._client is None:
            self._client = self._new_client()
        client = self._client
        # "auto" before the first success: a broker that never answers an MQTT 5 CONNECT (amqtt
        # misreads its properties and waits for bytes that never come) gets a 3.1.1 try soon
        probing = self._protocol_choice == "auto" and self._mqtt_version == paho.MQTTv5 and not self._ever_connected
        self._connack = loop.create_future()
        self._connecting = True
        try:
            try:
                await loop.run_in_executor(None, functools.partial(client.connect, **self._connect_args()))
            except (OSError, ValueError) as exc:  # refused, unreachable, DNS, TLS; paho closes its socket itself
                raise _socket_failure(self.address, exc) from None
            wait = deadline - loop.time()
            try:
                reason, session_present, max_packet_size = await asyncio.wait_for(
                    asyncio.shield(self._connack), max(0.0, min(wait, AUTO_PROBE_S) if probing else wait)
                )
            except TimeoutError:
                self._close_socket()
                if not probing or deadline - loop.time() <= 0:
                    raise _AttemptFailed("no CONNACK in time", f"the server at {self.address.host}:{self.address.port} "
                                         "took the connection but sent no MQTT answer in time. Is it an MQTT broker, "
                                         "and the port of the broker URL (--broker) its MQTT port?") from None
                reason, session_present, max_packet_size = ReasonCode(PacketTypes.CONNACK, identifier=0x84), False, None
                self.log.info("%s: no answer to an MQTT 5 CONNECT from %s", self.client_id, self.address.url)
        finally:
            self._connecting = False
        if reason.value != 0:
            self._close_socket()
            unsupported = reason.value in UNSUPPORTED_PROTOCOL
            if unsupported and probing:
                self.log.info("%s: %s does not speak MQTT 5; trying 3.1.1", self.client_id, self.address.url)
                self._mqtt_version, self._client = paho.MQTTv311, None
                try:
                    return await self._attempt(max(0.1, deadline - loop.time()))
                except _AttemptFailed:
                    self._mqtt_version, self._client = paho.MQTTv5, None  # maybe it was just slow: 5 next time
                    raise
            raise _connack_failure(self.address, reason, unsupported)
        if client.socket() is None:  # accepted, then dropped before this coroutine resumed
            raise _AttemptFailed("connection closed right after CONNACK")
        self.session_present = session_present
        self.max_packet_size = max_packet_size
        self._connected = self._ever_connected = True
        shared = {topic for topic in self._subscriptions if topic.startswith("$share/")}
        restore = set(self._sub_waiters) | shared if session_present else set(self._subscriptions)
        self._sub_mids.clear()
        for topic in sorted(restore):
            if topic in self._subscriptions:
                self._send_subscribe(topic, self._subscriptions[topic])
        self._connected_event.set()
        self.log.debug(
            "%s: connected to %s (MQTT %s, session %s)",
            self.client_id,
            self.address.url,
            self.protocol,
            "resumed" if session_present else "new",
        )

    async def _explain_closed(self, failure: _AttemptFailed) -> _AttemptFailed:
        """``failure`` (a plain connection closed unanswered), explained by what listens on the port.

        A TLS listener closes a plain MQTT connection, and so may a server that is no MQTT
        broker at all; either is final. Anything else (a broker at its connection limit) stays
        worth another attempt.
        """
        host, port = self.address.host, self.address.port
        kind, answer = await self._running_loop().run_in_executor(None, _what_listens, host, port)
        if kind == "tls":
            return _AttemptFailed(
                f"{failure} (the port speaks TLS)",
                f"port {port} expects TLS, and the broker closed this plain MQTT connection. Use "
                f"{replace(self.address, tls=True).url} (with the credentials folder's certificates, --credentials).",
                final=True,
            )
        if kind == "other":
            return _AttemptFailed(
                f"{failure} (the port does not speak MQTT)",
                f"the server at {host}:{port} answered with something that is not MQTT ({_show(answer)}). Check the "
                "port of the broker URL (--broker).",
                final=True,
            )
        return failure

    def _connect_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"host": self.address.host, "port": self.address.port, "keepalive": self.keepalive}
        if self._mqtt_version == paho.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.session_expiry_s
            if self.max_packet_size_in is not None:  # the broker drops what is larger, for this client only
                properties.MaximumPacketSize = self.max_packet_size_in
            if self.receive_maximum is not None:  # unacknowledged QoS 1 deliveries the broker may have out to us
                properties.ReceiveMaximum = self.receive_maximum
            args.update(clean_start=self.clean_start, properties=properties)
        return args

    def _new_client(self) -> paho.Client:
        v5 = self._mqtt_version == paho.MQTTv5
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if v5 else self.clean_start,
            protocol=self._mqtt_version,
            reconnect_on_failure=False,
            manual_ack=self.manual_ack,
        )
        client.enable_logger(_PAHO_LOG)  # type: ignore[arg-type]  # an adapter: paho only calls .log()
        client.connect_timeout = TCP_CONNECT_TIMEOUT_S
        client.max_inflight_messages_set(self.max_inflight)
        client.max_queued_messages_set(self.max_queued)
        if self.address.username is not None:
            client.username_pw_set(self.address.username, self.address.password)
        if self.address.tls:
            client.tls_set_context(self.address.ssl_context or ssl.create_default_context())
        if self.will is not None:
            client.will_set(self.will.topic, self.will.payload, qos=self.will.qos, retain=self.will.retain)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    async def _reconnect_loop(self) -> None:
        """The one place that reconnects: wait for a drop, then retry with backoff until connected."""
        loop = self._running_loop()
        while not self._closing:
            await self._lost.wait()
            self._lost.clear()
            delay, attempts, started = BACKOFF_FIRST_S, 0, loop.time()
            while not self._closing and not self._connected:
                await asyncio.sleep(_jitter(delay))
                attempts += 1
                try:
                    await self._attempt(ATTEMPT_TIMEOUT_S)
                except _AttemptFailed as exc:
                    self.log.debug("%s: reconnect attempt %d failed: %s", self.client_id, attempts, exc)
                    delay = min(delay * 2, BACKOFF_MAX_S)
                    continue
                except Exception:  # a bug, but the loop must go on: log it and keep retrying
                    self.log.exception("%s: reconnect attempt %d crashed", self.client_id, attempts)
                    delay = min(delay * 2, BACKOFF_MAX_S)
                    continue
                self.log.info(
                    "%s: reconnected to %s after %d attempt(s), %.1f s",
                    self.client_id,
                    self.address.url,
                    attempts,
                    loop.time() - started,
                )

    async def _misc_loop(self) -> None:
        """Keepalive pings and their timeouts: paho's ``loop_misc`` about once a second."""
        interval = self.misc_interval_s
        await asyncio.sleep(random.uniform(0, interval))  # spread a thousand sessions over the interval
        while True:
            client = self._client
            if client is not None and not self._connecting and client.socket() is not None:
                try:
                    client.loop_misc()
                except Exception:
                    self.log.exception("%s: paho loop_misc failed; dropping the connection", self.client_id)
                    self._close_socket()
            await asyncio.sleep(interval)

    # -- helpers -----------------------------------------------------------------------------

    @property
    def _who(self) -> str:
        """This session's login, as the broker's access rules see it."""
        return f"user {self.address.username!r}" if self.address.username else "a client without username"

    def _not_authorized(self, reason: ReasonCode) -> bool:
        """A refusal by the broker's access rules: MQTT 5's reason code, or 3.1.1's one failure code (0x80)."""
        return reason.value == NOT_AUTHORIZED or (reason.is_failure and self._mqtt_version == paho.MQTTv311)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError(f"session {self.client_id!r} is not connected; await connect() first")
        return self._loop

    def _require_client(self) -> paho.Client:
        if self._client is None:
            raise BrokerUnavailable(f"session {self.client_id!r} has no connection.", url=self.address.url)
        return self._client

    async def _wait_connected(self, deadline: float, what: str) -> None:
        """Return once connected; BrokerUnavailable at ``deadline`` or when the session closes first."""
        if self._connected and not self._closing:
            return
        loop = self._running_loop()
        if not self._closing and self._closed is not None:
            connected = asyncio.ensure_future(self._connected_event.wait())
            try:
                await asyncio.wait(
                    (connected, self._closed), timeout=max(0.0, deadline - loop.time()), return_when="FIRST_COMPLETED"
                )
            finally:
                connected.cancel()
        if self._closing:
            raise BrokerUnavailable(f"cannot {what}: session {self.client_id!r} is closed.", url=self.address.url)
        if not self._connected:
            raise BrokerUnavailable(
                f"cannot {what}: not connected to the broker at {self.address.url}; is it running?",
                url=self.address.url,
            )

    def _send_subscribe(self, topic: str, qos: int) -> None:
        rc, mid = self._require_client().subscribe(topic, qos)
        if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
            self._sub_mids[mid] = topic
        else:  # not connected after all; the next connection re-sends it
            self.log.debug("%s: SUBSCRIBE %s not sent (%s)", self.client_id, topic, rc)

    def _close_socket(self) -> None:
        """Close the TCP connection now, without DISCONNECT; paho cleans up through its own path."""
        client = self._client
        sock = client.socket() if client is not None else None
        if client is None or sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        for _ in range(100):  # read to EOF: paho closes the socket and reports the disconnect
            if client.socket() is not sock:
                return
            try:
                client.loop_read()
            except Exception:  # a half-closed TLS socket may raise anything
                break
        if client.socket() is sock:  # paho did not let go: stop watching; its keepalive check closes it
            self.log.error("%s: could not close the connection cleanly", self.client_id)
            self._unwatch(sock)

    async def _stop_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _finish(self, why: str) -> None:
        self._connected = False
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        self._connected_event.clear()
        for future in [*self._publishes.values(), *self._sub_waiters.values()]:
            if not future.done():
                future.set_exception(BrokerUnavailable(f"{self.client_id}: {why}.", url=self.address.url))
                future.exception()  # retrieved: nobody may be waiting any more
        self._report_shed(final=True)
        self._messages.put_nowait(None)  # the end: never shed, whatever the bounds

    def _call_in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` in the loop: now when already there, else queued in order (executor connects)."""
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            with contextlib.suppress(RuntimeError):  # loop closed: nothing left to hand over to
                loop.call_soon_threadsafe(fn, *args)

    # -- socket callbacks (paho -> loop) -----------------------------------------------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._call_in_loop(self._watch_reads, client, sock)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._call_in_loop(self._unwatch, sock)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._call_in_loop(self._watch_writes, client, sock)

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._call_in_loop(self._unwatch_writes, sock)

    def _watch_reads(self, client: paho.Client, sock: Any) -> None:
        if client.socket() is sock and sock.fileno() != -1:  # still the live socket of this client
            self._generation += 1  # a new connection: acks for older deliveries are void
            self._running_loop().add_reader(sock, self._readable, client, sock)
            if self._closing:  # connected from the executor after disconnect(): let paho read EOF and close
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _watch_writes(self, client: paho.Client, sock: Any) -> None:
        if client.socket() is sock and sock.fileno() != -1:
            self._running_loop().add_writer(sock, self._writable, client)

    def _unwatch_writes(self, sock: Any) -> None:
        self._running_loop().remove_writer(sock)

    def _unwatch(self, sock: Any) -> None:
        loop = self._running_loop()
        loop.remove_reader(sock)
        loop.remove_writer(sock)

    def _readable(self, client: paho.Client, sock: Any) -> None:
        # Never stops reading: PUBACK, SUBACK and PINGRESP arrive on this socket between the
        # deliveries; a consumer that falls behind makes the session shed (see _received).
        try:
            client.loop_read()
            # TLS: decrypted bytes can wait inside the SSL object while the socket is not readable
            while client.socket() is sock and getattr(sock, "pending", None) and sock.pending():
                client.loop_read()
        except Exception:
            self.log.exception("%s: reading from the broker failed; dropping the connection", self.client_id)
            self._close_socket()

    def _writable(self, client: paho.Client) -> None:
        try:
            client.loop_write()
        except Exception:
            self.log.exception("%s: writing to the broker failed; dropping the connection", self.client_id)
            self._close_socket()

    # -- protocol callbacks (paho -> loop) ---------------------------------------------------

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, reason: ReasonCode, properties: Any
    ) -> None:
        max_packet_size = getattr(properties, "MaximumPacketSize", None)
        self._call_in_loop(self._connack_arrived, reason, flags.session_present, max_packet_size)

    def _connack_arrived(self, reason: ReasonCode, session_present: bool, max_packet_size: int | None) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_result((reason, session_present, max_packet_size))

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags, reason: ReasonCode, properties: Any
    ) -> None:
        self._call_in_loop(self._connection_ended, client, reason, flags.is_disconnect_packet_from_server)

    def _connection_ended(self, client: paho.Client, reason: ReasonCode, from_broker: bool) -> None:
        if client is not self._client:
            return
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(_closed_before_connack(self.address, reason))
            self._connack.exception()
        was_connected, self._connected = self._connected, False
        self._connected_event.clear()
        waiter = self._disconnect_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if was_connected and not self._closing:
            self.log.warning(
                "%s: lost the connection to %s (%s); reconnecting",
                self.client_id,
                self.address.url,
                f"the broker sent DISCONNECT: {reason}" if from_broker else _why_closed(reason),
            )
            self._lost.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        topic, payload = msg.topic, bytes(msg.payload)
        v5 = self._mqtt_version == paho.MQTTv5
        # 3.1.1 cannot tell the broker the bound (and an MQTT 5 broker should never exceed it): shed here
        oversize = (self.max_packet_size_in is not None
                    and _publish_packet_size(topic, payload, msg.qos, v5) > self.max_packet_size_in)
        message = Message(
            topic=topic,
            payload=b"" if oversize else payload,  # the consumer never holds it
            qos=msg.qos,
            retain=bool(msg.retain),
            mid=msg.mid,
            dup=bool(msg.dup),
            connection=self._generation,
        )
        self._call_in_loop(self._received, message, oversize)

    def _received(self, message: Message, oversize: bool) -> None:
        """Queue a delivery for :meth:`messages`, or shed it (in the loop thread, where paho is driven)."""
        if not oversize and not self._backlog_full():
            self._messages.put_nowait(message)
            self._buffered_bytes += len(message.payload)
            return
        self._shed += 1
        self._shed_oversize += oversize
        if self.manual_ack:  # the broker's inflight window moves on; the sender's retry recovers what matters
            self.ack(message)
        if self._shed_summary is None:  # the first of a spell: say so now, sum up the rest later
            self.log.warning(
                "%s: shed a message on %r: %s; a summary follows every %g s while shedding goes on",
                self.client_id,
                message.topic,
                f"its packet is over max_packet_size_in={self.max_packet_size_in} bytes" if oversize else
                f"the consumer is behind ({self.buffered} messages, {self._buffered_bytes} bytes wait; "
                f"max_buffered={self.max_buffered}, max_buffered_bytes={self.max_buffered_bytes})",
                SHED_LOG_INTERVAL_S,
            )
            self._shed_logged = (self._shed, self._shed_oversize)
            self._shed_summary = self._running_loop().call_later(SHED_LOG_INTERVAL_S, self._report_shed)

    def _backlog_full(self) -> bool:
        return (self.max_buffered > 0 and self._messages.qsize() >= self.max_buffered) or (
            self.max_buffered_bytes > 0 and self._buffered_bytes >= self.max_buffered_bytes
        )

    def _report_shed(self, final: bool = False) -> None:
        """One summary line for the messages shed since the last line; re-armed while shedding goes on."""
        if final and self._shed_summary is not None:
            self._shed_summary.cancel()
        self._shed_summary = None
        shed = self._shed - self._shed_logged[0]
        if shed == 0:
            return
        oversize = self._shed_oversize - self._shed_logged[1]
        if oversize == 0:
            why = "the consumer is behind"
        elif oversize == shed:
            why = f"over max_packet_size_in={self.max_packet_size_in} bytes"
        else:
            why = (f"{shed - oversize} because the consumer is behind, {oversize} over "
                   f"max_packet_size_in={self.max_packet_size_in} bytes")
        self.log.warning("%s: shed %d messages: %s (%d since the session began)", self.client_id, shed, why,
                         self._shed)
        self._shed_logged = (self._shed, self._shed_oversize)
        if not final:
            self._shed_summary = self._running_loop().call_later(SHED_LOG_INTERVAL_S, self._report_shed)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
        self._call_in_loop(self._publish_acked, mid, reason)

    def _publish_acked(self, mid: int, reason: ReasonCode) -> None:
        future = self._publishes.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(reason)

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Any
    ) -> None:
        reason = reasons[0] if reasons else ReasonCode(PacketTypes.SUBACK, identifier=0x80)
        self._call_in_loop(self._subscribe_acked, mid, reason)

    def _subscribe_acked(self, mid: int, reason: ReasonCode) -> None:
        topic = self._sub_mids.pop(mid, None)
        if topic is None:
            return
        future = self._sub_waiters.get(topic)
        if reason.is_failure and future is None:  # a re-subscription on reconnect: nobody waits to raise it
            self.log.warning("%s: the broker refused the subscription to %s (%s)", self.client_id, topic, reason)
        if future is not None and not future.done():
            future.set_result(reason)


def _publish_packet_size(topic: str, payload: bytes, qos: int, v5: bool) -> int:
    """Bytes of the PUBLISH packet paho will send (no properties): fixed header + remaining length."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + (1 if v5 else 0) + len(payload)
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2_097_152 else 4
    return 1 + length_bytes + remaining


def _why_closed(reason: ReasonCode) -> str:
    """paho reports a plain socket close as "Unspecified error"; say what happened instead."""
    return "the connection closed" if reason.value == 0x80 else str(reason)


def _jitter(delay: float) -> float:
    """Between half and all of ``delay``: reconnecting clients spread out instead of stampeding."""
    return random.uniform(delay / 2, delay)


class _PahoLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """paho's log lines at DEBUG, but for a crash in one of the session's callbacks.

    paho logs every failed socket read at ERROR ("failed to receive on socket"), once per
    connect attempt: six lines for one broker that wants TLS. The session says itself what
    went wrong (the error of :meth:`MqttSession.connect`, the reconnect warning), so paho's
    lines are detail for ``-vv``.
    """

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level > logging.DEBUG and not str(msg).startswith("Caught exception"):
            level = logging.DEBUG
        super().log(level, msg, *args, **kwargs)


_PAHO_LOG = _PahoLog(logging.getLogger(f"{__name__}.paho"), {})


def _socket_failure(address: BrokerAddress, exc: OSError | ValueError) -> _AttemptFailed:
    """What a failed TCP (+TLS) connect means for the operator: nothing listening, no route, DNS, TLS."""
    where = f"{address.host}:{address.port}"
    short = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _certificate_failure(address, exc)
    if isinstance(exc, ssl.SSLError) and "ALERT" in (exc.reason or ""):  # the broker ended the handshake
        return _AttemptFailed(short, f"the broker refused the TLS handshake ({exc.reason}): it wants a client "
                                     "certificate signed by its own CA. Give the credentials folder of its federation "
                                     "(--credentials).", final=True)
    if isinstance(exc, ssl.SSLError) and exc.reason == "WRONG_VERSION_NUMBER":  # the answer was no TLS record
        return _AttemptFailed(short, f"the server at {where} does not speak TLS. If it is a plain MQTT port, use "
                                     f"{replace(address, tls=False).url}; otherwise check the port.", final=True)
    if address.tls and isinstance(exc, ssl.SSLError | ConnectionResetError | BrokenPipeError):
        return _AttemptFailed(short, f"the server at {where} closed the connection during the TLS handshake. A plain "
                                     f"MQTT port does that (then use {replace(address, tls=False).url}); otherwise "
                                     "see the broker's log.")
    if isinstance(exc, ConnectionRefusedError):
        return _AttemptFailed(short, f"nothing listens on {where} (connection refused). Start the broker, or correct "
                                     "the host and port of the broker URL (--broker).")
    if isinstance(exc, socket.gaierror):
        return _AttemptFailed(short, f"the host name {address.host!r} does not resolve ({exc.strerror}). Correct the "
                                     "host of the broker URL (--broker), or check this machine's DNS.")
    if isinstance(exc, TimeoutError):
        return _AttemptFailed(short, f"{where} did not answer within {TCP_CONNECT_TIMEOUT_S:g} s. Check that the host "
                                     "is up and reachable from here (network, firewall) and the port is right.")
    if isinstance(exc, OSError):
        return _AttemptFailed(short, f"cannot reach {where} ({exc.strerror or exc}). Check the network and the host "
                                     "of the broker URL (--broker).")
    return _AttemptFailed(short, f"cannot connect to {where} ({exc}).", final=True)  # paho's checks of host and port


def _certificate_failure(address: BrokerAddress, exc: ssl.SSLCertVerificationError) -> _AttemptFailed:
    """The broker's TLS certificate failed verification: not for this host, out of date, or from another CA."""
    detail = exc.verify_message or str(exc)
    if exc.verify_code == X509_HOSTNAME_MISMATCH:
        advice = (f"its TLS certificate is not made for the name {address.host!r} ({detail}). Connect by a name or "
                  "address the certificate names, or write the broker's config again with `wearfl keys broker-config "
                  f"--hostname {address.host}` and restart Mosquitto.")
    elif exc.verify_code in (X509_NOT_YET_VALID, X509_EXPIRED):
        advice = (f"its TLS certificate is not valid now ({detail}). Check both machines' clocks; write the broker's "
                  "config again with `wearfl keys broker-config` (a new certificate) and restart Mosquitto.")
    else:
        trusted = f"the CA in {address.ca_file}" if address.ca_file else "a CA this machine trusts"
        advice = (f"its TLS certificate is not signed by {trusted} ({detail}): the broker and these credentials "
                  "belong to different federations. Use the credentials folder made from the same `wearfl keys` "
                  "state as the broker's config (--credentials).")
    return _AttemptFailed(f"TLS certificate verification failed: {detail}", advice, final=True)


def _connack_failure(address: BrokerAddress, reason: ReasonCode, unsupported: bool) -> _AttemptFailed:
    """The broker answered CONNECT with a refusal: a bad login is the operator's to fix, a busy broker is not."""
    if reason.value in BAD_LOGIN and address.username is None:
        advice = (f"it refused a login without username ({reason}). Give the credentials it expects: --credentials "
                  "DIR (a `wearfl keys` folder) or mqtt://USER:PASSWORD@HOST in the broker URL.")
    elif reason.value in BAD_LOGIN:
        advice = (f"it refused the login of user {address.username!r} ({reason}): the password is wrong, or the "
                  "broker's password file does not hold this user. Check the credentials (mqtt.json of the "
                  "--credentials folder, or USER:PASSWORD in the broker URL); after `wearfl keys add-device`, run "
                  "`wearfl keys broker-config` again and restart Mosquitto.")
    elif reason.value in BAD_CLIENT_ID:
        advice = f"it refused the client id ({reason}); see the broker's log for the rule it broke."
    elif unsupported:
        advice = f"it does not speak this MQTT version ({reason}); use protocol 'auto' or the version it speaks."
    else:
        advice = f"it refused the connection ({reason}); see the broker's log."
    return _AttemptFailed(f"CONNACK {reason}", advice, final=reason.value not in RETRY_CONNACK,
                          unsupported_protocol=unsupported)


def _closed_before_connack(address: BrokerAddress, reason: ReasonCode) -> _AttemptFailed:
    """The connection ended before the broker answered CONNECT: not MQTT there, or the broker hung up."""
    where = f"{address.host}:{address.port}"
    if reason.value == PROTOCOL_ERROR:
        return _AttemptFailed(f"no MQTT answer ({reason})", f"the server at {where} answered with something that is "
                              "not MQTT (an HTTP server or a proxy?). Check the port of the broker URL (--broker).",
                              final=True, closed=True)
    if address.tls:
        advice = ("the broker closed the TLS connection before answering the MQTT CONNECT: it may have refused this "
                  "client's certificate (give the credentials folder of its federation, --credentials); see the "
                  "broker's log.")
    else:
        advice = (f"the server at {where} closed the connection before answering the MQTT CONNECT; see the broker's "
                  "log (a connection limit?).")
    return _AttemptFailed(f"connection closed before CONNACK ({reason})", advice, closed=True)


def _what_listens(host: str, port: int, timeout: float = PROBE_S) -> tuple[str, bytes]:
    """What serves ``host:port``, for an error message: ``"mqtt"``, ``"tls"``, ``"other"`` or ``"silent"``.

    A bare MQTT 3.1.1 CONNECT goes out: a broker answers CONNACK (``"mqtt"``); any other
    answer is returned (``"other"``), unless it is a TLS record (``"tls"``). A server that
    closes without a word gets a TLS hello next (:func:`_speaks_tls`).
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(PROBE_CONNECT)
            answer = sock.recv(64)
    except OSError:  # reset, or no answer in time
        answer = b""
    if answer[:1] == b"\x20":  # CONNACK
        return "mqtt", answer
    if answer[:1] == b"\x15" and answer[1:2] == b"\x03":  # a TLS alert record
        return "tls", answer
    if answer:
        return "other", answer
    return ("tls" if _speaks_tls(host, port, timeout) else "silent"), answer


def _show(answer: bytes) -> str:
    """The start of a server's answer, as text when it is text (``'HTTP/1.1 400 Bad Request'``)."""
    line = answer.split(b"\r\n", 1)[0].split(b"\n", 1)[0][:40]
    text = line.decode("ascii", errors="replace")
    return f"{text!r}" if text.isprintable() and text else f"bytes {answer[:8].hex(' ')}"


def _speaks_tls(host: str, port: int, timeout: float = PROBE_S) -> bool:
    """Whether ``host:port`` answers a TLS hello as a TLS server does: a handshake, or a TLS alert.

    Nothing is verified and nothing is sent after the handshake: this only tells a TLS
    listener from a plain one, for the error message of a plain connection it closed.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, context.wrap_socket(raw):
            return True
    except ssl.SSLError as exc:  # e.g. "certificate required": only a TLS server sends an alert
        return "ALERT" in (exc.reason or "")
    except OSError:
        return False
