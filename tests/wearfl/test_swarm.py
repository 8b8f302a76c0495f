"""Light simulated edges (:mod:`wearfl.swarm`) and their worker processes.

* End to end through a real Mosquitto (slow): ``wearfl simulate --edges light`` with two worker
  processes and in one process give every edge's update each round, receipts that empty the shared
  outboxes, and the same models whichever way the edges are spread.
* A swarm checks the hub's messages as a gateway does: a model or a task signed by another key, or
  for another federation, is refused.
* A worker that ends by itself stops the run with one error, not a hang.
* Flags that need full edges are refused with one ``error:`` line.
* The simulator's spans: deterministic, a later day a montage of activities.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from provisioned import needs_mosquitto

from edge_client.evaluation import task_spec
from edge_client.sources.simulator import SimulatedDataset
from models.errors import ConfigError
from models.model import Model
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.messages import Task, build_model
from wearfl.cli import main
from wearfl.swarm import Swarm, SwarmSpec, device_key, round_windows
from wearfl.swarm_worker import WorkerFailed, run_workers

FEDERATION = "swarm-test"


def simulate(out: Path, *flags: str) -> dict:
    assert main(["simulate", "--clients", "8", "--rounds", "2", "--local-steps", "2", "--edges", "light",
                 "--lr-schedule", "constant", "--seed", "3", "--out", str(out), *flags]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_light_edges_in_worker_processes_and_in_one_process_train_the_same_rounds(tmp_path):
    needs_mosquitto()
    spread = simulate(tmp_path / "spread", "--processes", "2")
    one = simulate(tmp_path / "one", "--processes", "0")
    for report in (spread, one):
        assert report["edges"] == "light"
        assert [r["updates_accepted"] for r in report["rounds"]] == [8, 8]  # every edge, every round
        counters = report["edge_counters"]
        assert counters["updates_published"] == 16 and counters["receipts_accepted"] == 16
        assert counters["models_refused"] == 0 and counters["tasks_refused"] == 0
    assert spread["processes"] == 2 and one["processes"] == 0
    # every update left its outbox on its receipt; every edge recorded round 2 with it
    outboxes = sorted((tmp_path / "spread" / "edges").glob("outbox-*.sqlite3"))
    assert len(outboxes) == 2
    rounds = {}
    for path in outboxes:
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 0
            rounds.update(dict(db.execute("SELECT client, CAST(value AS TEXT) FROM state WHERE key = 'last_round'")))
    assert rounds == {f"wearer-{i:02d}": "2" for i in range(8)}
    # a fit depends on (seed, edge, round, model) only, not on which process ran it or when
    for a, b in zip(spread["rounds"], one["rounds"], strict=True):
        assert a["metrics"]["accuracy"] == pytest.approx(b["metrics"]["accuracy"], abs=0.01)
    keyring = (tmp_path / "spread" / "keyring").read_text().split()
    assert len(keyring) == 16 and keyring[0] == "wearer-00"


# -- what a swarm believes ----------------------------------------------------------------------------


@pytest.fixture
def swarm(tmp_path):
    dataset = SimulatedDataset(0)
    spec = SwarmSpec(broker="mqtt://127.0.0.1:1", federation=FEDERATION, dataset="sim:0",
                     clients=dataset.train_clients[:3], outbox=str(tmp_path / "o.sqlite3"), secret="00" * 32)
    return Swarm(spec, dataset)


def model_message(key: Ed25519PrivateKey, version: int, federation: str = FEDERATION) -> bytes:
    model = Model(task_spec("activity", SimulatedDataset(0)), version=version)
    return build_model(model, version, key, federation=federation)


def test_the_first_model_pins_the_hub_key_and_a_model_signed_by_another_is_refused(swarm):
    hub, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    first = asyncio.run(swarm._check_model(model_message(hub, 0)))
    assert first is not None and swarm.pinned == hub.public_key().public_bytes_raw()
    assert asyncio.run(swarm._check_model(model_message(other, 5))) is None  # a newer model, but not the hub's
    assert asyncio.run(swarm._check_model(model_message(hub, 3, federation="elsewhere"))) is None
    assert asyncio.run(swarm._check_model(model_message(hub, 0))) is None  # not newer
    assert swarm.counters["models_refused"] == 3 and swarm.counters["models_accepted"] == 1
    assert asyncio.run(swarm._check_model(model_message(hub, 1))) is not None


def test_tasks_must_be_the_pinned_hubs_for_this_federation_with_settings_in_bounds(swarm):
    hub, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    asyncio.run(swarm._check_model(model_message(hub, 0)))
    good = Task(1, 0, {"lr": 1e-3}, None, ("wearer-00",), FEDERATION).signed(hub)
    task = asyncio.run(swarm._check_task(good.to_bytes()))
    assert task is not None and task.selects("wearer-00") and not task.selects("wearer-01")
    forged = Task(1, 0, {"lr": 1e-3}, None, None, FEDERATION).signed(other)
    foreign = Task(1, 0, {"lr": 1e-3}, None, None, "elsewhere").signed(hub)
    wild = Task(1, 0, {"quantize": "int3"}, None, None, FEDERATION).signed(hub)
    for payload in (forged.to_bytes(), foreign.to_bytes(), wild.to_bytes(), b"{not json"):
        assert asyncio.run(swarm._check_task(payload)) is None
    assert swarm.counters["tasks_refused"] == 4


def test_device_keys_are_a_function_of_the_runs_secret_and_the_client():
    a, b = device_key(b"s" * 32, "wearer-00"), device_key(b"s" * 32, "wearer-01")
    assert a.public_key() == device_key(b"s" * 32, "wearer-00").public_key()
    assert a.public_key() != b.public_key() != device_key(b"t" * 32, "wearer-01").public_key()


# -- worker processes ---------------------------------------------------------------------------------


def test_a_worker_that_fails_at_start_ends_the_run_with_one_error(tmp_path, capfd):
    spec = SwarmSpec(broker="mqtt://127.0.0.1:1", federation=FEDERATION, dataset="nosuch:dataset",
                     clients=("a", "b"), outbox=str(tmp_path / "o.sqlite3"), secret="00" * 32)

    async def run() -> None:
        await asyncio.wait_for(run_workers([spec], asyncio.Event()), 60)

    with pytest.raises(WorkerFailed, match=r"worker 1 of 1 \(edges a \.\. b\) ended with exit code 1"):
        asyncio.run(run())
    err = capfd.readouterr().err
    assert "error: " in err and "Traceback" not in err


# -- flags --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "says"), [
    (["--clients", "60", "--secure-aggregation"], "--secure-aggregation needs full edges and --clients 60 runs "
                                                  "light edges; give --edges full"),
    (["--clients", "8", "--edges", "light", "--attack", "scale"], "--attack needs full edges and --edges light"),
    (["--clients", "8", "--edges", "full", "--processes", "2"], "--processes spreads light edges"),
    (["--clients", "8", "--processes", "-1"], "--processes -1: give a number of worker processes"),
])
def test_flags_that_need_full_edges_are_refused(tmp_path, capsys, argv, says):
    out = tmp_path / "run"
    assert main(["simulate", "--rounds", "1", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    assert not out.exists()


# -- the windows a light edge trains on -------------------------------------------------------------


def test_round_windows_are_deterministic_and_a_later_day_holds_many_activities():
    dataset = SimulatedDataset(0).grown(40)
    model = Model(task_spec("activity", dataset))
    x, y = round_windows(dataset, "wearer-35", 1, model, 0.25, 64)
    x2, y2 = round_windows(dataset, "wearer-35", 1, model, 0.25, 64)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert x.shape[1:] == (6, 128) and 48 <= len(x) <= 64
    assert len(np.unique(y)) >= 3  # a montage of moments, not a minute of one activity
    assert not np.array_equal(round_windows(dataset, "wearer-35", 2, model, 0.25, 64)[0][:4], x[:4])
    with pytest.raises(ConfigError, match="span of a simulated stream"):
        dataset.source("wearer-35", day=1).span(10**6)

