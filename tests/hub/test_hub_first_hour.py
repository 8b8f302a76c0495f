"""The operator's first hour with `wearfl hub` (and `wearfl edge` on the same broker): a mistake is one
``error:`` line and exit 2, found before anything is written, and never a silent wait.

Run as the operator runs them: ``python -m wearfl ...`` in a subprocess. The wrong-federation cases
cross the locked-down Mosquitto that `wearfl keys broker-config` writes (TLS, passwords, ACL for one
federation); Mosquitto grants any subscription, so the refusal arrives on the first publish.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from provisioned import provisioned_broker

from wearfl.broker import MosquittoBroker

ROOT = Path(__file__).resolve().parents[2]
FED = "clinic"
DEVICE = "wearer-00"


def wearfl(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wearfl", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line of a command that failed as it should (exit 2, no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


# -- validation before any write --------------------------------------------------------------------


def test_a_state_path_that_is_a_file_is_one_error_line(tmp_path):
    state = tmp_path / "hub-state"
    state.write_text("not a directory")

    error = one_error(wearfl("hub", "--broker", "mqtt://127.0.0.1:1", "--federation", FED, "--state", str(state),
                             "--task", "heart-rate"))

    assert error == (f"error: the hub state directory (--state) {state} cannot be made: {state} is a file, "
                     "not a folder; give another path.")
    assert state.read_text() == "not a directory"


def test_a_state_path_under_a_file_is_one_error_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")

    error = one_error(wearfl("hub", "--broker", "mqtt://127.0.0.1:1", "--federation", FED, "--state",
                             str(blocker / "state"), "--task", "heart-rate"))

    assert f"{blocker} is a file, not a folder" in error


@pytest.mark.parametrize("broker", ["http://x", "mqtt://host:port", "mqtt://127.0.0.1:1/path"])
def test_a_bad_broker_url_leaves_no_state_directory_behind(tmp_path, broker):
    state = tmp_path / "hub-state"

    error = one_error(wearfl("hub", "--broker", broker, "--federation", FED, "--state", str(state),
                             "--task", "heart-rate"))

    assert error.startswith(f"error: broker URL {broker!r}") or error.startswith("error: cannot read broker URL")
    assert not state.exists()  # before: state/keys/hub.key was written first


def test_a_missing_keyring_leaves_no_state_directory_behind(tmp_path):
    state = tmp_path / "hub-state"

    error = one_error(wearfl("hub", "--broker", "mqtt://127.0.0.1:1", "--federation", FED, "--state", str(state),
                             "--task", "heart-rate", "--keyring", str(tmp_path / "no-keyring")))

    assert "no-keyring" in error
    assert not state.exists()


# -- the wrong federation on a locked-down broker ---------------------------------------------------


@dataclass
class Provisioned:
    state: Path
    broker: MosquittoBroker

    @property
    def url(self) -> str:
        return f"mqtts://{self.broker.host}:{self.broker.port}"

    def folder(self, who: str) -> Path:
        return self.state / "keys" / ("hub" if who == "hub" else f"devices/{who}")


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioned]:
    with provisioned_broker(tmp_path_factory, [DEVICE], FED) as (state, broker):
        yield Provisioned(state, broker)


def test_a_hub_on_another_federation_stops_with_one_error_line(provisioned, tmp_path):
    error = one_error(wearfl("hub", "--broker", provisioned.url, "--federation", "ward-9", "--state",
                             str(tmp_path / "hub"), "--credentials", str(provisioned.folder("hub")),
                             "--task", "heart-rate", "--rounds", "1"))

    assert "refused a message on wearfl/v1/ward-9/model (Not authorized)" in error
    assert "user 'wearfl-hub'" in error and error.endswith("Is --federation right for these credentials?")


def test_an_edge_on_another_federation_stops_with_one_error_line_instead_of_waiting(provisioned, tmp_path):
    """Before: the edge subscribed (granted), its status was refused at DEBUG level, and it waited forever."""
    result = wearfl("edge", "--broker", provisioned.url, "--federation", "ward-9", "--state", str(tmp_path / "edge"),
                    "--credentials", str(provisioned.folder(DEVICE)), "--source", f"sim:0/{DEVICE}",
                    "--connect-timeout", "20", timeout=90.0)

    error = one_error(result)
    assert f"refused a message on wearfl/v1/ward-9/status/{DEVICE} (Not authorized)" in error
    assert error.endswith("Is --federation right for these credentials?")
