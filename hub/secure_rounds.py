"""Secure aggregation run by the hub: SecAgg+ rounds over MQTT, each stage with a deadline.

Why a separate object: in a secure round the hub never holds an update, only the
messages of :mod:`models.protocol.secagg`. :class:`SecureRound` keeps the hub's side of
one round (:class:`~models.protocol.secagg.SecAggServer`), says when a stage is complete
(every client still in the round answered, or the stage's deadline passed), and turns a
finished round into the mean delta of the survivors.

:class:`SecureRoundDriver` runs them for the hub: once a round's clients are selected, the
service starts a secure round over those in the keyring (:meth:`SecureRoundDriver.start`);
its configuration goes out in the round's task (:meth:`SecureRoundDriver.task_config`); between
batches :meth:`SecureRoundDriver.step` moves the open round's deadline to the stage's and
closes the stage when it is due. Transport stays with the service: the driver takes what
arrived on ``secagg/<client>`` and returns what to publish on ``secagg-to/<client>``.

Every update is encoded on one fixed-point grid of ``value_bits`` bits over [-r, r]: r is
the rule's DP clip (it bounds every update already), else ``secagg_range`` (a range bound,
not a privacy setting). When the clients add the DP noise in shares
(:class:`hub.strategies.base.Capabilities`), the grid leaves room for it: 8 standard
deviations of each share per value. A stage that fails aborts the round; the service then
selects again.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from models.protocol.secagg import (
    AdvertiseKeys,
    MaskedInput,
    RoundConfig,
    SecAggError,
    SecAggServer,
    ServerStage,
    ShareKeys,
    UnmaskResponse,
    decode,
)

if TYPE_CHECKING:
    from hub.round_state import OpenRound
    from hub.strategies.base import Strategy

__all__ = ["SecureResult", "SecureRound", "SecureRoundDriver", "SecureStep"]

log = logging.getLogger(__name__)

_INBOUND = {
    ServerStage.ADVERTISE: (AdvertiseKeys, "receive_advertisement"),
    ServerStage.SHARE_KEYS: (ShareKeys, "receive_share_keys"),
    ServerStage.MASKED_INPUT: (MaskedInput, "receive_masked_input"),
    ServerStage.UNMASKING: (UnmaskResponse, "receive_unmask"),
}


@dataclass(frozen=True)
class SecureResult:
    """A finished round: the survivors' mean delta (flat float32) and who they were."""

    mean: np.ndarray
    survivors: tuple[str, ...]


class SecureRound:
    """The hub's side of one SecAgg+ round; ``stage_timeout_s`` bounds every stage."""

    def __init__(self, config: RoundConfig, directory: Mapping[str, bytes], stage_timeout_s: float,
                 now: float | None = None) -> None:
        self.config = config
        self.server = SecAggServer(config, directory)
        self.stage_timeout_s = float(stage_timeout_s)
        self.deadline = (time.monotonic() if now is None else now) + self.stage_timeout_s
        self._expected: set[str] = set(config.roster)
        self._answered: set[str] = set()
        self.result: SecureResult | None = None
        self.bytes_in = 0

    def receive(self, client: str, payload: bytes) -> None:
        """A message from ``client`` for the current stage; a bad one is logged and left out."""
        self.bytes_in += len(payload)
        inbound = _INBOUND.get(self.server.stage)
        if inbound is None or client not in self._expected or client in self._answered:
            log.info("secure aggregation: ignored a message from %s in stage %s", client, self.server.stage.name)
            return
        cls, method = inbound
        try:
            if cls is MaskedInput:
                message = MaskedInput.from_bytes(payload, max_bytes=self.config.masked_input_bytes)
            else:
                message = cls.from_bytes(payload)  # type: ignore[attr-defined]
            if getattr(message, "sender", getattr(message, "client_id", None)) != client:
                raise SecAggError("wrong_sender", f"a message on {client}'s topic names another sender")
            getattr(self.server, method)(message)
        except SecAggError as exc:
            log.warning("secure aggregation: refused %s's %s: %s", client, cls.__name__, exc)
            return
        self._answered.add(client)

    def due(self, now: float | None = None) -> bool:
        """Whether the current stage can close: everyone still in answered, or its deadline passed."""
        now = time.monotonic() if now is None else now
        return self._expected <= self._answered or now >= self.deadline

    def advance(self, now: float | None = None) -> dict[str, bytes]:
        """Close the current stage; the messages to send, by client. Raises SecAggError to abort the round."""
        now = time.monotonic() if now is None else now
        stage = self.server.stage
        missing = sorted(self._expected - self._answered)
        if missing:
            log.info("secure aggregation, stage %s: %d of %d clients dropped out (%s)", stage.name, len(missing),
                     len(self._expected), ", ".join(missing[:5]))
        if stage is ServerStage.UNMASKING:
            total = self.server.finish()
            survivors = self.server.survivors
            cfg = self.config
            mean = decode(total, len(survivors), cfg.value_range, cfg.value_bits, cfg.modulus_bits)
            self.result = SecureResult(mean, tuple(survivors))
            return {}
        if stage is ServerStage.ADVERTISE:
            outgoing = self.server.close_advertise()
        elif stage is ServerStage.SHARE_KEYS:
            outgoing = self.server.close_share_keys()
        else:
            outgoing = self.server.close_masked_input()
        self._expected = set(outgoing)
        self._answered = set()
        self.deadline = now + self.stage_timeout_s
        return {client: message.to_bytes() for client, message in outgoing.items()}


@dataclass(frozen=True)
class SecureStep:
    """What one step of the driver asks of the service.

    ``outgoing``: messages to publish, by client. ``result``: the finished round (the
    service closes the round with it). ``aborted``: the round failed; select again.
    """

    outgoing: dict[str, bytes] = field(default_factory=dict)
    result: SecureResult | None = None
    aborted: bool = False
    bytes_in: int = 0


class SecureRoundDriver:
    """The hub's secure rounds, one a round number at a time, over the devices in ``directory``.

    ``directory``: ``{client: raw public key}`` (the keyring). ``value_range`` is the grid's
    range when the rule sets no DP clip; ``round_timeout_s`` moves the deadline of a round
    that waits for its roster.
    """

    def __init__(self, directory: Mapping[str, bytes], strategy: Strategy, *, value_bits: int, value_range: float,
                 stage_timeout_s: float, round_timeout_s: float) -> None:
        self.directory = dict(directory)
        self.strategy = strategy
        self.value_bits, self.value_range = int(value_bits), float(value_range)
        self.stage_timeout_s, self.round_timeout_s = float(stage_timeout_s), float(round_timeout_s)
        self.round: SecureRound | None = None
        self.round_number = -1  # the round number ``round`` belongs to
        self._attempts = 0
        self._noise_share: float | None = None  # each client's DP noise std, when the clients add it

    def start(self, round_number: int, roster: tuple[str, ...], vector_length: int) -> None:
        """A SecAgg+ round over the selected clients that are in the keyring; its config goes out in the task."""
        unknown = [c for c in roster if c not in self.directory]
        if unknown:
            log.warning("secure aggregation: %s not in the keyring; left out of round %d", ", ".join(unknown),
                        round_number)
        members = [c for c in roster if c in self.directory]
        caps = self.strategy.capabilities()
        value_range = caps.dp_clip or self.value_range
        try:
            self._attempts = self._attempts + 1 if self.round_number == round_number else 1
            config = RoundConfig.create(f"r{round_number}-{self._attempts}", members, vector_length,
                                        value_bits=self.value_bits, value_range=value_range)
            self._noise_share = None
            if caps.distributed_noise:
                share = caps.noise_share(config.threshold)
                config = dataclasses.replace(config, value_range=value_range + 8 * share)
                self._noise_share = share
        except SecAggError as exc:
            log.error("secure aggregation: round %d cannot start: %s", round_number, exc)
            self.round = None
            return
        self.round = SecureRound(config, {c: self.directory[c] for c in members}, self.stage_timeout_s)
        self.round_number = round_number
        log.info("secure aggregation: round %d over %d clients (threshold %d, %d neighbours each)", round_number,
                 config.n, config.threshold, config.degree)

    def receive(self, client: str, payload: bytes) -> None:
        """A message on ``secagg/<client>``: for the running round's current stage, else dropped."""
        if self.round is not None:
            self.round.receive(client, payload)

    def task_config(self, round_number: int) -> dict[str, str | float]:
        """The task entries of ``round_number``'s secure round: its config, and each client's DP noise share."""
        secure = self.round
        if secure is None or self.round_number != round_number:
            return {}
        config: dict[str, str | float] = {"secagg": base64.b64encode(secure.config.to_bytes()).decode()}
        if self._noise_share is not None:
            config["dp_noise_share"] = self._noise_share
        return config

    def step(self, current: OpenRound) -> SecureStep:
        """Advance the secure round of ``current`` when its stage is due; ``current``'s deadline follows the stage."""
        secure = self.round
        if secure is None or self.round_number != current.round:
            current.set_deadline(time.time() + self.round_timeout_s)  # nothing to close before a roster
            return SecureStep()
        if not secure.due():
            current.set_deadline(time.time() + max(0.0, secure.deadline - time.monotonic()))
            return SecureStep()
        try:
            outgoing = secure.advance()
        except SecAggError as exc:
            log.error("secure aggregation: round %d aborted (%s); selecting again", current.round, exc)
            self.round = None
            current.set_deadline(time.time() + self.round_timeout_s)
            return SecureStep(aborted=True)
        current.set_deadline(time.time() + max(0.0, secure.deadline - time.monotonic()))
        if secure.result is None:
            return SecureStep(outgoing)
        self.round = None
        return SecureStep(outgoing, secure.result, bytes_in=secure.bytes_in)
