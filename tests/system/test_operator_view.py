"""The hub's operator view, served by a real `wearfl hub --http` with real edges through Mosquitto.

``/metrics`` parses with prometheus_client's own parser and its counters equal ``/api/status``
and ``wearfl status --json`` read at the same moment (the edges stopped, so nothing moves); the
dashboard loads in a real headless Chromium without console errors, draws its charts, and shows
the numbers of ``/api/status``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families
from web_client import http_get as get

from wearfl.broker import free_port

pytestmark = pytest.mark.slow  # the quick loop is `pytest -m "not slow"`

EDGES = ("wearer-01", "wearer-02")
WEARFL = [sys.executable, "-m", "wearfl"]


def wait_for(predicate, timeout: float, message) -> None:
    """Poll ``predicate`` until true; AssertionError with ``message`` after ``timeout`` s (a wait, not a timing)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(0.2)




def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A hub with --http (no --rounds), two edges until 3 rounds closed, then the edges stopped."""
    from wearfl.broker import MosquittoBroker, mosquitto_binary

    if mosquitto_binary() is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but mosquitto is not installed: `apt-get install -y mosquitto` (see .ci/run).")
        pytest.skip("needs the mosquitto binary (apt-get install mosquitto)")
    tmp = tmp_path_factory.mktemp("operator")
    name = f"ops-{uuid.uuid4().hex[:8]}"
    port = free_port()
    with MosquittoBroker(workdir=tmp / "mosquitto") as broker:
        hub_log = (tmp / "hub.log").open("w")
        (tmp / "hub.toml").write_text("[task_config]\nadapt = true\n")  # the edges report adapted figures too
        hub = subprocess.Popen([*WEARFL, "-v", "hub", "--broker", broker.url, "--federation", name, "--state",
                                str(tmp / "hub"), "--config", str(tmp / "hub.toml"), "--task", "heart-rate",
                                "--min-clients", "2",
                                "--clients-per-round", "2", "--round-timeout", "60", "--http", f"127.0.0.1:{port}"],
                               stdout=hub_log, stderr=subprocess.STDOUT)
        edge_port = free_port()
        edges = [subprocess.Popen([*WEARFL, "edge", "--broker", broker.url, "--federation", name, "--source",
                                   f"sim:0/{client}", "--state", str(tmp / client),
                                   *(["--http", f"127.0.0.1:{edge_port}"] if client == EDGES[0] else [])],
                                  stdout=(tmp / f"{client}.log").open("w"), stderr=subprocess.STDOUT)
                 for client in EDGES]
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: hub.poll() is not None or _rounds(base) >= 3, 180,
                     lambda: "3 rounds: " + (tmp / "hub.log").read_text()[-3000:])
            assert hub.poll() is None, (tmp / "hub.log").read_text()[-3000:]
            def edge_heard_three_receipts() -> bool:  # the third receipt may still be on its way to the edge
                nonlocal edge_metrics
                code, edge_metrics = get(f"http://127.0.0.1:{edge_port}/metrics")
                assert code == 200
                return _samples(edge_metrics.decode()).get(
                    ("wearfl_edge_receipts_total", (("status", "accepted"),)), 0) >= 3

            edge_metrics = b""
            wait_for(edge_heard_three_receipts, 30, lambda: "3 receipts at the edge:\n" + edge_metrics.decode()[-3000:])
            for edge in edges:
                edge.send_signal(signal.SIGTERM)
                assert edge.wait(timeout=60) == 0
            wait_for(lambda: json.loads(get(base + "/api/dashboard")[1])["live"]["online"] == [], 30,
                     "the edges' offline status")
            yield base, tmp / "hub", edge_metrics.decode()
        finally:
            for process in (*edges, hub):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    try:
                        process.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
            hub_log.close()


def _rounds(base: str) -> int:
    try:
        code, body = get(base + "/api/status")
    except OSError:
        return 0
    return json.loads(body)["rounds_completed"] if code == 200 else 0


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_parse_and_equal_the_status_at_the_same_moment(federation):
    base, state, _ = federation
    code, metrics = get(base + "/metrics")
    assert code == 200
    _, api = get(base + "/api/status")
    cli = subprocess.run([*WEARFL, "status", "--state", str(state), "--json"], capture_output=True, text=True,
                         timeout=60)
    assert cli.returncode == 0, cli.stderr
    status = json.loads(api)
    assert status == json.loads(cli.stdout)  # /api/status is exactly `wearfl status --json`
    samples = _samples(metrics.decode())
    assert samples[("wearfl_rounds_completed_total", ())] == status["rounds_completed"] >= 3
    assert samples[("wearfl_updates_accepted_total", ())] == status["updates_accepted"] == sum(
        c["accepted"] for c in status["clients"].values())
    assert status["updates_accepted"] >= 2 * status["rounds_completed"]  # the open round may hold some too
    for reason, n in status["updates_rejected"].items():
        assert samples[("wearfl_updates_rejected_total", (("reason", reason),))] == n
    assert samples[("wearfl_model_version", ())] == status["model_version"]
    assert samples[("wearfl_clients_online", ())] == 0
    assert samples[("wearfl_round_duration_seconds_count", ())] == status["rounds_completed"]
    assert samples[("wearfl_update_bytes_total", ())] > 0
    evaluated = status["global_metrics"]["metrics"]
    assert samples[("wearfl_global_metric", (("metric", "mae_bpm"),))] == pytest.approx(evaluated["mae_bpm"])
    assert not any(name.startswith("wearfl_privacy") for name, _ in samples)  # DP is off
    assert not any("client" in dict(labels) for _, labels in samples)  # no per-client series


def test_the_view_is_read_only_and_names_what_it_serves(federation):
    base, _, _ = federation
    request = urllib.request.Request(base + "/api/status", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 405
    code, body = get(base + "/nothing")
    assert code == 404 and b"/metrics" in body


def test_a_gateway_serves_its_own_metrics(federation):
    _, _, text = federation
    samples = _samples(text)
    trained = samples[("wearfl_edge_rounds_trained_total", ())]
    assert trained >= 3
    assert samples[("wearfl_edge_receipts_total", (("status", "accepted"),))] >= 3
    assert samples[("wearfl_edge_training_seconds_total", ())] > 0
    assert samples[("wearfl_edge_inference_seconds_count", ())] > 0
    assert samples[("wearfl_edge_outbox_updates", ())] >= 0
    assert samples[("wearfl_edge_model_version", ())] >= 3


def test_a_hub_refuses_to_serve_beyond_loopback_without_a_token(tmp_path):
    done = subprocess.run([*WEARFL, "hub", "--broker", "mqtt://127.0.0.1:1", "--federation", "f", "--state",
                           str(tmp_path / "hub"), "--task", "activity", "--http", "0.0.0.0:9100"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--http-token" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(chromium() is None and os.environ.get("CI", "").lower() != "true",
                    reason="needs Chromium (apt-get install chromium)")
def test_the_dashboard_draws_in_headless_chromium_and_shows_the_status(federation, tmp_path):
    base, _, _ = federation
    browser = chromium()
    assert browser is not None, "CI=true but Chromium is not installed: apt-get install -y chromium (see .ci/run)"
    _, api = get(base + "/api/status")
    status = json.loads(api)
    argv = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=8000", "--window-size=1280,1100"]
    dom = subprocess.run([*argv, "--dump-dom", base + "/"], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-3000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console  # no console errors (or messages of any kind)
    html = dom.stdout
    assert f'data-rendered="{status["rounds_completed"]}"' in html
    tile = re.search(r'id="updates-accepted">([^<]*)<', html)
    assert tile and tile.group(1) == str(status["updates_accepted"])
    assert re.search(r'id="model-version">([^<]*)<', html).group(1) == str(status["model_version"])
    for chart in ("chart-metric", "chart-spread", "chart-participation", "chart-bytes"):
        svg = re.search(rf'<svg id="{chart}"[^>]*>(.*?)</svg>', html, re.S)
        assert svg and re.search(r"<(polyline|circle|rect)\b", svg.group(1)), chart
    for client in EDGES:
        assert f"<td>{client}</td>" in html
    spread = re.search(r'<svg id="chart-spread"[^>]*>(.*?)</svg>', html, re.S).group(1)
    # a heart-rate gateway never adapts (its last statistics carry the BPM level): the tooltip says so
    assert "adapted (green)" in spread and re.search(
        r"<title>[^<]* adapted [0-9.]+ \(not adapted: the gateway's checks kept the global model\)</title>", spread)
    shot = tmp_path / "dashboard.png"
    done = subprocess.run([*argv, f"--screenshot={shot}", base + "/"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.stat().st_size > 10_000
    if os.environ.get("WEARFL_DASHBOARD_SHOT"):
        shutil.copy(shot, os.environ["WEARFL_DASHBOARD_SHOT"])
