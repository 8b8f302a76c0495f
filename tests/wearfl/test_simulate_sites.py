"""``wearfl simulate --sites K``: a federation of sites on one machine.

* One run end to end (slow): 6 edges over 2 site hubs, each on a Mosquitto of its own, under the
  consortium hub on a third; the report's ``tiers``, the rounds, and ``wearfl status`` of a site and of
  the consortium.
* Bad ``--sites`` input is one ``error:`` line and exit 2 before anything starts: no folder, no broker.
* :func:`wearfl.sites.plan_sites`: contiguous, near-equal shares named ``site-1`` .. ``site-K``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import mosquittos_under
from provisioned import needs_mosquitto

from models.errors import ConfigError
from wearfl.cli import main
from wearfl.sites import plan_sites

ROOT = Path(__file__).resolve().parents[2]
HANG_GUARD_S = 120.0
SITES = ("site-1", "site-2")


# -- one run: 6 edges over 2 sites, 2 rounds ----------------------------------------------------------


def status_of(state: Path, *flags: str) -> str:
    """``wearfl status --state STATE FLAGS``'s stdout (exit 0 asserted)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["status", "--state", str(state), *flags]) == 0
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sites_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """(the run's --out folder, its report) of ``wearfl simulate --clients 6 --sites 2 --rounds 2``."""
    needs_mosquitto()
    out = tmp_path_factory.mktemp("sites") / "run"
    started = time.monotonic()
    code = main(["simulate", "--clients", "6", "--sites", "2", "--rounds", "2", "--seed", "1", "--out", str(out)])
    print(f"simulate --sites 2 took {time.monotonic() - started:.1f} s", file=sys.stderr)
    assert code == 0
    return out, json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_the_report_counts_each_tier(sites_run):
    _, report = sites_run
    assert report["sites"] == 2 and report["clients"] == 6
    consortium, sites = report["tiers"]["consortium"], report["tiers"]["sites"]
    assert (consortium["clients"], consortium["updates_per_round"]) == (2, 2)
    assert (sites["clients"], sites["updates_per_round"]) == (6, 6)
    assert set(sites["per_site"]) == set(SITES)
    for site in SITES:
        assert sites["per_site"][site]["clients"] == 3
        assert sites["per_site"][site]["updates_accepted"] == 2 * 3  # 2 rounds x 3 edges
        assert sites["per_site"][site]["bytes_up"] > 0
    assert sum(s["bytes_up"] for s in sites["per_site"].values()) == sites["bytes_up"]
    # the consortium link carries one partial per site a round, not one update per edge
    assert 0 < consortium["bytes_up_per_round"] < sites["bytes_up_per_round"]
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert all(r["updates_accepted"] == 2 for r in report["rounds"])  # the consortium's rounds: one per site
    assert consortium["bytes_up"] == sum(r["bytes_up"] for r in report["rounds"])


@pytest.mark.slow
def test_a_site_hub_reports_its_edges_and_its_acknowledged_partial(sites_run):
    out, _ = sites_run
    status = json.loads(status_of(out / "sites" / "site-1", "--json"))
    assert len(status["clients"]) == 3
    assert status["updates_accepted"] == 6 == sum(c["accepted"] for c in status["clients"].values())
    upstream = status["upstream"]
    assert upstream["site"] == "site-1"
    assert upstream["consortium_version"] == 2
    assert upstream["partial"]["state"] == "acknowledged"

    text = status_of(out / "sites" / "site-1")
    (line,) = [line for line in text.splitlines() if line.startswith("upstream")]
    assert "site site-1" in line and "acknowledged" in line, text


@pytest.mark.slow
def test_the_consortium_hub_lists_its_sites(sites_run):
    out, _ = sites_run
    status = json.loads(status_of(out / "hub", "--json"))
    assert status["sites"] == list(SITES)
    assert set(status["clients"]) == set(SITES)
    assert "sites               2" in status_of(out / "hub")


# -- bad input: one line, exit 2, nothing started ---------------------------------------------------


@pytest.fixture
def leftovers(tmp_path) -> Iterator[None]:
    """Skip where a leftover broker cannot be found; end (by PID) any broker a failing test left running."""
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("finding a leftover broker needs /proc")
    needs_mosquitto()  # the embedded broker has no process to leak
    yield
    for pid in mosquittos_under(tmp_path):
        os.kill(pid, signal.SIGTERM)


def simulate_process(cwd: Path, *argv: str) -> tuple[int, str]:
    """(exit code, stderr) of ``python -m wearfl simulate ARGV``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
    proc = subprocess.run([sys.executable, "-m", "wearfl", "simulate", *argv], cwd=cwd, env=env, text=True,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=HANG_GUARD_S)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize(("argv", "says"), [
    (("--sites", "3", "--clients", "2"), "--sites 3: give 1 to 2 sites"),
    (("--sites", "-1", "--clients", "2"), "--sites -1"),
    (("--sites", "2", "--clients", "2", "--broker", "mqtt://127.0.0.1:1"), "--broker"),
    (("--sites", "2", "--clients", "4", "--secure-aggregation"), "at least 3 edges in each site"),
    (("--sites", "2", "--clients", "6", "--strategy", "krum", "--strategy-arg", "f=1"), "give more --sites"),
    (("--clients", "2", "--secure-aggregation"), "give more --clients"),
], ids=["more-sites-than-edges", "negative", "with-broker", "secure-sites-too-small", "rule-needs-more-sites",
        "secure-flat-too-small"])
def test_bad_sites_is_one_error_line_before_any_broker_or_folder(leftovers, tmp_path, argv, says):
    out = tmp_path / "run"
    code, stderr = simulate_process(tmp_path, "--out", str(out), "--rounds", "1", *argv)
    assert code == 2, stderr
    assert stderr.splitlines() == [stderr.strip()] and stderr.startswith("error: "), stderr
    assert says in stderr and "Traceback" not in stderr, stderr
    assert not out.exists()
    assert mosquittos_under(tmp_path) == []


# -- plan_sites ---------------------------------------------------------------------------------------


def test_plan_sites_splits_the_edges_into_contiguous_equal_shares_in_order():
    clients = [f"edge-{i:02d}" for i in range(21)]
    plan = plan_sites(3, clients)
    assert list(plan) == ["site-1", "site-2", "site-3"]
    assert plan == {"site-1": clients[0:7], "site-2": clients[7:14], "site-3": clients[14:21]}
    assert [c for share in plan.values() for c in share] == clients
    assert all(type(c) is str for share in plan.values() for c in share)


def test_plan_sites_gives_the_first_sites_the_remainder():
    clients = ["g", "a", "f", "b", "e", "c", "d"]  # not sorted: the order given is kept
    plan = plan_sites(3, clients)
    assert [len(share) for share in plan.values()] == [3, 2, 2]
    assert plan == {"site-1": ["g", "a", "f"], "site-2": ["b", "e"], "site-3": ["c", "d"]}


@pytest.mark.parametrize("k", [0, 4, -1])
def test_plan_sites_needs_one_to_len_clients_sites(k):
    with pytest.raises(ConfigError, match=rf"--sites {k}: give 1 to 3 sites"):
        plan_sites(k, ["a", "b", "c"])
