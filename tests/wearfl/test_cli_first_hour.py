"""The operator's first hour with the ``wearfl`` command line (issue 14).

* Output piped into a reader that leaves early (``| head -c 10``) ends any command quietly with
  exit 141 (128 + SIGPIPE), not with a BrokenPipeError traceback.
* ``wearfl export --out`` into a folder that does not exist is an error, not a ``mkdir -p``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hub.store import HubStore
from wearfl.cli import STDOUT_CLOSED_EXIT, main

ROOT = Path(__file__).resolve().parents[2]
WEARFL = (sys.executable, "-m", "wearfl")


def hub_state(folder: Path, clients: int = 4000) -> Path:
    """A hub state directory whose ``wearfl status`` is several times what a pipe holds (64 KiB)."""
    with HubStore(folder, synchronous="NORMAL") as store, store.transaction():
        for i in range(clients):
            store.pin_key(f"wearer-{i:04d}", bytes(32), now=0.0)
    return folder


def piped_into_head(*argv: str) -> tuple[int, bytes, str]:
    """``wearfl ARGV | head -c 10``: wearfl's exit status, what head printed, what wearfl wrote on stderr."""
    wearfl = subprocess.Popen([*WEARFL, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.Popen(["head", "-c", "10"], stdin=wearfl.stdout, stdout=subprocess.PIPE)
    assert wearfl.stdout is not None and wearfl.stderr is not None
    wearfl.stdout.close()  # head holds the only read end now
    shown, _ = head.communicate(timeout=60)
    err = wearfl.stderr.read().decode()
    wearfl.stderr.close()
    return wearfl.wait(timeout=60), shown, err


@pytest.mark.parametrize("json_flag", [("--json",), ()])
def test_status_into_head_exits_quietly(tmp_path, json_flag):
    state = hub_state(tmp_path / "hub")
    code, shown, err = piped_into_head("status", "--state", str(state), *json_flag)
    assert len(shown) == 10  # head got its bytes; the rest (~0.3-0.6 MB, pipes hold 64 KiB) had no reader
    assert (code, err) == (STDOUT_CLOSED_EXIT, ""), err  # without the fix: 1, a BrokenPipeError traceback


@pytest.mark.parametrize("json_flag", [("--json",), ()])
def test_another_command_whose_reader_has_gone_exits_quietly(tmp_path, json_flag):
    """The reader leaves before wearfl writes: its read end is closed at once, so even a short output fails."""
    package = tmp_path / "act.safetensors"
    assert main(["init", "--task", "activity", "--out", str(package)]) == 0
    wearfl = subprocess.Popen([*WEARFL, "info", "--model", str(package), *json_flag], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wearfl.stdout is not None
    wearfl.stdout.close()
    _, err = wearfl.communicate(timeout=60)
    assert (wearfl.returncode, err.decode()) == (STDOUT_CLOSED_EXIT, "")  # without the fix: 1, a traceback


def test_a_broken_pipe_that_is_not_stdout_still_shows_its_traceback(tmp_path):
    """A socket's or a child's pipe's BrokenPipeError, stdout being fine, is a bug: the CLI does not swallow it."""
    code = ("import sys, hub.commands\n"
            "def broken(args):\n    raise BrokenPipeError(32, 'Broken pipe (a socket)')\n"
            "hub.commands.cmd_status = broken\n"
            "from wearfl.cli import main\n"
            f"sys.exit(main(['status', '--state', {str(tmp_path)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" in done.stderr and "Broken pipe (a socket)" in done.stderr


def test_export_into_a_missing_folder_is_an_error_not_a_mkdir(tmp_path, capsys):
    package = tmp_path / "act.safetensors"
    assert main(["init", "--task", "activity", "--out", str(package)]) == 0
    capsys.readouterr()
    out = tmp_path / "missing" / "dir" / "model.onnx"

    code = main(["export", "--model", str(package), "--format", "onnx", "--out", str(out)])

    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "does not exist; create it first (mkdir -p" in err[0]
    assert str(tmp_path / "missing" / "dir") in err[0]
    assert not (tmp_path / "missing").exists()


def test_export_next_to_a_file_named_like_the_folder_is_an_error(tmp_path, capsys):
    package = tmp_path / "act.safetensors"
    assert main(["init", "--task", "activity", "--out", str(package)]) == 0
    capsys.readouterr()
    code = main(["export", "--model", str(package), "--format", "onnx", "--out", str(package / "model.onnx")])
    assert code == 2
    assert "is not a folder" in capsys.readouterr().err


def test_export_into_an_existing_folder_still_writes(tmp_path, capsys):
    package = tmp_path / "act.safetensors"
    assert main(["init", "--task", "activity", "--out", str(package)]) == 0
    assert main(["export", "--model", str(package), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 1000


@pytest.mark.parametrize("under", [False, True])
def test_an_edge_state_that_is_a_file_is_one_error_line(tmp_path, under):
    blocker = tmp_path / "state"
    blocker.write_text("not a folder")
    state = blocker / "edge" if under else blocker
    done = subprocess.run([sys.executable, "-m", "wearfl", "edge", "--broker", "mqtt://127.0.0.1:1", "--federation",
                           "f", "--source", "sim:0/wearer-01", "--state", str(state)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is a file, not a folder" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
