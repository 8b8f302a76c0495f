"""Federated explanations: what the global model looks at, learnt from every edge without a window leaving one.

With ``explain`` in a task each edge adds to its federated evaluation (``metrics/<client>``) the mean absolute
attribution of the global model per class, channel and time segment over its own held-out windows
(:func:`models.attribution.attribution_map`). :class:`FederatedExplanations` keeps the open round's maps, each
checked against the model's shape and bounded, and :meth:`~FederatedExplanations.result` combines them:

* without differential privacy, per class the window-weighted mean of the edges' maps;
* under a DP rule, each edge's map of a class is first scaled to unit L1 norm (the share of its attribution
  that each channel and segment holds, so one edge moves a class's mean by at most 1/n in L2), the edges count
  equally, and Gaussian noise of the rule's noise multiplier over n is added; the map is then in shares.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np

__all__ = ["MAX_CHANNELS", "MAX_GROUPS", "MAX_SEGMENTS", "FederatedExplanations", "strongest"]

log = logging.getLogger(__name__)

MAX_GROUPS = 64
MAX_CHANNELS = 32
MAX_SEGMENTS = 32
MAX_VALUE = 1e6
MAX_WINDOWS = 1_000_000


def _parse(body: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(windows per group (g,), map (g, channels, segments)) from an edge's ``explanation``; None if unusable."""
    if not isinstance(body, dict):
        return None
    windows, values = body.get("windows"), body.get("map")
    if not (isinstance(windows, list) and isinstance(values, list) and 1 <= len(values) <= MAX_GROUPS
            and len(windows) == len(values)):
        return None
    try:
        counts, grid = np.array(windows), np.array(values)
    except (TypeError, ValueError, OverflowError):
        return None
    if not all(a.dtype.kind in "iuf" for a in (counts, grid)):  # numbers only: no strings, booleans, nesting
        return None
    counts, grid = counts.astype(np.float64), grid.astype(np.float64)
    if (grid.ndim != 3 or not 1 <= grid.shape[1] <= MAX_CHANNELS or not 1 <= grid.shape[2] <= MAX_SEGMENTS
            or counts.ndim != 1 or not np.all(np.isfinite(grid)) or not np.all(np.isfinite(counts))
            or grid.min() < 0 or grid.max() > MAX_VALUE or counts.min() < 0 or counts.max() > MAX_WINDOWS
            or np.any(counts != np.round(counts))):
        return None
    return counts, grid


class FederatedExplanations:
    """The open round's attribution maps, one per edge (its latest), and their aggregate."""

    def __init__(self) -> None:
        self._maps: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def add(self, client: str, round_number: int, body: Any) -> bool:
        """Keep ``client``'s map for ``round_number``; False (and nothing kept) when it is malformed."""
        parsed = _parse(body)
        if parsed is None:
            log.info("ignored the explanation map of %s: not windows per class and a [class][channel][segment] "
                     "map of bounded non-negative numbers", client)
            return False
        self._maps.setdefault(round_number, {})[client] = parsed
        return True

    def result(self, round_number: int, groups: list[str], channels: list[str], segments: int,
               noise_multiplier: float | None = None, rng: np.random.Generator | None = None) -> dict[str, Any] | None:
        """The round's federated map, over the edges whose map has the model's shape; None without any.

        ``{"round", "method", "classes", "channels", "segments", "clients", "edges": [per class, edges with windows
        of it], "windows": [per class] (None under DP: the counts are not noised), "map": [class][channel][segment]
        (under DP: shares, each class's row of cells summing to about 1), "dp": {"noise_multiplier", "sigma": [per
        class]} or None}`` (the hub adds ``model_version``, the model the edges explained).
        """
        shape = (len(groups), len(channels), segments)
        maps = [(c, m) for c, m in sorted(self._maps.get(round_number, {}).items()) if m[1].shape == shape]
        if not maps:
            return None
        counts = np.stack([m[0] for _, m in maps])  # (edges, groups)
        grids = np.stack([m[1] for _, m in maps])  # (edges, groups, channels, segments)
        dp = None
        if noise_multiplier is None:
            total = counts.sum(axis=0)
            merged = np.einsum("eg,egcs->gcs", counts, grids) / np.maximum(total, 1)[:, None, None]
        else:
            present = counts > 0
            mass = grids.sum(axis=(2, 3), keepdims=True)
            shares = np.where(mass > 0, grids / np.where(mass > 0, mass, 1), 0.0) * present[:, :, None, None]
            n = present.sum(axis=0)
            sigma = np.where(n > 0, noise_multiplier / np.maximum(n, 1), 0.0)
            rng = rng if rng is not None else np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
            merged = shares.sum(axis=0) / np.maximum(n, 1)[:, None, None]
            merged = merged + rng.standard_normal(merged.shape) * sigma[:, None, None] * (n > 0)[:, None, None]
            dp = {"noise_multiplier": float(noise_multiplier), "sigma": [round(float(s), 6) for s in sigma]}
        return {"round": round_number, "method": "integrated-gradients", "classes": list(groups),
                "channels": list(channels), "segments": segments, "clients": len(maps),
                "edges": [int(e) for e in (counts > 0).sum(axis=0)],
                "windows": None if dp else [int(t) for t in total], "map": np.round(merged, 6).tolist(), "dp": dp}

    def forget_before(self, round_number: int) -> None:
        for r in [r for r in self._maps if r < round_number]:
            del self._maps[r]


def strongest(explanation: dict[str, Any]) -> list[tuple[str, str, float, int]]:
    """Per class: (class, the channel holding the largest share of its attribution, that share, the stretch of
    the window where that channel's attribution peaks)."""
    out = []
    grid = np.asarray(explanation["map"], dtype=np.float64)
    for k, name in enumerate(explanation["classes"]):
        cells = np.abs(grid[k])
        total = float(cells.sum())
        if not total or not math.isfinite(total):
            continue
        per_channel = cells.sum(axis=1)
        ch = int(per_channel.argmax())
        out.append((name, explanation["channels"][ch], float(per_channel[ch]) / total, int(cells[ch].argmax())))
    return out
