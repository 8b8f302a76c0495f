"""The README's "A federation as separate processes", run as written.

The commands are read from the README's code block (so the test breaks when the README
changes without the flow still working): a real Mosquitto, `wearfl hub --rounds 3`, an edge
on `sim:`, `wearfl record`, an edge on `recordings:`, each its own process with no extra
flags. Only the broker's port (a free one) and the `runs/` folder (a temporary one) differ.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_process import end_process

from wearfl.broker import free_port, mosquitto_binary

pytestmark = pytest.mark.slow  # the quick loop is `pytest -m "not slow"`

ROOT = Path(__file__).resolve().parents[2]
SECTION = "### A federation as separate processes"


def readme_commands() -> list[list[str]]:
    """The section's command lines, split as a shell would, comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(re.escape(SECTION) + r".*?```\n(.*?)```", text, re.S)
    assert block, f"README.md has no code block under {SECTION!r}"
    return [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_flow_runs_three_rounds_with_every_edge_accepted(tmp_path):
    mosquitto = mosquitto_binary()
    if mosquitto is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but mosquitto is not installed: `apt-get install -y mosquitto` (see .ci/run).")
        pytest.skip("Mosquitto is not installed (apt-get install mosquitto)")
    port = str(free_port())
    commands = readme_commands()
    assert [c[0] for c in commands] == ["mosquitto", *[".venv/bin/wearfl"] * 4], commands

    def concrete(argv: list[str]) -> list[str]:
        out = [a.replace("1884", port) for a in argv]
        out = [str(tmp_path / a) if a.startswith("runs/") else a for a in out]
        out = [a.replace("recordings:runs/", f"recordings:{tmp_path}/runs/") for a in out]
        return [sys.executable, "-m", "wearfl", *out[1:]] if out[0] == ".venv/bin/wearfl" else [mosquitto, *out[1:]]

    broker_cmd, hub_cmd, sim_edge_cmd, record_cmd, rec_edge_cmd = (concrete(c) for c in commands)
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("broker", "hub", "sim-edge", "rec-edge")}
    started: list[subprocess.Popen] = []

    def start(name: str, argv: list[str]) -> subprocess.Popen:
        started.append(subprocess.Popen(argv, cwd=tmp_path, stdout=logs[name], stderr=subprocess.STDOUT))
        return started[-1]

    try:
        start("broker", broker_cmd)
        hub = start("hub", hub_cmd)
        sim_edge = start("sim-edge", sim_edge_cmd)
        recorded = subprocess.run(record_cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert recorded.returncode == 0, recorded.stderr
        assert "wrote " in recorded.stdout
        rec_edge = start("rec-edge", rec_edge_cmd)
        try:
            code = hub.wait(timeout=420)
        except subprocess.TimeoutExpired:
            pytest.fail("the hub did not finish 3 rounds:\n" + (tmp_path / "hub.log").read_text()[-4000:])
        assert code == 0, (tmp_path / "hub.log").read_text()[-4000:]
        status = subprocess.run([sys.executable, "-m", "wearfl", "status", "--state", str(tmp_path / "runs/hub"),
                                 "--json"], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["rounds_completed"] == 3
        accepted = {client: info["accepted"] for client, info in report["clients"].items()}
        assert accepted == {"wearer-01": 3, "wearer-02": 3}, report
        assert report["updates_accepted"] == 6
        for name in ("sim-edge", "rec-edge"):  # what an operator watching a gateway's terminal sees
            log = tmp_path / f"{name}.log"
            deadline = time.monotonic() + 30
            while "(3 accepted in all)" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            text = log.read_text()
            # rounds faster than the printer's one look a second share a line ("(3 rounds since the last line)")
            assert re.search(r"model v\d+ adopted", text) and "round 3: trained, update stored and sent" in text, text
            assert "(3 accepted in all)" in text, text
        for edge in (sim_edge, rec_edge):  # a gateway runs until it is told to stop, and stops cleanly
            assert edge.poll() is None
            edge.send_signal(signal.SIGTERM)
            assert edge.wait(timeout=60) == 0
    finally:
        for process in reversed(started):
            end_process(process)
        for log in logs.values():
            log.close()
