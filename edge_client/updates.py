"""Update building: from one round's trained weights to what the edge sends.

Every round sends Δ = w_local - w_base, flattened in name order and scaled down to the
update clip (``update_clip`` of :meth:`CodecConfig.from_task
<models.protocol.codec.CodecConfig.from_task>`: differential privacy's clip, before any
noise). :func:`clipped_delta` is the one place that forms and clips it:

- a plain round encodes it (:func:`encode_update`, with the
  :class:`~models.protocol.codec.UpdateCodec`; for ``topk`` the part left out is the
  residual, kept for error feedback and added to the next round's delta) and signs it with
  the device key (:func:`sign_update`); the runtime stores that in the outbox *first*, in one
  transaction with the round and the residual, and only then publishes it;
- a secure round hands the same flat delta to the secure-aggregation client
  (:mod:`edge_client.secure_aggregation`), which masks it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from models.protocol.codec import CodecConfig, UpdateCodec, clip_l2
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.messages import ModelMessage, UpdateMeta, build_update

__all__ = ["EncodedUpdate", "LocalRound", "clipped_delta", "encode_update", "finite_metrics", "read_residual",
           "residual_bytes", "sign_update"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalRound:
    """One round's fit: the weights to send (``weights``), trained from ``base`` of model ``base_model``."""

    round: int
    base_model: ModelMessage
    base: Mapping[str, np.ndarray]
    weights: Mapping[str, np.ndarray]
    examples: int
    metrics: Mapping[str, Any]


@dataclass(frozen=True)
class EncodedUpdate:
    """A plain round's encoded delta: the tensors and codec metadata to sign, and the top-k residual."""

    tensors: dict[str, np.ndarray]
    codec: dict[str, Any]
    residual: np.ndarray | None


def clipped_delta(base: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray], codec: CodecConfig) -> np.ndarray:
    """Δ = ``weights`` - ``base``, flat (float32, in name order) and scaled down to ``codec.update_clip``."""
    layout = UpdateCodec.for_weights(base)
    return clip_l2(layout.flatten({k: np.asarray(weights[k], np.float32) - base[k] for k in base}), codec.update_clip)


def encode_update(
    base: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray], codec: CodecConfig,
    rng: np.random.Generator, residual: np.ndarray | None = None,
) -> EncodedUpdate:
    """:func:`clipped_delta`, encoded as ``codec`` says (``residual``: the last top-k residual, or None)."""
    flat = clipped_delta(base, weights, codec)
    encoder = UpdateCodec.for_weights(base, replace(codec, update_clip=0.0))  # clipped above, once for every round
    return EncodedUpdate(*encoder.encode(encoder.unflatten(flat), rng, residual))


def sign_update(local: LocalRound, encoded: EncodedUpdate, client_id: str, key: Ed25519PrivateKey,
                sequence: int) -> bytes:
    """The signed update message; ``sequence`` is inside the signature, so the outbox allocates it first."""
    meta = UpdateMeta(client=client_id, round=local.round, base_version=local.base_model.model.version,
                      base_hash=local.base_model.hash, num_examples=int(local.examples), sequence=sequence,
                      codec=encoded.codec, metrics=finite_metrics(local.metrics))
    return build_update(meta, encoded.tensors, key)


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric, finite entries of ``metrics`` as floats (what the hub's JSON and signatures take)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool | int | float | np.floating | np.integer) and math.isfinite(float(v)):
            out[str(k)] = float(v)
    return out


def residual_bytes(residual: np.ndarray | None) -> bytes:
    """How the outbox keeps a top-k residual (empty: none)."""
    return b"" if residual is None else st_save({"residual": residual})


def read_residual(raw: bytes | None, size: int, client_id: str) -> np.ndarray | None:
    """The residual kept by :func:`residual_bytes` when it fits a delta of ``size`` values, else None."""
    if not raw:
        return None
    try:
        residual = st_load(raw)["residual"]
    except Exception:  # a damaged residual only costs error feedback; never the update
        log.warning("%s: the stored top-k residual is unreadable; starting without it", client_id)
        return None
    return residual if residual.shape == (size,) else None
