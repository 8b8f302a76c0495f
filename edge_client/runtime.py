"""The edge runtime: one gateway's MQTT session, and the parts that do its work.

An :class:`EdgeClient` is what runs on a gateway (``wearfl edge``), and, many at a time in
one event loop, what ``wearfl simulate`` runs (:func:`run_edges`). It

1. connects a persistent MQTT session (``clean_start=False``; its last will marks the
   client offline), publishes a retained ``status/<client>`` and subscribes to ``model``,
   ``task``, ``receipt/<client>`` and ``secagg/<client>``;
2. adopts every genuine, newer ``model`` (:mod:`edge_client.adoption`);
3. ingests its source in the background into a replay buffer and a holdout, with live
   inference on the newest window (:mod:`edge_client.ingest`);
4. trains each task's round when it should (:mod:`edge_client.training`), builds the
   round's update (:mod:`edge_client.updates`) and evaluates the models on the holdout
   (:mod:`edge_client.federated_eval`), or joins the round's secure aggregation
   (:mod:`edge_client.secure_aggregation`);
5. stores every update in the outbox before it publishes it, and keeps it there until the
   hub's signed receipt (:mod:`models.transport.sender`).

Each part owns its state; this module only wires them together, dispatches the session's
messages to them and runs their loops. They share the MQTT link and wake one another
through :mod:`edge_client.shared`.

Concurrency: everything runs on one asyncio loop, and the CPU-heavy steps (reading and
preprocessing the source, fit, evaluate, encode, sign and store) go through
:func:`asyncio.to_thread`, so one loop hosts many edges. Per edge, one asyncio lock
serializes whatever touches the buffers (committing windows, fit, evaluate, checkpoint);
windows read while a fit runs wait in a short pending list. The session code never touches
arrays beyond encoding: learning is the :class:`~edge_client.finetune.EdgeTrainer` contract.

Restarts lose and repeat nothing: the last round trained, the top-k residual and each update
change in one outbox transaction; the replay buffer, the holdout and the stream position are
checkpointed every ``checkpoint_interval_s`` and at stop; a restart mid-round re-publishes
the pending update (same sequence, same bytes) and does not train that round again.

State directory::

    device.key            the device's Ed25519 key (load_or_create_key); with ``credentials``, the
                          folder's ``device.key`` is used instead and ``hub.pub`` comes from it
    hub.pub               the hub's public key, hex (pinned on first sight)
    model.msg             the current global model message, exactly as the hub signed it
    ledger.head           version and hash of that model's ledger entry (the next must link to it)
    outbox.sqlite3        pending updates, sequence counter, last round, residual, stream position
    replay.safetensors    the replay buffer; holdout.safetensors the held-out windows
    lock                  flock: one runtime per state directory
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable
from operator import attrgetter
from pathlib import Path
from typing import Any

from edge_client.adoption import ModelAdoption
from edge_client.config import EdgeConfig, read_credentials
from edge_client.federated_eval import Evaluator
from edge_client.ingest import Ingest, MissingChannels, StreamView
from edge_client.secure_aggregation import SecureRound
from edge_client.shared import Link, Wakes, wait
from edge_client.sources.base import Source
from edge_client.training import RoundTrainer, WeightsHook
from models.errors import BrokerUnavailable, ConfigError, WearflError
from models.files import StorageError, check_writable
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.identity import load_or_create_key, public_hex
from models.protocol.messages import MAX_MODEL_BYTES, ModelMessage
from models.protocol.topics import Topics
from models.transport.credentials import Credentials
from models.transport.mqtt import BrokerAddress, MqttSession, Will
from models.transport.outbox import Outbox
from models.transport.sender import Sender

__all__ = ["EdgeClient", "EdgeConfig", "WeightsHook", "run_edges"]

log = logging.getLogger(__name__)

CONNECTION_POLL_S = 0.5  # how often a connected edge checks whether its connection dropped
STATUS_MIN_SPACING_S = 1.0  # at most one event-driven status message a second
SHUTDOWN_PUBLISH_S = 5.0


class _StateDirLock:
    """An exclusive ``flock`` on ``state_dir/lock``: two runtimes on one state directory would corrupt it."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise ConfigError(
                f"the state directory {state_dir} is in use by another edge runtime; stop it or use another --state."
            ) from None

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


class EdgeClient:
    """One gateway: see the module docstring. ``run(stop)`` once; read the attributes for status."""

    def __init__(self, config: EdgeConfig, source: Source) -> None:
        self.config = config
        self.source = source
        self.client_id = config.client_id
        self.topics = Topics(config.federation, config.topic_prefix)
        self.outbox: Outbox | None = None
        self.counters = {"updates_built": 0, "updates_published": 0, "receipts_accepted": 0,
                         "receipts_duplicate": 0, "receipts_rejected": 0, "models_accepted": 0,
                         "models_refused": 0, "rounds_skipped": 0, "metrics_published": 0}
        self._link = Link(self.client_id, self.topics, config.publish_timeout_s)
        self._wakes = Wakes()
        self._ingest = Ingest(config, source, self._wakes, lambda view: self._evaluator.due(view))
        self._models = ModelAdoption(config, self._ingest, self._wakes, self.counters)
        self._sender = Sender(config, self._link, self._wakes.stop, self.counters, self._models.signers,
                             on_freed=self._outbox_freed)
        self._secure = SecureRound(config, self._link, self.counters)
        self._evaluator = Evaluator(self._link, self._ingest, self._models, self._wakes, self.counters,
                                    lambda: self._trainer.task)
        self._trainer = RoundTrainer(config, self._ingest, self._models, self._sender, self._secure, self._evaluator,
                                     self._wakes, self.counters)
        self._key: Ed25519PrivateKey | None = None
        self._creds: Credentials | None = None  # the credentials folder, read with the state
        self._ran = False

    def __repr__(self) -> str:
        return f"EdgeClient({self.client_id!r}, federation={self.config.federation!r})"

    # -- what the parts say ---------------------------------------------------------------------

    model = property(attrgetter("_models.model"), doc="The current global model (a ModelMessage), or None.")
    model_version = property(attrgetter("_models.version"), doc="The current global model's version, or None.")
    task = property(attrgetter("_trainer.task"), doc="The hub's current task, or None.")
    last_round = property(attrgetter("_trainer.last_round"), doc="The last round this edge trained (-1: none).")
    training_state = property(attrgetter("_trainer.state"), doc="What training does or waits for, in words.")
    declined = property(attrgetter("_trainer.declined"), doc="The last round declined (round, reason, detail) or None.")
    outbox_stats = property(attrgetter("_sender.stats"), doc="The outbox's entries and bytes (None before run).")
    latest_prediction = property(attrgetter("_ingest.latest_prediction"),
                                 doc="Live inference on the newest window (None before the first).")
    source_ended = property(attrgetter("_ingest.source_ended"), doc="Whether the source has delivered all it has.")
    inference_latencies = property(attrgetter("_ingest.inference"), doc="Live inference latencies (a histogram).")
    live_explainer = property(attrgetter("_ingest.explainer"),
                              doc="Explains live predictions within a CPU budget (None: not asked to).")

    @property
    def weights_hook(self) -> WeightsHook | None:
        """Simulation seam: turns each round's trained weights into others (the attack harness)."""
        return self._trainer.weights_hook

    @weights_hook.setter
    def weights_hook(self, hook: WeightsHook | None) -> None:
        self._trainer.weights_hook = hook

    @property
    def replay_windows(self) -> int:
        view = self._ingest.view
        return 0 if view is None else len(view.replay)

    @property
    def holdout_windows(self) -> int:
        view = self._ingest.view
        return 0 if view is None else len(view.holdout)

    def status(self) -> dict[str, Any]:
        """The retained ``status/<client>`` message: presence, model, outbox, training, live prediction."""
        stats = self._sender.stats
        return {
            "state": "online",
            "client": self.client_id,
            "timestamp": time.time(),
            "public_key": public_hex(self._key) if self._key is not None else None,
            "model_version": self.model_version,
            "last_round": self.last_round,
            "training": self.training_state,
            "declined": self.declined,
            "outbox": stats.as_dict() if stats is not None else None,
            **self._ingest.status(),
            "prediction": self.latest_prediction,
            "counters": dict(self.counters),
        }

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; then publish status offline, checkpoint and disconnect.

        Raises ConfigError (state directory in use, bad settings), BrokerUnavailable (no
        broker within ``connect_timeout_s`` at start), StorageError (the state directory is
        read-only, or its disk filled up: the outbox keeps its pending updates intact),
        MissingChannels (the hub's model needs channels the source lacks), or whatever error
        stopped a worker. A malformed broker URL fails before the state directory is touched.
        """
        if self._ran:
            raise RuntimeError(f"{self!r} has already run; create a new EdgeClient to run again")
        self._ran = True
        cfg = self.config
        BrokerAddress.parse(cfg.broker)  # ConfigError before the state directory and the device key are made
        await asyncio.to_thread(check_writable, cfg.state_dir, "edge state directory")  # read-only or full: say so
        lock = _StateDirLock(cfg.state_dir)
        try:
            stored = await asyncio.to_thread(self._open_state)
            if stored is not None:
                self._models.install(*stored)
            session = self._link.session = MqttSession(
                self._broker_address(), f"wearfl-edge-{cfg.federation}-{self.client_id}",
                clean_start=False, session_expiry_s=cfg.session_expiry_s,
                will=Will(self.topics.status(self.client_id), self._offline_payload("connection lost", will=True), 1,
                          True),
                manual_ack=True, protocol=cfg.protocol, keepalive=cfg.keepalive,
                # the broker never sends this edge more than a model message; a flood is shed, not held
                max_packet_size_in=MAX_MODEL_BYTES + 64 * 1024, max_buffered=1000,
                max_buffered_bytes=3 * MAX_MODEL_BYTES,
            )
            if not await self._connect_unless_stopped(session, stop):
                return
            try:
                for topic in (self.topics.model, self.topics.task, self.topics.receipt(self.client_id),
                              self.topics.secagg_down(self.client_id)):
                    await session.subscribe(topic, qos=1, timeout=cfg.connect_timeout_s)
                try:  # only a site's gateways need it; a broker whose ACL predates grants may refuse it
                    await session.subscribe(self.topics.grant, qos=1, timeout=cfg.connect_timeout_s)
                except ConfigError as exc:
                    log.info("%s: no site grants on this broker (%s)", self.client_id, exc)
                log.info("%s: connected to %s (MQTT %s), federation %s", self.client_id, session.address.url,
                         session.protocol, cfg.federation)
                await self._serve(stop)
            finally:
                await self._shutdown()
        finally:
            if self.outbox is not None:
                self.outbox.close()
            lock.release()

    async def _connect_unless_stopped(self, session: MqttSession, stop: asyncio.Event) -> bool:
        """Connect (BrokerUnavailable after ``connect_timeout_s``); False when ``stop`` came first."""
        connecting = asyncio.create_task(session.connect(timeout=self.config.connect_timeout_s))
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([connecting, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, WearflError):
                await connecting
            with contextlib.suppress(WearflError):
                await session.abort()
            log.info("%s: stopped before the broker answered", self.client_id)
            return False
        connecting.result()  # BrokerUnavailable when no attempt succeeded in time
        return True

    def _outbox_freed(self) -> None:
        self._wakes.train.set()  # room in the outbox
        self._wakes.status.set()

    def _open_state(self) -> tuple[ModelMessage, StreamView | None] | None:
        """(worker thread) Key, outbox and pinned hub key to the parts; the stored model and its stream view, if any."""
        cfg = self.config
        creds = self._creds = read_credentials(cfg)
        key = self._key = creds.signing_key() if creds is not None else load_or_create_key(cfg.state_dir / "device.key")
        outbox = self.outbox = Outbox(cfg.state_dir, max_entries=cfg.outbox_max_entries,
                                      max_bytes=cfg.outbox_max_bytes)
        self._sender.open(outbox)
        self._trainer.open(outbox, key)
        self._ingest.outbox, self._secure.key = outbox, key
        return self._models.open(creds)

    def _broker_address(self) -> BrokerAddress:
        """The broker URL, with the credentials' password and TLS certificates (read by :meth:`_open_state`)."""
        address = BrokerAddress.parse(self.config.broker)
        return self._creds.apply(address) if self._creds is not None else address

    async def _serve(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        failure: asyncio.Future[BaseException] = loop.create_future()

        def worker_done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None and not failure.done():
                failure.set_result(task.exception())  # type: ignore[arg-type]

        workers = [
            asyncio.create_task(coro, name=f"edge-{self.client_id}-{name}")
            for name, coro in (
                ("messages", self._message_loop()),
                ("connection", self._sender.connection_loop(CONNECTION_POLL_S, self._publish_status)),
                ("ingest", self._ingest.run()), ("train", self._trainer.loop()), ("eval", self._evaluator.loop()),
                ("status", self._status_loop()), ("resend", self._sender.resend_loop()),
                ("checkpoint", self._ingest.checkpoint_loop()),
            )
        ]
        for task in workers:
            task.add_done_callback(worker_done)
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([stopped, failure], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._wakes.stop.set()
            stopped.cancel()
            for task in workers:
                task.cancel()
            self._ingest.close_source()
            await asyncio.gather(*workers, stopped, return_exceptions=True)
        if failure.done():
            exc = failure.result()
            # a WearflError is the caller's one clear line (the CLI prints it); anything else is a bug
            log.log(logging.DEBUG if isinstance(exc, WearflError) else logging.ERROR,
                    "%s: stopping after an error: %s", self.client_id, exc)
            raise exc

    async def _shutdown(self) -> None:
        self._wakes.stop.set()
        await self._trainer.discard_running_fit()
        try:
            await self._ingest.checkpoint()
        except StorageError as exc:  # the disk is full or read-only: the error that stops the edge says so
            log.error("%s: could not checkpoint the buffers at stop: %s", self.client_id, exc)
        except Exception:
            log.exception("%s: could not checkpoint the buffers at stop", self.client_id)
        session = self._link.opened
        if session is None:
            return
        if session.connected:
            with contextlib.suppress(BrokerUnavailable, ConfigError):  # ConfigError: the broker refuses the topic
                await session.publish(self.topics.status(self.client_id), self._offline_payload("stopped"), qos=1,
                                      retain=True, timeout=SHUTDOWN_PUBLISH_S)
        await session.disconnect()
        stats = self._sender.stats
        log.info("%s: stopped (%d update(s) pending in the outbox)", self.client_id, stats.entries if stats else 0)

    # -- the session --------------------------------------------------------------------------

    async def _message_loop(self) -> None:
        session = self._link.session
        handlers = {self.topics.model: self._models.on_model, self.topics.grant: self._models.on_grant,
                    self.topics.task: self._trainer.on_task,
                    self.topics.receipt(self.client_id): self._sender.on_receipt,
                    self.topics.secagg_down(self.client_id): self._secure.on_message}
        async for message in session.messages():
            handler = handlers.get(message.topic)
            try:
                if handler is not None:
                    await handler(message)
                else:
                    log.debug("%s: ignoring a message on %s", self.client_id, message.topic)
            except (StorageError, MissingChannels):
                raise  # a full state directory, a model the source cannot feed: stop; the message is redelivered
            except Exception:
                log.exception("%s: handling a message on %s failed", self.client_id, message.topic)
            session.ack(message)  # after handling (and persisting); not on cancellation: then it is redelivered

    def _offline_payload(self, reason: str, will: bool = False) -> bytes:
        body: dict[str, Any] = {"state": "offline", "client": self.client_id, "reason": reason}
        stats = self._sender.stats
        if not will:  # the will is fixed at connect time: a timestamp there would mislead
            body["timestamp"] = time.time()
        if stats is not None and not will:
            body["outbox"] = stats.as_dict()
        return json.dumps(body, sort_keys=True).encode()

    async def _publish_status(self) -> None:
        await self._link.publish_json(self.topics.status(self.client_id), self.status(), retain=True)

    async def _status_loop(self) -> None:
        session = self._link.session
        while not self._wakes.stopping:
            await wait(self._wakes.status, self.config.status_interval_s)
            self._wakes.status.clear()
            if session.connected:
                await self._publish_status()
            await asyncio.sleep(STATUS_MIN_SPACING_S)


async def run_edges(
    edges: Iterable[EdgeClient | tuple[EdgeConfig, Source]],
    stop: asyncio.Event,
    *,
    connect_spread_s: float = 0.0,
) -> dict[str, BaseException]:
    """Run many edges in this event loop until ``stop`` is set; each edge is its own MQTT session.

    ``edges`` are EdgeClients or (EdgeConfig, Source) pairs. ``connect_spread_s`` spreads the
    starts over that many seconds (a thousand simultaneous CONNECTs are a storm). An edge that
    fails does not stop the others: the failures come back as ``{client_id: exception}`` (and
    are logged); every edge publishes status offline and checkpoints when stopped.
    """
    clients = [e if isinstance(e, EdgeClient) else EdgeClient(*e) for e in edges]
    seen: set[tuple[str, str]] = set()
    for c in clients:
        key = (c.config.federation, c.client_id)
        if key in seen:
            raise ConfigError(f"client id {c.client_id!r} appears twice in federation {c.config.federation!r}.")
        seen.add(key)

    async def one(i: int, client: EdgeClient) -> None:
        if connect_spread_s > 0 and len(clients) > 1:
            await wait(stop, connect_spread_s * i / (len(clients) - 1))
            if stop.is_set():
                return
        await client.run(stop)

    results = await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)), return_exceptions=True)
    failures: dict[str, BaseException] = {}
    for client, result in zip(clients, results, strict=True):
        if isinstance(result, BaseException):
            failures[client.client_id] = result
            log.error("%s: edge failed: %s", client.client_id, result,
                      exc_info=None if isinstance(result, WearflError) else result)
    return failures
