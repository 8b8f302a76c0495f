"""A swarm: many light simulated edges in one event loop, for federations of thousands of wearers.

A full :class:`~edge_client.runtime.EdgeClient` is a gateway: it streams its source into a replay
buffer and a holdout, runs live inference, evaluates every model and keeps all of it on disk,
about 1.4 MB resident and a few MB of files each. A simulation of 1,000 or 10,000 wearers cannot
afford that and does not need it, because a simulated wearer's data can be made when it trains.
A light edge keeps the federation's protocol and drops the waiting cost:

- its own persistent MQTT session (last will: status offline), a retained status online, and a
  subscription to ``receipt/<client>``;
- the ``model`` and the ``task`` are read-only data every edge shares: one session per process
  subscribes to them (a thousand sessions would each receive the same 70 kB model every round)
  and checks them as a gateway does (:mod:`edge_client.adoption`, :mod:`edge_client.training`):
  the hub's signature (its key pinned by the first model), the ledger entry linking to the last
  model adopted, a growing version, the federation, task settings within bounds; then every edge
  of the process takes them;
- when a task selects it: the round's windows are made (``sim``: another stretch of the same
  wearer's life, :meth:`~edge_client.sources.simulator.SimulatedWearer.span`; other datasets:
  the client's recording), fine-tuned from the global weights with the task's settings, encoded,
  signed with the edge's own key and stored in the outbox with the round in one transaction,
  published, and removed only by the hub's signed final receipt (the gateway's
  :class:`~models.transport.sender.Sender`, over a :class:`~models.transport.shared_outbox.SharedOutbox`).

A light edge does no federated evaluation, personalization, live inference, secure aggregation
or site grants. Device keys are derived from a per-run secret and the client id
(:func:`device_key`), so the hub's keyring lists every edge before any connects. A
:class:`SwarmSpec` is plain JSON, so a swarm runs in this process or in a worker process
(:mod:`wearfl.swarm_worker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.finetune import FineTunePolicy, release_free_memory
from edge_client.updates import LocalRound, encode_update, read_residual, residual_bytes, sign_update
from models.errors import ConfigError, WearflError
from models.model import Model
from models.package import package_bytes
from models.protocol.codec import CodecConfig, UpdateCodec
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.identity import public_hex
from models.protocol.ledger import check_entry
from models.protocol.messages import MAX_MODEL_BYTES, ModelMessage, Task, parse_model
from models.protocol.signed import SigningError
from models.protocol.topics import Topics
from models.training import TrainConfig, fit
from models.transport.link import Link
from models.transport.mqtt import BrokerAddress, Message, MqttSession, Will
from models.transport.sender import Sender
from models.transport.shared_outbox import ClientOutbox, SharedOutbox

__all__ = ["LightEdge", "Swarm", "SwarmSpec", "device_key", "round_windows"]

log = logging.getLogger(__name__)

RESEND_INTERVAL_S = 120.0
"""An update without a receipt for this long is published again (as a gateway does)."""
WATCH_S = 2.0
"""How often the swarm looks for sessions that reconnected (their status and pending updates go out again)."""
MISC_INTERVAL_S = 5.0
"""paho's keepalive bookkeeping per session: every few seconds, not every second (keepalive is 60 s)."""
KEEPALIVE_S = 60
PUBLISH_TIMEOUT_S = 60.0
DEFAULT_WINDOWS = 64
"""Windows a light edge makes for a round trained in epochs (with ``local_steps``: steps x batch size)."""
MAX_SPAN_SAMPLES = 8192


def device_key(secret: bytes, client: str) -> Ed25519PrivateKey:
    """The device key of simulated edge ``client``: a function of the run's secret, so the hub's keyring can be
    written before any edge starts, and the same after a worker restarts."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"wearfl-sim-device\0" + secret + client.encode())
                                                .digest())


@dataclass(frozen=True)
class SwarmSpec:
    """What a swarm runs, as plain JSON: the broker and federation, the dataset and clients, where the outbox is.

    ``first_index``: the index of ``clients[0]`` among all the run's edges (edge i's seed is ``seed + i``, as for
    full edges). ``grow``: the training wearers ``sim`` makes
    (:meth:`~edge_client.sources.simulator.SimulatedDataset.grown`; 0: the dataset as it is).
    """

    broker: str
    federation: str
    dataset: str
    clients: tuple[str, ...]
    outbox: str
    secret: str
    seed: int = 0
    first_index: int = 0
    hop_fraction: float = 0.25
    connect_spread_s: float = 0.0
    grow: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SwarmSpec:
        body = json.loads(text)
        body["clients"] = tuple(body["clients"])
        return cls(**body)


def round_windows(dataset: Any, client: str, round_number: int, model: Model, hop_fraction: float,
                  wanted: int) -> tuple[np.ndarray, np.ndarray]:
    """The labelled windows ``client`` trains on in ``round_number``: for ``sim``, a fresh stretch of the wearer's
    life just long enough for ``wanted`` windows; for a recorded dataset, the client's recording."""
    from edge_client.evaluation import client_windows
    from edge_client.sources.simulator import SimulatedDataset

    spec = model.spec
    hop = max(1, round(spec.window * hop_fraction))
    if isinstance(dataset, SimulatedDataset):
        source = dataset.source(client, day=round_number + 1)
        rate = source.sampling_rate_hz / spec.sampling_rate_hz
        samples = min(MAX_SPAN_SAMPLES, int(np.ceil((spec.window + (wanted - 1) * hop) * rate)) + 1)
        data = client_windows(source, spec, hop=hop, chunks=[source.span(samples)])
    else:
        data = client_windows(dataset.source(client), spec, hop=hop)
    return data.x, data.y


@dataclass(frozen=True)
class _SenderSettings:
    client_id: str
    federation: str
    publish_timeout_s: float = PUBLISH_TIMEOUT_S
    resend_interval_s: float = RESEND_INTERVAL_S


class LightEdge:
    """One simulated wearer's edge in a :class:`Swarm`: its session, key, outbox part and the round it trained."""

    __slots__ = ("client_id", "connection", "index", "key", "last_round", "link", "outbox", "queued", "sender")

    def __init__(self, swarm: Swarm, client_id: str, index: int, last_round: int) -> None:
        self.client_id, self.index, self.last_round = client_id, index, last_round
        self.key = device_key(swarm.secret, client_id)
        self.link = Link(client_id, swarm.topics, PUBLISH_TIMEOUT_S)
        self.outbox: ClientOutbox = swarm.outbox.view(client_id)
        self.sender = Sender(_SenderSettings(client_id, swarm.spec.federation), self.link, swarm.stop, swarm.counters,
                             swarm.signers)
        self.queued = False
        self.connection = 0  # the session's connection whose status and pending updates went out


class Swarm:
    """Many :class:`LightEdge` in one event loop: see the module docstring. ``run(stop)`` once."""

    def __init__(self, spec: SwarmSpec, dataset: Any | None = None) -> None:
        from edge_client.sources.datasets import open_dataset

        self.spec = spec
        if dataset is None:
            dataset = open_dataset(spec.dataset)
            grown = getattr(dataset, "grown", None)
            dataset = grown(spec.grow) if grown is not None and spec.grow else dataset
        self.dataset = dataset
        self.secret = bytes.fromhex(spec.secret)
        self.topics = Topics(spec.federation)
        self.stop = asyncio.Event()
        self.counters: dict[str, Any] = {"updates_built": 0, "updates_published": 0, "models_accepted": 0,
                                         "models_refused": 0, "tasks_refused": 0, "training_seconds": 0.0}
        self.pinned: bytes | None = None
        self.outbox: SharedOutbox = None  # type: ignore[assignment]  # opened by run()
        self.edges: list[LightEdge] = []
        self.model: ModelMessage | None = None  # the model and task every edge of the process has
        self.task: Task | None = None
        self._unverified: bytes | None = None  # a task that came before the hub's key was pinned
        self._base: dict[str, np.ndarray] = {}  # the model's weights, read-only
        self._checked: dict[bytes, asyncio.Future[Any]] = {}  # message digest -> the check's result
        self._jobs: asyncio.Queue[LightEdge] = asyncio.Queue()
        self._net: Model | None = None
        self._fresh: list[tuple[Any, dict[str, Any]]] = []  # the net's random generators as they start
        self.connected = 0

    def signers(self) -> list[bytes]:
        return [] if self.pinned is None else [self.pinned]

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Connect every edge, take part in the rounds until ``stop``; then status offline and disconnect."""
        BrokerAddress.parse(self.spec.broker)
        self.stop = stop
        self.outbox = await asyncio.to_thread(SharedOutbox, self.spec.outbox, max_entries=8)
        try:
            rounds = await asyncio.to_thread(self.outbox.states, "last_round")
            self.edges = [LightEdge(self, c, self.spec.first_index + i, int(rounds.get(c, b"-1")))
                          for i, c in enumerate(self.spec.clients)]
            for edge in self.edges:
                edge.sender.open(edge.outbox)  # type: ignore[arg-type]  # the Outbox methods Sender uses
            workers = [asyncio.create_task(self._fits(), name="swarm-fits"),
                       asyncio.create_task(self._watch(), name="swarm-watch"),
                       asyncio.create_task(self._listen(), name="swarm-listen")]
            lives = [asyncio.create_task(self._live(i, edge), name=f"edge-{edge.client_id}")
                     for i, edge in enumerate(self.edges)]
            try:
                await stop.wait()
            finally:
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                await asyncio.gather(*lives, return_exceptions=True)
        finally:
            self.outbox.close()

    async def _live(self, i: int, edge: LightEdge) -> None:
        """One edge's session from connect to disconnect; its messages in between."""
        spread = self.spec.connect_spread_s * i / max(1, len(self.edges) - 1)
        if spread > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), spread)
        if self.stop.is_set():
            return
        session = edge.link.session = MqttSession(
            BrokerAddress.parse(self.spec.broker), f"wearfl-edge-{self.spec.federation}-{edge.client_id}",
            clean_start=False, session_expiry_s=3600, manual_ack=True, keepalive=KEEPALIVE_S,
            will=Will(self.topics.status(edge.client_id), self._offline(edge, "connection lost"), 1, True),
            max_packet_size_in=MAX_MODEL_BYTES + 64 * 1024, max_buffered=100, max_buffered_bytes=2 * MAX_MODEL_BYTES,
            misc_interval_s=MISC_INTERVAL_S,
        )
        consumer = None
        try:
            connecting = asyncio.create_task(session.connect(timeout=60.0))
            stopped = asyncio.create_task(self.stop.wait())
            await asyncio.wait([connecting, stopped], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not connecting.done():
                connecting.cancel()
                with contextlib.suppress(BaseException):
                    await connecting
                return
            connecting.result()
            await session.subscribe(self.topics.receipt(edge.client_id), qos=1, timeout=60.0)
            self.connected += 1
            consumer = asyncio.create_task(self._consume(edge))
            await self._connected(edge)
            await self.stop.wait()
        except WearflError as exc:
            log.error("%s: %s", edge.client_id, exc)
        finally:
            if consumer is not None:
                consumer.cancel()
                with contextlib.suppress(BaseException):
                    await consumer
            if session.connected:
                with contextlib.suppress(WearflError):
                    await session.publish(self.topics.status(edge.client_id), self._offline(edge, "stopped"), qos=1,
                                          retain=True, timeout=5.0)
            with contextlib.suppress(WearflError):
                await session.disconnect()

    async def _connected(self, edge: LightEdge) -> None:
        """After each (re)connect: status online, then every pending update again."""
        edge.connection = edge.link.session.connection
        await edge.link.publish_json(self.topics.status(edge.client_id), self._online(edge), retain=True)
        await edge.sender.republish_pending()  # nothing to do when the outbox is empty
        self._consider(edge)  # the round that started before it connected

    async def _watch(self) -> None:
        """Sessions that reconnected send their status and pending updates again; overdue updates are re-sent."""
        loop = asyncio.get_running_loop()
        last_resend = loop.time()
        while True:
            await asyncio.sleep(WATCH_S)
            for edge in self.edges:
                session = edge.link.opened
                if session is not None and session.connected and session.connection != edge.connection:
                    await self._connected(edge)
            if loop.time() - last_resend < RESEND_INTERVAL_S / 4:
                continue
            last_resend = loop.time()
            for edge in self.edges:
                session, stats = edge.link.opened, edge.sender.stats
                if session is None or not session.connected or stats is None or not stats.entries:
                    continue
                pending = await asyncio.to_thread(edge.outbox.pending)
                for entry in edge.sender.overdue(pending, loop.time(), time.time()):
                    if not await edge.sender.send(entry.sequence, entry.payload, again=True):
                        break

    def _online(self, edge: LightEdge) -> dict[str, Any]:
        return {"state": "online", "client": edge.client_id, "timestamp": time.time(),
                "public_key": public_hex(edge.key), "model_version": None if self.model is None else
                self.model.model.version, "last_round": edge.last_round, "training": "idle", "edge": "light"}

    def _offline(self, edge: LightEdge, reason: str) -> bytes:
        return json.dumps({"state": "offline", "client": edge.client_id, "reason": reason}).encode()

    # -- messages -------------------------------------------------------------------------------

    async def _consume(self, edge: LightEdge) -> None:
        """An edge's receipts."""
        await self._each_message(edge.link.session, edge.client_id, edge.sender.on_receipt)

    async def _each_message(self, session: MqttSession, who: str, handle: Any) -> None:
        messages = session.messages()
        while (message := await anext(messages, None)) is not None:
            try:
                await handle(message)
            except WearflError as exc:
                log.error("%s: %s", who, exc)
            except Exception:
                log.exception("%s: handling a message on %s failed", who, message.topic)
            session.ack(message)
            del message  # a model message is not kept while waiting for the next

    async def _listen(self) -> None:
        """The process's one subscription to the model and the task, which every edge of it takes."""
        session = MqttSession(BrokerAddress.parse(self.spec.broker),
                              f"wearfl-swarm-{self.spec.federation}-{self.spec.first_index}", clean_start=True,
                              manual_ack=True, keepalive=KEEPALIVE_S, max_packet_size_in=MAX_MODEL_BYTES + 64 * 1024,
                              max_buffered=100, max_buffered_bytes=4 * MAX_MODEL_BYTES)
        try:
            await session.connect(timeout=60.0)
            for topic in (self.topics.model, self.topics.task):
                await session.subscribe(topic, qos=1, timeout=60.0)
            await self._each_message(session, "swarm", self._shared_message)
        finally:
            with contextlib.suppress(WearflError):
                await session.disconnect()

    async def _shared_message(self, message: Message) -> None:
        if not message.payload:
            return
        if message.topic == self.topics.model:
            if await self._checked_model(message.payload) is None:
                return
            if self._unverified is not None:  # the task that came before the first model pinned the hub's key
                payload, self._unverified = self._unverified, None
                await self._take_task(payload)
            self._consider_all()
        elif message.topic == self.topics.task:
            await self._take_task(message.payload)

    async def _take_task(self, payload: bytes) -> None:
        if self.pinned is None:
            self._unverified = payload
            return
        task = await self._checked_task(payload)
        if task is not None and (self.task is None or task.round >= self.task.round):
            self.task = task
            self._consider_all()

    async def _once(self, payload: bytes, check: Any) -> Any:
        """``check(payload)``'s result, computed once for every edge of the process that received these bytes."""
        digest = hashlib.sha256(payload).digest()
        future = self._checked.get(digest)
        if future is None:
            if len(self._checked) > 64:  # old models and tasks: their digests are not needed again
                self._checked = dict(list(self._checked.items())[-32:])
            future = self._checked[digest] = asyncio.get_running_loop().create_future()
            try:
                future.set_result(await check(payload))
            except BaseException as exc:
                future.set_exception(exc)
                self._checked.pop(digest, None)
                raise
        return await asyncio.shield(future)

    async def _checked_model(self, payload: bytes) -> ModelMessage | None:
        return await self._once(payload, self._check_model)

    async def _check_model(self, payload: bytes) -> ModelMessage | None:
        """The model in ``payload`` if it is the hub's, for this federation, newer and linked to the last one."""
        current = self.model
        try:
            parsed = await asyncio.to_thread(parse_model, payload, self.pinned)
        except (SigningError, WearflError) as exc:
            return self._refuse_model(f"a model message of {len(payload)} bytes ({exc})")
        if parsed.federation != self.spec.federation:
            return self._refuse_model(f"model v{parsed.model.version}: it is released to federation "
                                      f"{parsed.federation!r}")
        if current is not None and parsed.model.version <= current.model.version:
            return self._refuse_model(f"model v{parsed.model.version}: not newer than v{current.model.version}")
        if parsed.ledger is not None:
            previous = None if current is None or current.ledger is None else {
                "version": current.model.version, "hash": current.ledger["hash"]}
            digest = hashlib.sha256(await asyncio.to_thread(package_bytes, parsed.model)).hexdigest()
            refusal = check_entry(parsed.ledger, int(parsed.model.version), digest, previous)
            if refusal:
                return self._refuse_model(f"model v{parsed.model.version}: {refusal}")
        if self.pinned is None:
            self.pinned = parsed.public_key
            log.info("swarm: pinned the hub's key %s (first model seen)", parsed.public_key.hex())
        self.model, self._base = parsed, parsed.model.network.state_dict()
        self.counters["models_accepted"] += 1
        return parsed

    def _refuse_model(self, why: str) -> None:
        self.counters["models_refused"] += 1
        log.warning("swarm: refused %s", why)
        return None

    async def _checked_task(self, payload: bytes) -> Task | None:
        return await self._once(payload, self._check_task)

    async def _check_task(self, payload: bytes) -> Task | None:
        """The task in ``payload`` if the pinned hub key signed it for this federation with settings in bounds."""
        try:
            task = Task.from_bytes(payload)
        except SigningError as exc:
            return self._refuse_task(f"it is malformed ({exc.detail})")
        if not task.verify(self.pinned):
            return self._refuse_task(f"round {task.round}: it is not signed by the hub's key")
        if task.federation != self.spec.federation:
            return self._refuse_task(f"round {task.round}: it is for federation {str(task.federation)[:64]!r}")
        try:
            FineTunePolicy().with_overrides(task.config)
            CodecConfig.from_task(task.config)
        except ConfigError as exc:
            return self._refuse_task(f"round {task.round}: {exc}")
        if task.clients is not None:  # every edge asks: a set, not a list
            task = replace(task, clients=frozenset(task.clients))  # type: ignore[arg-type]
        return task

    def _refuse_task(self, why: str) -> None:
        self.counters["tasks_refused"] += 1
        log.warning("swarm: refused a task message: %s", why)
        return None

    # -- training -------------------------------------------------------------------------------

    def _due(self, edge: LightEdge) -> bool:
        task, model = self.task, self.model
        return (task is not None and model is not None and task.round > edge.last_round
                and task.selects(edge.client_id) and task.model_version == model.model.version)

    def _consider(self, edge: LightEdge) -> None:
        """Queue ``edge``'s fit when the task selects it for a round it has not trained (once connected)."""
        if not edge.queued and edge.connection and self._due(edge):
            edge.queued = True
            self._jobs.put_nowait(edge)

    def _consider_all(self) -> None:
        for edge in self.edges:
            self._consider(edge)

    async def _fits(self) -> None:
        started, done = 0.0, 0
        while True:
            if self._jobs.empty():
                if done:
                    log.info("swarm: %d fits in %.2f s (round %s)", done, time.monotonic() - started,
                             self.task.round if self.task else None)
                if self._net is not None:
                    self._net.network.release()  # the fits' training buffers, kept from one fit to the next
                release_free_memory()  # a round's fits and messages leave holes in the C heap
                done = 0
            edge = await self._jobs.get()
            if not done:
                started = time.monotonic()
            done += 1
            edge.queued = False
            if not self._due(edge) or self.stop.is_set():
                continue
            try:
                await self._train(edge)
            except (WearflError, ValueError) as exc:
                log.error("%s: cannot train round %s: %s", edge.client_id, self.task.round if self.task else None,
                          exc)
            except Exception:
                log.exception("%s: round %s failed", edge.client_id, self.task.round if self.task else None)

    async def _train(self, edge: LightEdge) -> None:
        """Fit the round, then store, then publish: the update leaves the outbox only on its receipt."""
        task, model = self.task, self.model
        assert task is not None and model is not None
        built = self._fit(edge, task, model)  # on the loop: a process hosts one fit at a time, and a thread would
        # only trade the GIL back and forth with the sessions (each handoff waits up to the 5 ms switch interval)
        await asyncio.sleep(0)  # let the sessions read between two fits
        if built is None:
            return
        local, encoded = built
        state = {"last_round": str(task.round).encode(), "residual": residual_bytes(encoded.residual)}
        stored = await edge.sender.store(task.round, functools.partial(sign_update, local, encoded, edge.client_id,
                                                                       edge.key), state)
        if stored is None:
            return
        edge.last_round = task.round
        self.counters["updates_built"] += 1
        await edge.sender.send(*stored)

    def _fit(self, edge: LightEdge, task: Task, model: ModelMessage) -> tuple[LocalRound, Any] | None:
        """The round's windows, the fit from the global weights, the encoded delta."""
        started = time.thread_time()
        config = dict(task.config)
        seed = self.spec.seed + edge.index
        config.setdefault("seed", seed + task.round)
        policy = FineTunePolicy(train=TrainConfig(seed=seed), min_new_windows=0).with_overrides(config)
        train = policy.train
        wanted = train.local_steps * train.batch_size if train.local_steps else DEFAULT_WINDOWS
        x, y = round_windows(self.dataset, edge.client_id, task.round, model.model, self.spec.hop_fraction, wanted)
        if len(x) == 0:
            log.info("%s: no labelled windows for round %d", edge.client_id, task.round)
            return None
        base = self._base if model is self.model else model.model.network.state_dict()
        net = self._net
        if net is None or net.spec != model.model.spec:  # one model to train in per process: fits take turns
            net = self._net = Model(model.model.spec)
            self._fresh = [(layer, dict(layer.rng.bit_generator.state)) for _, layer in net.network.layers
                           if hasattr(layer, "rng")]
        for layer, state in self._fresh:  # dropout draws as in a new model: a fit does not depend on the one before
            layer.rng.bit_generator.state = state
        net.network.load_state_dict(base)
        result = fit(net, x, y, train, keep_buffers=True)
        weights = net.network.state_dict()
        codec = CodecConfig.from_task(config)
        residual = None
        if codec.quantize == "topk":
            residual = read_residual(edge.outbox.get("residual"), UpdateCodec.for_weights(base).size, edge.client_id)
        encoded = encode_update(base, weights, codec, np.random.default_rng([seed, task.round]), residual)
        metrics: Mapping[str, Any] = {"train_loss": result.epoch_losses[-1], "steps": result.steps,
                                      "windows": len(x), "cpu_seconds": time.thread_time() - started}
        self.counters["training_seconds"] += float(metrics["cpu_seconds"])
        return LocalRound(task.round, model, base, weights, result.examples, metrics), encoded

    def status(self) -> dict[str, Any]:
        """What the swarm did, for the run's report."""
        return {"edges": len(self.edges), "connected": self.connected, **self.counters}


def write_keyring(path: Path, secret: bytes, clients: list[str]) -> None:
    """The hub's keyring of simulated edges: ``client public-key-hex`` per line (see :func:`device_key`)."""
    from models.files import write_atomic

    write_atomic(path, "".join(f"{c} {public_hex(device_key(secret, c))}\n" for c in clients).encode())
