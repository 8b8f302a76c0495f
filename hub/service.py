"""The hub service: MQTT intake, rounds and publishing, resumable from its state directory.

One asyncio task reads the session's messages into a queue; the main loop drains it in
batches. For a batch of updates the intake (signature checks, decoding, SQLite) runs in
a worker thread in one transaction; only when it has committed are the messages
acknowledged to the broker (``manual_ack``), then the receipts go out. A message never
acknowledged (the hub stopped first) is redelivered to the same persistent session
and deduplicated by (client, sequence).

Between batches the round policy decides whether the round closes; closing builds the
next model (in a thread), records the round, opens the next one and publishes the new
model and task, both retained. ``on_round_closed`` hooks receive a
:class:`hub.rounds.RoundSummary`.

State lives in ``state_dir``: ``hub.db`` (:mod:`hub.store`), ``models/``
(:mod:`hub.registry`) and ``keys/hub.key`` (the hub's signing key). A restarted hub
takes its model from the registry, its counters and pinned keys from the database, and
re-aggregates the open round's stored updates; the round's deadline starts anew.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import inspect
import logging
import math
import random
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hub.intake import DEFAULT_MAX_UPDATE_BYTES, Intake
from hub.ledger import Ledger
from hub.registry import ModelRegistry
from hub.rounds import MetricsCollector, RoundManager, RoundPolicy, RoundSummary
from hub.schedule import check_schedule, round_task_config
from hub.store import DB_NAME, HubStore
from hub.strategies import Strategy, make_strategy
from hub.strategy_state import StrategyState
from models.errors import BrokerUnavailable, ConfigError
from models.files import check_writable, state_dir_error
from models.model import Model
from models.protocol.codec import CodecConfig, UpdateCodec
from models.protocol.identity import load_keyring, load_or_create_key, public_hex
from models.protocol.messages import Receipt, Task, build_model, current_task_keys, parse_json
from models.protocol.signed import SigningError
from models.protocol.topics import Topics, check_name

if TYPE_CHECKING:
    from hub.accounting import PrivacyAccountant
    from hub.secure_rounds import SecureRound
    from models.transport.credentials import Credentials
    from models.transport.mqtt import BrokerAddress

__all__ = ["DEFAULT_TASK_CONFIG", "HubConfig", "HubService"]

log = logging.getLogger(__name__)

RECONNECT_POLL_S = 0.5
SECURE_STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "dpfedavg")
RECEIPTS_IN_FLIGHT = 32

Scalar = float | int | str | bool

DEFAULT_TASK_CONFIG: dict[str, Scalar] = {
    "epochs": 1,
    "lr": 0.001,
    "batch_size": 32,
    "prox_mu": 0.0,
    **CodecConfig().task_config(),  # quantize, block, topk_fraction, update_clip
    "lr_schedule": "constant",
    "lr_min_factor": 0.05,
}
"""What edges are told to do in a round unless ``task_config`` says otherwise."""

BATCH_DELTA_BYTES = 64 * 1024 * 1024

STORAGE_ADVICE = ("No update was acknowledged that is not stored; the restarted hub resumes from its state "
                  "directory.")


@dataclass
class HubConfig:
    """Everything a hub needs; ``wearfl hub`` fills it from flags and an optional TOML file.

    ``clients_per_round`` None: every edge currently online. ``rounds`` None: run until
    stopped. ``task_config`` is merged over :data:`DEFAULT_TASK_CONFIG` and sent to edges
    in each task (a flat dict of scalars). ``strategy`` names the aggregation rule
    (:data:`hub.strategies.STRATEGIES`) and ``strategy_args`` configures it (``--strategy-arg``).
    ``evaluate_every`` K: edges run federated evaluation in every K-th round (and the last).
    Client selection: ``fraction`` of the edges online (at least ``min_clients``, at most
    ``max_clients``) are picked for each round, seeded by the round, and named in its task;
    the others sit it out. ``stragglers``: ``drop`` refuses an update that arrives after
    its round closed (``round_closed``); ``next-round`` counts it into the next round.
    ``client_id`` defaults to
    ``wearfl-hub-<federation>``; give each of several hub workers its own.
    ``topic_prefix`` replaces ``wearfl/v1`` (tests give each run its own).
    ``secure_aggregation``: rounds run SecAgg+ (:mod:`hub.secure_rounds`) over the selected
    edges, each stage bounded by ``secagg_stage_timeout_s``; the hub learns only the sum.
    Every update is encoded on one fixed-point grid of ``secagg_value_bits`` bits over
    [-clip, clip], with clip the DP strategy's or ``secagg_clip`` (a range bound, not a
    privacy setting). It needs the device keys from ``keyring`` or ``credentials``.
    ``max_batch`` bounds how many queued messages one intake transaction takes (and fewer for a
    model so large that their decoded deltas would pass ``BATCH_DELTA_BYTES``).
    """

    broker: str
    federation: str
    state_dir: Path
    min_clients: int = 2
    clients_per_round: int | None = None
    round_timeout_s: float = 60.0
    max_update_bytes: int = DEFAULT_MAX_UPDATE_BYTES
    norm_bound: float | None = None
    keyring: Path | None = None
    credentials: Path | None = None
    rounds: int | None = None
    task_config: dict[str, Scalar] = field(default_factory=dict)
    server_lr: float = 1.0
    strategy: str = "fedavg"
    strategy_args: dict[str, Any] = field(default_factory=dict)
    evaluate_every: int = 1
    fraction: float = 1.0
    max_clients: int | None = None
    stragglers: str = "drop"
    secure_aggregation: bool = False
    secagg_stage_timeout_s: float = 30.0
    secagg_value_bits: int = 24
    secagg_clip: float = 100.0
    client_id: str | None = None
    protocol: str = "auto"
    topic_prefix: str = "wearfl/v1"
    max_batch: int = 256
    synchronous: str = "FULL"
    _loaded_credentials: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        if self.keyring is not None:
            self.keyring = Path(self.keyring)
        if self.credentials is not None:
            self.credentials = Path(self.credentials)
        check_name("federation", self.federation)
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}.")
        if self.max_update_bytes < 1024:
            raise ConfigError(f"max_update_bytes must be at least 1024, got {self.max_update_bytes}.")
        if self.norm_bound is not None and not (math.isfinite(self.norm_bound) and self.norm_bound > 0):
            raise ConfigError(f"norm_bound must be a finite number > 0, got {self.norm_bound}.")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ConfigError(f"server_lr must be a finite number > 0, got {self.server_lr}.")
        if not (math.isfinite(self.fraction) and 0.0 < self.fraction <= 1.0):
            raise ConfigError(f"fraction (of online clients selected a round) must be in (0, 1], got {self.fraction}.")
        if self.max_clients is not None and self.max_clients < self.min_clients:
            raise ConfigError(f"max_clients ({self.max_clients}) must be at least min_clients ({self.min_clients}).")
        if self.stragglers not in ("drop", "next-round"):
            raise ConfigError(f"stragglers must be drop or next-round, got {self.stragglers!r}.")
        if self.evaluate_every < 1:
            raise ConfigError(f"evaluate_every must be at least 1 round, got {self.evaluate_every}.")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {self.max_batch}.")
        self.policy()  # validates the round settings
        rule = self.build_strategy()
        if self.min_clients < rule.min_updates():
            raise ConfigError(f"strategy {self.strategy} as configured needs at least {rule.min_updates()} updates "
                              f"a round; set --min-clients {rule.min_updates()} or more (it is {self.min_clients}).")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"unknown MQTT protocol {self.protocol!r}; use auto, 5 or 3.1.1.")
        if self.strategy_args.get("distributed") not in (None, 0, "0") and not self.secure_aggregation:
            raise ConfigError("distributed DP noise is added by the clients of secure rounds; turn on "
                              "--secure-aggregation, or drop distributed=1 to let the hub add the noise.")
        if self.secure_aggregation:
            if self.strategy not in SECURE_STRATEGIES:
                raise ConfigError(f"secure aggregation gives the hub only a sum: it works with "
                                  f"{', '.join(SECURE_STRATEGIES)}, not {self.strategy}.")
            if self.keyring is None and self.credentials is None:
                raise ConfigError("secure aggregation needs the devices' keys from a keyring: give --keyring FILE or "
                                  "--credentials DIR (the edges need the same keyring as --peer-keyring).")
            if not (self.secagg_stage_timeout_s > 0 and 2 <= self.secagg_value_bits <= 48
                    and math.isfinite(self.secagg_clip) and self.secagg_clip > 0):
                raise ConfigError("secagg_stage_timeout_s and secagg_clip must be > 0, secagg_value_bits in [2, 48].")
        self.task_config = self.full_task_config(rule)

    def build_strategy(self) -> Strategy:
        """A fresh instance of the configured rule (``server_lr`` applies unless the args set it)."""
        args = dict(self.strategy_args)
        if self.server_lr != 1.0:
            args.setdefault("server_lr", self.server_lr)
        if self.strategy == "dpfedavg":  # DP's denominator: the clients a round is meant to have
            args.setdefault("expected_clients", self.clients_per_round or self.min_clients)
        return make_strategy(self.strategy, args)

    def credentials_folder(self) -> Credentials | None:
        """The ``wearfl keys`` folder given as ``credentials``, read and checked (once)."""
        from models.transport.credentials import Credentials

        if self.credentials is not None and self._loaded_credentials is None:
            self._loaded_credentials = Credentials.load(self.credentials, "hub")
        return self._loaded_credentials

    def broker_address(self) -> BrokerAddress:
        """The broker URL, with the credentials folder's password and TLS certificates when given."""
        from models.transport.mqtt import BrokerAddress

        address = BrokerAddress.parse(self.broker)
        creds = self.credentials_folder()
        return creds.apply(address) if creds is not None else address

    def keyring_path(self) -> Path | None:
        """``keyring``, else the credentials folder's: the only device keys the hub accepts (None: first use)."""
        if self.keyring is not None:
            return self.keyring
        creds = self.credentials_folder()
        return creds.keyring_path if creds is not None else None

    def signing_key(self) -> Ed25519PrivateKey:
        """The key that signs models: the credentials folder's, else ``state/keys/hub.key`` (made on first run)."""
        creds = self.credentials_folder()
        return creds.signing_key() if creds is not None else load_or_create_key(self.state_dir / "keys" / "hub.key")

    def policy(self) -> RoundPolicy:
        return RoundPolicy(self.min_clients, self.clients_per_round, self.round_timeout_s)

    def full_task_config(self, rule: Strategy) -> dict[str, Scalar]:
        """:data:`DEFAULT_TASK_CONFIG` overridden by ``task_config`` and what ``rule`` needs of the edges, checked."""
        config = {**DEFAULT_TASK_CONFIG, **current_task_keys(self.task_config), **rule.task_config()}
        for key, value in config.items():
            if not isinstance(value, float | int | str | bool):
                raise ConfigError(f"task_config[{key!r}] must be a number, string or boolean, got {value!r}.")
        CodecConfig.from_task(config)  # a bad codec setting is a ConfigError naming it
        check_schedule(config, self.rounds)
        return config


RoundHook = Callable[[RoundSummary], Any]


class HubService:
    """One hub: ``await HubService(config, initial_model).run(stop)``.

    ``initial_model`` is used only when the state directory holds no model yet;
    ``strategy`` (an instance) overrides ``config.strategy``.
    ``ready`` is set once the hub is subscribed and has published the current model and
    task. ``on_round_closed`` (a function or coroutine function of a RoundSummary) runs
    after each round is recorded and its model published; ``summaries`` keeps them.
    """

    def __init__(self, config: HubConfig, initial_model: Model | None = None,
                 strategy: Strategy | None = None) -> None:
        self.config = config
        self.topics = Topics(config.federation, config.topic_prefix)
        self.initial_model = initial_model
        self.strategy = strategy if strategy is not None else config.build_strategy()
        self.privacy = self._privacy_accountant()
        self.on_round_closed: RoundHook | None = None
        self.summaries: list[RoundSummary] = []
        self.ready = asyncio.Event()
        self.online: set[str] = set()
        self._selected: dict[int, tuple[str, ...]] = {}
        self._store: HubStore | None = None
        self._rounds: RoundManager | None = None
        self._intake: Intake | None = None
        self._metrics = MetricsCollector()
        self._session: Any = None
        self._key: Any = None
        self._batch_limit = self.config.max_batch
        self._receipt_slots: asyncio.Semaphore | None = None
        self._secure: SecureRound | None = None
        self._secure_for = -1  # the round number the secure round belongs to
        self._secure_attempts = 0
        self._noise_share = 0.0
        self._directory: dict[str, bytes] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._announcing = asyncio.Lock()

    # -- accessors ------------------------------------------------------------------

    @property
    def current_model(self) -> Model | None:
        """The global model the open round trains from (None before ``run`` loaded it)."""
        return self._rounds.model if self._rounds is not None else None

    @property
    def current_round(self) -> int | None:
        return self._rounds.current.round if self._rounds is not None and self._rounds.current else None

    def status(self) -> dict[str, Any]:
        """The ``wearfl status --json`` contract, from the live store or the state directory."""
        if self._store is not None:
            return self._store.status()
        with HubStore(self.config.state_dir, create=False) as store:
            return store.status()

    def _privacy_accountant(self) -> PrivacyAccountant | None:
        """The DP accountant of a differentially private strategy (None for the others)."""
        make = getattr(self.strategy, "privacy_accountant", None)
        if make is None:
            return None
        try:
            return make()  # type: ignore[no-any-return]
        except ValueError as exc:
            raise ConfigError(f"strategy {self.strategy.name}: {exc}.") from None

    def _store_privacy(self) -> None:
        """After a release: the epsilon spent so far (and per round), for ``wearfl status`` and reports."""
        if self.privacy is None or self._store is None:
            return
        rounds = self._store.rounds_completed()
        report = self.privacy.report(rounds)
        previous = self._store.get("privacy") or {}
        per_round = [r for r in previous.get("per_round", []) if r["round"] < rounds]
        report["per_round"] = [*per_round, {"round": rounds, "epsilon": report["epsilon"]}]
        report["budget_reached"] = not self.privacy.can_release(rounds + 1)
        self._store.put("privacy", report)

    def _store_personalization(self) -> None:
        personal = self._metrics.personalization()
        if personal and self._store is not None:
            self._store.put("personalization", personal)

    # -- running --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set or ``config.rounds`` rounds are complete.

        A read-only state directory, or a disk that fills up while the hub runs, stops it with
        one :class:`~models.files.StorageError` naming the directory: the failed transaction
        is rolled back and its messages are neither acknowledged nor answered, so nothing
        unstored was ever accepted; a restart (once there is space) resumes from the state.
        """
        check_writable(self.config.state_dir, "hub state directory")
        try:
            await self._run(stop)
        except (OSError, sqlite3.Error) as exc:
            error = state_dir_error(exc, self.config.state_dir, "hub", STORAGE_ADVICE, DB_NAME)
            if error is None:
                raise
            raise error from exc

    async def _run(self, stop: asyncio.Event | None) -> None:
        from models.transport.mqtt import MqttSession

        stop = stop if stop is not None else asyncio.Event()
        cfg = self.config
        address = cfg.broker_address()
        keyring_path = cfg.keyring_path()
        keyring = load_keyring(keyring_path) if keyring_path is not None else None
        self._directory = dict(keyring or {})
        self._key = cfg.signing_key()
        store = self._store = HubStore(cfg.state_dir, synchronous=cfg.synchronous)
        try:
            rounds = self._rounds = RoundManager(store, ModelRegistry(cfg.state_dir / "models"), self.strategy,
                                                 cfg.policy(), StrategyState(cfg.state_dir / "strategy"),
                                                 Ledger(cfg.state_dir / "ledger.jsonl"))
            model = await asyncio.to_thread(rounds.resume, self.initial_model)
            codec = UpdateCodec.for_weights(model.network.state_dict())
            intake = self._intake = Intake(store, self.topics, codec, max_update_bytes=cfg.max_update_bytes,
                                           norm_bound=cfg.norm_bound, keyring=keyring,
                                           max_staleness=max(self.strategy.max_staleness,
                                                             int(cfg.stragglers == "next-round")))
            # One batch's decoded deltas are in memory together: bound them in bytes, whatever the model's size.
            self._batch_limit = max(1, min(cfg.max_batch, BATCH_DELTA_BYTES // (4 * codec.size)))
            round_number = int(store.get("round"))
            await asyncio.to_thread(rounds.open, round_number, intake)
            session = self._session = MqttSession(
                address, cfg.client_id or f"wearfl-hub-{cfg.federation}", manual_ack=True,
                protocol=cfg.protocol,  # type: ignore[arg-type]
                max_buffered=self._batch_limit,  # a burst of updates waits in the broker, not in the hub's memory
            )
            await session.connect()
            try:
                if (reason := self._finish_reason()) is not None:
                    log.info("%s; publishing its final model", reason)
                    await self._publish_model_and_task(task=False)
                else:
                    await self._serve(session, stop)
            finally:
                await self._drain_background(5.0)
                await session.disconnect()
        finally:
            self._store = None
            store.close()

    async def _serve(self, session: Any, stop: asyncio.Event) -> None:
        cfg, rounds = self.config, self._require_rounds()
        shared = session.protocol == "5"
        await session.subscribe(self.topics.shared_updates() if shared else self.topics.all_of("update"), qos=1)
        await session.subscribe(self.topics.all_of("status"), qos=1)
        await session.subscribe(self.topics.all_of("metrics"), qos=1)
        if self.config.secure_aggregation:
            await session.subscribe(self.topics.all_of("secagg"), qos=1)
        await self._publish_model_and_task()
        model = rounds.model
        assert model is not None
        log.info("hub %s for federation %s on %s (MQTT %s%s): model v%d, round %d, hub key %s", session.client_id,
                 cfg.federation, session.address.url, session.protocol, ", shared subscription" if shared else "",
                 model.version, self.current_round, public_hex(self._key))
        self.ready.set()

        batch_limit = self._batch_limit
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=batch_limit)
        pump = asyncio.create_task(self._pump(session, queue), name="hub-pump")
        stopper = asyncio.create_task(self._wake_on(stop, queue), name="hub-stop")
        reannounce = asyncio.create_task(self._reannounce(session), name="hub-reannounce")
        try:
            while not stop.is_set():
                cur = rounds.current
                assert cur is not None
                try:
                    first = await asyncio.wait_for(queue.get(), max(0.0, cur.deadline - time.monotonic()))
                except TimeoutError:
                    first = ...
                if first is None:
                    break
                batch = [] if first is ... else [first]
                while len(batch) < batch_limit and not queue.empty():
                    item = queue.get_nowait()
                    if item is None:
                        queue.put_nowait(None)
                        break
                    batch.append(item)
                if batch:
                    await self._handle(session, batch)
                if await self._maybe_close() and (reason := self._finish_reason()) is not None:
                    log.log(logging.WARNING if self._budget_spent() else logging.INFO, "%s; stopping", reason)
                    break
        finally:
            for task in (pump, stopper, reannounce):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    @staticmethod
    async def _pump(session: Any, queue: asyncio.Queue[Any]) -> None:
        async for message in session.messages():
            await queue.put(message)
        await queue.put(None)

    async def _reannounce(self, session: Any) -> None:
        """After every reconnect, the model and task again: a broker that restarted may have lost them,
        and the hub's subscription with whatever edges sent meanwhile (they re-send on hearing the task)."""
        connection = session.connection
        while True:
            await asyncio.sleep(RECONNECT_POLL_S)
            if not session.connected or session.connection == connection:
                continue
            connection = session.connection
            log.info("reconnected to the broker; publishing the model and task again")
            with contextlib.suppress(BrokerUnavailable):
                await self._publish_model_and_task(task=not self._finished())

    @staticmethod
    async def _wake_on(stop: asyncio.Event, queue: asyncio.Queue[Any]) -> None:
        await stop.wait()
        await queue.put(None)

    # -- messages -------------------------------------------------------------------

    async def _handle(self, session: Any, batch: list[Any]) -> None:
        updates = []
        update_prefix = self.topics.all_of("update")[:-1]  # "<root>/update/": invalid client ids go to intake too
        for message in batch:
            if message.topic.startswith(update_prefix):
                updates.append(message)
            elif (client := self.topics.client_from(message.topic, "status")) is not None:
                self._on_status(client, message.payload)
                session.ack(message)
            elif (client := self.topics.client_from(message.topic, "metrics")) is not None:
                self._metrics.add(client, message.payload)
                session.ack(message)
            elif (client := self.topics.client_from(message.topic, "secagg")) is not None:
                if self._secure is not None:
                    self._secure.receive(client, message.payload)
                session.ack(message)
            else:
                log.debug("ignored a message on %s", message.topic)
                session.ack(message)
        if not updates:
            return
        intake, rounds = self._require_intake(), self._require_rounds()
        started = time.perf_counter()
        results = await asyncio.to_thread(intake.process_batch, [(m.topic, m.payload) for m in updates])
        log.debug("intake: %d updates in %.1f ms", len(updates), 1000 * (time.perf_counter() - started))
        receipts: list[Receipt] = []
        for message, (receipt, accepted) in zip(updates, results, strict=True):
            session.ack(message)  # persisted (or refused for good) by the committed batch
            if accepted is not None:
                rounds.add(accepted)
            else:
                rounds.count_received(len(message.payload), rejected=receipt.status == "rejected")
            if receipt.client:
                receipts.append(receipt)
        self._spawn(self._publish_receipts(session, receipts))

    def _selection_pending(self) -> bool:
        cur = self._rounds.current if self._rounds is not None else None
        return cur is not None and self._selection(cur.round) == ()

    def _on_status(self, client: str, payload: bytes) -> None:
        if not payload:  # a cleared retained status
            self.online.discard(client)
            return
        try:
            state = parse_json(payload, "status").get("state")
        except SigningError as exc:
            log.info("ignored status of %s: %s", client, exc)
            return
        if state == "online":
            pending = self._selection_pending()
            self.online.add(client)
            if pending and len(self.online) >= self.config.min_clients and self._session is not None:
                self._spawn(self._publish_task())
        elif state == "offline":
            self.online.discard(client)

    async def _publish_receipts(self, session: Any, receipts: list[Receipt]) -> None:
        # Few receipts in flight at once: paho reads as many packets per socket event as it has messages
        # in flight, which would let a burst of updates past the session's max_buffered bound.
        if self._receipt_slots is None:
            self._receipt_slots = asyncio.Semaphore(RECEIPTS_IN_FLIGHT)
        slots = self._receipt_slots

        async def publish(receipt: Receipt) -> None:
            async with slots:
                await session.publish(self.topics.receipt(receipt.client), receipt.signed(self._key).to_bytes(), qos=1)

        results = await asyncio.gather(*(publish(r) for r in receipts), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.warning("%d of %d receipts were not confirmed by the broker: %s", len(failed), len(receipts), failed[0])

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drain_background(self, timeout: float) -> None:
        if self._background:
            _, pending = await asyncio.wait(set(self._background), timeout=timeout)
            for task in pending:
                task.cancel()

    # -- rounds ---------------------------------------------------------------------

    def _finished(self) -> bool:
        return self._finish_reason() is not None

    def _budget_spent(self) -> bool:
        """Whether one more release would pass the privacy budget."""
        return (self.privacy is not None and self._store is not None
                and not self.privacy.can_release(self._store.rounds_completed() + 1))

    def _finish_reason(self) -> str | None:
        """Why no further round is run (the rounds are done, or one more would pass the privacy budget), or None."""
        if self._store is None:
            return None
        done = self._store.rounds_completed()
        if self._budget_spent():
            return (f"the privacy budget is spent: epsilon {self.privacy.epsilon_after(done):.3g} after {done} rounds, "
                    f"one more would pass {self.privacy.budget_epsilon:g}; no further model is released")
        if self.config.rounds is not None and done >= self.config.rounds:
            return f"the federation completed {done} rounds"
        return None

    def _start_secure_round(self, round_number: int, roster: tuple[str, ...]) -> None:
        """A SecAgg+ round over the selected clients: its config goes out in the task."""
        from hub.secure_rounds import SecureRound
        from models.protocol.secagg import RoundConfig, SecAggError

        cfg, intake = self.config, self._require_intake()
        unknown = [c for c in roster if c not in self._directory]
        if unknown:
            log.warning("secure aggregation: %s not in the keyring; left out of round %d", ", ".join(unknown),
                        round_number)
        members = [c for c in roster if c in self._directory]
        # DP's clip bounds every update already; otherwise the clip only bounds the fixed-point range
        clip = float(getattr(self.strategy, "clip", 0.0) or cfg.secagg_clip)
        try:
            self._secure_attempts = self._secure_attempts + 1 if self._secure_for == round_number else 1
            config = RoundConfig.create(f"r{round_number}-{self._secure_attempts}", members, intake.codec.size,
                                        value_bits=cfg.secagg_value_bits, value_range=clip)
            if getattr(self.strategy, "distributed", 0):
                # the clients' noise rides on the grid too: 8 standard deviations of room per value
                share = self.strategy.noise_share(config.threshold)  # type: ignore[attr-defined]
                config = dataclasses.replace(config, value_range=clip + 8 * share)
                self._noise_share = share
        except SecAggError as exc:
            log.error("secure aggregation: round %d cannot start: %s", round_number, exc)
            self._secure = None
            return
        self._secure = SecureRound(config, {c: self._directory[c] for c in members}, cfg.secagg_stage_timeout_s)
        self._secure_for = round_number
        log.info("secure aggregation: round %d over %d clients (threshold %d, %d neighbours each)", round_number,
                 config.n, config.threshold, config.degree)

    async def _secure_step(self) -> bool:
        """Advance the secure round when its stage is due; close the round when it finished."""
        from models.protocol.secagg import SecAggError

        rounds, secure = self._require_rounds(), self._secure
        cur = rounds.current
        assert cur is not None
        if secure is None or self._secure_for != cur.round:
            cur.set_deadline(time.time() + self.config.round_timeout_s)  # nothing to close before a roster
            return False
        if not secure.due():
            cur.set_deadline(time.time() + max(0.0, secure.deadline - time.monotonic()))
            return False
        try:
            outgoing = secure.advance()
        except SecAggError as exc:
            log.error("secure aggregation: round %d aborted (%s); selecting again", cur.round, exc)
            self._secure = None
            self._selected.pop(cur.round, None)
            cur.set_deadline(time.time() + self.config.round_timeout_s)
            await self._publish_task()
            return False
        cur.set_deadline(time.time() + max(0.0, secure.deadline - time.monotonic()))
        for client, payload in outgoing.items():
            self._spawn(self._session.publish(self.topics.secagg_down(client), payload, qos=1))
        if secure.result is None:
            return False
        codec = self._require_intake().codec
        rounds.add_secure_mean(codec.unflatten(secure.result.mean), secure.result.survivors, secure.bytes_in)
        self._secure = None
        return await self._close_round()

    async def _maybe_close(self) -> bool:
        """Close or extend the round when the policy says so; True when a round closed."""
        rounds = self._require_rounds()
        if self.config.secure_aggregation:
            return await self._secure_step()
        selected = self._selection(rounds.current.round) if rounds.current is not None else None
        decision = rounds.decide(len(selected) if selected else len(self.online))
        if decision == "extend":
            rounds.extend()
            await self._publish_task()
            return False
        if decision == "wait":
            return False
        return await self._close_round()

    async def _close_round(self) -> bool:
        """Aggregate, release the next model and open the next round."""
        rounds, intake = self._require_rounds(), self._require_intake()
        cur = rounds.current
        assert cur is not None
        intake.close_round()
        new_model = await asyncio.to_thread(rounds.build_next_model, intake)
        next_round = cur.round + 1
        model_message = build_model(new_model, next_round, self._key, rounds.ledger_entry(int(new_model.version)))
        selection = self._selection(next_round)
        task = Task(next_round, int(new_model.version), self._round_config(next_round),
                    round(time.time() + self.config.round_timeout_s, 3), selection)
        recipients = len(self.online) or len(cur.participants)
        summary = rounds.record_close(new_model, (len(model_message) + len(task.to_bytes())) * recipients,
                                      self._metrics.result(cur.round))
        await asyncio.to_thread(self._store_personalization)
        await asyncio.to_thread(self._store_privacy)
        await asyncio.to_thread(rounds.open, next_round, intake, task.deadline)
        self._restrict_intake(next_round)  # selected before the round opened
        self._metrics.forget_before(next_round)
        # After the last round of a run with ``rounds`` set, only the model goes out: a task would
        # set the edges training for a round no hub takes. A restarted hub publishes it.
        await self._publish_model_and_task(model_message, task=not self._finished())
        self.summaries.append(summary)
        await self._run_hook(summary)
        return True

    async def _run_hook(self, summary: RoundSummary) -> None:
        hook = self.on_round_closed
        if hook is None:
            return
        try:
            result = hook(summary)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_round_closed hook failed for round %d", summary.round)

    def _task(self) -> Task:
        rounds = self._require_rounds()
        cur, model = rounds.current, rounds.model
        assert cur is not None and model is not None
        selection = self._selection(cur.round)  # first: a secure round's config goes in the task
        return Task(cur.round, int(model.version), self._round_config(cur.round), cur.deadline_at, selection)

    def _selection(self, round_number: int) -> tuple[str, ...] | None:
        """The clients picked for ``round_number`` (None: everyone; empty: too few online yet)."""
        cfg = self.config
        if cfg.fraction >= 1.0 and cfg.max_clients is None and not cfg.secure_aggregation:
            return None
        chosen = self._selected.get(round_number)
        if chosen is not None:
            return chosen
        online = sorted(self.online)
        if len(online) < cfg.min_clients:
            return ()  # re-selected (and the task re-published) as edges come online
        k = max(math.ceil(cfg.fraction * len(online)), cfg.min_clients)
        k = min(k, cfg.max_clients or k, len(online))
        chosen = tuple(sorted(random.Random(round_number).sample(online, k)))
        self._selected = {r: c for r, c in self._selected.items() if r >= round_number - 1}
        self._selected[round_number] = chosen
        if cfg.secure_aggregation:
            self._start_secure_round(round_number, chosen)
        self._restrict_intake(round_number)
        log.info("round %d: selected %d of %d online clients", round_number, k, len(online))
        return chosen

    def _restrict_intake(self, round_number: int) -> None:
        """The open round's intake takes updates from its selected clients only; a secure round from none."""
        chosen, intake = self._selected.get(round_number), self._intake
        if chosen is not None and intake is not None and intake.round == round_number:
            intake.select(() if self.config.secure_aggregation else chosen)

    def _round_config(self, round_number: int) -> dict[str, Scalar]:
        cfg = self.config
        # the rule's settings as they are now (adaptive clipping moves its clip between rounds)
        config = round_task_config({**cfg.task_config, **self.strategy.task_config()}, round_number, cfg.rounds)
        if cfg.evaluate_every > 1:
            config["evaluate"] = round_number % cfg.evaluate_every == 0 or round_number == cfg.rounds
        secure = self._secure
        if secure is not None and self._secure_for == round_number:
            config["secagg"] = base64.b64encode(secure.config.to_bytes()).decode()
            if getattr(self.strategy, "distributed", 0):
                config["dp_noise_share"] = self._noise_share
        return config

    async def _publish_task(self) -> None:
        await self._session.publish(self.topics.task, self._task().to_bytes(), qos=1, retain=True)

    async def _publish_model_and_task(self, model_message: bytes | None = None, task: bool = True) -> None:
        """Publish the current model (retained, signed) and then the task that points at it."""
        async with self._announcing:
            rounds = self._require_rounds()
            model, cur = rounds.model, rounds.current
            if model is None or cur is None:
                return
            if model_message is None:
                model_message = build_model(model, cur.round, self._key, rounds.ledger_entry(int(model.version)))
            task_message = self._task().to_bytes() if task else None
            await self._session.publish(self.topics.model, model_message, qos=1, retain=True)
            if task_message is not None:
                await self._session.publish(self.topics.task, task_message, qos=1, retain=True)
                log.info("published model v%d (%d bytes) and the task for round %d", model.version,
                         len(model_message), cur.round)
            else:
                log.info("published the final model v%d (%d bytes)", model.version, len(model_message))

    def _require_rounds(self) -> RoundManager:
        if self._rounds is None:
            raise RuntimeError("the hub is not running")
        return self._rounds

    def _require_intake(self) -> Intake:
        if self._intake is None:
            raise RuntimeError("the hub is not running")
        return self._intake


def task_config_from(mapping: Mapping[str, Any]) -> dict[str, Scalar]:
    """A flat scalar dict from a parsed TOML table (nested tables are refused)."""
    out: dict[str, Scalar] = {}
    for key, value in mapping.items():
        if not isinstance(value, float | int | str | bool):
            raise ConfigError(f"task setting {key!r} must be a number, string or boolean, got {type(value).__name__}.")
        out[str(key)] = value
    return out
