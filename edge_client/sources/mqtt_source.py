"""``mqtt:TOPIC``: sample batches that a local BLE-to-MQTT bridge publishes, as a live source.

A gateway often runs a small bridge that talks to the wearable over BLE and publishes
what it receives to the gateway's own MQTT broker. :class:`MqttSource` subscribes to one
topic there and hands the samples to the pipeline.

Spec: ``mqtt:TOPIC`` reads TOPIC at ``mqtt://127.0.0.1:1883`` (the gateway's local broker);
``mqtt://HOST:PORT/TOPIC`` (or ``mqtts://``, with ``user:password@`` if the broker wants it)
names another broker. TOPIC is one topic without wildcards (``+``, ``#``); percent-escapes
are decoded. The client is the topic's last level (``mqtt:ble/wrist-07`` -> ``wrist-07``)
unless the edge is given ``--client-id``.

Payload: one UTF-8 JSON object per message, at most :data:`MAX_PAYLOAD_BYTES` bytes::

    {"rate": 32, "t": [12.5, 12.53125], "ppg": [51234, 51302], "acc_x": [0.01, 0.02], "hr_bpm": [72, null]}

* ``rate`` (required, every message): the sampling rate in Hz, a positive number, the
  same in every message.
* sensor columns ``acc_x acc_y acc_z gyro_x gyro_y gyro_z ppg`` and ``hr_bpm`` (the
  reference heart rate): arrays of numbers, all of one length n >= 1; ``null`` (or NaN)
  is a missing sample. The first message fixes the source's channels; a later message
  may leave some out (their samples are missing) and channels it adds are ignored.
* ``t`` (optional): n sample times in seconds. Without ``t`` the samples follow the
  previous message's last sample at the rate (the first message's at 0.0): leave ``t``
  out only when no sample is ever lost, since a gap then goes unseen.
* any other key is ignored (one warning per key).

A message that is larger, not JSON, or breaks these rules is logged and skipped; it never
stops the edge. Opening the source waits up to ``timeout_s`` for the first good message
(it fixes channels and rate) and fails with a clear error when the broker cannot be
reached or nothing usable arrives. Samples wait in a bounded buffer for the pipeline
(:class:`~edge_client.sources.push.PushSource`); when the pipeline stays behind for
:data:`PUSH_TIMEOUT_S` the message's samples are dropped, counted and logged. paho's
network thread (``loop_start``) receives; it reconnects by itself when the broker restarts.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import numpy as np
import paho.mqtt.client as paho

from edge_client.sources.base import CHANNELS, Chunk
from edge_client.sources.live import SkipLog
from edge_client.sources.push import PushSource
from models.errors import BrokerUnavailable, ConfigError, InputError, PushBufferFull, PushClosed, WearflError
from models.transport.mqtt import BrokerAddress

__all__ = ["DEFAULT_BROKER", "FIRST_MESSAGE_TIMEOUT_S", "MAX_PAYLOAD_BYTES", "Batch", "MqttSource", "parse_payload",
           "parse_spec"]

log = logging.getLogger(__name__)

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
"""The broker of ``mqtt:TOPIC``: the gateway's own local one."""
MAX_PAYLOAD_BYTES = 1 << 20
"""Largest message read (1 MiB, some 10 s of 7 channels at 1 kHz); larger ones are skipped unparsed."""
FIRST_MESSAGE_TIMEOUT_S = 10.0
"""How long opening the source waits for the first good message."""
PUSH_TIMEOUT_S = 0.5
"""How long a message's samples wait for room in the buffer before they are dropped."""
BUFFER_S = 60.0
"""Seconds of samples the buffer holds for a pipeline that is busy."""
SAMPLE_KEYS = (*CHANNELS, "hr_bpm")
_DOCS = "see docs/devices.md"


class Batch(NamedTuple):
    """One parsed message: its rate, sample times (None: not given) and columns (float64, NaN = missing)."""

    rate: float
    t: np.ndarray | None
    columns: dict[str, np.ndarray]
    ignored: tuple[str, ...]


def parse_spec(spec: str) -> tuple[BrokerAddress, str]:
    """The broker and topic of ``mqtt:TOPIC`` or ``mqtt[s]://HOST[:PORT]/TOPIC``; ConfigError otherwise."""
    text = spec.strip()
    scheme, _, rest = text.partition(":")
    if rest.startswith("//"):
        parts = urlsplit(text)
        if parts.query or parts.fragment:
            raise ConfigError(f"--source {spec!r}: the topic must not contain '?' or '#'; use mqtt://HOST:PORT/TOPIC.")
        address = BrokerAddress.parse(f"{scheme}://{parts.netloc}")
        topic = unquote(parts.path[1:])
    elif scheme.strip().lower() == "mqtts":
        raise ConfigError(f"--source {spec!r}: mqtts needs the broker's host; use mqtts://HOST:PORT/TOPIC.")
    else:
        address = BrokerAddress.parse(DEFAULT_BROKER)
        topic = unquote(rest.strip())
    if not topic:
        raise ConfigError(f"--source {spec!r} names no topic; use mqtt:TOPIC or mqtt://HOST:PORT/TOPIC ({_DOCS}).")
    if "+" in topic or "#" in topic or "\0" in topic:
        raise ConfigError(
            f"--source {spec!r}: topic {topic!r} has a wildcard; name the one topic of one device (the bridge "
            f"publishes each device to its own topic, {_DOCS})."
        )
    return address, topic


def _numbers(key: str, value: object) -> np.ndarray:
    if not isinstance(value, list):
        raise InputError(f"{key} is {type(value).__name__}, not an array of numbers")
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{key} holds something other than numbers and null") from None
    if array.ndim != 1:
        raise InputError(f"{key} is not a flat array of numbers")
    return array


def parse_payload(payload: bytes) -> Batch:
    """One message as a :class:`Batch` (module docstring); InputError saying what is wrong with it."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InputError(f"the payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        message = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"the payload is not UTF-8 JSON ({exc})") from None
    if not isinstance(message, dict):
        raise InputError(f"the payload is a JSON {type(message).__name__}, not an object")
    rate = message.get("rate")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate) or rate <= 0:
        raise InputError(f"'rate' must be the sampling rate in Hz, a positive number; got {rate!r}")
    columns = {k: _numbers(k, v) for k, v in message.items() if k in SAMPLE_KEYS}
    if not any(k in CHANNELS for k in columns):
        raise InputError(f"there is no sensor column (one of {list(CHANNELS)}); keys: {sorted(message)}")
    t = _numbers("t", message["t"]) if "t" in message else None
    lengths = {k: len(v) for k, v in columns.items()} | ({} if t is None else {"t": len(t)})
    if len(set(lengths.values())) != 1:
        raise InputError(f"the arrays differ in length {lengths}; every array needs one value per sample")
    if not next(iter(lengths.values())):
        raise InputError("the arrays are empty; a message needs at least one sample")
    if t is not None and not np.isfinite(t).all():
        raise InputError("'t' holds a value that is not a finite number of seconds")
    ignored = tuple(sorted(set(message) - {*SAMPLE_KEYS, "t", "rate"}))
    return Batch(float(rate), t, columns, ignored)


class MqttSource:
    """Samples published to one MQTT topic (module docstring); ``close()`` disconnects and ends ``chunks()``."""

    classes: tuple[str, ...] = ()

    def __init__(self, spec: str, client_id: str | None = None, *, timeout_s: float | None = None) -> None:
        self.address, self.topic = parse_spec(spec)
        self.spec = spec
        self.client_id = client_id or self.topic.rstrip("/").rsplit("/", 1)[-1]
        self.timeout_s = FIRST_MESSAGE_TIMEOUT_S if timeout_s is None else float(timeout_s)
        self.dropped_samples = 0
        """Samples of good messages dropped because the pipeline stayed behind."""
        self._skip = SkipLog(log, f"mqtt source {self.topic}")
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._buffer: PushSource | None = None
        self._next_t = 0.0
        self._warned_keys: set[str] = set()
        self._connect_error: str | None = None
        self._connected = False
        self._client = self._new_client()
        try:
            self._client.connect_async(self.address.host, self.address.port, keepalive=30)
            self._client.loop_start()
            if not self._ready.wait(self.timeout_s):
                raise self._open_error()
        except BaseException:
            self._stop_client()
            raise
        buffer = self._buffer
        assert buffer is not None
        self.channels = buffer.channels
        self.sampling_rate_hz = buffer.sampling_rate_hz

    @property
    def skipped_messages(self) -> int:
        """Messages skipped as malformed (or of another rate) so far."""
        return self._skip.skipped

    def _new_client(self) -> paho.Client:
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"wearfl-source-{uuid.uuid4().hex[:12]}",
                             clean_session=True, protocol=paho.MQTTv311)
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        client.reconnect_delay_set(0.5, 30)
        if self.address.username is not None:
            client.username_pw_set(self.address.username, self.address.password)
        if self.address.tls:
            import ssl

            client.tls_set_context(self.address.ssl_context or ssl.create_default_context())
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        return client

    def _open_error(self) -> WearflError:
        where = f"{self.topic!r} at {self.address.url}"
        if not self._connected:
            reason = self._connect_error or "no answer"
            return BrokerUnavailable(
                f"the MQTT source {self.spec!r} cannot reach the broker {self.address.url} within {self.timeout_s:g} s "
                f"({reason}); start the gateway's broker (e.g. `systemctl start mosquitto`) or name the bridge's "
                f"broker as mqtt://HOST:PORT/TOPIC ({_DOCS}).",
                url=self.address.url,
            )
        seen = f"; {self._skip.skipped} messages were skipped as malformed (see the log)" if self._skip.skipped else ""
        return InputError(
            f"no usable message arrived on {where} within {self.timeout_s:g} s{seen}; check that the bridge runs, "
            f"is connected to the device and publishes to that topic in wearfl's payload format ({_DOCS})."
        )

    # -- paho's network thread ---------------------------------------------------------------

    def _on_connect(self, client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self._connect_error = f"the broker refused the connection: {reason}"
            return
        self._connected = True
        client.subscribe(self.topic, qos=1)

    def _on_connect_fail(self, _client: paho.Client, _userdata: Any) -> None:
        self._connect_error = "the connection failed"

    def _on_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            self._take(parse_payload(message.payload))
        except InputError as exc:
            self._skip(f"a message on {message.topic}: {exc}")
        except Exception:  # never let one message end paho's network thread
            log.exception("mqtt source %s: a message on %s failed; skipped", self.topic, message.topic)

    def _take(self, batch: Batch) -> None:
        """A parsed message's samples into the buffer (the first one creates it: channels and rate)."""
        new_keys = set(batch.ignored) - self._warned_keys
        with self._lock:
            buffer = self._buffer
            if buffer is None:
                channels = tuple(c for c in CHANNELS if c in batch.columns)
                buffer = PushSource(self.client_id, channels, batch.rate, max_buffered_s=BUFFER_S,
                                    push_timeout_s=PUSH_TIMEOUT_S)
                self._buffer = buffer
            elif batch.rate != buffer.sampling_rate_hz:
                raise InputError(f"its rate {batch.rate:g} Hz is not this source's {buffer.sampling_rate_hz:g} Hz "
                                 f"(restart the edge when the device's rate changed)")
            extra = {c for c in batch.columns if c in CHANNELS and c not in buffer.channels} - self._warned_keys
            n = len(next(iter(batch.columns.values())))
            t = batch.t if batch.t is not None else self._next_t + np.arange(n) / batch.rate
            self._next_t = float(t[-1]) + 1.0 / batch.rate
        if new_keys or extra:
            self._warned_keys |= new_keys | extra
            log.warning("mqtt source %s: ignoring keys %s (this source reads %s, t and rate)", self.topic,
                        sorted(new_keys | extra), [*buffer.channels, "hr_bpm"])
        data = np.full((n, len(buffer.channels)), np.nan, np.float32)
        for j, c in enumerate(buffer.channels):
            if c in batch.columns:
                data[:, j] = batch.columns[c]
        data[~np.isfinite(data)] = np.nan
        hr = batch.columns.get("hr_bpm")
        if hr is not None:
            hr = np.where(np.isfinite(hr), hr, np.nan).astype(np.float32)
        try:
            buffer.push(t, data, hr_bpm=hr)
        except PushBufferFull:
            self.dropped_samples += n
            self._skip(f"{n} samples: the pipeline is {BUFFER_S:g} s behind (dropped {self.dropped_samples} so far)")
        except PushClosed:
            pass
        self._ready.set()

    # -- the pipeline's thread ---------------------------------------------------------------

    def chunks(self, max_samples: int = 4096) -> Iterator[Chunk]:
        """Yield samples as messages bring them (blocking), at most ``max_samples`` a chunk, until :meth:`close`."""
        buffer = self._buffer
        assert buffer is not None
        buffer.client_id = self.client_id
        yield from buffer.chunks(max_samples)

    def _stop_client(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def close(self) -> None:
        """Disconnect and end ``chunks`` (after what is buffered). Idempotent, thread-safe."""
        with self._lock:
            buffer = self._buffer
        if buffer is not None:
            buffer.close()
        self._stop_client()

    def __repr__(self) -> str:
        return f"MqttSource({self.topic!r} at {self.address.url}, client {self.client_id!r})"

