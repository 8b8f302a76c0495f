"""Training: when a task's round is this edge's to train, the fit, and handing its update on.

For each task of a round it has not trained yet whose model version is the current model's,
an edge fine-tunes (:meth:`~edge_client.finetune.EdgeTrainer.fit`, which applies the policy,
its resource hooks and the CPU budget) unless :meth:`RoundTrainer.why_not` gives a reason
to wait (not selected, another model, outbox full, replayed data still streaming in, a
veto of the policy). A plain round's update is built (:mod:`edge_client.updates`), stored
in the outbox and, after the global and the fine-tuned model are evaluated on the holdout
(``metrics/<client>``), published (:mod:`models.transport.sender`); a secure round's delta goes
to the secure-aggregation client (:mod:`edge_client.secure_aggregation`) instead.

Every round that selects the edge gets an answer: fresh windows are preferred, never required.
With fewer than ``min_new_windows`` new ones, the edge waits for fresh data until half of the
time to the round's deadline has passed (:data:`FRESH_SHARE`), then trains on its replay
buffer as it is; a source that has ended (a replayed file) is not waited for. When it cannot
take part (a resource hook vetoes, it has no windows at all, its outbox is full) it declines:
the reason (:data:`DECLINE_REASONS`) goes out in its status message (``declined``), so the
hub neither waits for it in silence nor counts it as lost.

A fit takes the replay buffer's new windows. Until its update is stored, a
:class:`FitInFlight` remembers how many there were: if the edge stops meanwhile, or the
outbox refuses the update, they count as new again, so the next attempt (or the next start)
trains that round; nothing is published, and ``last_round`` does not move.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from edge_client.adoption import ModelAdoption
from edge_client.config import EdgeConfig
from edge_client.federated_eval import Evaluator
from edge_client.ingest import Ingest, StreamView
from edge_client.secure_aggregation import SecureRound
from edge_client.shared import Wakes, wait
from edge_client.updates import LocalRound, clipped_delta, encode_update, read_residual, residual_bytes, sign_update
from models.errors import ConfigError, InputError, ModelFormatError, StorageError
from models.inference import NumpyPredictor
from models.model import Model
from models.protocol.codec import CodecConfig, UpdateCodec
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.messages import ModelMessage, Task
from models.protocol.signed import SigningError
from models.transport.mqtt import Message
from models.transport.outbox import Outbox
from models.transport.sender import Sender

__all__ = ["DECLINE_REASONS", "FRESH_SHARE", "FitInFlight", "RoundTrainer", "WeightsHook"]

log = logging.getLogger(__name__)

REASK_SPACING_S = 30.0
"""A hub that asks again (the same task, not retained) gets the pending updates re-sent at most this often."""

FRESH_SHARE = 0.5
"""Of the time from seeing a task to its deadline, the share spent waiting for fresh windows."""

DECLINE_REASONS = ("resources", "no_data", "outbox_full")
"""Why an edge declines a round: a resource hook vetoes (battery, heat), it has no windows, its outbox is full."""

WeightsHook = Callable[[int, dict[str, np.ndarray], Mapping[str, np.ndarray]], Awaitable[Mapping[str, np.ndarray]]]
"""(round, base weights, trained weights) -> the weights to send instead."""


class FitInFlight:
    """A fit from its start until its windows are spent: it knows how to give them back as new."""

    def __init__(self, view: StreamView, base: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> None:
        self.view = view
        self._taken: int | None = view.replay.new_windows
        self.future = asyncio.ensure_future(asyncio.to_thread(view.trainer.fit, base, config))

    def spent(self) -> None:
        """The windows are used for good (the update is stored, the round skipped, or the fit took nothing)."""
        self._taken = None

    def give_back(self) -> bool:
        """Count the fit's windows as new again, once; True when that changed the buffer's state."""
        if self._taken is None:
            return False
        self.view.replay.new_windows = max(self.view.replay.new_windows, self._taken)
        self._taken = None
        return True

    async def wait_out(self, timeout: float) -> None:
        """Let a running fit end (a thread cannot be interrupted), at most ``timeout`` seconds."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.future)


class RoundTrainer:
    """Owns training: the current task, the last round trained, the training state and the fit in flight."""

    def __init__(self, config: EdgeConfig, ingest: Ingest, models: ModelAdoption, sender: Sender,
                 secure: SecureRound, evaluator: Evaluator, wakes: Wakes, counters: dict[str, int]) -> None:
        self.config, self.client_id = config, config.client_id
        self._ingest, self._models, self._sender, self._secure = ingest, models, sender, secure
        self._evaluator, self._wakes, self._counters = evaluator, wakes, counters
        self.task: Task | None = None
        self.last_round = -1
        self.state = "waiting for a model"
        self.weights_hook: WeightsHook | None = None
        self.outbox: Outbox | None = None  # set, with the device key, when the edge opens its state
        self.key: Ed25519PrivateKey | None = None
        self._fit: FitInFlight | None = None
        self._unverified: bytes | None = None  # the newest task that came before the hub's key was pinned
        self._awaiting_grant: bytes | None = None  # the newest task refused for its signer (a grant may name it)
        self._reasked_at = -REASK_SPACING_S
        self._train_due: dict[int, float] = {}
        self._fresh_by: dict[int, float] = {}  # round -> when the wait for fresh windows ends (time.time())
        self.declined: dict[str, Any] | None = None  # the last round declined: round, reason, detail
        self._logged: set[str] = set()

    def open(self, outbox: Outbox, key: Ed25519PrivateKey) -> None:
        """(worker thread) The outbox, which keeps the last round trained, and the device key that signs updates."""
        self.outbox, self.key = outbox, key
        raw = outbox.get("last_round")
        self.last_round = int(raw) if raw else -1

    async def on_task(self, message: Message) -> None:
        if not message.payload:
            return
        if self._models.pinned is None:  # no model yet: the task is checked once the first model pins the hub's key
            self._unverified = message.payload
            return
        task = self._accepted_task(message.payload, self._models.signers())
        if task is None:
            return
        if task == self.task:
            now = time.monotonic()
            if not message.retain and now - self._reasked_at >= REASK_SPACING_S:
                self._reasked_at = now  # the hub asks again: whatever is pending may not have reached it
                await self._sender.republish_pending(again=True)
            return
        self.task = task
        log.info("%s: task for round %d on model v%d", self.client_id, task.round, task.model_version)
        self._wakes.train.set()

    def _accepted_task(self, payload: bytes, signers: list[bytes]) -> Task | None:
        """The task ``payload`` carries when the hub (or a site it granted) signed it for this federation and its
        settings are within bounds; None (and the reason logged once) otherwise. A refused task leaves the
        current one in place; one whose signer is unknown waits for a grant that may name it."""
        try:
            task = Task.from_bytes(payload)
        except SigningError as exc:
            return self._refuse_task(f"it is malformed ({exc.detail})")
        if not any(task.verify(key) for key in signers):
            self._awaiting_grant = payload  # a site's task may come before its grant: looked at again when one does
            if self._models.granted is None and task.upstream is not None:  # the usual order on a site's broker
                self._counters["tasks_awaiting_grant"] = self._counters.get("tasks_awaiting_grant", 0) + 1
                self._note(f"task:grant:{task.round}", logging.INFO, "%s: round %d: a site's task; waiting for the "
                           "grant that names its key", self.client_id, task.round)
                return None
            return self._refuse_task(f"round {task.round}: it is not signed by the hub's key or a key it granted")
        if not task.verify(signers[0]) and (why := self._site_task_mismatch(task, signers[0])) is not None:
            return self._refuse_task(f"round {task.round}: site task: {why}")
        if task.federation != self.config.federation:
            return self._refuse_task(f"round {task.round}: it is for federation {str(task.federation)[:64]!r}")
        current, model = self.task, self._models.model
        if current is not None and task.round < current.round:
            return self._refuse_task(f"round {task.round}: this edge has the task of round {current.round}")
        if model is not None and task.model_version < model.model.version:
            return self._refuse_task(f"round {task.round}: it names model v{task.model_version}, older than the "
                                     f"current v{model.model.version}")
        try:
            self.config.policy.with_overrides(task.config)
            CodecConfig.from_task(task.config)
        except ConfigError as exc:
            return self._refuse_task(f"round {task.round}: {exc}")
        return task

    def _site_task_mismatch(self, task: Task, hub_key: bytes) -> str | None:
        """Why a task signed by a granted site key does not run the hub's own task unchanged, or None."""
        grant = self._models.granted
        if task.upstream is None or grant is None:
            return "it carries no task of the hub's"
        try:
            hub_task = Task.from_bytes(task.upstream.encode())
        except SigningError as exc:
            return f"the hub's task in it is malformed ({exc.detail})"
        if not hub_task.verify(hub_key) or hub_task.federation != task.federation:
            return "the task in it is not the hub's for this federation"
        if (hub_task.round, hub_task.model_version, _hub_settings(hub_task)) != (task.round, task.model_version,
                                                                                  _hub_settings(task)):
            return "it changes the hub's round, model or settings"
        if not hub_task.selects(grant.site):
            return f"the hub did not select site {grant.site!r} for this round"
        if hub_task.deadline is not None and (task.deadline is None or task.deadline > hub_task.deadline):
            return "its deadline is later than the hub's"
        return None

    def _granted_task(self) -> Task | None:
        """The task refused for its signer, now that a grant names that signer (and it is newer); else None."""
        payload, granted = self._awaiting_grant, self._models.granted
        if payload is None or granted is None:
            return None
        self._awaiting_grant = None  # looked at once per grant: a task its key did not sign stays refused
        try:
            signed_by_site = Task.from_bytes(payload).verify(granted.public_key)
        except SigningError:
            signed_by_site = False
        if not signed_by_site:
            return None
        checked = self._accepted_task(payload, self._models.signers())
        return checked if checked is not None and checked != self.task else None

    def _refuse_task(self, why: str) -> None:
        self._counters["tasks_refused"] = self._counters.get("tasks_refused", 0) + 1
        self._note(f"task:{why}", logging.WARNING, "%s: refused a task message: %s", self.client_id, why)
        return None

    async def loop(self) -> None:
        while not self._wakes.stopping:
            await wait(self._wakes.train, self._next_check())
            self._wakes.train.clear()
            task = self.task
            try:
                if self._unverified is not None and self._models.pinned is not None:
                    payload, self._unverified = self._unverified, None
                    if (checked := self._accepted_task(payload, self._models.signers())) is not None \
                            and checked != self.task:
                        self.task = task = checked
                if (checked := self._granted_task()) is not None:
                    self.task = task = checked
                await self.maybe_train()
            except (ConfigError, InputError, ModelFormatError) as exc:
                self._note(f"error:{task.round if task else None}:{exc}", logging.ERROR,
                           "%s: cannot train round %s: %s", self.client_id, task.round if task else None, exc)
            except (StorageError, asyncio.CancelledError):
                raise  # a full or read-only state directory stops the edge; so does a stop
            except Exception:  # a bug or a hostile input nothing caught: this round fails, the edge goes on
                self._note(f"crash:{task.round if task else None}", logging.ERROR,
                           "%s: round %s failed; the edge goes on with the next task", self.client_id,
                           task.round if task else None)
                log.debug("%s: the failure", self.client_id, exc_info=True)
                self._set_state(f"round {task.round if task else None} failed; waiting for the next task")

    async def maybe_train(self) -> None:
        """Train the current task's round if it is due: guard, delay, fit, then store or join the secure round."""
        task, model, view = self.task, self._models.model, self._ingest.view
        if task is None or model is None or view is None or self._wakes.stopping:
            return
        if task.round <= self.last_round:
            await self._secure.maybe_rejoin(task)
            return
        reason = self.why_not(task, model, view)
        if reason is not None:
            self._set_state(reason)
            return
        if not await self._delay(task.round):
            return
        config = dict(task.config)
        if view.replay.new_windows < self.config.policy.with_overrides(task.config).min_new_windows:
            config["min_new_windows"] = 0  # the wait for fresh windows is over: train on the buffer as it is
        config.setdefault("seed", self.config.policy.with_overrides(task.config).train.seed + task.round)
        codec = CodecConfig.from_task(config)
        self._set_state(f"training round {task.round}")
        async with self._ingest.lock:
            if self._ingest.view is not view:
                return  # the model's input changed meanwhile
            fitted = await self._fit_round(task, model, view, config)
            if fitted is None:
                return
            local, trained = fitted
            stored = await self._hand_over(task, local, codec)
        if stored is not None:
            await self._publish(local, trained, *stored)

    def why_not(self, task: Task, model: ModelMessage, view: StreamView) -> str | None:
        """Why this edge does not train ``task`` now (its training state meanwhile), or None.

        A reason the edge cannot get past before the deadline also declines the round (published).
        """
        if not task.selects(self.client_id):
            return f"not selected for round {task.round}"
        if task.model_version != model.model.version:
            return f"waiting for model v{task.model_version}"
        stats = self._sender.stats
        if stats is not None and stats.full:
            self._note(f"full:{task.round}", logging.WARNING,
                       "%s: the outbox is full (%d updates, %d bytes); training paused until receipts arrive",
                       self.client_id, stats.entries, stats.bytes)
            self._decline(task, "outbox_full", f"the outbox holds {stats.entries} updates awaiting receipts")
            return "paused: outbox full"
        policy = self.config.policy.with_overrides(task.config)
        if self._ingest.catching_up and len(view.replay) < view.replay.capacity:
            return "waiting: reading the stream"  # replayed data arrives faster than real time: read it all first
        vetoed = view.trainer.veto(replace(policy, min_new_windows=0))  # the resource hooks
        if vetoed:
            self._decline(task, "resources", vetoed)
            return f"declined round {task.round}: {vetoed}"
        fresh = view.replay.new_windows
        if fresh < policy.min_new_windows and not self._ingest.source_ended:  # an ended source brings no more
            if task.round not in self._fresh_by:
                self._fresh_by = {task.round: self._fresh_deadline(task)}
            fresh_by = self._fresh_by[task.round]
            if time.time() < fresh_by:
                self._note(f"fresh:{task.round}", logging.INFO, "%s: round %d: %d new windows (< %d); waiting "
                           "for fresh data until %s, then training on the replay buffer", self.client_id,
                           task.round, fresh, policy.min_new_windows, time.strftime("%H:%M:%S",
                                                                                    time.localtime(fresh_by)))
                return f"waiting: {fresh} new windows (< {policy.min_new_windows}) until " \
                       f"{time.strftime('%H:%M:%S', time.localtime(fresh_by))}"
        if len(view.replay) == 0:
            self._decline(task, "no_data", "no labelled windows yet")
            return f"declined round {task.round}: no windows yet"
        return None

    def _fresh_deadline(self, task: Task) -> float:
        """When to stop waiting for fresh windows for ``task``: part way to its deadline (now without one)."""
        now = time.time()
        if task.deadline is None or task.deadline <= now:
            return now
        return now + FRESH_SHARE * (task.deadline - now)

    def _next_check(self) -> float:
        """Seconds until the train loop looks again by itself: the retry interval, or sooner when a wait ends."""
        task, now = self.task, time.time()
        fresh_by = self._fresh_by.get(task.round) if task is not None else None
        if fresh_by is not None and fresh_by > now:
            return max(0.05, min(self.config.retry_interval_s, fresh_by - now + 0.05))
        return self.config.retry_interval_s

    def _decline(self, task: Task, reason: str, detail: str) -> None:
        """Tell the hub (in the status message) that this edge sits ``task``'s round out, and why; once a round."""
        if self.declined is not None and self.declined["round"] == task.round and self.declined["reason"] == reason:
            return
        self.declined = {"round": task.round, "reason": reason, "detail": detail[:200]}
        self._counters["rounds_declined"] = self._counters.get("rounds_declined", 0) + 1
        log.info("%s: declining round %d: %s (%s)", self.client_id, task.round, reason, detail)
        self._wakes.status.set()

    async def _delay(self, round_number: int) -> bool:
        """Wait out this round's random start delay; False when a stop or a newer task came first."""
        if self.config.train_delay_s <= 0:
            return True
        delay = np.random.default_rng([self.config.seed, round_number, 17]).exponential(self.config.train_delay_s)
        due = self._train_due.setdefault(round_number, time.monotonic() + float(delay))
        while (left := due - time.monotonic()) > 0:
            self._set_state(f"waiting {left:.0f} s before round {round_number}")
            await wait(self._wakes.stop, left)
            if self._wakes.stopping or self.task is None or self.task.round != round_number:
                return False
        return True

    async def _fit_round(self, task: Task, model: ModelMessage, view: StreamView,
                         config: Mapping[str, Any]) -> tuple[LocalRound, dict[str, np.ndarray]] | None:
        """(buffer lock held) Fine-tune: the round to send and this edge's own weights; None when nothing to send."""
        await self._ingest.commit_held(view)
        base = model.model.network.state_dict()
        fit = self._fit = FitInFlight(view, base, config)
        try:
            weights, n, metrics = await asyncio.shield(fit.future)  # a stop lets it finish, then gives it back
        except Exception:
            fit.spent()  # a failed fit consumed nothing
            raise
        self._ingest.dirty = True
        self._counters["training_seconds"] = self._counters.get("training_seconds", 0.0) + float(
            metrics.get("cpu_seconds", 0.0))
        if self._wakes.stopping:
            return None  # discard_running_fit gives the windows back: the next start trains this round
        if metrics.get("skipped") or n < 1:
            fit.spent()  # vetoed: the fit consumed nothing
            self._counters["rounds_skipped"] += 1
            self._decline(task, "resources" if metrics.get("skipped") else "no_data",
                          str(metrics.get("skipped", "no examples")))
            self._set_state(f"skipped round {task.round}: {metrics.get('skipped', 'no examples')}")
            log.info("%s: round %d skipped: %s", self.client_id, task.round, metrics.get("skipped"))
            return None
        sent = weights if self.weights_hook is None else await self.weights_hook(task.round, base, weights)
        return LocalRound(task.round, model, base, sent, n, metrics), weights

    async def _hand_over(self, task: Task, local: LocalRound, codec: CodecConfig) -> tuple[int, bytes] | None:
        """(buffer lock held) The round's update into the outbox, or its delta into the secure round."""
        fit = self._fit
        assert fit is not None
        if "secagg" in task.config:
            fit.spent()
            await self._join_secure(task, local, codec)
            return None
        stored = None
        try:
            stored = await self._store(local, codec)
        finally:
            if stored is not None:
                fit.spent()
            elif not self._wakes.stopping:
                self._give_back()  # not stored (outbox full): the windows count as new for the next attempt
        return stored

    async def _store(self, local: LocalRound, codec: CodecConfig) -> tuple[int, bytes] | None:
        """Encode, sign and add to the outbox in one transaction with the round and residual."""
        outbox, key = self.outbox, self.key
        assert outbox is not None and key is not None
        residual = None
        if codec.quantize == "topk":
            size = UpdateCodec.for_weights(local.base).size
            residual = await asyncio.to_thread(lambda: read_residual(outbox.get("residual"), size, self.client_id))
        rng = np.random.default_rng([self.config.seed, local.round])
        encoded = await asyncio.to_thread(encode_update, local.base, local.weights, codec, rng, residual)
        state = {"last_round": str(local.round).encode(), "residual": residual_bytes(encoded.residual)}
        stored = await self._sender.store(local.round, functools.partial(sign_update, local, encoded, self.client_id,
                                                                         key), state)
        if stored is None:
            self._set_state("paused: outbox full")
            return None
        self.last_round = local.round
        self._counters["updates_built"] += 1
        return stored

    async def _join_secure(self, task: Task, local: LocalRound, codec: CodecConfig) -> None:
        """Take part in the task's secure round with this round's clipped delta; the round counts as trained."""
        outbox = self.outbox
        assert outbox is not None
        delta = clipped_delta(local.base, local.weights, codec)
        await asyncio.to_thread(outbox.put, "last_round", str(task.round).encode())
        self.last_round = task.round
        self._set_state("idle")
        await self._secure.join(task, delta)

    async def _publish(self, local: LocalRound, trained: dict[str, np.ndarray], sequence: int, payload: bytes) -> None:
        """After a stored update: live inference on the fine-tuned weights, the round's metrics, then the update."""
        model = local.base_model
        if self._models.model is model:  # live inference on the personalized weights until the next model
            personal = Model(model.model.spec, version=model.model.version)
            personal.network.load_state_dict(trained)
            self._ingest.predictor = NumpyPredictor(personal)
        self._set_state("idle")
        log.info("%s: round %d trained on %d examples (loss %.4f); update %d, %d bytes", self.client_id, local.round,
                 local.examples, float(local.metrics.get("train_loss", float("nan"))), sequence, len(payload))
        await self._evaluator.evaluate_and_publish(model, trained, local.round)  # the round's metrics before its update
        await self._sender.send(sequence, payload)

    async def discard_running_fit(self) -> None:
        """Let a fit in flight finish, then give its windows back as new: the next start trains that round."""
        fit = self._fit
        if fit is None:
            return
        if not fit.future.done():
            log.info("%s: stopping the running fine-tuning (its result is discarded)", self.client_id)
            fit.view.trainer.interrupt()
            await fit.wait_out(self.config.policy.cpu_seconds + 30.0)
        self._give_back()

    def _give_back(self) -> None:
        if self._fit is not None and self._fit.give_back():
            self._ingest.dirty = True

    def _note(self, key: str, level: int, msg: str, *args: Any) -> None:
        """Log a message once per key (a waiting edge re-checks often; the log says it once)."""
        if key not in self._logged:
            if len(self._logged) >= 1000:  # keys name rounds and reasons: bounded however many come
                self._logged.clear()
            self._logged.add(key)
            log.log(level, msg, *args)

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self._wakes.status.set()


SITE_ROUND_KEYS = ("secagg", "dp_noise_share")
"""Task settings a site hub sets for its own gateways (its secure round inside the site), not the hub's."""


def _hub_settings(task: Task) -> dict[str, Any]:
    """A task's settings but those a site hub sets for its own secure round."""
    return {k: v for k, v in task.config.items() if k not in SITE_ROUND_KEYS}
