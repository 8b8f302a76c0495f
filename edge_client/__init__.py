"""The gateway runtime (sources, preprocessing, fine-tuning, MQTT session); see DESIGN.md.

The public API is :data:`__all__`: an :class:`EdgeClient` runs one gateway from an
:class:`EdgeConfig` and a source, :func:`run_edges` many of them in one event loop. Its parts
live in their own modules (:mod:`edge_client.runtime` names them). The names are imported on
first use, so importing a submodule (a source, the outbox) does not load the whole runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_client.config import EdgeConfig
    from edge_client.finetune import FineTunePolicy
    from edge_client.runtime import EdgeClient, run_edges
    from edge_client.training import WeightsHook
    from models.transport.outbox import Outbox

__all__ = ["EdgeClient", "EdgeConfig", "FineTunePolicy", "Outbox", "WeightsHook", "run_edges"]

_HOMES = {"EdgeClient": "runtime", "EdgeConfig": "config", "FineTunePolicy": "finetune", "Outbox": "outbox",
          "WeightsHook": "training", "run_edges": "runtime"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"edge_client.{_HOMES[name]}"), name)
