"""The operator's first hour with ``wearfl edge`` (issue 14): a source the edge can never use, and a
bad ``--broker``, end the edge with one ``error:`` line and exit 2, at start and before any side effect.

* a recording with a bad row anywhere is found at start (file, line, column), not when the hub's
  first model arrives and the stream is read;
* a source whose channels feed no task's model is refused at start; one that lacks channels of the
  hub's model stops the edge when that model arrives: at start when the hub has published it (it is
  retained), later otherwise, instead of logging an error and waiting for ever;
* a malformed broker URL makes neither the state directory nor the device key.

Tests that cross MQTT use the session's Mosquitto (the ``mqtt_broker`` fixture).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_client.finetune import FineTunePolicy
from edge_client.ingest import MissingChannels
from edge_client.runtime import EdgeClient, EdgeConfig
from edge_client.sources.datasets import open_dataset
from edge_client.sources.recordings import BLOCK_ROWS, write_recording
from models.errors import ConfigError
from models.model import Model
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.messages import build_model
from models.protocol.topics import Topics
from models.spec import default_spec
from models.transport.mqtt import BrokerAddress, MqttSession
from wearfl.broker import free_port
from wearfl.cli import main

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 30.0
MOTION = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")


def recording(folder: Path, channels: tuple[str, ...] = MOTION, n: int = 1500, stem: str = "subject1") -> str:
    """A recordings folder with one file of ``n`` samples at 50 Hz; its ``recordings:DIR/STEM`` spec."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.toml").write_text('sampling_rate_hz = 50\nlabels = ["walking", "sitting"]\n')
    t = np.arange(n) / 50.0
    rng = np.random.default_rng(0)
    write_recording(folder / f"{stem}.csv", t, **{c: rng.standard_normal(n) for c in channels},
                    activity=["walking"] * n)
    return f"recordings:{folder}/{stem}"


def unreachable_broker() -> str:
    return f"mqtt://127.0.0.1:{free_port()}"


def edge(capsys, *argv: str) -> tuple[int, list[str]]:
    """``wearfl edge ARGV`` in this process: the exit status and the lines it wrote on stderr."""
    code = main(["edge", "--federation", "f1", "--connect-timeout", "1", *argv])
    return code, capsys.readouterr().err.splitlines()


def the_one_error(lines: list[str]) -> str:
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    assert not any("Traceback" in line for line in lines), lines
    return errors[0]


# -- a bad row anywhere in a recording: at start --------------------------------------------------------


def test_a_bad_row_deep_in_a_recording_stops_the_edge_at_start_naming_file_line_and_column(tmp_path, capsys):
    spec = recording(tmp_path / "ward")
    path = tmp_path / "ward" / "subject1.csv"
    lines = path.read_text().splitlines()
    row = 2 * BLOCK_ROWS + 7  # past the first blocks: the whole file is checked, not its head
    cells = lines[row].split(",")
    cells[2] = "abc"  # acc_y
    lines[row] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    state = tmp_path / "state"

    code, err = edge(capsys, "--broker", unreachable_broker(), "--source", spec, "--state", str(state))

    assert code == 2
    error = the_one_error(err)
    assert f"subject1.csv line {row + 1}, column acc_y: 'abc' is not a number" in error, error
    assert not state.exists()  # found before the state directory is made


def test_a_row_of_the_wrong_width_is_found_at_start_with_client_id_given(tmp_path, capsys):
    spec = recording(tmp_path / "ward")
    path = tmp_path / "ward" / "subject1.csv"
    with path.open("a") as f:
        f.write("99.0,1,2\n")  # the last row, three fields of eight
    code, err = edge(capsys, "--broker", unreachable_broker(), "--client-id", "gw-1", "--source", spec,
                     "--state", str(tmp_path / "state"))
    assert code == 2
    error = the_one_error(err)
    assert "subject1.csv line 1502: 3 fields, but the header has 8" in error, error


def test_validate_reads_the_whole_file_and_keeps_nothing(tmp_path):
    spec = recording(tmp_path / "ward", n=2 * BLOCK_ROWS + 5)
    source = open_dataset(spec.rpartition("/")[0]).source("subject1")
    assert source.validate() == 2 * BLOCK_ROWS + 5
    assert sum(len(c) for c in source.chunks(100)) == 2 * BLOCK_ROWS + 5  # the source still reads from the start


# -- channels: no task at start, the hub's model when it arrives ----------------------------------------


def test_a_source_whose_channels_feed_no_task_is_refused_at_start(tmp_path, capsys):
    spec = recording(tmp_path / "ward", channels=("ppg",))
    state = tmp_path / "state"
    code, err = edge(capsys, "--broker", unreachable_broker(), "--source", spec, "--state", str(state))
    assert code == 2
    error = the_one_error(err)
    assert "['ppg'], which no task's model reads" in error and "heart-rate needs ppg, acc_x, acc_y, acc_z" in error
    assert not state.exists()


def test_an_accelerometer_only_recording_still_starts(tmp_path, capsys):
    """docs/recordings.md: an accelerometer-only data set is fine for activity models; the edge gets as far
    as the broker (here none listens)."""
    spec = recording(tmp_path / "ward", channels=("acc_x", "acc_y", "acc_z"))
    code, err = edge(capsys, "--broker", unreachable_broker(), "--source", spec, "--state", str(tmp_path / "state"))
    assert code == 2
    assert "broker" in the_one_error(err)


async def publish_model(broker: Any, fed: str, model: Model) -> None:
    """``model`` as the hub releases it: signed, retained on the federation's model topic."""
    session = MqttSession(BrokerAddress.parse(broker.url), f"test-hub-{fed}", clean_start=True,
                          protocol="5" if broker.kind == "mosquitto" else "3.1.1")
    await session.connect()
    try:
        data = build_model(model, 0, Ed25519PrivateKey.generate(), federation=fed)
        await session.publish(Topics(fed).model, data, qos=1, retain=True)
    finally:
        await session.disconnect()


async def next_status(broker: Any, fed: str, client: str, state: str) -> dict[str, Any]:
    """The next (or retained) status message of ``client`` in ``state``."""
    session = MqttSession(BrokerAddress.parse(broker.url), f"test-watch-{uuid.uuid4().hex[:8]}", clean_start=True,
                          protocol="5" if broker.kind == "mosquitto" else "3.1.1")
    await session.connect()
    try:
        topic = Topics(fed).status(client)
        await session.subscribe(topic, qos=1)
        async for message in session.messages():
            if message.topic != topic:  # the amqtt fallback, under load, once handed this subscriber the model
                continue
            body = json.loads(message.payload) if message.payload else {}
            if body.get("state") == state:
                return body
    finally:
        await session.disconnect()
    raise AssertionError("the status subscription ended")


def test_the_edge_exits_2_at_start_when_the_hubs_model_needs_channels_the_recording_lacks(mqtt_broker, tmp_path):
    """A real ``wearfl edge`` process: the hub's retained heart-rate model arrives as it connects."""
    fed = f"test-{uuid.uuid4().hex[:12]}"
    asyncio.run(asyncio.wait_for(publish_model(mqtt_broker, fed, Model(default_spec("heart-rate"))), WAIT_S))
    spec = recording(tmp_path / "ward")  # motion only: no ppg

    done = subprocess.run(
        [sys.executable, "-m", "wearfl", "edge", "--broker", mqtt_broker.url, "--federation", fed, "--source", spec,
         "--state", str(tmp_path / "state")],
        cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S,  # without the fix: waits for ever, killed here
    )

    assert done.returncode == 2, done.stderr
    error = the_one_error(done.stderr.splitlines())
    assert "the global heart-rate model needs channels ['ppg'], which the source 'subject1' does not have" in error


def test_a_running_edge_stops_when_a_model_it_cannot_feed_arrives(mqtt_broker, tmp_path):
    fed = f"test-{uuid.uuid4().hex[:12]}"
    source = open_dataset(recording(tmp_path / "ward").rpartition("/")[0]).source("subject1")
    config = EdgeConfig(broker=mqtt_broker.url, federation=fed, client_id="subject1", state_dir=tmp_path / "state",
                        policy=FineTunePolicy(), protocol="5" if mqtt_broker.kind == "mosquitto" else "3.1.1")
    client = EdgeClient(config, source)

    async def scenario() -> None:
        stop = asyncio.Event()
        online = asyncio.create_task(next_status(mqtt_broker, fed, "subject1", "online"))
        running = asyncio.create_task(client.run(stop))
        try:
            await asyncio.wait_for(online, WAIT_S)  # connected, no model yet: it waits for the hub
            await publish_model(mqtt_broker, fed, Model(default_spec("heart-rate")))
            with pytest.raises(MissingChannels, match=r"needs channels \['ppg'\]"):
                await asyncio.wait_for(running, WAIT_S)  # without the fix: it logs an error and waits on
        finally:
            stop.set()
            await asyncio.gather(running, return_exceptions=True)
        offline = await asyncio.wait_for(next_status(mqtt_broker, fed, "subject1", "offline"), WAIT_S)
        assert offline["reason"] == "stopped"  # a clean stop: status offline, buffers checkpointed

    asyncio.run(asyncio.wait_for(scenario(), 3 * WAIT_S))
    assert client.counters["models_refused"] == 1 and client.model is None


# -- a bad --broker: nothing made ----------------------------------------------------------------------


@pytest.mark.parametrize("who", [(), ("--client-id", "gw-1")])
def test_a_bad_broker_scheme_fails_before_the_state_directory_or_a_key_is_made(tmp_path, capsys, who):
    state = tmp_path / "state"
    code, err = edge(capsys, "--broker", "http://x", *who, "--source", recording(tmp_path / "ward"),
                     "--state", str(state))
    assert code == 2
    assert "scheme 'http'; use mqtt:// or mqtts://" in the_one_error(err)
    assert not state.exists()


def test_an_edge_client_with_a_bad_broker_url_makes_no_state(tmp_path):
    """The runtime itself (``wearfl simulate`` runs it without the command line) checks the URL first."""
    state = tmp_path / "state"
    source = open_dataset(recording(tmp_path / "ward").rpartition("/")[0]).source("subject1")
    config = EdgeConfig(broker="http://x", federation="f1", client_id="subject1", state_dir=state)
    with pytest.raises(ConfigError, match="scheme 'http'"):
        asyncio.run(EdgeClient(config, source).run(asyncio.Event()))
    assert not state.exists()  # no folder, no device.key
