"""Dataset specs: the one string (``--data`` on the command line) that names where samples come from.

Three forms, so a benchmark, a public data set and a deployment's own recordings are
all one argument away::

    sim[:SEED[:DEVICE]]  simulated wearers (edge_client.sources.simulator), SEED an integer, default 0; DEVICE
                      another sensor device recording the same wearers (arm-ir: a domain shift)
    hapt[:DIR]        UCI HAPT's RawData folder (DIR defaults to $WEARFL_HAPT_DIR)
    recordings:DIR    a folder in the wearfl recording format (docs/recordings.md)

and three live forms, a device rather than files (docs/devices.md)::

    lsl:NAME                         a Lab Streaming Layer stream (edge_client.sources.lsl)
    mqtt:TOPIC, mqtt://H:P/TOPIC     JSON sample batches from a BLE-to-MQTT bridge (edge_client.sources.mqtt_source)
    follow:FILE.csv                  a recording file another program appends to (edge_client.sources.follow)

A live stream never ends, so it is opened only where it is asked for with
``open_dataset(spec, live=True)`` (``wearfl edge --source``); a command that reads a data
set to its end gets a ConfigError saying so instead of waiting forever. Each module is
imported only when its form is used (pylsl and paho only for theirs).
"""

from __future__ import annotations

import os
from pathlib import Path

from edge_client.sources.base import Dataset
from models.errors import ConfigError

__all__ = ["LIVE_KINDS", "SPEC_FORMS", "is_live", "open_dataset"]

SPEC_FORMS = (
    "sim[:SEED] (simulated wearers, SEED an integer, default 0; sim:SEED:arm-ir records them with another device)",
    "hapt:DIR (UCI HAPT's RawData folder; DIR may be left out when WEARFL_HAPT_DIR is set)",
    "recordings:DIR (a folder in the wearfl recording format, see docs/recordings.md)",
    "lsl:NAME (live, wearfl edge only: a Lab Streaming Layer stream, see docs/devices.md)",
    "mqtt:TOPIC or mqtt://HOST:PORT/TOPIC (live, wearfl edge only: JSON sample batches from a bridge; "
    "mqtt:TOPIC reads the gateway's local broker mqtt://127.0.0.1:1883, see docs/devices.md)",
    "follow:FILE.csv (live, wearfl edge only: a recording file that another program appends to, see docs/devices.md)",
)
LIVE_KINDS = ("lsl", "mqtt", "mqtts", "follow")
"""The spec kinds that name a live device rather than a data set."""


def _forms() -> str:
    return "; ".join(SPEC_FORMS)


def _kind(spec: str) -> tuple[str, str]:
    kind, _, arg = spec.strip().partition(":")
    return kind.strip().lower(), arg


def is_live(spec: str) -> bool:
    """Whether ``spec`` names a live source (``lsl:``, ``mqtt:``, ``mqtts:``, ``follow:``): nothing is opened."""
    return _kind(spec)[0] in LIVE_KINDS


def open_dataset(spec: str, *, live: bool = False) -> Dataset:
    """The dataset a spec names; ConfigError for a malformed spec, InputError for unusable data.

    A live spec opens its device (resolves the stream, connects, opens the file) and gives a
    one-client :class:`~edge_client.sources.live.LiveDataset`; only with ``live=True``, since
    its stream never ends.
    """
    kind, arg = _kind(spec)
    if kind in LIVE_KINDS:
        if not live:
            raise ConfigError(
                f"{spec!r} is a live source: its stream never ends, so it cannot be read as a data set here; use "
                f"it with `wearfl edge --source {spec.strip()}` (to train or evaluate on it, record it into a "
                f"recordings folder first, see docs/recordings.md)."
            )
        return _open_live(spec.strip(), kind, arg)
    if kind == "sim":
        seed_text, _, device = arg.partition(":")
        try:
            seed = int(seed_text) if seed_text.strip() else 0
        except ValueError:
            raise ConfigError(f"dataset spec {spec!r}: the seed {seed_text!r} is not an integer; use e.g. sim:0."
                              ) from None
        from edge_client.sources.simulator import SimulatedDataset

        return SimulatedDataset(seed=seed, device=device.strip() or "wrist")
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


def _open_live(spec: str, kind: str, arg: str) -> Dataset:
    from edge_client.sources.live import LiveDataset

    if kind == "lsl":
        from edge_client.sources.lsl import LslSource

        source = LslSource(arg.strip())
    elif kind == "follow":
        from edge_client.sources.follow import FollowSource

        if not arg.strip():
            raise ConfigError(f"dataset spec {spec!r} names no file; use follow:FILE.csv (see docs/devices.md).")
        source = FollowSource(Path(arg.strip()))
    else:
        from edge_client.sources.mqtt_source import MqttSource

        source = MqttSource(spec)
    return LiveDataset(spec, source)
