"""``wearfl simulate`` in an operator's first hour (issue 14).

* Bad input (an unknown strategy, a strategy arg the rule does not take, ``--malicious`` out of (0, 1),
  ``--out`` naming a file) is one ``error:`` line and exit 2, before anything starts: no broker, no folder.
* The broker the command starts never outlives it: not after an error mid-run, Ctrl-C or SIGTERM.
* Ctrl-C in a terminal (SIGINT to the whole foreground process group) ends a run with 130 and one
  ``interrupted`` line; SIGTERM with 143 and ``terminated``. How fast is measured by
  ``scripts/bench_simulate_interrupt.py`` (issue 14: within 5 s), not asserted here.
* ``--help`` names every strategy of the registry and every flag's default.
* On a terminal the rounds show as a progress bar on stderr; elsewhere as the per-round lines CI parses.

The runs that need a real process (signals, stderr, leftover brokers) are subprocesses; a broker they
start is found by its command line, which names its config in the run's ``--out`` folder.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from broker import mosquittos_under

from hub.strategies import STRATEGIES
from models.errors import BrokerUnavailable
from wearfl.broker import mosquitto_binary
from wearfl.cli import build_parser, main
from wearfl.simulate import RoundProgress, round_postfix

ROOT = Path(__file__).resolve().parents[2]
FAST = ("--clients", "2", "--local-epochs", "1", "--seed", "1")
"""A run whose rounds take about a second each."""
ROUND_LINE = re.compile(r"^round +\d+/\d+ +\d+ updates +[\d.]+ KiB up  accuracy [\d.]+")
HANG_GUARD_S = 120.0


def needs_mosquitto() -> None:
    """The leak checks look for a ``mosquitto`` process; the embedded broker has none to leak."""
    if mosquitto_binary() is not None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true but mosquitto is not installed: `apt-get install -y mosquitto` (see .ci/run).")
    pytest.skip("mosquitto is not installed; the simulation would use the embedded broker")


@pytest.fixture
def runs(tmp_path) -> Iterator[list[subprocess.Popen[str]]]:
    """The test's ``wearfl simulate`` processes; whatever they leave running (a failing test's) is ended by PID."""
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("finding a leftover broker needs /proc")
    needs_mosquitto()
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for pid in mosquittos_under(tmp_path):
        os.kill(pid, signal.SIGTERM)


def start_simulate(runs: list[subprocess.Popen[str]], cwd: Path, *argv: str) -> subprocess.Popen[str]:
    """``python -m wearfl simulate ARGV`` in its own session (so a signal can go to its process group)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
    proc = subprocess.Popen([sys.executable, "-m", "wearfl", "simulate", *argv], cwd=cwd, env=env, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    runs.append(proc)
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = HANG_GUARD_S) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``proc``; TimeoutExpired when it runs past ``timeout``."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def until_first_round(proc: subprocess.Popen[str]) -> list[str]:
    """Read ``proc``'s stderr up to its first round line (its lines so far); fail when it ends first."""
    assert proc.stderr is not None
    guard = threading.Timer(HANG_GUARD_S, lambda: os.killpg(proc.pid, signal.SIGKILL))
    guard.start()
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if ROUND_LINE.match(line):
                return lines
    finally:
        guard.cancel()
    pytest.fail("simulate ended before its first round:\n" + "\n".join(lines))


# -- bad input: one line, exit 2, nothing started -------------------------------------------------


@pytest.mark.parametrize(("argv", "says"), [
    (("--strategy", "nope"), "unknown strategy 'nope' (--strategy)"),
    (("--strategy-arg", "q=1"), "takes no q (--strategy-arg)"),
    (("--attack", "sign-flip", "--malicious", "5"), "--malicious 5"),
    (("--malicious", "5"), "--malicious 5"),
])
def test_bad_input_is_one_error_line_before_any_broker_or_folder(runs, tmp_path, argv, says):
    out = tmp_path / "run"
    code, _, stderr = finish(start_simulate(runs, tmp_path, *FAST, "--out", str(out), *argv))
    assert code == 2, stderr
    assert stderr.splitlines() == [stderr.strip()] and stderr.startswith("error: ") and says in stderr, stderr
    assert not out.exists()  # checked before the output folder is made
    assert mosquittos_under(tmp_path) == []  # ... and before the broker starts (it was left running)


def test_out_naming_a_file_is_one_error_line_before_anything_starts(runs, tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    code, _, stderr = finish(start_simulate(runs, tmp_path, *FAST, "--out", str(taken)))
    assert code == 2, stderr  # was 1, a FileExistsError traceback
    assert stderr.splitlines() == [f"error: --out {taken} is a file; give a folder for the run's files (a new one, "
                                   "or an existing folder)."]
    assert taken.read_text() == "mine\n"
    assert mosquittos_under(tmp_path) == []
    assert not (tmp_path / "runs").exists()


# -- the broker never outlives the command ----------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_ends_the_run_and_stops_the_broker(runs, tmp_path):
    proc = start_simulate(runs, tmp_path, *FAST, "--rounds", "50", "--out", str(tmp_path / "run"))
    until_first_round(proc)
    (broker,) = mosquittos_under(tmp_path)  # the run's own broker
    assert os.getpgid(broker) != proc.pid  # out of the terminal's reach: it must outlive the clients' goodbyes
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground process group
    code, stdout, stderr = finish(proc)  # was ~150 s, the broker gone under the hub's publish
    assert code == 130, stderr
    assert "Traceback" not in stderr and "error" not in stderr, stderr
    assert stderr.splitlines()[-1] == "interrupted"
    assert stdout == ""
    assert mosquittos_under(tmp_path) == []
    kept = json.loads((tmp_path / "run" / "report.json").read_text())  # the rounds done are not lost
    assert kept["interrupted"] == "SIGINT" and len(kept["rounds"]) >= 1


def workers_of(pid: int) -> list[int]:
    """The ``wearfl.swarm_worker`` processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
            if int(fields[1]) == pid and b"wearfl.swarm_worker" in cmdline:
                found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_ctrl_c_stops_the_light_edges_worker_processes_too(runs, tmp_path):
    proc = start_simulate(runs, tmp_path, "--clients", "60", "--processes", "2", "--local-steps", "1",
                          "--rounds", "50", "--out", str(tmp_path / "run"))
    until_first_round(proc)
    workers = workers_of(proc.pid)
    assert len(workers) == 2
    os.killpg(proc.pid, signal.SIGINT)
    code, _, stderr = finish(proc)
    assert code == 130, stderr
    assert "Traceback" not in stderr and stderr.splitlines()[-1] == "interrupted", stderr
    assert mosquittos_under(tmp_path) == []
    assert not [w for w in workers if Path(f"/proc/{w}").exists()]  # the workers ended with the run


@pytest.mark.slow
def test_sigterm_ends_the_run_and_stops_the_broker(runs, tmp_path):
    proc = start_simulate(runs, tmp_path, *FAST, "--rounds", "50", "--out", str(tmp_path / "run"))
    until_first_round(proc)
    proc.terminate()  # systemd, kill, a CI runner's timeout: the process alone
    code, _, stderr = finish(proc)
    assert code == 128 + signal.SIGTERM, stderr  # was -15, the broker left running
    assert "Traceback" not in stderr and stderr.splitlines()[-1] == "terminated", stderr
    assert mosquittos_under(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("failure", [BrokerUnavailable("the broker went away."), KeyboardInterrupt(),
                                     RuntimeError("a bug")], ids=["error", "ctrl-c", "bug"])
def test_a_run_that_fails_mid_way_stops_its_broker(runs, tmp_path, monkeypatch, failure):
    from hub.service import HubService

    async def fail(self, stop=None):
        assert mosquittos_under(tmp_path), "the broker runs while the hub does"
        raise failure

    monkeypatch.setattr(HubService, "run", fail)
    argv = ["simulate", *FAST, "--rounds", "2", "--out", str(tmp_path / "run")]
    if isinstance(failure, RuntimeError):
        with pytest.raises(RuntimeError, match="a bug"):  # a bug keeps its traceback
            main(argv)
    else:
        assert main(argv) == (2 if isinstance(failure, BrokerUnavailable) else 130)
    assert mosquittos_under(tmp_path) == []


# -- --help -------------------------------------------------------------------------------------


def simulate_help(capsys) -> dict[str, str]:
    """``wearfl simulate --help`` as {option: its entry, whitespace collapsed}."""
    with pytest.raises(SystemExit) as exited:
        main(["simulate", "--help"])
    assert exited.value.code == 0
    options = capsys.readouterr().out.split("options:", 1)[1]
    entries = [e for e in re.split(r"\n(?=  -)", options) if e.strip()]
    return {e.split()[0].rstrip(","): " ".join(e.split()) for e in entries}


def simulate_parser() -> argparse.ArgumentParser:
    parser = build_parser("simulate")
    (sub,) = (a for a in parser._actions if a.choices and "simulate" in a.choices)
    return sub.choices["simulate"]


def test_help_lists_every_strategy_of_the_registry(capsys):
    listed = set(re.findall(r"[a-z]+", simulate_help(capsys)["--strategy"]))
    assert set(STRATEGIES) <= listed, set(STRATEGIES) - listed  # dpfedavg was missing


def test_help_shows_the_default_of_every_flag_that_has_one(capsys):
    entries = simulate_help(capsys)
    missing = []
    for action in simulate_parser()._actions:
        if not action.option_strings or action.default in (None, argparse.SUPPRESS):
            continue
        shown = ("on" if action.default else "off") if isinstance(action.default, bool) else str(action.default)
        if f"(default: {shown})" not in entries[action.option_strings[0]]:
            missing.append(f"{action.option_strings[0]} (default {shown})")
    assert missing == []  # --rounds, --seed, --round-timeout, ... had no help at all


# -- progress: a bar on a terminal, the lines elsewhere ---------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def closed_round(number: int) -> SimpleNamespace:
    return SimpleNamespace(round=number, participants=2, bytes_up=25088)


def test_off_a_terminal_each_round_is_the_line_ci_parses():
    stream = io.StringIO()
    metrics = {"accuracy": 0.71914, "macro_f1": 0.74361}
    with RoundProgress(3, "accuracy", stream) as progress:
        progress.round_closed(closed_round(1), metrics)
    assert not progress.shows_bar
    assert stream.getvalue() == "round   1/3    2 updates      24.5 KiB up  accuracy 0.7191  macro_f1 0.7436  (0 s)\n"


def test_on_a_terminal_the_rounds_are_a_bar_with_the_latest_metric_and_an_eta():
    stream = Terminal()
    with RoundProgress(5, "accuracy", stream) as progress:
        progress.round_closed(closed_round(1), {"accuracy": 0.5, "macro_f1": 0.4})
        progress.round_closed(closed_round(2), {"accuracy": 0.91519, "macro_f1": 0.9})
    shown = stream.getvalue()
    assert progress.shows_bar
    assert "2/5" in shown and "accuracy 0.9152" in shown and "<" in shown  # tqdm's "elapsed<remaining"
    assert "round   1/5" not in shown


def test_the_bar_shows_the_headline_metric():
    assert round_postfix({"accuracy": 0.91519, "macro_f1": 0.9}, "accuracy") == "accuracy 0.9152"
    assert round_postfix({"mae_bpm": 7.25}, "mae_bpm") == "mae_bpm 7.2500"
    assert round_postfix({}, "accuracy") == ""


def test_simulate_http_beyond_loopback_needs_a_token_before_anything_starts(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "wearfl", "simulate", "--http", "0.0.0.0:9100", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--http-token" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()
