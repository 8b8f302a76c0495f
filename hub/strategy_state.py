"""The server optimizer's state on disk, one file per model version it produced.

FedAvgM's velocity and FedAdam's moments must survive a hub restart, and must match
the model they belong to. The hub writes ``<state>/strategy/v<N>.safetensors`` before
it registers model vN, so after a crash between the two the previous version's state
is still there for the previous model; older files are removed once vN is registered.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from hub.strategies.base import Strategy
from models.files import write_atomic

__all__ = ["StrategyState"]

log = logging.getLogger(__name__)


class StrategyState:
    """Saves and restores one strategy's state under ``root`` (``<state>/strategy``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, version: int) -> Path:
        return self.root / f"v{int(version)}.safetensors"

    def save(self, strategy: Strategy, version: int) -> None:
        state = strategy.state_dict()
        if not state:
            return
        identity = {"strategy": strategy.name, "optimizer": strategy.optimizer.name}
        write_atomic(self.path(version), save(state, metadata={"wearfl": json.dumps(identity, sort_keys=True)}),
                     doing=f"saving the server optimizer's state for model v{int(version)}")

    def load(self, strategy: Strategy, version: int) -> bool:
        """Restore the state saved with model ``version``; False (and a fresh state) when there is none."""
        path = self.path(version)
        if not path.exists():
            if version > 0 and strategy.optimizer.name != "sgd":
                log.warning("no %s server-optimizer state for model v%d; it starts afresh", strategy.name, version)
            return False
        try:
            with safe_open(path, framework="numpy") as f:
                meta = json.loads((f.metadata() or {}).get("wearfl", "{}"))
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except (OSError, ValueError, SafetensorError) as exc:
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
        if not self.root.is_dir():
            return
        for entry in self.root.glob("v*.safetensors"):
            if entry.name != self.path(keep).name:
                try:
                    entry.unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("could not remove the old strategy state %s (%s); it is removed next time",
                                entry, exc)

