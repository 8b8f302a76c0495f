"""The aggregation service (intake, strategies, rounds, registry); see DESIGN.md.

The parts, one owner each: :mod:`hub.config` (settings), :mod:`hub.service` (wiring and
the loop), :mod:`hub.inbox` (batches of incoming messages), :mod:`hub.intake` (verifying
and storing updates), :mod:`hub.round_state` (the open round), :mod:`hub.rounds`
(closing rounds, the model), :mod:`hub.selection` (which clients), :mod:`hub.secure_rounds`
(SecAgg+), :mod:`hub.publisher` (receipts, model and task), :mod:`hub.reports`
(evaluation, personalization, privacy spent), :mod:`hub.strategies` (the rules).

Names are imported on first use, so that building the CLI parser (which every
``wearfl`` command does, an edge's included) does not load the hub.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AcceptedUpdate": "hub.intake",
    "Capabilities": "hub.strategies",
    "DEFAULT_TASK_CONFIG": "hub.config",
    "FedAvg": "hub.strategies",
    "HubConfig": "hub.config",
    "HubService": "hub.service",
    "HubStore": "hub.store",
    "Intake": "hub.intake",
    "ModelRegistry": "hub.registry",
    "ModelVersion": "hub.registry",
    "OpenRound": "hub.round_state",
    "RoundManager": "hub.rounds",
    "RoundPolicy": "hub.rounds",
    "RoundSummary": "hub.rounds",
    "RoundView": "hub.round_state",
    "STRATEGIES": "hub.strategies",
    "SelectionPolicy": "hub.selection",
    "Strategy": "hub.strategies",
    "StreamingAverage": "hub.aggregation",
    "make_strategy": "hub.strategies",
    "select_clients": "hub.selection",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hub' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
