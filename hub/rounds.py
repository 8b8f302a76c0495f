"""Round logic: when a round closes, and what closing it does.

A round starts from global model vN. Accepted updates are summed as they arrive
(:class:`hub.aggregation.StreamingAverage`) for a streaming strategy; a non-streaming
one gets the round's deltas decoded again from the store at close. The round closes
(:class:`RoundPolicy`) when ``clients_per_round`` distinct clients have sent an
accepted update (default: as many as edges are online, from their retained
``status/<client>`` messages), or at the deadline once ``min_clients`` have; with
fewer at the deadline, the deadline moves on by the timeout and the round waits. A
round never closes with fewer than ``min_clients``.

Closing (:meth:`RoundManager.build_next_model`, then :meth:`RoundManager.record_close`):
mean delta, the strategy's server step, model vN+1 in the registry (package, ONNX,
TFLite), then the round is recorded in the store together with the new current round
and version. Publishing the new model and task is the service's part.
:meth:`RoundManager.resume` rebuilds all of this from the state directory after a
restart, and finishes a close that a crash interrupted between the registry write and
the store record.

The round manager owns the open round (:class:`hub.round_state.OpenRound`, its
``current``) and the current model. It never sees the intake: to rebuild a round from
stored updates it is handed the function that verifies and decodes one again
(:meth:`hub.intake.Intake.decode_stored`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from hub.aggregation import StreamingAverage
from hub.intake import AcceptedUpdate
from hub.ledger import Ledger
from hub.registry import ModelRegistry, ModelVersion
from hub.reports import describe_metrics
from hub.round_state import OpenRound
from hub.store import HubStore, RoundRecord
from hub.strategies.base import Strategy
from hub.strategies.optimizers import is_statistic
from hub.strategy_state import StrategyState
from models.errors import ConfigError, WearflError
from models.model import Model

__all__ = ["Decode", "RoundManager", "RoundPolicy", "RoundSummary"]

log = logging.getLogger(__name__)

Decision = Literal["close", "extend", "wait"]
Decode = Callable[[bytes, int], AcceptedUpdate | None]
"""A stored update's payload and the model version the round trains from -> the update, or None if it fails."""


@dataclass(frozen=True)
class RoundPolicy:
    """When rounds close: ``clients_per_round`` None means every edge currently online."""

    min_clients: int = 2
    clients_per_round: int | None = None
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.min_clients < 1:
            raise ConfigError(f"--min-clients must be at least 1, got {self.min_clients}.")
        if self.clients_per_round is not None and self.clients_per_round < 1:
            raise ConfigError(f"--clients-per-round must be at least 1, got {self.clients_per_round}.")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError(f"--round-timeout must be > 0 seconds, got {self.timeout_s}.")

    def target(self, online: int) -> int:
        """How many distinct clients close a round early."""
        wanted = self.clients_per_round if self.clients_per_round is not None else online
        return max(self.min_clients, wanted)

    def decide(self, participants: int, online: int, now: float, deadline: float) -> Decision:
        if participants >= self.target(online):
            return "close"
        if now >= deadline:
            return "close" if participants >= self.min_clients else "extend"
        return "wait"


@dataclass(frozen=True)
class RoundSummary:
    """What happened in one closed round, for ``on_round_closed`` hooks and reports.

    ``bytes_up``: payload bytes of every update received during the round (accepted,
    duplicate and rejected). ``bytes_down``: bytes of the model and task messages the
    hub published when the round closed, times the number of edges online then (the
    broker sends each retained message to every subscribed edge); when no edge reports
    its status, times the number of participants. ``metrics``: federated evaluation of
    the round's base model, the example-weighted mean of what edges published on
    ``metrics/<client>`` for this round, plus ``eval_clients`` and ``eval_examples``
    (empty when no edge reported). ``model``: the new global model (version
    ``model_version``); treat it as read-only. ``explanation``: with ``explain`` in the task, the federated
    attribution map of the round's base model (:meth:`hub.explanations.FederatedExplanations.result`), or None.
    """

    round: int
    model_version: int
    participants: int
    updates_accepted: int
    updates_rejected: int
    bytes_up: int
    bytes_down: int
    duration_s: float
    metrics: dict[str, float] = field(default_factory=dict)
    model: Model | None = field(default=None, repr=False, compare=False)
    explanation: dict[str, Any] | None = field(default=None, repr=False, compare=False)


class RoundManager:
    """The current model and open round of one hub, over its store and registry."""

    def __init__(self, store: HubStore, registry: ModelRegistry, strategy: Strategy, policy: RoundPolicy,
                 strategy_state: StrategyState | None = None, ledger: Ledger | None = None,
                 keep_models: int | None = None, from_store: bool = False) -> None:
        self.store, self.registry, self.strategy, self.policy = store, registry, strategy, policy
        self.from_store = from_store  # replicas: every replica stores updates, so the round is summed from the store
        self.keep_models = None if keep_models is None else max(keep_models, strategy.max_staleness + 2)
        self.strategy_state = strategy_state
        self.ledger = ledger
        self._base_statistics: dict[int, dict[str, np.ndarray]] = {}
        self.model: Model | None = None
        self.current: OpenRound | None = None

    # -- start and resume -----------------------------------------------------------

    def resume(self, initial_model: Model | None) -> Model:
        """Load (or create) the current model and round from the state directory."""
        entry = self.registry.latest()
        if entry is None:
            if self.store.rounds_completed():
                raise ConfigError(f"the hub database records {self.store.rounds_completed()} rounds but the model "
                                  f"registry {self.registry.root} is empty; restore it from a backup.")
            if initial_model is None:
                raise ConfigError("the hub's state directory holds no model yet; start the hub with --model PKG "
                                  "or --task TASK.")
            model = initial_model
            self.registry.save(model, 0)
            round_number = 1
            with self.store.transaction():
                self.store.put("round", round_number)
                self.store.put("model_version", int(model.version))
            log.info("new federation state: model v%d, round %d", model.version, round_number)
        else:
            model = entry.load()
            if initial_model is not None and initial_model.spec != model.spec:
                log.warning("ignoring the given initial model: the state directory already holds a %s model v%d",
                            model.spec.task, model.version)
            stored_version = self.store.get("model_version")
            round_number = self.store.get("round")
            if stored_version is None or round_number is None:
                round_number = entry.round + 1
                log.warning("no round state in the store; continuing from the registry at v%d, round %d",
                            entry.version, round_number)
            elif entry.version == stored_version + 1 and entry.round == round_number:
                self._finish_interrupted_close(entry.version, round_number)
                round_number += 1
            elif entry.version != stored_version:
                raise ConfigError(f"the registry's latest model is v{entry.version} but the hub database says "
                                  f"v{stored_version}; the state directory is inconsistent, restore it from a backup.")
            with self.store.transaction():
                self.store.put("round", round_number)
                self.store.put("model_version", int(model.version))
        self._catch_up_ledger()
        if self.strategy_state is not None and self.strategy_state.load(self.strategy, int(model.version)):
            log.info("restored the %s server-optimizer state of model v%d", self.strategy.name, model.version)
        self.model = model
        return model

    def load_current(self) -> Model:
        """A replica that does not lead: the model the store says is current, from the registry (nothing written)."""
        version = self.store.get("model_version")
        entry = self.registry.latest() if version is None else self.registry.get(int(version))
        if entry is None:
            raise ConfigError("the registry holds no model yet")
        self.model = entry.load()
        return self.model

    def follow(self, model: Model) -> None:
        """A site hub's current model: the consortium's, taken as it is (nothing is registered or logged here)."""
        self.model = model
        self.store.put("model_version", int(model.version))

    def ledger_entry(self, version: int) -> dict[str, Any] | None:
        """The ledger entry of model ``version`` when it is the latest (what its model message carries)."""
        entry = self.ledger.last_entry if self.ledger is not None else None
        return entry if entry is not None and entry.get("version") == version else None

    def _catch_up_ledger(self) -> None:
        """Enter registered versions the ledger lacks (the hub stopped between registering and logging)."""
        if self.ledger is None:
            return
        for version in self.registry.versions():
            if self.ledger.last_version is None or version > self.ledger.last_version:
                self._log_version(self.registry.get(version))

    def _log_version(self, entry: ModelVersion) -> None:
        assert self.ledger is not None
        files = {name: info["sha256"] for name, info in entry.manifest["files"].items()}
        updates = self.store.round_update_digests(entry.round) if entry.round > 0 else []
        self.ledger.append(entry.version, entry.round, files, updates, float(entry.manifest.get("created_at", 0.0)))

    def _finish_interrupted_close(self, version: int, round_number: int) -> None:
        clients, examples = self.store.round_totals(round_number)
        log.warning("round %d was closed into model v%d but not recorded (the hub stopped in between); "
                    "recording it now", round_number, version)
        self.store.record_round(
            RoundRecord(round_number, version - 1, version, None, time.time(), clients, examples),
            round_number + 1,
        )

    def open(self, round_number: int, decode: Decode | None = None, deadline_at: float | None = None) -> OpenRound:
        """Start ``round_number`` on the current model; with ``decode``, re-add the updates already stored for it.

        ``deadline_at`` (Unix time) defaults to one timeout from now.
        """
        assert self.model is not None, "resume() first"
        version = int(self.model.version)
        streaming = self.strategy.streaming and not self.from_store
        aggregate = StreamingAverage.like(self.model.network.state_dict()) if streaming else None
        self.current = cur = OpenRound(round_number, version, aggregate)
        cur.set_deadline(cur.opened_at + self.policy.timeout_s if deadline_at is None else deadline_at)
        if decode is not None:
            for stored in self.store.iter_round_updates(round_number):
                if stored.payload is None:
                    continue
                update = decode(stored.payload, version)
                if update is None:
                    log.error("stored update %s/%d no longer verifies; left out of the aggregate",
                              stored.client, stored.sequence)
                    continue
                self.add(update)
            if self.current.updates_accepted:
                log.info("round %d resumed with %d stored updates from %d clients", round_number,
                         self.current.updates_accepted, len(self.current.participants))
        return self.current

    # -- during the round -----------------------------------------------------------

    def add(self, update: AcceptedUpdate) -> None:
        """Count an accepted update into the open round."""
        cur = self._open()
        if cur.aggregate is not None:
            cur.aggregate.add(self.strategy.prepare(self._rebased(update), update.staleness),
                              self.strategy.client_weight(update.num_examples))
        cur.participants.add(update.client)
        cur.updates_accepted += 1
        cur.num_examples += update.num_examples
        cur.bytes_up += update.size

    def add_secure_mean(self, mean: Mapping[str, np.ndarray], survivors: Sequence[str], bytes_up: int = 0) -> None:
        """The open round's aggregate from secure aggregation: the survivors' mean, no update seen alone."""
        cur, model = self._open(), self.model
        assert model is not None
        cur.aggregate = StreamingAverage.like(model.network.state_dict())
        cur.aggregate.add(mean, 1.0)
        cur.participants = set(survivors)
        cur.updates_accepted = len(survivors)
        cur.bytes_up += bytes_up

    def _rebased(self, update: AcceptedUpdate) -> Mapping[str, np.ndarray]:
        """The delta with its BatchNorm statistics re-based from its (older) base model onto the current one.

        Statistics are estimates of the data, not steps: a stale update's local estimate is
        ``base + Δ``, and as a delta from the current model that is ``Δ + base - current``.
        Adding the stale Δ itself could drive a variance below zero.
        """
        if update.staleness <= 0 or self.model is None:
            return update.delta
        version = update.meta.base_version
        base = self._base_statistics.get(version)
        if base is None:
            state = self.registry.get(version).load().network.state_dict()
            base = {k: v for k, v in state.items() if is_statistic(k)}
            self._base_statistics = {v: s for v, s in self._base_statistics.items() if v > version - 8}
            self._base_statistics[version] = base
        current = self.model.network.state_dict()
        return {k: (v + base[k] - current[k]).astype(np.float32) if k in base else v for k, v in update.delta.items()}

    def sync_from_store(self) -> None:
        """The open round's participants and counters as every replica stored them (replicas only)."""
        cur = self._open()
        clients, updates, examples, size = self.store.round_summary(cur.round)
        cur.participants, cur.updates_accepted, cur.num_examples = clients, updates, examples
        cur.bytes_up = max(cur.bytes_up, size)

    def count_received(self, size: int, rejected: bool) -> None:
        """Count a message that was not accepted (rejected or duplicate) into the round's bytes."""
        cur = self._open()
        cur.bytes_up += size
        cur.updates_rejected += int(rejected)

    def decide(self, online: int, now: float | None = None) -> Decision:
        cur = self._open()
        now = time.monotonic() if now is None else now
        if self.strategy.asynchronous:  # a release every buffer_size updates, whoever sent them
            if cur.updates_accepted >= self.strategy.buffer_size:
                return "close"
            if now >= cur.deadline:
                return "close" if cur.updates_accepted >= self.policy.min_clients else "extend"
            return "wait"
        return self.policy.decide(len(cur.participants), online, now, cur.deadline)

    def extend(self) -> float:
        """Move the deadline on by one timeout; returns the new deadline as Unix time."""
        cur = self._open()
        cur.set_deadline(time.time() + self.policy.timeout_s)
        log.info("round %d: %d of at least %d clients by the deadline; waiting %g s more",
                 cur.round, len(cur.participants), self.policy.min_clients, self.policy.timeout_s)
        return cur.deadline_at

    # -- closing --------------------------------------------------------------------

    def build_next_model(self, decode: Decode | None = None) -> Model:
        """Aggregate, server step, register vN+1 (CPU and disk work: run it in a thread).

        A non-streaming strategy needs ``decode`` to read the round's stored updates again.
        """
        cur, model = self._open(), self.model
        assert model is not None
        cur.close()
        avg = cur.aggregate.mean() if cur.aggregate is not None else self._aggregate_from_store(cur.round, decode)
        before = {k: v.copy() for k, v in self.strategy.state_dict().items()}
        try:
            avg = self.strategy.finalize(avg, cur.updates_accepted)
            weights = self.strategy.server_step(model.network.state_dict(), avg)
            bad = sorted(k for k, v in weights.items() if not np.all(np.isfinite(v)))
            if bad:
                raise WearflError(f"round {cur.round} produced non-finite weights ({', '.join(bad[:5])}); the model "
                                  f"is kept at v{model.version}. Reject large updates with --max-update-norm, "
                                  "or bound them with --strategy-arg norm_bound=L2.")
            new = Model(model.spec, version=int(model.version) + 1)
            new.network.load_state_dict(weights)
            if self.strategy_state is not None:
                self.strategy_state.save(self.strategy, int(new.version))
            registered = self.registry.save(new, cur.round)
        except BaseException:
            self.strategy.load_state_dict(before)  # the optimizer steps only with the model
            raise
        if self.strategy_state is not None:
            self.strategy_state.prune(keep=int(new.version))
        if self.ledger is not None:
            self._log_version(registered)
        if self.keep_models is not None:
            self.registry.prune(self.keep_models)
        return new

    def partial(self, decode: Decode | None = None) -> tuple[dict[str, np.ndarray], int]:
        """Close the open round and return what a site hub sends up instead of releasing a model: its rule's
        aggregate of the round's deltas (under FedAvg, the example-weighted mean) and the examples behind it.

        A consortium that averages the sites' partials weighted by their examples computes the FedAvg of
        every gateway's update (sums compose; a median of medians is not a median). The model stays as it
        is: record the round with :meth:`record_close` and the current model.
        """
        cur = self._open()
        cur.close()
        avg = cur.aggregate.mean() if cur.aggregate is not None else self._aggregate_from_store(cur.round, decode)
        return self.strategy.finalize(avg, cur.updates_accepted), cur.num_examples

    def _aggregate_from_store(self, round_number: int, decode: Decode | None) -> dict[str, np.ndarray]:
        if decode is None:
            raise ValueError("a non-streaming strategy needs a decode function to read the stored updates")
        assert self.model is not None
        version = int(self.model.version)
        summed = StreamingAverage.like(self.model.network.state_dict()) if self.strategy.streaming else None
        deltas: list[Mapping[str, np.ndarray]] = []
        weights: list[float] = []
        for stored in self.store.iter_round_updates(round_number):
            update = decode(stored.payload, version) if stored.payload is not None else None
            if update is None:
                continue
            weight = self.strategy.client_weight(update.num_examples)
            if summed is not None:  # a weighted mean: summed one update at a time, whatever the round's size
                summed.add(self.strategy.prepare(self._rebased(update), update.staleness), weight)
            else:
                deltas.append(self._rebased(update))
                weights.append(weight)
        if summed is not None:
            if summed.count < max(1, self.strategy.min_updates()):
                raise ValueError(f"the rule needs at least {max(1, self.strategy.min_updates())} updates in a round, "
                                 f"got {summed.count}")
            return summed.mean()
        return self.strategy.aggregate(deltas, weights)

    def record_close(self, new_model: Model, bytes_down: int, metrics: Mapping[str, float],
                     explanation: dict[str, Any] | None = None) -> RoundSummary:
        """Record the closed round and make ``new_model`` current (the next round is opened apart)."""
        cur = self._open()
        closed_at = time.time()
        record = RoundRecord(cur.round, cur.base_version, int(new_model.version), cur.opened_at, closed_at,
                             len(cur.participants), cur.num_examples, cur.updates_rejected, cur.bytes_up, bytes_down,
                             dict(metrics))
        self.store.record_round(record, cur.round + 1)
        self.model = new_model
        self.current = None
        summary = RoundSummary(cur.round, int(new_model.version), len(cur.participants), cur.updates_accepted,
                               cur.updates_rejected, cur.bytes_up, bytes_down, closed_at - cur.opened_at, dict(metrics),
                               new_model, explanation)
        evaluated = describe_metrics(summary.metrics)
        log.info("round %d closed: %d clients, %d updates, model v%d%s", cur.round, summary.participants,
                 summary.updates_accepted, summary.model_version,
                 f"; model v{cur.base_version} evaluated by the edges: {evaluated}" if evaluated else "")
        return summary

    def _open(self) -> OpenRound:
        if self.current is None:
            raise RuntimeError("no round is open")
        return self.current

