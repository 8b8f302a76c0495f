"""Lab Streaming Layer outlets for tests, confined to this machine.

Discovery stays on the host: an ``lsl_api.cfg`` with ``ResolveScope = machine`` (and no
IPv6), given to liblsl through ``LSLAPICFG`` before its first use. Under ``CI=true`` a
missing pylsl or liblsl fails the tests that need it; elsewhere they are skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

LSL_CONFIG = """\
[ports]
IPv6 = disable
[multicast]
ResolveScope = machine
[log]
level = -2
"""


@pytest.fixture(scope="session")
def lsl_config(tmp_path_factory) -> Iterator[Path]:
    """liblsl confined to this machine (set before its first use in this process), or skip/fail without pylsl."""
    path = tmp_path_factory.mktemp("lsl") / "lsl_api.cfg"
    path.write_text(LSL_CONFIG)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LSLAPICFG", str(path))
        try:
            import pylsl

            pylsl.local_clock()
        except (ImportError, RuntimeError, OSError) as exc:
            reason = f"pylsl with its liblsl is not usable ({exc}); `pip install pylsl` (its wheels bundle liblsl)"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"CI=true requires it: {reason}")
            pytest.skip(reason)
        yield path


@pytest.fixture
def pylsl(lsl_config) -> Any:
    import pylsl

    return pylsl


def stream_name() -> str:
    return f"wearfl-test-{uuid.uuid4().hex[:10]}"


def make_outlet(pylsl: Any, name: str, labels: list[str], rate: float = 32.0, fmt: str = "float32",
                source_id: str = "") -> Any:
    info = pylsl.StreamInfo(name, "wearable", len(labels), rate, fmt, source_id)
    channels = info.desc().append_child("channels")
    for label in labels:
        channels.append_child("channel").append_child_value("label", label)
    return pylsl.StreamOutlet(info)
