"""A site hub's link to its consortium: the consortium's model and task in, one signed partial a round out.

In a federation of sites each site (a hospital, a ward) runs its own broker and hub for its
gateways; the site hub is a client of the consortium hub, on the consortium's broker, under
its site id. Over that session it

- takes the consortium's model and task (retained). A model is believed only when the
  consortium's key signed it for this federation, its ledger entry vouches for it and links
  to the last one this site took, and its version grows; the site hub re-publishes it
  unchanged, so its gateways check the consortium's signature themselves. A task is
  believed when the same key signed it;
- sends one partial aggregate per round as an ordinary signed update (the rule's aggregate
  of the site's deltas and the examples behind it), through the same durable outbox,
  re-sends and signed receipts an edge uses (:class:`~models.transport.sender.Sender`).
  The outbox keeps, in the same transaction, which round the partial answers, so a site
  hub killed after storing it never builds a second one for that round;
- keeps its status (online, the consortium version it follows) retained on ``status/<site>``.

What it took is kept in ``upstream/`` of the hub's state directory (``model.msg``, ``task.json``,
``ledger.head``, ``consortium.pub``, the outbox), each written atomically, so a restarted site
hub goes on without waiting for the consortium.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.errors import BrokerUnavailable, ConfigError, WearflError
from models.files import write_atomic
from models.package import package_bytes
from models.protocol.codec import CodecConfig, UpdateCodec
from models.protocol.identity import public_hex
from models.protocol.ledger import check_entry
from models.protocol.messages import MAX_MODEL_BYTES, Grant, ModelMessage, Task, UpdateMeta, build_update, parse_model
from models.protocol.signed import SigningError
from models.protocol.topics import Topics
from models.transport.link import Link
from models.transport.mqtt import BrokerAddress, Message, MqttSession, Will
from models.transport.outbox import Outbox
from models.transport.sender import Sender

if TYPE_CHECKING:
    from models.protocol.ed25519 import Ed25519PrivateKey

__all__ = ["PARTIAL_ROUND", "Upstream", "UpstreamSettings", "partial_codec"]

log = logging.getLogger(__name__)

PARTIAL_ROUND = "partial_round"
"""Outbox state: the last round whose partial the outbox took (written with the partial, in one transaction)."""


@dataclass(frozen=True)
class UpstreamSettings:
    """Where the consortium is and who this site is there (``client_id`` is the site id)."""

    broker: str
    federation: str
    client_id: str
    credentials: Path | None = None
    consortium_key: str | None = None
    topic_prefix: str = "wearfl/v1"
    protocol: str = "auto"
    publish_timeout_s: float = 10.0
    resend_interval_s: float = 30.0
    connect_timeout_s: float = 10.0

    def address(self) -> BrokerAddress:
        """The consortium broker's URL, with the upstream credentials' password and TLS certificates."""
        from models.transport.credentials import Credentials

        address = BrokerAddress.parse(self.broker)
        if self.credentials is None:
            return address
        return Credentials.load(self.credentials, "device").apply(address)


def partial_codec(task_config: Mapping[str, Any]) -> CodecConfig:
    """How a site encodes its partial: the task's quantization, never clipped, and whole (top-k keeps no
    residual across a site's rounds, so a sparse partial would lose what it leaves out)."""
    codec = CodecConfig.from_task(task_config)
    quantize = "int8" if codec.quantize == "topk" else codec.quantize
    return replace(codec, quantize=quantize, update_clip=0.0)


class Upstream:
    """The consortium's latest model and task (:attr:`model`, :attr:`task`), and the partials on their way.

    ``changed`` is set whenever a newer model or task was taken. ``key`` signs the partials
    (the site's key, the one the consortium's keyring and grant name).
    """

    def __init__(self, settings: UpstreamSettings, state_dir: Path, key: Ed25519PrivateKey,
                 grant: Grant | None = None) -> None:
        self.settings, self.state_dir, self.key, self.grant = settings, Path(state_dir), key, grant
        self.site = settings.client_id
        self.topics = Topics(settings.federation, settings.topic_prefix)
        self.link = Link(self.site, self.topics, settings.publish_timeout_s)
        self.stop = asyncio.Event()
        self.counters: dict[str, int] = {"updates_published": 0}
        self.sender = Sender(settings, self.link, self.stop, self.counters, self.signers, on_freed=self._freed)
        self.changed = asyncio.Event()
        self.pinned: bytes | None = None
        self.model: ModelMessage | None = None
        self.model_payload: bytes | None = None
        self.task: Task | None = None
        self.task_payload: bytes | None = None
        self.partial: dict[str, Any] | None = None  # the last partial: round, sequence, state
        self._outbox: Outbox | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()

    def signers(self) -> list[bytes]:
        return [] if self.pinned is None else [self.pinned]

    # -- start and stop -------------------------------------------------------------

    async def start(self) -> None:
        """Open the stored state and the session (connecting in the background when the consortium is away)."""
        await asyncio.to_thread(self._open_state)
        address = self.settings.address()
        self.link.session = session = MqttSession(
            address, f"wearfl-site-{self.settings.federation}-{self.site}", clean_start=False,
            session_expiry_s=7 * 24 * 3600, manual_ack=False,
            protocol=self.settings.protocol,  # type: ignore[arg-type]
            will=Will(self.topics.status(self.site), self._status_payload("offline"), 1, True),
            max_packet_size_in=MAX_MODEL_BYTES + 64 * 1024, max_buffered=100, max_buffered_bytes=3 * MAX_MODEL_BYTES,
        )
        self._tasks = [asyncio.create_task(self._run(session), name=f"upstream-{self.site}")]

    async def close(self) -> None:
        """Say offline, disconnect and close the outbox."""
        self.stop.set()
        session = self.link.opened
        if session is not None and session.connected:
            with contextlib.suppress(BrokerUnavailable):
                await session.publish(self.topics.status(self.site), self._status_payload("offline"), qos=1,
                                      retain=True, timeout=2.0)
        for task in [*self._tasks, *self._background]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if session is not None:
            with contextlib.suppress(WearflError):
                await session.disconnect()
        if self._outbox is not None:
            self._outbox.close()

    def _open_state(self) -> None:
        """(worker thread) The pinned consortium key, the stored model and task, the outbox."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        pin = self.state_dir / "consortium.pub"
        given = self.settings.consortium_key
        if given is None and self.settings.credentials is not None:
            hub_pub = self.settings.credentials / "hub.pub"
            given = hub_pub.read_text().strip() if hub_pub.is_file() else None
        try:
            self.pinned = bytes.fromhex(given) if given else (bytes.fromhex(pin.read_text().strip())
                                                              if pin.is_file() else None)
        except ValueError:
            raise ConfigError(f"the consortium's key ({given or pin}) is not 64 hex digits; give the consortium "
                              "hub's hub.pub.") from None
        if self.pinned is not None and len(self.pinned) != 32:
            raise ConfigError("the consortium's key must be an Ed25519 public key (64 hex digits).")
        if self.pinned is not None:
            write_atomic(pin, (self.pinned.hex() + "\n").encode())
        self._check_grant()
        self._outbox = Outbox(self.state_dir)
        self.sender.open(self._outbox)
        last = self._outbox.get(PARTIAL_ROUND)
        if last is not None:
            self.partial = {"round": int(last), "state": "pending" if len(self._outbox) else "acknowledged"}
        stored = self.state_dir / "model.msg"
        if stored.is_file():
            try:
                self._take_model(stored.read_bytes(), save=False)
            except (SigningError, WearflError) as exc:
                log.warning("site %s: the stored consortium model %s is unusable (%s); waiting for the consortium's",
                            self.site, stored, exc)
        stored_task = self.state_dir / "task.json"
        if stored_task.is_file():
            with contextlib.suppress(SigningError, WearflError):
                self._take_task(stored_task.read_bytes(), save=False)

    def _check_grant(self) -> None:
        grant = self.grant
        if grant is None:
            return
        if grant.site != self.site or grant.key != public_hex(self.key):
            raise ConfigError(f"the grant is for site {grant.site!r} with key {grant.key[:16]}..., not this site "
                              f"({self.site!r}, key {public_hex(self.key)[:16]}...); use the site's own grant and "
                              "key from `wearfl keys add-site`.")
        if grant.federation != self.settings.federation:
            raise ConfigError(f"the grant is for federation {grant.federation!r}, not {self.settings.federation!r}.")
        if self.pinned is not None and not grant.verify(self.pinned):
            raise ConfigError("the grant is not signed by the consortium's key; make it again with "
                              "`wearfl keys add-site` on the consortium's keys folder.")

    # -- the session ----------------------------------------------------------------

    async def _run(self, session: MqttSession) -> None:
        while not self.stop.is_set():
            try:
                await session.connect(timeout=self.settings.connect_timeout_s)
                for topic in (self.topics.model, self.topics.task, self.topics.receipt(self.site)):
                    await session.subscribe(topic, qos=1, timeout=self.settings.connect_timeout_s)
                break
            except BrokerUnavailable as exc:
                log.warning("site %s: the consortium's broker is not reachable yet (%s); trying again", self.site, exc)
                await asyncio.sleep(2.0)
        log.info("site %s: connected to the consortium at %s (federation %s)", self.site, session.address.url,
                 self.settings.federation)
        await asyncio.gather(self._read(session), self.sender.connection_loop(0.5, self._publish_status),
                             self.sender.resend_loop())

    async def _read(self, session: MqttSession) -> None:
        async for message in session.messages():
            try:
                await self._on_message(message)
            except (SigningError, WearflError) as exc:
                log.warning("site %s: refused a message on %s from the consortium's broker: %s", self.site,
                            message.topic, exc)

    async def _on_message(self, message: Message) -> None:
        if message.topic == self.topics.receipt(self.site):
            await self.sender.on_receipt(message)
        elif message.topic == self.topics.model and message.payload:
            if await asyncio.to_thread(self._take_model, message.payload):
                self.changed.set()
                await self._publish_status()
        elif message.topic == self.topics.task and message.payload:
            if await asyncio.to_thread(self._take_task, message.payload):
                self.changed.set()
            elif self.sender.stats is not None and self.sender.stats.entries:
                # the consortium announced its task again (it reconnected, perhaps to a broker that lost
                # everything): a partial still without a receipt goes again, as an edge's update does
                await self.sender.republish_pending(again=True)

    def _take_model(self, payload: bytes, save: bool = True) -> bool:
        """(worker thread) Take a model message when it is the consortium's and newer; True when it was taken."""
        parsed = parse_model(payload, self.pinned)
        if self.model is not None and parsed.model.version <= self.model.model.version:
            return False
        if parsed.federation != self.settings.federation:
            raise SigningError("federation", f"the model is for federation {parsed.federation!r}")
        previous = self._read_json("ledger.head")
        digest = hashlib.sha256(package_bytes(parsed.model)).hexdigest()
        why = check_entry(parsed.ledger, int(parsed.model.version), digest, previous)
        if why is not None:
            raise SigningError("ledger", f"model v{parsed.model.version}: {why}")
        if self.pinned is None:
            self.pinned = parsed.public_key
            write_atomic(self.state_dir / "consortium.pub", (parsed.public_key.hex() + "\n").encode())
            log.info("site %s: pinned the consortium's key %s (first model seen)", self.site, parsed.public_key.hex())
            self._check_grant()
        if save:
            write_atomic(self.state_dir / "model.msg", payload)
            assert parsed.ledger is not None
            head = {"version": parsed.ledger["version"], "hash": parsed.ledger["hash"]}
            write_atomic(self.state_dir / "ledger.head", json.dumps(head).encode())
        self.model, self.model_payload = parsed, payload
        log.info("site %s: took the consortium's model v%d (round %d)", self.site, parsed.model.version,
                 parsed.round)
        return True

    def _take_task(self, payload: bytes, save: bool = True) -> bool:
        """(worker thread) Take a task the consortium signed for this federation; True when it is new."""
        task = Task.from_bytes(payload)
        if self.pinned is None or not task.verify(self.pinned):
            raise SigningError("signature", f"the task of round {task.round} is not signed by the consortium's key")
        if task.federation != self.settings.federation:
            raise SigningError("federation", f"the task is for federation {task.federation!r}")
        if self.task is not None and (task.round, task.deadline or 0.0) < (self.task.round, self.task.deadline or 0.0):
            return False
        if payload == self.task_payload:
            return False
        if save:
            write_atomic(self.state_dir / "task.json", payload)
        self.task, self.task_payload = task, payload
        return True

    def _read_json(self, name: str) -> dict[str, Any] | None:
        try:
            value = json.loads((self.state_dir / name).read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _status_payload(self, state: str) -> bytes:
        body: dict[str, Any] = {"state": state, "client": self.site, "role": "site", "timestamp": time.time(),
                                "public_key": public_hex(self.key)}
        if state == "online":
            body["model_version"] = None if self.model is None else self.model.model.version
            stats = self.sender.stats
            body["outbox"] = stats.as_dict() if stats is not None else None
        return json.dumps(body, sort_keys=True).encode()

    async def _publish_status(self) -> None:
        session = self.link.opened
        if session is None or not session.connected:
            return
        with contextlib.suppress(BrokerUnavailable):
            await session.publish(self.topics.status(self.site), self._status_payload("online"), qos=1, retain=True,
                                  timeout=self.settings.publish_timeout_s)

    def _freed(self) -> None:
        if self.partial is not None and self._outbox is not None and not len(self._outbox):
            self.partial = {**self.partial, "state": "acknowledged"}

    # -- partials -------------------------------------------------------------------

    def has_partial(self, round_number: int) -> bool:
        """Whether the outbox took this round's partial already (sent, or on its way)."""
        last = self._outbox.get(PARTIAL_ROUND) if self._outbox is not None else None
        return last is not None and int(last) >= round_number

    async def send_partial(self, round_number: int, base: ModelMessage, delta: Mapping[str, np.ndarray],
                           examples: int, task_config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Store this round's partial in the outbox (once per round) and publish it; its receipt removes it."""
        if self._outbox is None:
            raise RuntimeError(f"site {self.site!r} is not running")
        if self.has_partial(round_number):
            log.info("site %s: the partial of round %d is in the outbox already", self.site, round_number)
            return
        self._spawn(self._publish_metrics(round_number, base.model.version, metrics))
        weights = base.model.network.state_dict()
        codec = UpdateCodec.for_weights(weights, partial_codec(task_config))
        rng = np.random.default_rng([round_number, int(hashlib.sha256(self.site.encode()).hexdigest()[:8], 16)])
        tensors, codec_meta, _ = codec.encode(delta, rng)

        def build(sequence: int) -> bytes:
            meta = UpdateMeta(client=self.site, round=round_number, base_version=int(base.model.version),
                              base_hash=base.hash, num_examples=max(1, int(examples)), sequence=sequence,
                              codec=codec_meta)
            return build_update(meta, tensors, self.key)

        stored = await self.sender.store(round_number, build, {PARTIAL_ROUND: str(round_number).encode()})
        if stored is None:
            log.error("site %s: the outbox is full; the partial of round %d is not sent", self.site, round_number)
            return
        sequence, payload = stored
        self.partial = {"round": round_number, "sequence": sequence, "state": "pending", "bytes": len(payload),
                        "examples": int(examples)}
        log.info("site %s: partial of round %d (%d examples, %d bytes) to the consortium", self.site, round_number,
                 examples, len(payload))
        # in the background: a consortium broker that is away must not hold up the site's own rounds (the
        # partial is safe in the outbox, and goes again after every reconnect)
        self._spawn(self.sender.send(sequence, payload))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _publish_metrics(self, round_number: int, version: int, metrics: Mapping[str, float]) -> None:
        """The site's federated evaluation of the round's model, as one report weighted by its examples."""
        examples = int(metrics.get("eval_examples", 0))
        shown = {k: v for k, v in metrics.items() if k not in ("eval_clients", "eval_examples")}
        if examples < 1 or not shown:
            return
        body = {"round": round_number, "model_version": version, "num_examples": examples, "metrics": shown}
        await self.link.publish_json(self.topics.metrics(self.site), body)

    def status(self) -> dict[str, Any]:
        """What ``wearfl status`` shows of this site's upstream."""
        session = self.link.opened
        return {
            "site": self.site, "broker": self.settings.broker, "federation": self.settings.federation,
            "connected": bool(session is not None and session.connected),
            "consortium_key": None if self.pinned is None else self.pinned.hex(),
            "consortium_version": None if self.model is None else self.model.model.version,
            "consortium_round": None if self.task is None else self.task.round,
            "partial": self.partial,
            "outbox": None if self.sender.stats is None else self.sender.stats.as_dict(),
        }
