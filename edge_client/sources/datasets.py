"""Dataset specs: the one string (``--data`` on the command line) that names where samples come from.

Three forms, so a benchmark, a public data set and a deployment's own recordings are
all one argument away::

    sim[:SEED]        simulated wearers (edge_client.sources.simulator), SEED an integer, default 0
    hapt[:DIR]        UCI HAPT's RawData folder (DIR defaults to $WEARFL_HAPT_DIR)
    recordings:DIR    a folder in the wearfl recording format (docs/recordings.md)

Each dataset module is imported only when its form is used.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge_client.sources.base import Dataset
from models.errors import ConfigError

__all__ = ["SPEC_FORMS", "open_dataset"]

SPEC_FORMS = (
    "sim[:SEED] (simulated wearers, SEED an integer, default 0)",
    "hapt:DIR (UCI HAPT's RawData folder; DIR may be left out when WEARFL_HAPT_DIR is set)",
    "recordings:DIR (a folder in the wearfl recording format, see docs/recordings.md)",
)


def _forms() -> str:
    return "; ".join(SPEC_FORMS)


def open_dataset(spec: str) -> Dataset:
    """The dataset a spec names; ConfigError for a malformed spec, InputError for unusable data."""
    kind, _, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind == "sim":
        try:
            seed = int(arg) if arg.strip() else 0
        except ValueError:
            raise ConfigError(f"dataset spec {spec!r}: the seed {arg!r} is not an integer; use e.g. sim:0.") from None
        from edge_client.sources.simulator import SimulatedDataset

        return SimulatedDataset(seed=seed)
    if kind == "hapt":
        from edge_client.sources.hapt import HAPT_HINT, HaptDataset

        if not arg:
            arg = os.environ.get("WEARFL_HAPT_DIR", "")
            if not arg:
                raise ConfigError(
                    f"dataset spec {spec!r} names no folder and WEARFL_HAPT_DIR is not set; use hapt:DIR. To get "
                    f"the data: {HAPT_HINT}."
                )
        return HaptDataset(Path(arg))
    if kind == "recordings":
        from edge_client.sources.recordings import RecordingsDataset

        if not arg:
            raise ConfigError(f"dataset spec {spec!r} names no folder; use recordings:DIR (see docs/recordings.md).")
        return RecordingsDataset(Path(arg))
    raise ConfigError(f"unknown dataset spec {spec!r}; use one of: {_forms()}.")
