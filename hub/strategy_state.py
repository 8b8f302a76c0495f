"""The server optimizer's state on disk, one file per model version it produced.

FedAvgM's velocity and FedAdam's moments must survive a hub restart, and must match
the model they belong to. The hub writes ``<state>/strategy/v<N>.safetensors`` before
it registers model vN, so after a crash between the two the previous version's state
is still there for the previous model; older files are removed once vN is registered.
With ``--state postgresql://...`` the files live in the database (:mod:`hub.blobs`).
"""

from __future__ import annotations

import json
import logging
import os
import struct

from safetensors import SafetensorError
from safetensors.numpy import load, save

from hub.blobs import Blobs, FolderBlobs
from hub.strategies.base import Strategy

__all__ = ["StrategyState"]

log = logging.getLogger(__name__)


class StrategyState:
    """Saves and restores one strategy's state under ``root`` (``<state>/strategy``), or in ``Blobs``."""

    def __init__(self, root: str | os.PathLike[str] | Blobs) -> None:
        self.blobs = root if isinstance(root, Blobs) else FolderBlobs(root)

    @staticmethod
    def name(version: int) -> str:
        return f"v{int(version)}.safetensors"

    def save(self, strategy: Strategy, version: int) -> None:
        state = strategy.state_dict()
        if not state:
            return
        identity = {"strategy": strategy.name, "optimizer": strategy.optimizer.name}
        self.blobs.write(self.name(version), save(state, metadata={"wearfl": json.dumps(identity, sort_keys=True)}),
                         doing=f"saving the server optimizer's state for model v{int(version)}")

    def load(self, strategy: Strategy, version: int) -> bool:
        """Restore the state saved with model ``version``; False (and a fresh state) when there is none."""
        path = f"{self.blobs.where}/{self.name(version)}"
        data = self.blobs.read(self.name(version))
        if data is None:
            if version > 0 and strategy.optimizer.name != "sgd":
                log.warning("no %s server-optimizer state for model v%d; it starts afresh", strategy.name, version)
            return False
        try:
            meta = json.loads(_metadata(data).get("wearfl", "{}"))
            state = load(data)
        except (OSError, ValueError, SafetensorError, struct.error) as exc:
            log.warning("ignoring unreadable strategy state %s (%s); the optimizer starts afresh", path, exc)
            return False
        if meta != {"strategy": strategy.name, "optimizer": strategy.optimizer.name}:
            log.warning("the state in %s is for %s; the hub now runs %s/%s, which starts afresh",
                        path, meta, strategy.name, strategy.optimizer.name)
            return False
        strategy.load_state_dict(state)
        return True

    def prune(self, keep: int) -> None:
        """Remove the state files of versions other than ``keep`` (best effort: a leftover file is harmless)."""
        for name in self.blobs.names("v"):
            if name.endswith(".safetensors") and name != self.name(keep):
                try:
                    self.blobs.delete([name])
                except OSError as exc:
                    log.warning("could not remove the old strategy state %s (%s); it is removed next time",
                                name, exc)


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (what safe_open's metadata() gives for a file)."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("the safetensors metadata is not an object")
    return meta

