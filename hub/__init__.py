"""The aggregation service (intake, strategies, rounds, registry); see DESIGN.md."""

from hub.aggregation import StreamingAverage
from hub.intake import AcceptedUpdate, Intake
from hub.registry import ModelRegistry, ModelVersion
from hub.rounds import RoundPolicy, RoundSummary
from hub.service import HubConfig, HubService
from hub.store import HubStore
from hub.strategies import FedAvg, Strategy

__all__ = [
    "AcceptedUpdate",
    "FedAvg",
    "HubConfig",
    "HubService",
    "HubStore",
    "Intake",
    "ModelRegistry",
    "ModelVersion",
    "RoundPolicy",
    "RoundSummary",
    "Strategy",
    "StreamingAverage",
]
