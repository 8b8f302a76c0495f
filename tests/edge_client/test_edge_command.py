"""``wearfl edge``'s command line: which client the edge runs as, which source it reads, and whether it resumes.

``cmd_edge`` is run with its event-loop part replaced, so these tests see exactly the
config and source the command would run with, without a broker.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from edge_client import edge_command
from edge_client.edge_command import SOURCE_HELP, add_edge_command, config_from_args
from edge_client.sources.follow import FollowSource
from edge_client.sources.simulator import SimulatedWearer
from models.errors import ConfigError


def parse(*argv: str, state: Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wearfl")
    add_edge_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["edge", "--broker", "mqtt://127.0.0.1:1", "--federation", "f1", "--state", str(state),
                              *argv])


@pytest.fixture
def ran(monkeypatch) -> list[tuple[Any, Any]]:
    """(config, source) of each cmd_edge call that got as far as running the edge."""
    calls: list[tuple[Any, Any]] = []

    async def run(config: Any, source: Any, http: Any = None, http_token: Any = None) -> None:
        calls.append((config, source))

    monkeypatch.setattr(edge_command, "_run", run)
    return calls


def recording_file(folder: Path, stem: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "dataset.toml").write_text("sampling_rate_hz = 50\n")
    path = folder / f"{stem}.csv"
    path.write_text("t,acc_x,acc_y,acc_z\n0,0,0,1\n")
    return path


def test_a_source_that_names_the_client_makes_client_id_optional(ran, tmp_path):
    args = parse("--source", "sim:0/wearer-01", state=tmp_path / "s")
    assert edge_command.cmd_edge(args) == 0
    (config, source), = ran
    assert config.client_id == source.client_id == "wearer-01"
    assert isinstance(source, SimulatedWearer) and config.resume_stream  # a replayable stream resumes


def test_client_id_still_wins_over_the_source_and_a_bare_dataset_needs_one(ran, tmp_path):
    edge_command.cmd_edge(parse("--source", "sim:0/wearer-01", "--client-id", "gw-7", state=tmp_path / "s"))
    (config, source), = ran
    assert (config.client_id, source.client_id) == ("gw-7", "wearer-01")
    with pytest.raises(ConfigError, match="names no client"):
        edge_command.cmd_edge(parse("--source", "sim:0", state=tmp_path / "s"))
    with pytest.raises(ConfigError, match=r"needs --client-id, --credentials .* or a --source that names the client"):
        config_from_args(parse("--source", "sim:0", state=tmp_path / "s"))


def test_a_live_source_names_the_client_is_realtime_and_is_closed_after_the_run(ran, tmp_path):
    path = recording_file(tmp_path / "live", "wrist-07")
    edge_command.cmd_edge(parse("--source", f"follow:{path}", state=tmp_path / "s"))
    edge_command.cmd_edge(parse("--source", f"follow:{path}", "--client-id", "gw-9", state=tmp_path / "s"))
    (first, source), (second, renamed) = ran
    assert isinstance(source, FollowSource)
    assert (first.client_id, source.client_id) == ("wrist-07", "wrist-07")
    assert (second.client_id, renamed.client_id) == ("gw-9", "gw-9")  # a live stream is read as the edge's client
    assert not first.resume_stream and not second.resume_stream  # no stream position to skip to after a restart
    assert list(source.chunks()) == []  # closed when the edge stopped: reading ends at once


def test_a_client_name_from_the_source_that_is_no_valid_id_asks_for_client_id(ran, tmp_path):
    path = recording_file(tmp_path / "live", "wrist 07")
    with pytest.raises(ConfigError, match=r"'wrist 07', which is no valid client id.*give --client-id"):
        edge_command.cmd_edge(parse("--source", f"follow:{path}", state=tmp_path / "s"))
    assert ran == []
    edge_command.cmd_edge(parse("--source", f"follow:{path}", "--client-id", "wrist-07", state=tmp_path / "s"))
    assert ran[0][0].client_id == "wrist-07"


def test_a_malformed_broker_url_fails_before_a_device_is_opened(ran, tmp_path):
    args = parse("--source", f"follow:{tmp_path / 'absent.csv'}", state=tmp_path / "s")
    args.broker = "ftp://nowhere"
    with pytest.raises(ConfigError, match="scheme"):  # not "absent.csv does not exist" after a wait
        edge_command.cmd_edge(args)


def test_the_help_lists_the_live_forms_and_the_client_rule():
    for text in ("lsl:NAME", "mqtt:TOPIC", "mqtt://HOST:PORT/TOPIC", "mqtt://127.0.0.1:1883", "follow:",
                 "--client-id may be left out"):
        assert text in SOURCE_HELP


def test_progress_lines_say_what_changed_since_the_last_look():
    from edge_client.edge_command import progress_lines

    quiet = {"model": None, "round": -1, "declined": None, "accepted": 0, "duplicate": 0, "rejected": 0,
             "models": 0, "rounds": 0}
    assert progress_lines(quiet, quiet) == []
    busy = {**quiet, "model": 2, "round": 4, "accepted": 3, "rejected": 1, "models": 1, "rounds": 1,
            "declined": {"round": 5, "reason": "resources", "detail": "battery at 12%"}}
    assert progress_lines(quiet, busy) == [
        "model v2 adopted", "round 4: trained, update stored and sent",
        "3 update(s) accepted by the hub (3 accepted in all)", "1 update(s) rejected by the hub (3 accepted in all)",
        "round 5 declined: resources (battery at 12%)"]
    assert progress_lines(busy, busy) == []
    fast = {**busy, "model": 5, "round": 7, "models": 4, "rounds": 3, "declined": busy["declined"]}
    assert progress_lines(busy, fast)[:2] == ["model v5 adopted (3 models since the last line)",
                                              "round 7: trained, update stored and sent (2 rounds since the last line)"]
