"""Aggregation rules: a small pure base (:class:`Strategy`), the rules, and server optimizers.

:data:`STRATEGIES` maps the names ``--strategy`` accepts to their classes;
:func:`make_strategy` builds one from ``--strategy-arg KEY=VALUE`` settings. Every rule
takes ``norm_bound`` (the server norm bound) and ``server_opt`` (``sgd``,
``momentum``, ``adam``, ``yogi``, ``adagrad``) with that optimizer's settings
(``server_lr``, ``momentum``; ``eta``, ``beta1``, ``beta2``, ``tau``), so robust rules
and server optimizers compose: ``fedtrimmedavg`` with ``server_opt=adam``. Renamed args
(``clip_norm``, DP-FedAvg's ``clip``) are still read for one release (:mod:`hub.renamed`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hub.renamed import renamed, strategy_arg_renames
from hub.strategies.base import Capabilities, Strategy
from hub.strategies.dp import DPFedAvg
from hub.strategies.fedavg import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi
from hub.strategies.fedbuff import FedBuff
from hub.strategies.optimizers import OPTIMIZERS, ServerOptimizer
from hub.strategies.robust import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum
from models.errors import ConfigError

__all__ = [
    "STRATEGIES", "Bulyan", "Capabilities", "DPFedAvg", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedBuff",
    "FedMedian", "FedProx", "FedTrimmedAvg", "FedYogi", "Krum", "MultiKrum", "Strategy", "make_strategy",
    "parse_strategy_args",
]

STRATEGIES: dict[str, type[Strategy]] = {
    c.name: c for c in (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad,
                        FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan, FedBuff, DPFedAvg)
}

OPTIMIZER_ARGS: dict[str, dict[str, str]] = {
    # --strategy-arg name -> the optimizer's constructor argument
    "sgd": {"server_lr": "lr"},
    "momentum": {"server_lr": "lr", "momentum": "momentum"},
    "adam": {"eta": "eta", "beta1": "beta1", "beta2": "beta2", "tau": "tau"},
    "yogi": {"eta": "eta", "beta1": "beta1", "beta2": "beta2", "tau": "tau"},
    "adagrad": {"eta": "eta", "beta1": "beta1", "tau": "tau"},
}


def parse_strategy_args(items: list[str] | None) -> dict[str, str]:
    """``["f=2", "beta=0.1"]`` (repeated ``--strategy-arg``) as a dict; ConfigError on a bad item."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--strategy-arg {item!r} is not KEY=VALUE (e.g. --strategy-arg f=2).")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _typed(name: str, key: str, value: Any, kind: type) -> Any:
    try:
        if kind is int:
            number = float(value)
            if number != int(number):
                raise ValueError
            return int(number)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"strategy {name!r}: {key}={value!r} is not a valid {kind.__name__}.") from None


def make_strategy(name: str, args: Mapping[str, Any] | None = None, **kwargs: Any) -> Strategy:
    """The strategy called ``name``, configured by ``args`` (strings or numbers) and ``kwargs``."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ConfigError(f"unknown strategy {name!r} (--strategy); use one of {', '.join(sorted(STRATEGIES))}.")
    settings = renamed({**(args or {}), **kwargs}, strategy_arg_renames(name), "strategy arg")
    opt_name = str(settings.pop("server_opt", cls.default_optimizer))
    if opt_name not in OPTIMIZERS:
        raise ConfigError(f"unknown server_opt {opt_name!r}; use one of {', '.join(OPTIMIZERS)}.")
    if cls.default_optimizer != "sgd" and opt_name != cls.default_optimizer:
        raise ConfigError(f"{name} steps with {cls.default_optimizer}; for another optimizer use "
                          f"--strategy fedavg --strategy-arg server_opt={opt_name}.")
    mapping = OPTIMIZER_ARGS[opt_name]
    opt_kw = {mapping[k]: _typed(name, k, settings.pop(k), float) for k in list(settings) if k in mapping}
    rule_types = {**cls.params, "norm_bound": float}
    unknown = sorted(set(settings) - set(rule_types))
    if unknown:
        accepted = sorted({*rule_types, *mapping, "server_opt"})
        raise ConfigError(f"strategy {name!r} with server_opt {opt_name} takes no {', '.join(unknown)} "
                          f"(--strategy-arg); it takes {', '.join(accepted)}.")
    rule_kw = {k: _typed(name, k, v, rule_types[k]) for k, v in settings.items()}
    try:
        optimizer: ServerOptimizer = OPTIMIZERS[opt_name](**opt_kw)
        return cls(optimizer=optimizer, **rule_kw)
    except ValueError as exc:
        raise ConfigError(f"strategy {name!r}: {exc}.") from exc


