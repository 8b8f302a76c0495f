"""A gateway on a Lab Streaming Layer stream takes part in a heart-rate federation.

A real ``pylsl`` outlet on this machine streams a simulated wearer's PPG, accelerometer and
reference heart rate at 32 Hz (a little faster than real time, as a live device keeps
pace); the edge reads it through ``--source lsl:NAME`` and trains every round.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import numpy as np
import pytest
from federating import run_until_hub_ends
from lsl_outlets import make_outlet, stream_name
from scipy.signal import resample_poly

from edge_client.edge_command import resolve_source
from edge_client.finetune import FineTunePolicy
from edge_client.runtime import EdgeClient, EdgeConfig
from edge_client.sources.simulator import SimulatedWearer
from hub.service import HubConfig, HubService
from models import Model, heart_rate_spec

pytestmark = pytest.mark.slow  # the quick loop is `pytest -m "not slow"`

LABELS = ["ppg", "acc_x", "acc_y", "acc_z", "hr_bpm"]
RATE = 32.0
PACE = 1.8  # times real time: still a live stream to the edge (its catch-up test is 2x)


def wearer_at_32_hz(minutes: float) -> np.ndarray:
    """(samples, 5) float32: a simulated wearer's ppg, acc xyz and hr_bpm, resampled from 50 Hz to 32 Hz."""
    chunks = list(SimulatedWearer("w", seed=4, minutes=minutes).chunks(10_000))
    data = np.concatenate([c.data for c in chunks])
    channels = list(chunks[0].channels)
    sensors = np.stack([data[:, channels.index(c)] for c in LABELS[:4]], axis=1)
    hr = np.concatenate([c.hr_bpm for c in chunks])
    out = resample_poly(sensors, 16, 25, axis=0)
    hr32 = np.interp(np.arange(len(out)) * 50 / 32, np.arange(len(hr)), hr)
    return np.column_stack([out, hr32]).astype(np.float32)


class Outlet:
    """Pushes the samples from a thread at ``PACE`` times real time until stopped."""

    def __init__(self, pylsl, name: str, samples: np.ndarray) -> None:
        self.outlet = make_outlet(pylsl, name, LABELS, RATE)
        self.samples, self.clock = samples, pylsl.local_clock
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._push, daemon=True)

    def _push(self) -> None:
        block = 16
        start = self.clock()
        for i in range(0, len(self.samples), block):
            if self.stop.is_set():
                return
            chunk = self.samples[i : i + block]
            self.outlet.push_chunk(chunk.tolist(), start + (i + len(chunk) - 1) / RATE)
            time.sleep(block / RATE / PACE)

    def __enter__(self) -> Outlet:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def test_an_edge_on_an_lsl_stream_takes_part_in_three_heart_rate_rounds(mqtt_broker, pylsl, tmp_path):
    name = stream_name()
    with Outlet(pylsl, name, wearer_at_32_hz(minutes=6)):
        source = resolve_source(f"lsl:{name}", None)
        try:
            hub = asyncio.run(_federate(mqtt_broker, tmp_path, source))
        finally:
            source.close()

    status = hub.status()
    assert status["rounds_completed"] == 3
    assert status["clients"] == {name: {"accepted": 3, "last_sequence": 3, "rejected": 0, "declined": 0,
                                        "last_seen": status["clients"][name]["last_seen"]}}


async def _federate(broker, tmp_path, source) -> HubService:
    federation, prefix = f"lsl-{uuid.uuid4().hex[:10]}", f"wearfl-test/{uuid.uuid4().hex[:8]}"
    hub = HubService(HubConfig(broker=broker.url, federation=federation, state_dir=tmp_path / "hub", min_clients=1,
                               round_timeout_s=12, rounds=3, protocol=broker.protocol, topic_prefix=prefix),
                     initial_model=Model(heart_rate_spec(), seed=0))
    # four fresh windows a round (the default is 16): a live stream needs less time to provide them
    edge = EdgeClient(EdgeConfig(broker=broker.url, federation=federation, client_id=source.client_id,
                                 state_dir=tmp_path / "edge", protocol=broker.protocol, topic_prefix=prefix,
                                 resume_stream=False, policy=FineTunePolicy(min_new_windows=4)), source)
    await run_until_hub_ends(hub, [edge], 240)
    return hub
