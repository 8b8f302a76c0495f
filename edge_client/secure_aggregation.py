"""The edge's side of a secure-aggregation round: the SecAgg+ client driven by the hub's messages.

Why here and not in the outbox: a secure round is interactive. The masked update is useless
without the key sharing before it and the unmasking after it, and a client that misses a
stage is simply a dropout the protocol recovers from. So nothing of it is stored; the
trained delta is kept in memory for the round (and for a re-run of it after an abort).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from models.protocol.secagg import (
    ClientStage,
    KeyBundle,
    RoundConfig,
    SecAggClient,
    SecAggError,
    ShareBundle,
    UnmaskRequest,
    encode,
)
from models.protocol.secagg.fixedpoint import levels, step

__all__ = ["SecureParticipant", "round_config_of"]

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
    return RoundConfig.from_bytes(data)


class SecureParticipant:
    """One client in one secure round: :meth:`start` gives its first message, :meth:`answer` the next ones."""

    def __init__(self, client_id: str, config: RoundConfig, key: Ed25519PrivateKey, directory: Mapping[str, bytes],
                 delta: np.ndarray, rng: np.random.Generator, noise_share: float = 0.0) -> None:
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
        return self.client.stage in (ClientStage.DONE, ClientStage.ABORTED)

    def start(self) -> bytes:
        return self.client.advertise_keys().to_bytes()

    def answer(self, payload: bytes) -> bytes:
        """The reply to the hub's message for the current stage; SecAggError when it is refused."""
        stage = self.client.stage
        if stage is ClientStage.ADVERTISED:
            return self.client.share_keys(KeyBundle.from_bytes(payload)).to_bytes()
        if stage is ClientStage.SHARED:
            return self.client.masked_input(ShareBundle.from_bytes(payload), self._x).to_bytes()
        if stage is ClientStage.MASKED:
            return self.client.unmask(UnmaskRequest.from_bytes(payload)).to_bytes()
        raise SecAggError("out_of_order", f"no message is expected in stage {stage.name}")
