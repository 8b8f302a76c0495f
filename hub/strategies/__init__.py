"""Aggregation rules: a small pure base (:class:`Strategy`) and one module per rule.

:data:`STRATEGIES` maps the names ``wearfl hub --strategy`` and ``HubConfig.strategy``
accept to their classes; :func:`make_strategy` builds one.
"""

from __future__ import annotations

from typing import Any

from hub.strategies.base import Strategy
from hub.strategies.fedavg import FedAvg
from models.errors import ConfigError

__all__ = ["STRATEGIES", "FedAvg", "Strategy", "make_strategy"]

STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg}


def make_strategy(name: str, **options: Any) -> Strategy:
    """The strategy called ``name`` built with ``options`` (e.g. ``server_lr``)."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ConfigError(f"unknown strategy {name!r}; use one of {', '.join(sorted(STRATEGIES))}.")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"strategy {name!r}: {exc}.") from exc
