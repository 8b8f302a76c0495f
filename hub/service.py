"""The hub service: MQTT intake, rounds and publishing, resumable from its state directory.

This module wires the hub's parts together and runs their loop; each part has one owner.
One asyncio task reads the session's messages into a queue (:mod:`hub.inbox`); the main
loop drains it in batches. For a batch of updates the intake (signature checks, decoding,
SQLite: :mod:`hub.intake`) runs in a worker thread in one transaction; only when it has
committed are the messages acknowledged to the broker (``manual_ack``), then the receipts
go out (:mod:`hub.publisher`). A message never acknowledged (the hub stopped first) is
redelivered to the same persistent session and deduplicated by (client, sequence).

Between batches the round policy decides whether the round closes; closing builds the
next model (in a thread, :mod:`hub.rounds`), records the round, opens the next one and
publishes the new model and task, both retained. ``on_round_closed`` hooks receive a
:class:`hub.rounds.RoundSummary`; the reports stored after each release are
:mod:`hub.reports`'.

The open round lives in one object (:class:`hub.round_state.OpenRound`), which the round
manager owns and the intake, the task and the secure-round driver read. Choosing a
round's clients is a pure function (:mod:`hub.selection`); what a choice starts (a secure
round over those clients, :mod:`hub.secure_rounds`, and an intake that takes their updates
only) is a step this loop takes when it makes one. Building a task changes nothing.

State lives in ``state_dir``: ``hub.db`` (:mod:`hub.store`), ``models/``
(:mod:`hub.registry`) and ``keys/hub.key`` (the hub's signing key). A restarted hub
takes its model from the registry, its counters and pinned keys from the database, and
re-aggregates the open round's stored updates; the round's deadline starts anew.

A site hub (``upstream`` set) runs the consortium's rounds instead of its own
(:mod:`hub.upstream`): its model is the consortium's, re-published unchanged; it opens a
round when the consortium's task for it arrives (same round, model and settings, its own
selection, a deadline no later than the consortium's), and closing a round sends the
rule's aggregate upstream as one partial instead of releasing a model. Between its
partial and the consortium's next task the open round is a placeholder: no task, no close.

Hubs on one PostgreSQL state are replicas (:mod:`hub.replicas`): each takes updates from the
shared subscription and stores them (the intake passes the store's round barrier, so a round
being closed takes no more); only the leader selects, closes, aggregates (from the store:
every replica's updates), registers and publishes. A replica that does not lead follows the
round and model the store names; when the leader dies, the next to take the lead resumes from
the store as a restarted hub does.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from hub.blobs import blobs_for
from hub.config import DEFAULT_TASK_CONFIG, HubConfig, task_config_from
from hub.inbox import Inbox
from hub.intake import Intake, StaleRound
from hub.ledger import open_ledger
from hub.presence import Presence
from hub.publisher import Announcement, Publisher
from hub.registry import ModelRegistry
from hub.reports import MetricsCollector, budget_spent, finish_reason, record_release
from hub.rounds import RoundManager, RoundSummary
from hub.selection import select_clients
from hub.store import DB_NAME, HubStore
from hub.strategy_state import StrategyState
from models.attribution import explain_settings
from models.errors import ConfigError
from models.files import check_writable, state_dir_error
from models.protocol.codec import UpdateCodec
from models.protocol.identity import load_keyring, public_hex
from models.protocol.messages import MAX_MODEL_BYTES, Receipt, Task, build_model
from models.protocol.topics import Topics

if TYPE_CHECKING:
    from hub.accounting import PrivacyAccountant
    from hub.intake import AcceptedUpdate
    from hub.replicas import Replicas
    from hub.round_state import OpenRound
    from hub.secure_rounds import SecureRoundDriver
    from hub.strategies import Strategy
    from hub.upstream import Upstream
    from hub.web import OperatorView
    from models.model import Model
    from models.protocol.ed25519 import Ed25519PrivateKey
    from models.protocol.messages import ModelMessage
    from models.transport.mqtt import Message, MqttSession

__all__ = ["DEFAULT_TASK_CONFIG", "HubConfig", "HubService", "task_config_from"]

log = logging.getLogger(__name__)

BATCH_DELTA_BYTES = 64 * 1024 * 1024
"""The most decoded delta bytes one intake batch holds at once (``max_batch`` is cut to fit a large model)."""

INBOX_MESSAGES = 20_000
INBOX_BYTES = 128 * 1024 * 1024
"""What the hub's session holds for the intake at most; a burst past it is shed (edges re-send updates)."""

OUTAGE_RETRY_S = 1.0
"""How often a replica tries the shared database again while it is unreachable."""

STORAGE_ADVICE = ("No update was acknowledged that is not stored; the restarted hub resumes from its state "
                  "directory.")

RoundHook = Callable[[RoundSummary], Any]
T = TypeVar("T")


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
        self.operator_view: OperatorView | None = None
        self.summaries: list[RoundSummary] = []
        self.ready = asyncio.Event()
        self.presence = Presence(lambda client: self._belongs(client) or self._bootstrapping())
        self._selection_policy = config.selection()
        self._metrics = MetricsCollector()
        self._batch_limit = config.max_batch
        # the parts of a running hub, made by run()
        self._store: HubStore | None = None
        self._rounds: RoundManager | None = None
        self._intake: Intake | None = None
        self._secure: SecureRoundDriver | None = None
        self._session: MqttSession | None = None
        self._publisher: Publisher | None = None
        self._key: Ed25519PrivateKey | None = None
        self._wait_report_at = 0.0  # time.monotonic() of the next "waiting for" report
        self._expected_memo: tuple[tuple[Any, ...], set[str]] | None = None  # the open round's expected edges
        self._shed_counted = 0  # of the session's shed messages, how many the store counted
        # a site hub's: its link to the consortium, and the consortium's task and model the open round runs
        self._upstream: Upstream | None = None
        self._site_task: tuple[Task, bytes] | None = None  # None: the open round is a placeholder
        self._site_model: tuple[ModelMessage, bytes] | None = None  # as the consortium signed it
        # replicas on one PostgreSQL state: this one's heartbeat and claim on the lead
        self._replicas: Replicas | None = None
        self._leading = True  # a hub on SQLite is the only one
        self._beat_at = 0.0
        self._outage_since: float | None = None  # time.monotonic() since the shared database is unreachable

    # -- accessors ------------------------------------------------------------------

    @property
    def online(self) -> set[str]:
        """The online edges rounds are for: those that belong (keyring or pinned key), and in the first round
        of a hub without keyring every edge online."""
        return self._candidates()[0]

    def _belongs(self, client: str) -> bool:
        return self._intake is not None and self._intake.knows(client)

    def _bootstrapping(self) -> bool:
        """A hub that pins keys, in its first round: every edge is new, and the round is for them."""
        return (self._intake is not None and self._intake.keyring is None and self._store is not None
                and self._store.rounds_completed() == 0)

    def _candidates(self) -> tuple[set[str], list[str]]:
        """(the online edges a round is for, the newcomers it may try on top)."""
        if self._bootstrapping():  # presence counts every edge a member then
            return self.presence.online | set(self.presence.newcomers), []
        return self.presence.online, self.presence.newcomers

    def _expected(self, selection: tuple[str, ...] | None) -> set[str]:
        """The edges the open round waits for: its selected members (or every member online), never a newcomer
        the round merely tries."""
        key = (selection, self.presence.changes, self._intake.known if self._intake is not None else 0,
               self._bootstrapping())
        if self._expected_memo is not None and self._expected_memo[0] == key:
            return self._expected_memo[1]  # asked after every batch of updates: a thousand edges made it O(N^2)
        if not selection:
            expected = self._candidates()[0]
        else:
            expected = {c for c in selection if self._belongs(c)}
            if len(expected) < len(selection):
                candidates, _ = self._candidates()
                expected |= {c for c in selection if c in candidates}
        self._expected_memo = (key, expected)
        return expected

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
        try:
            return self.strategy.privacy_accountant()
        except ValueError as exc:
            raise ConfigError(f"strategy {self.strategy.name}: {exc}.") from None

    # -- running --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set or ``config.rounds`` rounds are complete.

        A read-only state directory, or a disk that fills up while the hub runs, stops it with
        one :class:`~models.files.StorageError` naming the directory: the failed transaction
        is rolled back and its messages are neither acknowledged nor answered, so nothing
        unstored was ever accepted; a restart (once there is space) resumes from the state.
        """
        if not self.config.in_database:
            check_writable(self.config.state_dir, "hub state directory")
        try:
            await self._run(stop if stop is not None else asyncio.Event())
        except (OSError, sqlite3.Error) as exc:
            if self.config.in_database:
                raise
            error = state_dir_error(exc, Path(self.config.state_dir), "hub", STORAGE_ADVICE, DB_NAME)
            if error is None:
                raise
            raise error from exc

    async def _run(self, stop: asyncio.Event) -> None:
        from models.transport.mqtt import MqttSession

        cfg = self.config
        address = cfg.broker_address()
        keyring_path = cfg.keyring_path()
        keyring = load_keyring(keyring_path) if keyring_path is not None else None
        self._key = cfg.site_key() if cfg.is_site else cfg.signing_key()
        store = self._store = HubStore(cfg.state_dir, synchronous=cfg.synchronous)
        try:
            await asyncio.to_thread(store.claim, cfg.federation)
            rounds = self._rounds = RoundManager(store, ModelRegistry(blobs_for(cfg.state_dir, "models")),
                                                 self.strategy, cfg.policy(),
                                                 StrategyState(blobs_for(cfg.state_dir, "strategy")),
                                                 open_ledger(cfg.state_dir), keep_models=cfg.keep_models,
                                                 from_store=cfg.in_database)
            if cfg.in_database:
                await self._join_replicas(store)
            if cfg.is_site:
                site_model = await self._start_upstream(stop)
                if site_model is None:
                    return
                model = site_model
            elif self._leading:
                model = await asyncio.to_thread(rounds.resume, self.initial_model)
            else:
                followed = await self._first_model(stop)
                if followed is None:
                    return
                model = followed
            codec = UpdateCodec.for_weights(model.network.state_dict())
            intake = self._intake = Intake(store, self.topics, codec, max_update_bytes=cfg.max_update_bytes,
                                           max_update_norm=cfg.max_update_norm, keyring=keyring,
                                           max_staleness=max(self.strategy.max_staleness,
                                                             int(cfg.stragglers == "next-round")),
                                           max_examples=cfg.max_examples, max_pinned=cfg.max_pinned,
                                           shared=cfg.in_database)
            if cfg.secure_aggregation:
                from hub.secure_rounds import SecureRoundDriver

                self._secure = SecureRoundDriver(keyring or {}, self.strategy, value_bits=cfg.secagg_value_bits,
                                                 value_range=cfg.secagg_range,
                                                 stage_timeout_s=cfg.secagg_stage_timeout_s,
                                                 round_timeout_s=cfg.round_timeout_s)
            # One batch's decoded deltas are in memory together: bound them in bytes, whatever the model's size.
            self._batch_limit = max(1, min(cfg.max_batch, BATCH_DELTA_BYTES // (4 * codec.size)))
            if cfg.is_site:  # a placeholder until the consortium's task for this site comes
                await asyncio.to_thread(rounds.open, int(store.get("round", 1)), None, math.inf)
            elif self._leading:
                current = await asyncio.to_thread(rounds.open, int(store.get("round")), intake.decode_stored)
                self._select(current, self._make_selection(current.round))
            else:
                await self._follow_store()
            client_id = cfg.client_id or f"wearfl-hub-{cfg.federation}"
            if self._replicas is not None:
                client_id = f"{client_id}-{self._replicas.replica_id}"
            replica = self._replicas is not None  # its session ends with it: the others take its share
            session = self._session = MqttSession(
                address, client_id, manual_ack=True, clean_start=replica, session_expiry_s=0 if replica else 3600,
                protocol=cfg.protocol,  # type: ignore[arg-type]
                # past these the session drops (and counts) what arrives: its acks must keep flowing
                max_buffered=INBOX_MESSAGES, max_buffered_bytes=INBOX_BYTES,
                max_packet_size_in=max(cfg.max_update_bytes, MAX_MODEL_BYTES) + 64 * 1024,
                receive_maximum=self._batch_limit,
            )
            publisher = self._publisher = Publisher(session, self.topics, self._key)
            self._start_operator_view()
            await session.connect()
            try:
                if (reason := self._finish_reason()) is not None:
                    log.info("%s; publishing its final model", reason)
                    await self._announce(task=False)
                else:
                    await self._serve(session, stop)
            finally:
                await publisher.drain(5.0)
                await session.disconnect()
        finally:
            if self._upstream is not None:
                await self._upstream.close()
                store.put("upstream", self._upstream.status())  # not connected, and where it stopped
            if self._replicas is not None:
                self._replicas.close()
            if self.operator_view is not None:
                self.operator_view.stop()
            self._store = None
            store.close()

    async def _start_upstream(self, stop: asyncio.Event) -> Model | None:
        """A site hub: connect to the consortium and wait for its model (the stored one, or the first to come);
        None when stopped first."""
        from hub.upstream import Upstream

        cfg = self.config
        grant = cfg.grant()
        if grant is None:
            log.warning("site %s: no grant from the consortium (grant.json in --upstream-credentials); the gateways "
                        "will not believe this site's tasks. Make one with `wearfl keys add-site %s`.", cfg.site_id,
                        cfg.site_id)
        upstream = self._upstream = Upstream(cfg.upstream_settings(), Path(cfg.state_dir) / "upstream",
                                             _running(self._key), grant)
        await upstream.start()
        waited = time.monotonic()
        while upstream.model is None:
            if stop.is_set():
                return None
            if time.monotonic() - waited > 10:
                log.info("site %s: waiting for the consortium's model on %s", cfg.site_id, cfg.upstream)
                waited = time.monotonic()
            await asyncio.sleep(0.2)
        self._site_model = (upstream.model, _running(upstream.model_payload))
        upstream.changed.set()  # its task, if any, is looked at once the hub serves
        model = upstream.model.model
        await asyncio.to_thread(_running(self._rounds).follow, model)
        return model

    # -- replicas -------------------------------------------------------------------

    async def _join_replicas(self, store: HubStore) -> None:
        """Write this replica's first heartbeat; lead if no other replica does."""
        from hub.replicas import BEAT_S, Replicas, default_replica_id

        replicas = self._replicas = Replicas(str(self.config.state_dir), self.config.replica_id or default_replica_id())
        self._leading = await asyncio.to_thread(replicas.beat)
        self._beat_at = time.monotonic() + BEAT_S
        if self._leading:
            await asyncio.to_thread(store.put, "leader", replicas.replica_id)
        log.info("replica %s of federation %s: %s", replicas.replica_id, self.config.federation,
                 "leads" if self._leading else f"follows {store.get('leader')}")

    async def _first_model(self, stop: asyncio.Event) -> Model | None:
        """A replica that does not lead: the current model, once the leader has registered one."""
        rounds = _running(self._rounds)
        while not stop.is_set():
            try:
                return await asyncio.to_thread(rounds.load_current)
            except ConfigError:
                await asyncio.sleep(0.5)
        return None

    async def _replica_beat(self) -> None:
        """Heartbeat; take the lead when it is free, else follow the round the store names."""
        from hub.replicas import BEAT_S

        replicas = _running(self._replicas)
        self._beat_at = time.monotonic() + BEAT_S
        leading = await asyncio.to_thread(replicas.beat)
        if leading and not self._leading:
            await self._take_lead()
        elif not leading:
            await self._follow_store()

    async def _take_lead(self) -> None:
        """The leader is gone and this replica leads now: resume the round from the store, as a restarted hub."""
        rounds, store, intake = _running(self._rounds), _running(self._store), _running(self._intake)
        replica = _running(self._replicas).replica_id
        self._leading = True
        await asyncio.to_thread(store.put, "leader", replica)
        if rounds.ledger is not None:  # what the old leader appended since this replica started
            await asyncio.to_thread(rounds.ledger.reload)
        await asyncio.to_thread(rounds.resume, None)  # also finishes a close the old leader left half-done
        await asyncio.to_thread(store.mark_closing, None)
        current = await asyncio.to_thread(rounds.open, int(store.get("round")), intake.decode_stored)
        chosen = await asyncio.to_thread(store.get, "selection")
        if isinstance(chosen, dict) and chosen.get("round") == current.round and chosen.get("deadline"):
            # the old leader's task, unchanged: edges hearing it again re-send what got no receipt
            current.set_deadline(max(float(chosen["deadline"]), time.time() + 1.0))
            clients = chosen.get("clients")
            self._select(current, None if clients is None else tuple(clients))
        else:
            self._select(current, self._make_selection(current.round))
        log.warning("replica %s took the lead: model v%d, round %d with %d stored updates", replica,
                    _running(rounds.model).version, current.round, current.updates_accepted)
        await self._announce()

    async def _follow_store(self) -> None:
        """A replica that does not lead: the store's current model, round and selection."""
        rounds, store = _running(self._rounds), _running(self._store)
        round_number, version = await asyncio.to_thread(lambda: (store.get("round"), store.get("model_version")))
        if round_number is None or version is None:
            return
        if rounds.model is None or int(rounds.model.version) != int(version):
            await asyncio.to_thread(rounds.load_current)
        current = rounds.current
        if current is None or current.round != int(round_number) or current.base_version != int(version):
            current = await asyncio.to_thread(rounds.open, int(round_number), None, math.inf)
            self._metrics.forget_before(current.round)
            self.presence.forget_before(current.round)
        chosen = await asyncio.to_thread(store.get, "selection")
        if isinstance(chosen, dict) and chosen.get("round") == current.round:
            clients = chosen.get("clients")
            current.select(None if clients is None else tuple(clients), plain_updates=self._secure is None)

    def _select(self, current: OpenRound, selection: tuple[str, ...] | None) -> None:
        """Record the round's selection (and, for replicas that do not lead, in the store)."""
        current.select(selection, plain_updates=self._secure is None)
        self._share_round(current)

    def _share_round(self, current: OpenRound) -> None:
        """Replicas: the open round's selection and deadline in the store, for the others (and the next leader)."""
        if self._replicas is not None:
            selection = current.selection
            _running(self._store).put("selection", {"round": current.round, "deadline": current.deadline_at,
                                                    "clients": None if selection is None else list(selection)})

    def _start_operator_view(self) -> None:
        """``--http``: the dashboard, /metrics and /api/status, served from this hub's state."""
        if self.config.http is None or self.operator_view is not None:
            return
        from hub.web import OperatorView
        from models.transport.http_server import parse_http_address

        host, port = parse_http_address(self.config.http)
        self.operator_view = OperatorView(host, port, lambda: self._store, self.live_view, self.config.http_token)
        self.operator_view.start()

    def live_view(self) -> dict[str, Any]:
        """What only the running hub knows, for the operator view (called from its HTTP thread: copies only)."""
        rounds = self._rounds
        model = rounds.model if rounds is not None else None
        current = rounds.current if rounds is not None else None
        ledger = rounds.ledger if rounds is not None else None
        return {
            "federation": self.config.federation,
            "online": sorted(self.presence.online),
            "doing": dict(self.presence.doing),
            "declined": {} if current is None else {
                c: d.reason for c, d in self.presence.declined(current.round).items()},
            "round": None if current is None else {
                "round": current.round, "updates": len(current.participants), "deadline": current.deadline_at},
            "task": None if model is None else model.spec.task,
            "parameters": None if self._intake is None else self._intake.codec.size,
            "ledger": None if ledger is None else {"entries": ledger.count, "head": ledger.head,
                                                   "version": ledger.last_version},
            "upstream": None if self._upstream is None else self._upstream.status(),
        }

    async def _serve(self, session: MqttSession, stop: asyncio.Event) -> None:
        cfg, rounds = self.config, _running(self._rounds)
        shared = session.protocol == "5"
        await session.subscribe(self.topics.shared_updates() if shared else self.topics.all_of("update"), qos=1)
        await session.subscribe(self.topics.all_of("status"), qos=1)
        await session.subscribe(self.topics.all_of("metrics"), qos=1)
        if self._secure is not None:
            await session.subscribe(self.topics.all_of("secagg"), qos=1)
        await self._announce()
        await self._publish_grant()
        for topic in (self.topics.model, self.topics.task):  # to restore them when someone overwrites them
            await session.subscribe(topic, qos=1)
        model = _running(rounds.model)
        log.info("hub %s for federation %s on %s (MQTT %s%s): model v%d, round %d, hub key %s", session.client_id,
                 cfg.federation, session.address.url, session.protocol, ", shared subscription" if shared else "",
                 model.version, self.current_round, public_hex(_running(self._key)))
        self.ready.set()

        async with (Inbox(session, self._batch_limit, stop) as inbox,
                    _running(self._publisher).reannouncing(self._reannounce)):
            self._wait_report_at = time.monotonic() + cfg.round_timeout_s / 4
            while not stop.is_set():
                wake = min(_running(rounds.current).deadline, self._wait_report_at)
                if self._upstream is not None:  # the consortium's news are looked at between batches
                    wake = min(wake, time.monotonic() + 0.25)
                if self._replicas is not None:
                    wake = min(wake, self._beat_at)
                batch = await inbox.next_batch(wake - time.monotonic())
                if batch is None:
                    break
                try:
                    if not await self._step(session, batch, stop):
                        break
                except self._outages() as exc:
                    await self._outage(exc, stop)

    async def _step(self, session: MqttSession, batch: list[Message], stop: asyncio.Event) -> bool:
        """One turn of the loop: the batch, the consortium's and the replicas' news, the round. False: stop."""
        if batch:
            await self._handle(batch, stop)
        if self._upstream is not None and self._upstream.changed.is_set():
            self._upstream.changed.clear()
            await self._follow_upstream()
        if self._replicas is not None and time.monotonic() >= self._beat_at:
            await self._replica_beat()
        if session.shed > self._shed_counted:
            await asyncio.to_thread(_running(self._store).count_shed, session.shed - self._shed_counted)
            self._shed_counted = session.shed
        if await self._maybe_close() and (reason := self._finish_reason()) is not None:
            spent = budget_spent(_running(self._store), self.privacy)
            log.log(logging.WARNING if spent else logging.INFO, "%s; stopping", reason)
            return False
        if time.monotonic() >= self._wait_report_at:
            await self._report_waiting()
        if self._outage_since is not None:
            log.warning("the database is back after %.0f s; carrying on", time.monotonic() - self._outage_since)
            self._outage_since = None
        return True

    def _outages(self) -> tuple[type[BaseException], ...]:
        """The storage errors a replica waits out (a hub on SQLite stops on them, with a clear message)."""
        return _running(self._store).storage_errors if self._replicas is not None else ()

    async def _outage(self, exc: BaseException, stop: asyncio.Event) -> None:
        """The shared database is unreachable: give up any lead, acknowledge nothing, and wait for it."""
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("the database %s is unreachable (%s); waiting for it: nothing is acknowledged until it is "
                        "back", _running(self._store).where, str(exc).strip().splitlines()[0] if str(exc) else exc)
        if self._leading:
            self._leading = False
            await asyncio.to_thread(_running(self._replicas).step_down)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), OUTAGE_RETRY_S)

    async def _report_waiting(self) -> None:
        """Say which expected edges the open round still waits for, and what each last said (log and status)."""
        self._wait_report_at = time.monotonic() + self.config.round_timeout_s / 4
        if not self._leading:
            return
        current = _running(_running(self._rounds).current)
        if self._upstream is not None:
            await asyncio.to_thread(_running(self._store).put, "upstream", self._upstream.status())
            if self._site_task is None:
                return
        waiting = self.presence.waiting(current.round, self._expected(current.selection), current.participants)
        declined = self.presence.declined(current.round)
        snapshot = {"round": current.round, "since": current.opened_at, "deadline": current.deadline_at,
                    "answered": len(current.participants), "edges": waiting,
                    "declined": {c: f"{d.reason}: {d.detail}" for c, d in sorted(declined.items())}}
        await asyncio.to_thread(_running(self._store).put, "waiting", snapshot)
        if not waiting:
            return
        shown = "; ".join(f"{c}: {doing}" for c, doing in list(waiting.items())[:10])
        more = f"; and {len(waiting) - 10} more" if len(waiting) > 10 else ""
        log.info("round %d: %d updates in, waiting for %d edge(s), deadline in %.0f s: %s%s", current.round,
                 len(current.participants), len(waiting), max(0.0, current.deadline - time.monotonic()), shown, more)

    async def _reannounce(self) -> None:
        if not self._leading:
            return
        await self._announce(task=not self._finished())
        await self._publish_grant()

    async def _publish_grant(self) -> None:
        grant = self._upstream.grant if self._upstream is not None else None
        if grant is not None:
            await _running(self._publisher).grant(grant.to_bytes())

    # -- messages -------------------------------------------------------------------

    async def _handle(self, batch: list[Message], stop: asyncio.Event | None = None) -> None:
        session = _running(self._session)
        updates = []
        update_prefix = self.topics.all_of("update")[:-1]  # "<root>/update/": invalid client ids go to intake too
        for message in batch:
            if message.topic.startswith(update_prefix):
                updates.append(message)
                continue
            if (client := self.topics.client_from(message.topic, "status")) is not None:
                self._on_status(client, message.payload)
            elif (client := self.topics.client_from(message.topic, "metrics")) is not None:
                self._take_metrics(client, message.payload)
            elif (client := self.topics.client_from(message.topic, "secagg")) is not None:
                if self._secure is not None:
                    self._secure.receive(client, message.payload)
            elif message.topic in (self.topics.model, self.topics.task):
                if self._leading:
                    _running(self._publisher).check_retained(message.topic, message.payload)
            else:
                log.debug("ignored a message on %s", message.topic)
            session.ack(message)
        if updates:
            await self._take_updates(updates, stop)

    async def _take_updates(self, updates: list[Message], stop: asyncio.Event | None = None) -> None:
        """One intake transaction for the open round, then the acknowledgements, the counts and the receipts.

        A replica keeps the batch, unacknowledged, through an outage of the shared database and
        stores it once the database is back."""
        rounds, session = _running(self._rounds), _running(self._session)
        started = time.perf_counter()
        batch = [(m.topic, m.payload) for m in updates]
        while True:
            try:
                results = await self._intake_batch(batch)
                break
            except self._outages() as exc:
                await self._outage(exc, stop or asyncio.Event())
                if stop is not None and stop.is_set():
                    return
        log.debug("intake: %d updates in %.1f ms", len(updates), 1000 * (time.perf_counter() - started))
        receipts: list[Receipt] = []
        for message, (receipt, accepted) in zip(updates, results, strict=True):
            session.ack(message)  # persisted (or refused for good) by the committed batch
            if accepted is not None:
                rounds.add(accepted)
                self.presence.admit(accepted.client)
            else:
                rounds.count_received(len(message.payload), rejected=receipt.status == "rejected")
            if receipt.client:
                receipts.append(receipt)
        _running(self._publisher).receipts(receipts)

    async def _intake_batch(self, batch: list[tuple[str, bytes]]) -> list[tuple[Receipt, AcceptedUpdate | None]]:
        intake, rounds = _running(self._intake), _running(self._rounds)
        try:
            return await asyncio.to_thread(intake.process_batch, batch, _running(rounds.current))
        except (StaleRound, _running(self._store).integrity_error) as exc:
            # another replica moved the round on, or stored one of these updates meanwhile: once more, afresh
            log.debug("intake batch again: %s", exc)
            if not self._leading:
                await self._follow_store()
            return await asyncio.to_thread(intake.process_batch, batch, _running(rounds.current))

    def _take_metrics(self, client: str, payload: bytes) -> None:
        """A federated-evaluation report, kept only from a member the open round expects, for that round."""
        current = self._rounds.current if self._rounds is not None else None
        if current is None or client not in self._expected(current.selection):
            return
        # a replica that does not lead keeps the next round's too: it may lead that round, and learns of it late
        self._metrics.add(client, payload, current.round if self._leading else None)

    def _on_status(self, client: str, payload: bytes) -> None:
        sites = len(self.presence.sites)
        came_online, decline = self.presence.update(client, payload)
        if len(self.presence.sites) > sites:  # a consortium hub: its clients are sites
            _running(self._store).put("sites", sorted(self.presence.sites))
        current = self._rounds.current if self._rounds is not None else None
        if current is None or not self._leading:
            return
        if (came_online or self._bootstrapping()) and self._select_awaited(current):
            _running(self._publisher).spawn(self._publish_task())
        if decline is not None and decline.round == current.round and client not in current.participants:
            _running(self._store).count_declined(decline.reason, client=decline.client)
            log.info("round %d: %s declined (%s: %s)", current.round, client, decline.reason, decline.detail)

    # -- selection ------------------------------------------------------------------

    def _make_selection(self, round_number: int) -> tuple[str, ...] | None:
        """The clients of ``round_number`` from the edges online now; once there are some, their secure round starts."""
        candidates, newcomers = self._candidates()
        chosen = select_clients(round_number, candidates, self._selection_policy, newcomers)
        if chosen:
            log.info("round %d: selected %d of %d online clients", round_number, len(chosen), len(candidates))
            if self._secure is not None:
                self._secure.start(round_number, chosen, _running(self._intake).codec.size)
        return chosen

    def _select_awaited(self, current: OpenRound) -> bool:
        """Select the open round's clients when it still awaits them; True when it got them now."""
        if not current.awaiting_selection or self._placeholder():
            return False
        self._select(current, self._make_selection(current.round))
        return not current.awaiting_selection

    # -- rounds ---------------------------------------------------------------------

    def _placeholder(self) -> bool:
        """A site hub between rounds: it sent its partial and waits for the consortium's next task."""
        return self._upstream is not None and self._site_task is None

    def _finished(self) -> bool:
        return self._finish_reason() is not None

    def _finish_reason(self) -> str | None:
        """Why no further round is run (the rounds are done, or one more would pass the privacy budget), or None."""
        return finish_reason(self._store, self.privacy, self.config.rounds) if self._store is not None else None

    async def _maybe_close(self) -> bool:
        """Close or extend the round when the policy says so; True when a round closed."""
        rounds = _running(self._rounds)
        current = _running(rounds.current)
        if self._placeholder() or not self._leading:
            return False
        if self._replicas is not None:  # the round as every replica stored it
            await asyncio.to_thread(rounds.sync_from_store)
        if self._secure is not None:
            return await self._secure_step(self._secure, current)
        expected = self._expected(current.selection)
        declined = self.presence.declined(current.round).keys() - current.participants
        decision = rounds.decide(len(expected) - len(declined & expected))
        if decision == "extend":
            rounds.extend()
            self._share_round(current)
            await self._publish_task()
            return False
        if decision == "wait":
            return False
        return await self._close_round()

    async def _secure_step(self, secure: SecureRoundDriver, current: OpenRound) -> bool:
        """Advance the secure round when its stage is due; close the round when it finished."""
        step = secure.step(current)
        if step.aborted:
            current.select(())  # chosen again, from the edges online now
            self._select_awaited(current)
            await self._publish_task()
            return False
        _running(self._publisher).secagg(step.outgoing)
        if step.result is None:
            return False
        codec = _running(self._intake).codec
        _running(self._rounds).add_secure_mean(codec.unflatten(step.result.mean), step.result.survivors,
                                               step.bytes_in)
        return await self._close_round()

    async def _close_round(self) -> bool:
        """Aggregate, release the next model and open the next round."""
        if self._upstream is not None:
            return await self._close_site_round(self._upstream)
        rounds, intake, store = _running(self._rounds), _running(self._intake), _running(self._store)
        closing = _running(rounds.current)
        if self._replicas is not None:  # no replica stores another update for it; then count what they stored
            await asyncio.to_thread(store.mark_closing, closing.round)
            await asyncio.to_thread(rounds.sync_from_store)
        new_model = await asyncio.to_thread(rounds.build_next_model, intake.decode_stored)
        next_round, version = closing.round + 1, int(new_model.version)
        model_message = build_model(new_model, next_round, _running(self._key), rounds.ledger_entry(version),
                                    self.config.federation)
        selection = self._make_selection(next_round)  # before the task: a secure round's config goes in it
        task = self._build_task(next_round, version, round(time.time() + self.config.round_timeout_s, 3), selection)
        recipients = len(self._candidates()[0]) or len(closing.participants)
        declined = self.presence.declined(closing.round).keys()
        missing = self._expected(closing.selection) - closing.participants - declined
        store.put_stragglers(closing.round, len(missing))
        explanation = self._explanation(closing.round, closing.base_version)
        summary = rounds.record_close(new_model, (len(model_message) + len(task.to_bytes())) * recipients,
                                      self._metrics.result(closing.round), explanation)
        await asyncio.to_thread(record_release, store, self._metrics, self.privacy, explanation)
        opened = await asyncio.to_thread(rounds.open, next_round, intake.decode_stored, task.deadline)
        self._select(opened, selection)
        self._metrics.forget_before(next_round)
        self.presence.forget_before(next_round)
        self._wait_report_at = time.monotonic() + self.config.round_timeout_s / 4
        await asyncio.to_thread(store.put, "waiting", None)
        # After the last round of a run with ``rounds`` set, only the model goes out: a task would
        # set the edges training for a round no hub takes. A restarted hub publishes it.
        await self._announce(model_message, task=not self._finished())
        self.summaries.append(summary)
        await self._run_hook(summary)
        return True

    # -- a site hub's rounds -----------------------------------------------------------

    async def _follow_upstream(self) -> None:
        """Take what the consortium published: run its task's round with this site's gateways, or pass on its
        newer model while no round of this site is open."""
        upstream, rounds, store = _running(self._upstream), _running(self._rounds), _running(self._store)
        message, current = upstream.model, _running(rounds.current)
        if message is None:
            return
        task, payload = upstream.task, upstream.task_payload
        runs = (task is not None and payload is not None and task.model_version == message.model.version
                and task.selects(_running(self.config.site_id)))
        if runs and self._site_task is not None and current.round == task.round:  # the same round, moved on
            if payload != self._site_task[1]:
                self._site_task = (task, payload)
                await self._publish_task()
            return
        if runs and task.round >= int(store.get("round", 1)) and (self._site_task is None
                                                                 or current.round < task.round):
            if self._site_task is not None:
                await self._abandon(current, task.round)
            await self._open_site_round(task, payload, message)
            return
        if self._site_task is None and int(message.model.version) > int(_running(rounds.model).version):
            self._site_model = (message, _running(upstream.model_payload))
            await asyncio.to_thread(rounds.follow, message.model)
            await self._announce()
        await asyncio.to_thread(store.put, "upstream", upstream.status())

    async def _open_site_round(self, task: Task, payload: bytes, message: ModelMessage) -> None:
        upstream, rounds, store = _running(self._upstream), _running(self._rounds), _running(self._store)
        intake = _running(self._intake)
        self._site_model = (message, _running(upstream.model_payload))
        self._site_task = (task, payload)
        now = time.time()
        deadline = now + self.config.round_timeout_s
        if task.deadline is not None:  # some time for the partial to reach the consortium
            deadline = min(deadline, task.deadline - max(0.5, 0.1 * (task.deadline - now)))
        if int(message.model.version) != int(_running(rounds.model).version):
            await asyncio.to_thread(rounds.follow, message.model)
        await asyncio.to_thread(store.put, "round", task.round)
        # with the updates stored for it before a restart
        current = await asyncio.to_thread(rounds.open, task.round, intake.decode_stored, deadline)
        self._select(current, self._make_selection(task.round))
        log.info("site %s: round %d of the consortium on model v%d, deadline in %.0f s", self.config.site_id,
                 task.round, task.model_version, max(0.0, deadline - now))
        self._wait_report_at = time.monotonic() + self.config.round_timeout_s / 4
        await self._announce()
        await asyncio.to_thread(store.put, "upstream", upstream.status())

    async def _abandon(self, current: OpenRound, next_round: int) -> None:
        """The consortium moved on before this site closed ``current``: record it; its updates are not sent."""
        rounds = _running(self._rounds)
        log.warning("site %s: the consortium opened round %d before this site's round %d closed; its %d update(s) "
                    "are not sent upstream", self.config.site_id, next_round, current.round, current.updates_accepted)
        current.close()
        summary = await asyncio.to_thread(rounds.record_close, _running(rounds.model), 0, {})
        self._site_task = None
        self.summaries.append(summary)
        await self._run_hook(summary)

    async def _close_site_round(self, upstream: Upstream) -> bool:
        """Send the round's partial upstream (stored in the outbox first), record the round, and wait for the
        consortium's next task."""
        rounds, intake, store = _running(self._rounds), _running(self._intake), _running(self._store)
        closing, (task, _) = _running(rounds.current), _running(self._site_task)
        base = _running(self._site_model)[0]
        delta, examples = await asyncio.to_thread(rounds.partial, intake.decode_stored)
        metrics = self._metrics.result(closing.round)
        # a secure round tells the hub no example counts: its survivors weigh one each
        await upstream.send_partial(closing.round, base, delta, examples or len(closing.participants), task.config,
                                    metrics)
        declined = self.presence.declined(closing.round).keys()
        missing = self._expected(closing.selection) - closing.participants - declined
        store.put_stragglers(closing.round, len(missing))
        summary = rounds.record_close(_running(rounds.model), 0, metrics)
        await asyncio.to_thread(record_release, store, self._metrics, self.privacy)  # the gateways' personalization
        self._site_task = None
        await asyncio.to_thread(rounds.open, closing.round + 1, None, math.inf)
        self._metrics.forget_before(closing.round + 1)
        self.presence.forget_before(closing.round + 1)
        await asyncio.to_thread(store.put, "waiting", None)
        await asyncio.to_thread(store.put, "upstream", upstream.status())
        self.summaries.append(summary)
        await self._run_hook(summary)
        return True

    def _explanation(self, round_number: int, base_version: int) -> dict[str, Any] | None:
        """With ``explain`` in the task: the round's federated attribution map (noised under a DP rule)."""
        settings = explain_settings(self.config.task_config)
        model = _running(self._rounds).model
        if settings is None or model is None:
            return None
        spec = model.spec
        groups = list(spec.classes) if spec.is_classifier else ["BPM"]
        noise, rng = None, None
        if self.privacy is not None:  # the rule's noise; its seed when it has one (tests), else unpredictable
            noise = self.privacy.noise_multiplier
            seed = getattr(self.strategy, "seed", -1)
            rng = np.random.default_rng([int(seed), round_number]) if isinstance(seed, int) and seed >= 0 else None
        result = self._metrics.explanations.result(round_number, groups, list(spec.channels), settings[0], noise, rng)
        return None if result is None else {**result, "model_version": int(base_version)}

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

    # -- tasks and announcements ----------------------------------------------------

    def _build_task(self, round_number: int, model_version: int, deadline_at: float,
                    selection: tuple[str, ...] | None) -> Task:
        """The task of ``round_number``, from data alone (a secure round's config included)."""
        secure = self._secure.task_config(round_number) if self._secure is not None else None
        if self._site_task is not None:  # the consortium's task, for this site's gateways
            upstream, payload = self._site_task
            if upstream.deadline is not None:
                deadline_at = min(deadline_at, upstream.deadline)
            return Task(upstream.round, upstream.model_version, {**upstream.config, **(secure or {})}, deadline_at,
                        selection, self.config.federation, upstream=payload.decode()).signed(_running(self._key))
        return Task(round_number, model_version, self.config.round_config(self.strategy, round_number, secure),
                    deadline_at, selection, self.config.federation).signed(_running(self._key))

    def _task(self) -> Task:
        """The open round's task."""
        rounds = _running(self._rounds)
        current, model = _running(rounds.current), _running(rounds.model)
        return self._build_task(current.round, int(model.version), current.deadline_at, current.selection)

    async def _publish_task(self) -> None:
        if not self._placeholder() and self._leading:
            await _running(self._publisher).task(self._task())

    async def _announce(self, model_message: bytes | None = None, task: bool = True) -> None:
        """Publish the current model (retained, signed) and then the task that points at it (the leader only)."""
        if not self._leading:
            return

        def compose() -> Announcement | None:
            rounds = _running(self._rounds)
            model, current = rounds.model, rounds.current
            if model is None or current is None:
                return None
            version = int(model.version)
            message = model_message
            if self._site_model is not None:  # the consortium's model, as it signed it
                message = self._site_model[1]
            if message is None:
                message = build_model(model, current.round, _running(self._key), rounds.ledger_entry(version),
                                      self.config.federation)
            with_task = task and not self._placeholder()
            return Announcement(message, version, current.round, self._task().to_bytes() if with_task else None)

        await _running(self._publisher).announce(compose)


def _running(part: T | None) -> T:
    """A part of the running hub; RuntimeError when the hub is not running."""
    if part is None:
        raise RuntimeError("the hub is not running")
    return part
