"""Helpers for hub tests: signed updates built the way an edge builds them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from models.protocol.codec import CodecConfig, UpdateCodec
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.messages import UpdateMeta, build_update

SHAPES = {"conv.weight": (4, 3, 5), "conv.bias": (4,), "fc.weight": (2, 4), "fc.bias": (2,)}  # 78 values


def federation_name() -> str:
    """A federation of this test's own (letters, digits, '-' only)."""
    return f"t-{uuid.uuid4().hex[:16]}"


def delta_of(shapes: Mapping[str, tuple[int, ...]], seed: int = 0, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def make_update(
    key: Ed25519PrivateKey,
    client: str,
    *,
    sequence: int = 0,
    round_number: int = 1,
    base_version: int = 0,
    num_examples: int = 10,
    delta: Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, tuple[int, ...]] = SHAPES,
    scheme: str = "none",
    meta_client: str | None = None,
    seed: int = 0,
) -> bytes:
    """A signed update as an edge sends it."""
    codec = UpdateCodec(shapes, CodecConfig(quantize=scheme, block=16))
    delta = delta if delta is not None else delta_of(shapes, seed)
    tensors, codec_meta, _ = codec.encode(delta, np.random.default_rng(seed))
    meta = UpdateMeta(client=meta_client or client, round=round_number, base_version=base_version, base_hash="0" * 64,
                      num_examples=num_examples, sequence=sequence, codec=codec_meta, timestamp=time.time())
    return build_update(replace(meta), tensors, key)
