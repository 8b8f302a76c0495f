"""``wearfl hub`` as a child process for tests that SIGKILL it, optionally paused at a named point first."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 40.0

PAUSE = """
import os, pathlib, sys, threading

point, mark = os.environ["WEARFL_TEST_PAUSE_AT"], pathlib.Path(os.environ["WEARFL_TEST_PAUSE_MARK"])


def pause_after(owner, name, when):
    original = getattr(owner, name)

    def paused(*args, **kwargs):
        result = original(*args, **kwargs)
        if when(*args):
            mark.write_text(point)
            threading.Event().wait()
        return result

    setattr(owner, name, paused)


if point == "registered":
    from hub.registry import ModelRegistry
    pause_after(ModelRegistry, "save", lambda registry, model, *rest: model.version > 0)
elif point == "recorded":
    from hub.store import HubStore
    pause_after(HubStore, "record_round", lambda *args: True)
elif point == "partial_stored":  # a site hub: its partial is in the outbox, not yet published
    from models.transport.outbox import Outbox
    wanted = int(os.environ.get("WEARFL_TEST_PAUSE_ROUND", "1"))
    pause_after(Outbox, "add", lambda outbox, round_number, *rest: round_number == wanted)
from wearfl.cli import main
sys.exit(main(sys.argv[1:]))
"""
"""``wearfl`` with one test-only change: at the named point the process writes a marker file and
stops there (the test then SIGKILLs it), so a kill lands exactly between two steps of a close."""


class HubProcess:
    """``wearfl hub`` as a child process: started, SIGKILLed and waited for by PID."""

    def __init__(self, state: Path | str, args: list[str], workdir: Path | None = None) -> None:
        """``state``: a folder (its parent holds the log), or a postgresql:// URL with ``workdir`` for the log."""
        self.state, self.args = state, args
        self.workdir = workdir if workdir is not None else Path(state).parent
        self.log = self.workdir / "hub.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, pause_at: str | None = None) -> None:
        assert self.proc is None or self.proc.poll() is not None
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if pause_at is None:
            argv = [sys.executable, "-m", "wearfl"]
        else:
            argv = [sys.executable, "-c", PAUSE]
            env.update(WEARFL_TEST_PAUSE_AT=pause_at, WEARFL_TEST_PAUSE_MARK=str(self.mark))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([*argv, "-v", "hub", "--state", str(self.state), *self.args], cwd=ROOT,
                                         env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    @property
    def mark(self) -> Path:
        return self.workdir / "paused"

    def alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"the hub exited ({self.proc and self.proc.returncode}):\n{self.log_tail()}")
        return True

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT_S)

    async def exited(self) -> int:
        assert self.proc is not None
        try:
            return await asyncio.to_thread(self.proc.wait, WAIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the hub did not finish:\n{self.log_tail()}") from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT_S)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "(no log)"


def end_process(process: subprocess.Popen, timeout: float = 30.0) -> None:  # type: ignore[type-arg]
    """Stop a child process this test started: SIGTERM, then SIGKILL if it does not end in ``timeout`` s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
