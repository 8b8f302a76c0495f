"""The update codec: model deltas to compact tensors and back.

The edge sends Δ = w_local - w_base, flattened in name order, L2-clipped, then
either as float32 (``none``), per-block symmetric int8 or int4 with stochastic
rounding (unbiased: the mean of many encodings is the input), or as the top-k
entries by magnitude (``topk``) with the part left out kept on the edge and added
to the next delta (error feedback). Decoding checks every size and value before a
single number is used, so a hostile payload is rejected, never trusted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from models.errors import CodecError, ConfigError

__all__ = ["SCHEMES", "CodecConfig", "CodecError", "UpdateCodec", "clip_l2"]

SCHEMES = ("none", "int8", "int4", "topk")
F32 = np.float32


def clip_l2(flat: np.ndarray, bound: float) -> np.ndarray:
    """A flat delta scaled down to L2 norm ``bound`` (0: no bound): the update clip."""
    if bound > 0:
        norm = float(np.linalg.norm(flat))
        if norm > bound:
            return flat * F32(bound / norm)
    return flat


@dataclass(frozen=True)
class CodecConfig:
    """How deltas travel: the task keys ``quantize``, ``block``, ``topk_fraction`` and ``update_clip``.

    ``update_clip`` is the update clip: the L2 bound the edge scales its whole delta to
    before encoding (0: none). It is not the trainer's gradient clip (``grad_clip``), the
    hub's server norm bound, nor DP-FedAvg's clip (which the hub sends to edges as this).
    The defaults here are the federation's defaults: the hub's task config starts from them.
    """

    quantize: str = "int8"
    block: int = 256
    topk_fraction: float = 0.04
    update_clip: float = 0.0

    def __post_init__(self) -> None:
        if self.quantize not in SCHEMES:
            raise ConfigError(f"unknown quantization {self.quantize!r}; use one of {', '.join(SCHEMES)}.")
        if not 8 <= self.block <= 65536:
            raise ConfigError(f"quantization block must be 8..65536 values, got {self.block}.")
        if not 0.0 < self.topk_fraction <= 1.0:
            raise ConfigError(f"topk_fraction must be in (0, 1], got {self.topk_fraction}.")
        if not (math.isfinite(self.update_clip) and self.update_clip >= 0):
            raise ConfigError(f"update_clip must be a finite number >= 0, got {self.update_clip}.")

    @classmethod
    def from_task(cls, config: Mapping[str, Any]) -> CodecConfig:
        """The update encoding a round's task config asks for (its missing keys take the defaults).

        The one mapping from task config to codec settings, used by the edge to encode and the
        hub to check its own task config.
        """
        defaults = cls()
        try:
            return cls(
                quantize=str(config.get("quantize", defaults.quantize)),
                block=int(config.get("block", defaults.block)),
                topk_fraction=float(config.get("topk_fraction", defaults.topk_fraction)),
                update_clip=float(config.get("update_clip", defaults.update_clip) or 0.0),
            )
        except (TypeError, ValueError, OverflowError) as exc:
            if isinstance(exc, ConfigError):
                raise ConfigError(f"the task's update encoding settings are invalid: {exc}") from None
            raise ConfigError(f"the task's update encoding settings are invalid ({exc}).") from exc

    def task_config(self) -> dict[str, str | int | float]:
        """These settings as task config keys (what :meth:`from_task` reads back)."""
        return asdict(self)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stochastic_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.floor(x + rng.random(x.shape, dtype=F32))


class UpdateCodec:
    """Encodes and decodes deltas of one model layout (names and shapes, sorted by name)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], config: CodecConfig = CodecConfig()) -> None:
        self.names = sorted(shapes)
        self.shapes = {k: tuple(shapes[k]) for k in self.names}
        self.sizes = [math.prod(self.shapes[k]) for k in self.names]  # math.prod: np.prod costs 5 us a call
        self.size = int(sum(self.sizes))
        self.config = config

    @classmethod
    def for_weights(cls, weights: Mapping[str, np.ndarray], config: CodecConfig = CodecConfig()) -> UpdateCodec:
        return cls({k: v.shape for k, v in weights.items()}, config)

    def flatten(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        if set(tensors) != set(self.names):
            raise ConfigError("delta names do not match the model layout.")
        return np.concatenate([np.asarray(tensors[k], F32).reshape(-1) for k in self.names])

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        out, offset = {}, 0
        for name, size in zip(self.names, self.sizes, strict=True):
            out[name] = flat[offset : offset + size].reshape(self.shapes[name]).astype(F32, copy=False)
            offset += size
        return out

    # -- encoding (edge) -------------------------------------------------------------

    def encode(
        self, delta: Mapping[str, np.ndarray], rng: np.random.Generator, residual: np.ndarray | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any], np.ndarray | None]:
        """(tensors, codec metadata, new residual) for a delta; residual only for ``topk``."""
        flat = clip_l2(self.flatten(delta), self.config.update_clip)
        scheme = self.config.quantize
        meta: dict[str, Any] = {"scheme": scheme, "n": self.size, "block": self.config.block}
        if scheme == "none":
            return {"delta": flat.astype(F32)}, meta, None
        if scheme in ("int8", "int4"):
            q, scales = self._quantize(flat, 127 if scheme == "int8" else 7, rng)
            if scheme == "int4":
                q = self._pack4(q)
            return {"q": q, "scales": scales}, meta, None
        if residual is not None:
            flat = flat + residual
        k = max(1, round(self.config.topk_fraction * self.size))
        idx = np.sort(np.argpartition(np.abs(flat), self.size - k)[self.size - k :])
        q, scales = self._quantize(flat[idx], 127, rng)
        sent = np.zeros_like(flat)
        sent[idx] = self._dequantize_with(q.astype(F32), scales, self.config.block, k)
        meta["k"] = k
        index_dtype = np.uint16 if self.size <= 65536 else np.uint32
        return {"idx": idx.astype(index_dtype), "q": q, "scales": scales}, meta, (flat - sent).astype(F32)

    def _quantize(self, x: np.ndarray, levels: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        block = self.config.block
        blocks = -(-len(x) // block)
        padded = np.zeros(blocks * block, F32)
        padded[: len(x)] = x
        padded = padded.reshape(blocks, block)
        scales = (np.abs(padded).max(axis=1) / F32(levels)).astype(F32)
        safe = np.where(scales > 0, scales, F32(1.0))
        q = _stochastic_round(padded / safe[:, None], rng)
        q = np.clip(q, -levels, levels).astype(np.int8).reshape(-1)[: len(x)]
        return q, scales

    @staticmethod
    def _pack4(q: np.ndarray) -> np.ndarray:
        u = (q.astype(np.int16) + 8).astype(np.uint8)
        if len(u) % 2:
            u = np.concatenate([u, np.array([8], np.uint8)])
        return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)

    @staticmethod
    def _unpack4(packed: np.ndarray, n: int) -> np.ndarray:
        out = np.empty(len(packed) * 2, np.int16)
        out[0::2] = packed & 0x0F
        out[1::2] = packed >> 4
        return (out[:n] - 8).astype(np.float32)

    # -- decoding (hub) --------------------------------------------------------------

    def decode(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The float32 delta, or :class:`CodecError` for anything inconsistent."""
        try:
            scheme, n, block = str(meta["scheme"]), int(meta["n"]), int(meta["block"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise CodecError("malformed", f"codec metadata is incomplete ({exc})") from None
        if scheme not in SCHEMES:
            raise CodecError("malformed", f"unknown quantization {scheme!r}")
        if n != self.size:
            raise CodecError("wrong_shape", f"the update has {n} values, the model {self.size}")
        if not 8 <= block <= 65536:
            raise CodecError("malformed", f"block size {block} is out of range")

        def tensor(name: str, dtype: type, length: int) -> np.ndarray:
            t = tensors.get(name)
            if t is None or t.dtype != dtype or t.ndim != 1 or len(t) != length:
                got = "missing" if t is None else f"{t.dtype}{list(t.shape)}"
                raise CodecError("wrong_shape", f"tensor {name!r} must be {np.dtype(dtype).name}[{length}], got {got}")
            return t

        expected = {"none": {"delta"}, "int8": {"q", "scales"}, "int4": {"q", "scales"}, "topk": {"idx", "q", "scales"}}
        if set(tensors) != expected[scheme]:
            raise CodecError("wrong_shape", f"{scheme} updates carry tensors {sorted(expected[scheme])}")
        if scheme == "none":
            flat = tensor("delta", np.float32, n).astype(F32)
        elif scheme in ("int8", "int4"):
            blocks = -(-n // block)
            scales = self._scales(tensor("scales", np.float32, blocks))
            if scheme == "int8":
                q = tensor("q", np.int8, n).astype(F32)
                if q.min(initial=0) < -127:
                    raise CodecError("malformed", "int8 values must lie in [-127, 127]")
            else:
                q = self._unpack4(tensor("q", np.uint8, -(-n // 2)), n)
                if q.min(initial=0) < -7:
                    raise CodecError("malformed", "int4 values must lie in [-7, 7]")
            flat = self._dequantize_with(q, scales, block, n)
        else:
            try:
                k = int(meta.get("k", -1))
            except (TypeError, ValueError, OverflowError):
                k = -1
            if not 1 <= k <= n:
                raise CodecError("malformed", f"top-k count {k} is out of range")
            index_dtype = np.uint16 if n <= 65536 else np.uint32
            idx = tensor("idx", index_dtype, k).astype(np.int64)
            if idx[-1] >= n or np.any(np.diff(idx) <= 0):
                raise CodecError("malformed", "top-k indices must be strictly increasing and below the model size")
            scales = self._scales(tensor("scales", np.float32, -(-k // block)))
            values = self._dequantize_with(tensor("q", np.int8, k).astype(F32), scales, block, k)
            flat = np.zeros(n, F32)
            flat[idx] = values
        if not np.all(np.isfinite(flat)):
            raise CodecError("non_finite", "the update holds NaN or infinite values")
        return self.unflatten(flat)

    @staticmethod
    def _scales(scales: np.ndarray) -> np.ndarray:
        if not np.all(np.isfinite(scales)) or np.any(scales < 0):
            raise CodecError("non_finite", "quantization scales must be finite and >= 0")
        return scales

    @staticmethod
    def _dequantize_with(q: np.ndarray, scales: np.ndarray, block: int, n: int) -> np.ndarray:
        return (q * np.repeat(scales, block)[:n]).astype(F32)
