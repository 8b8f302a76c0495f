"""A federation provisioned by `wearfl keys` on a real Mosquitto running the config `keys broker-config` wrote.

Shared by the tests of broker access, connection errors and the hub's first hour.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from hub.keys import add_device, broker_config, init_keys
from wearfl.broker import MosquittoBroker, free_port, mosquitto_binary


def needs_mosquitto() -> None:
    """Skip without Mosquitto, except under CI=true, where its absence is an error."""
    if mosquitto_binary() is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but mosquitto is not installed: `apt-get install -y mosquitto` (see .ci/run).")
        pytest.skip("needs the mosquitto binary (`apt-get install mosquitto`)")


@contextlib.contextmanager
def provisioned_broker(tmp_path_factory: pytest.TempPathFactory, devices: Iterable[str],
                       federation: str | None = None) -> Iterator[tuple[Path, MosquittoBroker]]:
    """(hub state with keys for ``devices``, the running locked-down broker), stopped on exit."""
    needs_mosquitto()
    state = tmp_path_factory.mktemp("hub-state")
    init_keys(state)
    for device in devices:
        add_device(state, device)
    port = free_port()
    out = tmp_path_factory.mktemp("broker")
    # as root, Mosquitto stays root: pytest's temporary folders are closed to the `mosquitto` account
    config = broker_config(state, out, port=port, bind="127.0.0.1",
                           user="root" if hasattr(os, "geteuid") and os.geteuid() == 0 else None,
                           **({"federation": federation} if federation else {}))
    with MosquittoBroker(port, config_file=config, workdir=out) as broker:
        yield state, broker

