"""One secure-aggregation round run by the hub: SecAgg+ stages over MQTT, each with a deadline.

Why a separate object: in a secure round the hub never holds an update, only the
messages of :mod:`models.protocol.secagg`. This class keeps the hub's side of them
(:class:`~models.protocol.secagg.SecAggServer`), says when a stage is complete (every
client still in the round answered, or the stage's deadline passed), and turns a
finished round into the mean delta of the survivors. Transport stays with the service:
:meth:`SecureRound.receive` takes what arrived on ``secagg/<client>``, and
:meth:`SecureRound.advance` returns what to publish on ``secagg-to/<client>``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

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

__all__ = ["SecureResult", "SecureRound"]

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
