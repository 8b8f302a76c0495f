"""A federation of sites through three real Mosquitto brokers: two site hubs under a consortium hub."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sqlite3
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import waiting
from hub_process import WAIT_S, HubProcess
from provisioned import needs_mosquitto

from edge_client.evaluation import task_spec
from edge_client.finetune import FineTunePolicy
from edge_client.runtime import EdgeClient, EdgeConfig, run_edges
from edge_client.sources.simulator import SimulatedDataset
from hub.service import HubConfig, HubService
from hub.store import HubStore
from models import Model, TrainConfig
from models.package import save_package
from models.protocol.identity import load_or_create_key, public_hex
from models.protocol.messages import Grant, build_model
from models.protocol.topics import Topics
from models.transport.mqtt import BrokerAddress, MqttSession
from wearfl.broker import MosquittoBroker, free_port, mosquitto_config

pytestmark = pytest.mark.slow

DATASET = SimulatedDataset(seed=5, wearers=6, minutes=3, test_wearers=1)
SITES = {"site-a": DATASET.train_clients[:2], "site-b": DATASET.train_clients[2:4]}
GROWN = DATASET.grown(6)
SITES_OF_THREE = {"site-a": GROWN.train_clients[:3], "site-b": GROWN.train_clients[3:6]}
"""Secure rounds need three clients: pairwise masks hide each among at least two others."""


def provision(tmp_path: Path, federation: str) -> str:
    """Site keys in the consortium's keyring, each site's grant in its state folder; the consortium's key."""
    consortium = load_or_create_key(tmp_path / "consortium" / "keys" / "hub.key")
    lines = []
    for site in SITES:
        key = load_or_create_key(tmp_path / site / "keys" / "hub.key")
        lines.append(f"{site} {public_hex(key)}\n")
        grant = Grant(federation, site, public_hex(key)).signed(consortium)
        (tmp_path / site / "upstream").mkdir(parents=True)
        (tmp_path / site / "upstream" / "grant.json").write_bytes(grant.to_bytes())
    (tmp_path / "sites.keyring").write_text("".join(lines))
    return public_hex(consortium)


async def forge_a_model(tmp_path: Path, broker: MosquittoBroker, federation: str) -> None:
    """Publish, retained on a site's broker, a newer model that the site hub's own key signed."""
    site_key = load_or_create_key(tmp_path / "site-a" / "keys" / "hub.key")
    forged = build_model(Model(task_spec("activity", DATASET), seed=9, version=99), 99, site_key, None, federation)
    session = MqttSession(BrokerAddress.parse(broker.url), "forger")
    await session.connect()
    await session.publish(Topics(federation).model, forged, qos=1, retain=True)
    await session.disconnect()
    await asyncio.sleep(1.5)


async def federate(tmp_path: Path, brokers: dict[str, MosquittoBroker], rounds: int, forge: bool = False,
                   federation: str | None = None, consortium_pub: str | None = None,
                   upstream: dict[str, tuple[str, str]] | None = None, secure: bool = False,
                   sites: dict[str, list[str]] | None = None) -> tuple[dict[str, HubService], list[EdgeClient]]:
    """Run the consortium for ``rounds`` rounds with both sites; ``upstream``: a site's own way to the consortium
    (broker URL, topic prefix) instead of the consortium's broker; ``secure``: SecAgg+ rounds inside each site;
    ``sites``: each site's gateways (default :data:`SITES`)."""
    sites = sites or SITES
    if federation is None:
        federation = f"sites-{uuid.uuid4().hex[:8]}"
        consortium_pub = provision(tmp_path, federation)
    spec = task_spec("activity", DATASET)
    hubs = {"consortium": HubService(
        HubConfig(broker=brokers["consortium"].url, federation=federation, state_dir=tmp_path / "consortium",
                  min_clients=2, clients_per_round=2, round_timeout_s=60, rounds=rounds,
                  keyring=tmp_path / "sites.keyring", task_config={"epochs": 1, "lr": 3e-3}),
        initial_model=Model(spec, seed=0))}
    edges = []
    policy = FineTunePolicy(TrainConfig(), min_new_windows=0)
    keyring = None
    if secure:  # the gateways' keys, which a secure round's pairwise masks need
        keyring = tmp_path / "gateways.keyring"
        keyring.write_text("".join(
            f"{c} {public_hex(load_or_create_key(tmp_path / 'edges' / c / 'device.key'))}\n"
            for clients in sites.values() for c in clients))
    for site, clients in sites.items():
        url, prefix = (upstream or {}).get(site, (brokers["consortium"].url, None))
        hubs[site] = HubService(HubConfig(
            broker=brokers[site].url, federation=federation, state_dir=tmp_path / site, min_clients=len(clients),
            round_timeout_s=60, upstream=url, upstream_topic_prefix=prefix, site_id=site, keyring=keyring,
            secure_aggregation=secure))
        for i, client in enumerate(clients):
            edges.append(EdgeClient(EdgeConfig(
                broker=brokers[site].url, federation=federation, client_id=client,
                state_dir=tmp_path / "edges" / client, policy=policy, seed=i, hub_key=consortium_pub,
                peer_keyring=keyring),
                GROWN.source(client)))
    stop = asyncio.Event()
    running = [asyncio.create_task(hubs[site].run(stop)) for site in sites]
    running.append(asyncio.create_task(run_edges(edges, stop)))
    try:
        await asyncio.wait_for(hubs["consortium"].run(), 240)
        await asyncio.sleep(1.0)  # the sites take the final model
        if forge:
            await forge_a_model(tmp_path, brokers["site-a"], federation)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*running), 60)
    return hubs, edges


def gated_edge(tmp_path: Path, url: str, federation: str, consortium_pub: str, client: str,
               gate: Callable[[str, int], Awaitable[None]]) -> EdgeClient:
    """A gateway pinning the consortium's key whose update of each round waits for ``gate(client, round)``."""
    edge = EdgeClient(EdgeConfig(
        broker=url, federation=federation, client_id=client, state_dir=tmp_path / "edges" / client,
        policy=FineTunePolicy(TrainConfig(), min_new_windows=0), seed=0, hub_key=consortium_pub),
        DATASET.source(client))

    async def hook(round_number: int, base: Any, weights: Any) -> Any:
        await gate(client, round_number)
        return weights

    edge.weights_hook = hook
    return edge


@pytest.fixture
def brokers(tmp_path):
    needs_mosquitto()
    started = {name: MosquittoBroker(workdir=tmp_path / f"mosquitto-{name}") for name in ("consortium", *SITES)}
    for broker in started.values():
        broker.start()
    yield started
    for broker in started.values():
        broker.stop()


def test_two_sites_run_three_consortium_rounds_and_gateways_refuse_a_model_the_site_forged(tmp_path, brokers):
    hubs, edges = asyncio.run(federate(tmp_path, brokers, rounds=3, forge=True))
    consortium = hubs["consortium"].status()
    assert consortium["rounds_completed"] == 3
    assert consortium["updates_accepted"] == 6 == sum(c["accepted"] for c in consortium["clients"].values())
    assert set(consortium["clients"]) == set(SITES)
    for site in SITES:
        status = hubs[site].status()
        assert status["updates_accepted"] == 6 == sum(c["accepted"] for c in status["clients"].values())
        assert status["upstream"]["consortium_version"] == consortium["model_version"] == 3
        assert status["upstream"]["partial"]["state"] == "acknowledged"
    site_a = [e for e in edges if e.client_id in SITES["site-a"]]
    assert all(e.model_version == 3 and e.counters["models_refused"] >= 1 for e in site_a)  # not v99


# -- a site hub SIGKILLed mid-round ------------------------------------------------------------------


def stored(state: Path, key: str | None = None) -> Any:
    """A running site hub's stored updates (or its kv ``key``), read-only."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{state / 'hub.db'}?mode=ro", uri=True, timeout=5)) as db:
            if key is None:
                return db.execute("SELECT COUNT(*) FROM updates").fetchone()[0]
            row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    except sqlite3.Error:
        return None
    return None if row is None else json.loads(row[0])


@pytest.mark.parametrize("kill_at", ["some_stored", "partial_stored"])
def test_a_site_hub_killed_mid_round_loses_and_double_counts_nothing(tmp_path, brokers, monkeypatch, kill_at):
    """Round 2 of 3: ``some_stored``: one gateway's update is stored at site A when its hub dies;
    ``partial_stored``: site A's partial is in its outbox, not yet published. The restarted site hub
    finishes; every hub counts each update once and every site follows the consortium to v3."""
    federation = f"sites-{uuid.uuid4().hex[:8]}"
    consortium_pub = provision(tmp_path, federation)
    until = functools.partial(waiting.until, timeout=WAIT_S)
    site_a = HubProcess(tmp_path / "site-a", [
        "--broker", brokers["site-a"].url, "--federation", federation, "--upstream", brokers["consortium"].url,
        "--site-id", "site-a", "--min-clients", "2", "--round-timeout", "300"])
    monkeypatch.setenv("WEARFL_TEST_PAUSE_ROUND", "2")
    gates: defaultdict[tuple[str, int], asyncio.Event] = defaultdict(asyncio.Event)
    held: defaultdict[tuple[str, int], asyncio.Event] = defaultdict(asyncio.Event)
    a0, a1 = SITES["site-a"]

    async def gate(client: str, round_number: int) -> None:
        held[client, round_number].set()
        if client in SITES["site-a"] and round_number == 2:
            await gates[client, round_number].wait()


    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        consortium = HubService(HubConfig(
            broker=brokers["consortium"].url, federation=federation, state_dir=tmp_path / "consortium",
            min_clients=2, clients_per_round=2, round_timeout_s=300, rounds=3, keyring=tmp_path / "sites.keyring",
            task_config={"epochs": 1, "lr": 3e-3}), initial_model=Model(task_spec("activity", DATASET), seed=0))
        site_b = HubService(HubConfig(broker=brokers["site-b"].url, federation=federation,
                                      state_dir=tmp_path / "site-b", min_clients=2, round_timeout_s=300,
                                      upstream=brokers["consortium"].url, site_id="site-b"))
        edges = [gated_edge(tmp_path, brokers[site].url, federation, consortium_pub, c, gate)
                 for site, clients in SITES.items() for c in clients]
        stop = asyncio.Event()
        running = [asyncio.create_task(site_b.run(stop)), asyncio.create_task(run_edges(edges, stop))]
        consortium_run = asyncio.create_task(consortium.run())
        try:
            site_a.start("partial_stored" if kill_at == "partial_stored" else None)
            await until(lambda: site_a.alive() and held[a0, 2].is_set() and held[a1, 2].is_set(),
                        "site A's gateways to train round 2")
            if kill_at == "some_stored":
                gates[a0, 2].set()
                await until(lambda: site_a.alive() and stored(site_a.state) == 3, "gateway a0's round-2 update")
                site_a.kill()
                gates[a1, 2].set()
            else:
                gates[a0, 2].set()
                gates[a1, 2].set()
                await until(lambda: site_a.alive() and site_a.mark.exists(), "site A's partial in its outbox")
                site_a.kill()
            site_a.start()
            await asyncio.wait_for(consortium_run, 240)
            await until(lambda: all(e.model_version == 3 for e in edges), "every gateway to adopt v3")
            await until(lambda: (stored(site_a.state, "upstream") or {}).get("consortium_version") == 3,
                        "site A to take v3")
        finally:
            stop.set()
            site_a.stop()
            await asyncio.wait_for(asyncio.gather(*running), 60)
        return consortium.status(), site_b.status()

    consortium, site_b = asyncio.run(scenario())
    assert consortium["rounds_completed"] == 3
    assert consortium["updates_accepted"] == 6 == sum(c["accepted"] for c in consortium["clients"].values())
    assert {c: v["accepted"] for c, v in consortium["clients"].items()} == {"site-a": 3, "site-b": 3}
    with HubStore(site_a.state, create=False) as store:
        a = store.status()
    for status in (a, site_b):
        assert status["updates_accepted"] == 6 == sum(c["accepted"] for c in status["clients"].values())
        assert all(c["accepted"] == 3 for c in status["clients"].values())
        assert status["upstream"]["consortium_version"] == 3
    assert a["rounds_completed"] == 3


# -- a Mosquitto bridge instead of the site hub's own session to the consortium ------------------------


def bridged_config(port: int, consortium: MosquittoBroker, federation: str, site: str) -> str:
    """Site A's broker: its own listener, and a bridge that maps the consortium's topics for this site
    under the local prefix ``consortium/`` (as docs/sites.md shows)."""
    local, remote = f"consortium/wearfl/v1/{federation}/", f"wearfl/v1/{federation}/"
    topics = [f"topic {t} in 1 {local} {remote}" for t in ("model", "task", f"receipt/{site}")]
    topics += [f"topic {t}/{site} out 1 {local} {remote}" for t in ("update", "status", "metrics")]
    return "\n".join([
        mosquitto_config(port).strip(), "",
        "connection consortium", f"address {consortium.host}:{consortium.port}", f"remote_clientid bridge-{site}",
        "cleansession false", "bridge_protocol_version mqttv50", *topics, "",
    ])


def test_a_site_hub_reaches_the_consortium_through_a_mosquitto_bridge(tmp_path, brokers):
    """Site A's hub talks only to its own broker (--upstream-topic-prefix consortium/wearfl/v1); a bridge on
    that broker carries its partials out and the consortium's model, task and receipts in."""
    federation = f"sites-{uuid.uuid4().hex[:8]}"
    consortium_pub = provision(tmp_path, federation)
    brokers["site-a"].stop()
    port = free_port()
    config = tmp_path / "bridged.conf"
    config.write_text(bridged_config(port, brokers["consortium"], federation, "site-a"))
    bridged = MosquittoBroker(port, workdir=tmp_path / "mosquitto-bridged", config_file=config)
    bridged.start()
    try:
        hubs, _ = asyncio.run(federate(tmp_path, {**brokers, "site-a": bridged}, rounds=2, federation=federation,
                                       consortium_pub=consortium_pub,
                                       upstream={"site-a": (bridged.url, "consortium/wearfl/v1")}))
    finally:
        bridged.stop()
    consortium = hubs["consortium"].status()
    assert consortium["rounds_completed"] == 2
    assert {c: v["accepted"] for c, v in consortium["clients"].items()} == {"site-a": 2, "site-b": 2}
    status = hubs["site-a"].status()
    assert status["updates_accepted"] == 4 and status["upstream"]["consortium_version"] == 2
    assert status["upstream"]["broker"] == bridged.url


# -- the consortium's hub or broker SIGKILLed mid-round ------------------------------------------------


@pytest.mark.parametrize("kill", ["consortium_hub", "consortium_broker"])
def test_the_consortium_hub_or_broker_killed_mid_round_loses_and_double_counts_nothing(tmp_path, brokers, kill):
    """Round 2 of 3, site B's partial in and site A's still to come: the consortium's hub (a child
    process, SIGKILLed with B's partial stored) or its broker (SIGKILLed without persistence: retained
    messages and sessions gone) dies; A's partial is built meanwhile. After the restart the round
    completes with both partials, each counted once, and the sites follow to v3."""
    federation = f"sites-{uuid.uuid4().hex[:8]}"
    consortium_pub = provision(tmp_path, federation)
    until = functools.partial(waiting.until, timeout=WAIT_S)
    state = tmp_path / "consortium"
    save_package(Model(task_spec("activity", DATASET), seed=0), tmp_path / "initial.safetensors")
    consortium = HubProcess(state, [
        "--broker", brokers["consortium"].url, "--federation", federation, "--keyring", str(tmp_path / "sites.keyring"),
        "--model", str(tmp_path / "initial.safetensors"), "--min-clients", "2", "--clients-per-round", "2",
        "--round-timeout", "300", "--rounds", "3", "--quantize", "int8"])
    gates: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
    held: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def gate(client: str, round_number: int) -> None:
        if client in SITES["site-a"] and round_number == 2:
            held[client].set()
            await gates[client].wait()


    async def scenario() -> dict[str, HubService]:
        sites = {site: HubService(HubConfig(broker=brokers[site].url, federation=federation,
                                            state_dir=tmp_path / site, min_clients=2, round_timeout_s=300,
                                            upstream=brokers["consortium"].url, site_id=site)) for site in SITES}
        edges = [gated_edge(tmp_path, brokers[site].url, federation, consortium_pub, c, gate)
                 for site, clients in SITES.items() for c in clients]
        stop = asyncio.Event()
        running = [asyncio.create_task(hub.run(stop)) for hub in sites.values()]
        running.append(asyncio.create_task(run_edges(edges, stop)))
        try:
            consortium.start()
            await until(lambda: consortium.alive() and all(held[c].is_set() for c in SITES["site-a"])
                        and stored(state) == 3, "site B's round-2 partial at the consortium, site A's gateways held")
            if kill == "consortium_hub":
                consortium.kill()
            else:
                await asyncio.to_thread(brokers["consortium"].kill)
            for client in SITES["site-a"]:
                gates[client].set()
            await until(lambda: sites["site-a"].status()["rounds_completed"] == 2, "site A's round 2 to close")
            if kill == "consortium_hub":
                consortium.start()
            else:
                await asyncio.to_thread(brokers["consortium"].start)
            assert await consortium.exited() == 0, consortium.log_tail()
            await until(lambda: all(e.model_version == 3 for e in edges), "every gateway to adopt v3")
            await until(lambda: all((h.status()["upstream"] or {}).get("consortium_version") == 3
                                    for h in sites.values()), "both sites to take v3")
        finally:
            stop.set()
            consortium.stop()
            await asyncio.wait_for(asyncio.gather(*running), 60)
        return sites

    sites = asyncio.run(scenario())
    with HubStore(state, create=False) as store:
        top = store.status()
    assert top["rounds_completed"] == 3
    assert {c: v["accepted"] for c, v in top["clients"].items()} == {"site-a": 3, "site-b": 3}
    assert top["updates_accepted"] == 6
    for hub in sites.values():
        status = hub.status()
        assert status["updates_accepted"] == 6 == sum(c["accepted"] for c in status["clients"].values())
        assert status["rounds_completed"] == 3


def test_secure_rounds_inside_each_site_send_one_partial_a_round(tmp_path, brokers):
    """SecAgg+ inside each site: the site hub learns only its gateways' sum, stores no gateway update, and its
    partial (weighted by the round's survivors) reaches the consortium once a round."""
    hubs, edges = asyncio.run(federate(tmp_path, brokers, rounds=2, secure=True, sites=SITES_OF_THREE))
    consortium = hubs["consortium"].status()
    assert consortium["rounds_completed"] == 2
    assert {c: v["accepted"] for c, v in consortium["clients"].items()} == {"site-a": 2, "site-b": 2}
    for site in SITES:
        status = hubs[site].status()
        assert status["rounds_completed"] == 2 and status["updates_accepted"] == 0  # no update seen alone
        assert status["upstream"]["partial"]["state"] == "acknowledged"
        assert status["upstream"]["partial"]["examples"] == 3  # the round's survivors
    assert all(e.model_version == 2 for e in edges)
