"""The edge's side of a secure-aggregation round: the SecAgg+ client driven by the hub's messages.

Why here and not in the outbox: a secure round is interactive. The masked update is useless
without the key sharing before it and the unmasking after it, and a client that misses a
stage is simply a dropout the protocol recovers from. So nothing of it is stored; the
trained delta is kept in memory for the round (and for a re-run of it after an abort).

:class:`SecureRound` is the edge runtime's part: it joins the round a task announces with
the round's clipped delta (:func:`edge_client.updates.clipped_delta`, the same as a plain
round's), answers the hub's messages on ``secagg/<client>``, and, when the hub runs a round
again after an abort, joins the new run with the kept delta. The peers' public keys come
from the operator's keyring (:attr:`EdgeConfig.peer_keyring
<edge_client.config.EdgeConfig.peer_keyring>`), never from the hub; an edge without one sits
secure rounds out.

The SecAgg+ library (:mod:`models.protocol.secagg`, with X25519, AES-GCM and HKDF) is imported
when a secure round starts, not with the edge: most federations never run one, and a gateway
keeps its resident set for the rounds it does run.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from edge_client.config import EdgeConfig
from edge_client.shared import Link
from models.errors import SecAggError, WearflError
from models.protocol.identity import load_keyring
from models.protocol.messages import Task

if TYPE_CHECKING:
    from models.protocol.ed25519 import Ed25519PrivateKey
    from models.protocol.secagg import RoundConfig
    from models.transport.mqtt import Message

__all__ = ["SecureParticipant", "SecureRound", "round_config_of"]

log = logging.getLogger(__name__)


def round_config_of(task_config: Mapping[str, object]) -> RoundConfig | None:
    """The secure round a task announces (``secagg``, base64), or None; SecAggError when unreadable."""
    raw = task_config.get("secagg")
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise SecAggError("malformed", "the task's secagg entry is not a base64 string")
    try:
        data = base64.b64decode(raw, validate=True)
    except ValueError:
        raise SecAggError("malformed", "the task's secagg entry is not valid base64") from None
    from models.protocol.secagg import RoundConfig

    return RoundConfig.from_bytes(data)


class SecureParticipant:
    """One client in one secure round: :meth:`start` gives its first message, :meth:`answer` the next ones."""

    def __init__(self, client_id: str, config: RoundConfig, key: Ed25519PrivateKey, directory: Mapping[str, bytes],
                 delta: np.ndarray, rng: np.random.Generator, noise_share: float = 0.0) -> None:
        from models.protocol.secagg import SecAggClient, encode
        from models.protocol.secagg.fixedpoint import levels, step

        self.config = config
        self.client = SecAggClient(client_id, config, key, directory)
        x = encode(np.asarray(delta, np.float32), config.value_range, config.value_bits, rng)
        if noise_share > 0:  # distributed DP: this client's share of the round's Gaussian noise, on the grid
            unit = step(config.value_range, config.value_bits)
            noise = np.rint(rng.normal(0.0, noise_share / unit, x.shape)).astype(np.int64)
            bound = levels(config.value_bits)
            x = np.clip(x + noise, -bound, bound)
        self._x = x

    @property
    def round_id(self) -> str:
        return self.config.round_id

    @property
    def done(self) -> bool:
        from models.protocol.secagg import ClientStage

        return self.client.stage in (ClientStage.DONE, ClientStage.ABORTED)

    @property
    def succeeded(self) -> bool:
        """The round's unmasking answered: this client's part is complete."""
        from models.protocol.secagg import ClientStage

        return self.client.stage is ClientStage.DONE

    def start(self) -> bytes:
        return self.client.advertise_keys().to_bytes()

    def answer(self, payload: bytes) -> bytes:
        """The reply to the hub's message for the current stage; SecAggError when it is refused."""
        from models.protocol.secagg import ClientStage, KeyBundle, ShareBundle, UnmaskRequest

        stage = self.client.stage
        if stage is ClientStage.ADVERTISED:
            return self.client.share_keys(KeyBundle.from_bytes(payload)).to_bytes()
        if stage is ClientStage.SHARED:
            return self.client.masked_input(ShareBundle.from_bytes(payload), self._x).to_bytes()
        if stage is ClientStage.MASKED:
            return self.client.unmask(UnmaskRequest.from_bytes(payload)).to_bytes()
        raise SecAggError("out_of_order", f"no message is expected in stage {stage.name}")


class SecureRound:
    """Owns this edge's side of secure rounds: the current participant, its task entry and the kept delta."""

    def __init__(self, config: EdgeConfig, link: Link, counters: dict[str, int]) -> None:
        self.config, self.client_id = config, config.client_id
        self._link, self._counters = link, counters
        self.key: Ed25519PrivateKey | None = None  # the device key; set when the edge opens its state
        self._participant: SecureParticipant | None = None
        self._joined: object = None  # the task's secagg entry the participant was made for
        self._delta: tuple[int, np.ndarray] | None = None  # (round, clipped delta), kept for a re-run

    async def join(self, task: Task, delta: np.ndarray) -> None:
        """Take part in the task's secure round with this delta (kept for a re-run of the round)."""
        self._delta = (task.round, delta)
        await self._start(task)

    async def maybe_rejoin(self, task: Task) -> None:
        """A secure round of a round already trained, run again (after an abort): join with the kept delta."""
        kept = self._delta
        if kept is None or kept[0] != task.round or "secagg" not in task.config:
            return
        if task.config.get("secagg") == self._joined:
            return  # this secure round is joined (or was refused) already
        await self._start(task)

    async def _start(self, task: Task) -> None:
        kept = self._delta
        assert kept is not None and self.key is not None
        self._participant, self._joined = None, task.config.get("secagg")
        if self.config.peer_keyring is None:
            log.warning("%s: round %d uses secure aggregation, but this edge has no peer keyring; it sits out",
                        self.client_id, task.round)
            return
        try:
            config = round_config_of(task.config)
            if config is None or self.client_id not in config.roster:
                return
            directory = load_keyring(self.config.peer_keyring)
            participant = SecureParticipant(self.client_id, config, self.key, directory, kept[1],
                                            np.random.default_rng(),
                                            float(task.config.get("dp_noise_share", 0.0) or 0.0))
            first = participant.start()
        except (SecAggError, WearflError) as exc:
            log.warning("%s: cannot take part in the secure round of round %d: %s", self.client_id, task.round, exc)
            return
        self._participant = participant
        log.info("%s: secure round %s: %d clients, threshold %d", self.client_id, config.round_id, config.n,
                 config.threshold)
        await self._link.session.publish(self._link.topics.secagg_up(self.client_id), first, qos=1)

    async def on_message(self, message: Message) -> None:
        """The hub's message for the current stage: answer it."""
        participant = self._participant
        if participant is None or participant.done:
            return
        try:
            reply = await asyncio.to_thread(participant.answer, message.payload)
        except SecAggError as exc:
            log.warning("%s: secure round %s: %s", self.client_id, participant.round_id, exc)
            return
        await self._link.session.publish(self._link.topics.secagg_up(self.client_id), reply, qos=1)
        if participant.succeeded:
            self._counters["secure_rounds"] = self._counters.get("secure_rounds", 0) + 1
