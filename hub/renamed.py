"""Renamed hub settings, still read under their old names for one release.

One name per concept, the same in code, task keys, strategy args, CLI flags and help texts:

- **gradient clip** (``grad_clip``, a task key): the edge clips each gradient step;
- **update clip** (``update_clip``, a task key, ``CodecConfig.update_clip``): the edge clips
  its whole update before encoding it;
- **server norm bound** (``norm_bound``, a strategy arg of every rule): the hub scales a delta
  down to that L2 norm before aggregating it (it was ``clip_norm``);
- **DP clip** (``dp_clip``, a DP-FedAvg arg, ``wearfl simulate --dp-clip``): the L2 bound of one
  update under differential privacy, which the edges are told as their update clip (it was
  ``clip``);
- **max update norm** (``max_update_norm``, ``--max-update-norm``): the intake rejects an update
  above that L2 norm, with the receipt reason ``norm_bound`` (the wire keeps that string; the
  setting was ``norm_bound``, ``--norm-bound``);
- **secure-aggregation range** (``secagg_range``): the fixed-point range of a secure round's
  values, :attr:`models.protocol.secagg.RoundConfig.value_range`, not a privacy setting (it was
  ``secagg_clip``).

An old name still works and logs one warning line naming the new one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from models.errors import ConfigError

__all__ = ["CLI_FLAGS", "HUB_SETTINGS", "RULE_ARGS", "STRATEGY_ARGS", "renamed", "strategy_arg_renames",
           "warn_renamed"]

log = logging.getLogger(__name__)

HUB_SETTINGS = {"norm_bound": "max_update_norm", "secagg_clip": "secagg_range"}
"""``HubConfig`` keywords and ``wearfl hub`` TOML keys: old name -> new name."""
STRATEGY_ARGS = {"clip_norm": "norm_bound"}
"""Strategy args every rule takes (``--strategy-arg``, ``[strategy_args]``): old -> new."""
RULE_ARGS = {"dpfedavg": {"clip": "dp_clip"}}
"""Strategy args of one rule: rule name -> {old -> new}."""
CLI_FLAGS = {"--norm-bound": "--max-update-norm"}
"""``wearfl hub`` flags: old -> new."""


def strategy_arg_renames(rule: str) -> dict[str, str]:
    """The renamed args of the rule called ``rule``: old -> new."""
    return {**STRATEGY_ARGS, **RULE_ARGS.get(rule, {})}


def warn_renamed(old: str, new: str, what: str) -> None:
    """The one-line deprecation warning for ``old``, naming ``new``."""
    log.warning("%s %s is deprecated; use %s (the old name is read for one more release)", what, old, new)


def renamed(settings: Mapping[str, Any], renames: Mapping[str, str], what: str) -> dict[str, Any]:
    """``settings`` with each old name of ``renames`` under its new name; ConfigError when both are given."""
    out = dict(settings)
    for old, new in renames.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"{what} {old} is the old name of {new}; give only {new}.")
        warn_renamed(old, new, what)
        out[new] = out.pop(old)
    return out
