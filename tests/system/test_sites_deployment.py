"""docs/sites.md's "Deploying it", run as written: a consortium and one site, each provisioned by `wearfl keys`.

The commands are read from the section's code block (so the test breaks when the docs change without the
deployment still working) and run as CLI processes: on a "consortium host" folder the consortium's keys, its
site's folder, its broker config and its hub; on a "site host" folder the site's keys from the copied site
folder, two gateways' keys, the site's broker config, the site hub and the gateways. Each broker is a real
Mosquitto on the config `wearfl keys broker-config` wrote. What differs from the docs: the host names (the
loopback address, also in the broker certificates), the ports (free ones), the broker config folders
(temporary ones), `--user root` when run as root (pytest's folders are closed to the mosquitto account),
simulated wearers as the gateways' sources, a second gateway, `--rounds 2` so the consortium ends, and the
edge's `--state`, which the docs' edge command lacks although `wearfl edge` requires it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hub_process import end_process
from provisioned import needs_mosquitto

from wearfl.broker import MosquittoBroker, free_port

pytestmark = pytest.mark.slow  # the quick loop is `pytest -m "not slow"`

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Deploying it"
LOOPBACK = "127.0.0.1"
ROUNDS = 2
GATEWAYS = {"gw-01": "sim:0/wearer-01", "gw-02": "sim:0/wearer-02"}
RUN_S = 480.0  # bound on the consortium's two rounds (about 10 s when idle; a 2-core machine may be busy)
SETTLE_S = 60.0  # bound on what follows the consortium's end: the last receipt, the final model's way down


def deploying_commands() -> list[list[str]]:
    """The section's first code block: one argv per command, continuation lines joined, comments dropped."""
    text = (ROOT / "docs" / "sites.md").read_text(encoding="utf-8")
    block = re.search(re.escape(SECTION) + r"\n.*?```bash\n(.*?)```", text, re.S)
    assert block, f"docs/sites.md has no bash block under {SECTION!r}"
    joined = block.group(1).replace("\\\n", " ")
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def option(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} is not in {shlex.join(argv)}"
    return argv[argv.index(flag) + 1]


def with_option(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value replaced, or ``flag value`` appended when it has none."""
    if flag not in argv:
        return [*argv, flag, value]
    i = argv.index(flag)
    return [*argv[:i + 1], value, *argv[i + 2:]]


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def test_the_documented_site_deployment_runs_two_consortium_rounds(tmp_path):
    needs_mosquitto()
    commands = deploying_commands()
    assert [c[:3] if c[1] == "keys" else c[:2] for c in commands] == [
        ["wearfl", "keys", "init"], ["wearfl", "keys", "add-site"], ["wearfl", "keys", "broker-config"],
        ["wearfl", "hub"],
        ["wearfl", "keys", "init"], ["wearfl", "keys", "add-device"], ["wearfl", "keys", "broker-config"],
        ["wearfl", "hub"],
        ["wearfl", "edge"]], commands
    (c_init, c_add_site, c_broker_config, c_hub, s_init, s_add_device, s_broker_config, s_hub, edge) = commands

    consortium_host, site_host = tmp_path / "consortium-host", tmp_path / "site-a-host"
    consortium_host.mkdir()
    site_host.mkdir()
    ports = {"consortium.example.org": free_port(), "site-a.example.org": free_port()}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def concrete(argv: list[str]) -> list[str]:
        """Host names and ports of the docs made loopback ones, the hostname in the certificate too."""
        out = list(argv)
        for name, port in ports.items():
            out = [a.replace(f"{name}:8883", f"{LOOPBACK}:{port}") for a in out]
        if "--hostname" in out:
            out = with_option(out, "--hostname", LOOPBACK)
        assert out[0] == "wearfl", out
        return [sys.executable, "-m", "wearfl", *out[1:]]

    def broker_config(argv: list[str], host: Path, name: str) -> list[str]:
        """The docs' `keys broker-config` with the port, a temporary --out, loopback and (as root) --user root."""
        assert option(argv, "--out") == "/etc/mosquitto/wearfl" and option(argv, "--hostname") == name, argv
        out = with_option(with_option(argv, "--out", str(host / "mosquitto")), "--port", str(ports[name]))
        out = with_option(out, "--bind", LOOPBACK)
        return with_option(out, "--user", "root") if running_as_root() else out

    def run(argv: list[str], host: Path) -> str:
        done = subprocess.run(concrete(argv), cwd=host, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{shlex.join(argv)} failed ({done.returncode}):\n{done.stderr}{done.stdout}"
        return done.stdout

    def status(host: Path, state: str, *, as_json: bool = True) -> Any:
        done = subprocess.run([sys.executable, "-m", "wearfl", "status", "--state", state,
                               *(["--json"] if as_json else [])], cwd=host, env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout) if as_json else done.stdout

    brokers: list[MosquittoBroker] = []
    started: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def start_broker(host: Path, name: str) -> None:
        folder = host / "mosquitto"
        brokers.append(MosquittoBroker(ports[name], config_file=folder / "mosquitto.conf", workdir=folder))
        brokers[-1].start()

    def start(name: str, argv: list[str], host: Path) -> subprocess.Popen[bytes]:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(concrete(argv), cwd=host, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT)
        started[name] = (process, log)
        return process

    def logs() -> str:
        return "\n".join(f"--- {name} (exit {p.poll()}):\n{log.read_text(errors='replace')[-2500:]}"
                         for name, (p, log) in started.items())

    try:
        # on the consortium
        run(c_init, consortium_host)
        run(c_add_site, consortium_host)
        site_folder = consortium_host / "consortium" / "keys" / "sites" / "site-a"
        assert site_folder.is_dir(), "add-site's comment in the docs names consortium/keys/sites/site-a/"
        run(broker_config(c_broker_config, consortium_host, "consortium.example.org"), consortium_host)
        start_broker(consortium_host, "consortium.example.org")
        consortium = start("consortium-hub", [*c_hub, "--rounds", str(ROUNDS), "--round-timeout", "90",
                                              "--min-clients", "1"], consortium_host)

        # on site A, with the folder site-a/ copied from the consortium
        shutil.copytree(site_folder, site_host / "site-a")
        run(s_init, site_host)
        assert option(s_add_device, "--state") == "site" and "gw-01" in s_add_device
        for gateway in GATEWAYS:  # the docs enrol gw-01; a second gateway the same way
            run([gateway if a == "gw-01" else a for a in s_add_device], site_host)
        run(broker_config(s_broker_config, site_host, "site-a.example.org"), site_host)
        start_broker(site_host, "site-a.example.org")
        site_hub = start("site-hub", [*s_hub, "--min-clients", "2"], site_host)

        # on each gateway of site A (its credentials where the docs' command finds them, on the site host)
        assert option(edge, "--credentials") == "site/keys/devices/gw-01", edge
        edges = []
        for gateway, source in GATEWAYS.items():
            argv = with_option([a.replace("gw-01", gateway) for a in edge], "--source", source)
            # each gateway its own state folder (the docs' is a path on the gateway)
            edges.append(start(gateway, with_option(argv, "--state", f"edge-{gateway}"), site_host))

        deadline = time.monotonic() + RUN_S
        while consortium.poll() is None:
            for name in ("site-hub", *GATEWAYS):
                if started[name][0].poll() is not None:
                    pytest.fail(f"{name} exited while the consortium ran its rounds:\n{logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the consortium hub did not finish {ROUNDS} rounds in {RUN_S:.0f} s:\n{logs()}")
            time.sleep(0.5)
        assert consortium.returncode == 0, logs()

        top = status(consortium_host, "consortium")
        assert top["rounds_completed"] == ROUNDS and top["model_version"] == ROUNDS, top
        assert {c: info["accepted"] for c, info in top["clients"].items()} == {"site-a": ROUNDS}, top["clients"]
        assert top["sites"] == ["site-a"]
        assert top["updates_accepted"] == ROUNDS

        deadline = time.monotonic() + SETTLE_S  # the consortium's last receipt reaches the site hub
        while True:
            site = status(site_host, "site")
            upstream = site["upstream"] or {}
            if upstream.get("consortium_version") == ROUNDS and (upstream.get("partial") or {}).get(
                    "state") == "acknowledged":
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the site's upstream never showed model v{ROUNDS} and its partial acknowledged: "
                            f"{upstream}\n{logs()}")
            time.sleep(0.5)
        accepted = {c: info["accepted"] for c, info in site["clients"].items()}
        assert accepted == dict.fromkeys(GATEWAYS, ROUNDS), site["clients"]
        assert site["updates_accepted"] == 2 * ROUNDS == sum(accepted.values())
        assert site["rounds_completed"] == ROUNDS
        assert upstream["site"] == "site-a" and upstream["partial"]["round"] == ROUNDS, upstream
        # what the docs say `wearfl status` shows an operator at either tier
        assert f"partial of round {ROUNDS} acknowledged" in status(site_host, "site", as_json=False)
        assert "sites               1 " in status(consortium_host, "consortium", as_json=False)

        deadline = time.monotonic() + SETTLE_S  # the gateways take the consortium's final model
        for gateway in GATEWAYS:
            while f"model v{ROUNDS} adopted" not in started[gateway][1].read_text(errors="replace"):
                if time.monotonic() > deadline:
                    pytest.fail(f"{gateway} never adopted model v{ROUNDS}:\n{logs()}")
                time.sleep(0.5)

        for process in (*edges, site_hub):  # a gateway and a site hub run until told to stop, and stop cleanly
            process.send_signal(signal.SIGTERM)
        for name, process in (*zip(GATEWAYS, edges, strict=True), ("site-hub", site_hub)):
            assert process.wait(timeout=60) == 0, f"{name} did not stop cleanly on SIGTERM:\n{logs()}"
    finally:
        for process, _ in reversed(started.values()):
            end_process(process)
        for broker in reversed(brokers):
            broker.stop()
