"""The aggregation service (intake, strategies, rounds, registry); see DESIGN.md.

Names are imported on first use, so that building the CLI parser (which every
``wearfl`` command does, an edge's included) does not load the hub.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AcceptedUpdate": "hub.intake",
    "FedAvg": "hub.strategies",
    "HubConfig": "hub.service",
    "HubService": "hub.service",
    "HubStore": "hub.store",
    "Intake": "hub.intake",
    "ModelRegistry": "hub.registry",
    "ModelVersion": "hub.registry",
    "RoundPolicy": "hub.rounds",
    "RoundSummary": "hub.rounds",
    "Strategy": "hub.strategies",
    "StreamingAverage": "hub.aggregation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hub' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
