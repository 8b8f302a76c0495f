"""``wearfl simulate --sites K``: a federation of sites on one machine.

K site hubs, each with its own broker and its share of the edges (contiguous, as the
dataset lists them), run under the consortium hub on a broker of its own. The consortium is
the simulation's ordinary hub: its clients are the sites, its keyring holds their keys, and
each site's grant (signed with the consortium's key) lets its gateways believe the site's
tasks and receipts. The sites aggregate with FedAvg (a weighted sum, which composes: the
consortium's FedAvg over the sites' partials is FedAvg over every gateway); the run's
``--strategy`` is the consortium's rule over the sites.

The report gets ``tiers``: per tier, the clients, the updates a round and the bytes that
crossed it, so the consortium link's traffic can be set against the gateways'.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.errors import ConfigError

if TYPE_CHECKING:
    from hub.rounds import RoundSummary
    from hub.service import HubService
    from wearfl.broker import EmbeddedBroker, MosquittoBroker

__all__ = ["SimulatedSites", "plan_sites"]

CONSORTIUM = "consortium"


def plan_sites(k: int, clients: list[str]) -> dict[str, list[str]]:
    """``site-1`` .. ``site-K`` and their edges: the clients split into K contiguous, near-equal shares."""
    if not 1 <= k <= len(clients):
        raise ConfigError(f"--sites {k}: give 1 to {len(clients)} sites for {len(clients)} edges (each site needs "
                          "at least one).")
    return {f"site-{i + 1}": [str(c) for c in share] for i, share in enumerate(np.array_split(clients, k))}


@dataclass
class SimulatedSites:
    """The site tier of a simulation: each site's broker, hub, edges and closed rounds."""

    members: dict[str, list[str]]
    brokers: dict[str, MosquittoBroker | EmbeddedBroker]
    hubs: dict[str, HubService] = field(default_factory=dict)
    rounds: dict[str, list[RoundSummary]] = field(default_factory=dict)

    @classmethod
    def plan(cls, k: int, clients: list[str], out: Path) -> SimulatedSites:
        """K sites over ``clients``, with brokers made (not started) on ports of their own."""
        from wearfl.broker import make_broker

        members = plan_sites(k, clients)
        brokers: dict[str, MosquittoBroker | EmbeddedBroker] = {}
        for name in (CONSORTIUM, *members):
            broker = make_broker(workdir=out)
            while any(b.port == broker.port for b in brokers.values()):
                broker = make_broker(workdir=out)
            brokers[name] = broker
        return cls(members, brokers)

    @property
    def consortium_url(self) -> str:
        return self.brokers[CONSORTIUM].url

    def url_of(self, client: str) -> str:
        """The broker of the site ``client`` belongs to."""
        return next(self.brokers[site].url for site, members in self.members.items() if client in members)

    def build_hubs(self, args: argparse.Namespace, federation: str, out: Path, keyring: Path | None) -> None:
        """One site hub per site (FedAvg over its gateways, secure rounds inside the site when asked)."""
        from hub.service import HubConfig, HubService

        task_config = {"quantize": args.quantize}
        for site, members in self.members.items():
            n = len(members)
            config = HubConfig(
                broker=self.brokers[site].url, federation=federation, state_dir=out / "sites" / site,
                min_clients=n if args.fraction >= 1 else max(1, int(np.ceil(args.fraction * n))),
                clients_per_round=n if args.fraction >= 1 else None, fraction=args.fraction,
                round_timeout_s=args.round_timeout, task_config=task_config, keyring=keyring,
                secure_aggregation=args.secure_aggregation, upstream=self.consortium_url, site_id=site,
            )
            hub = HubService(config)
            self.rounds[site] = []
            hub.on_round_closed = self.rounds[site].append
            self.hubs[site] = hub

    def provision(self, out: Path, federation: str) -> Path:
        """Each site's key and the consortium's grant for it; the consortium's keyring of sites (returned)."""
        from models.files import write_atomic
        from models.protocol.identity import load_or_create_key, public_hex
        from models.protocol.messages import Grant

        consortium = load_or_create_key(out / "hub" / "keys" / "hub.key")  # the consortium hub's signing key
        lines = []
        for site in self.members:
            key = load_or_create_key(out / "sites" / site / "keys" / "hub.key")
            lines.append(f"{site} {public_hex(key)}\n")
            grant = Grant(federation, site, public_hex(key)).signed(consortium)
            (out / "sites" / site / "upstream").mkdir(parents=True, exist_ok=True)
            write_atomic(out / "sites" / site / "upstream" / "grant.json", grant.to_bytes())
        keyring = out / "sites.keyring"
        write_atomic(keyring, "".join(lines).encode())
        return keyring

    def start(self) -> None:
        for broker in self.brokers.values():
            broker.start()

    def stop(self) -> None:
        for broker in self.brokers.values():
            broker.stop()

    def tiers(self, consortium_rounds: list[dict[str, Any]]) -> dict[str, Any]:
        """Per tier: clients, updates a round (mean) and the bytes that went up (total and per round)."""
        site_rounds = [s for summaries in self.rounds.values() for s in summaries]
        n = max(1, len(consortium_rounds))
        return {
            CONSORTIUM: {
                "clients": len(self.members),
                "updates_per_round": sum(r["updates_accepted"] for r in consortium_rounds) / n,
                "bytes_up": sum(r["bytes_up"] for r in consortium_rounds),
                "bytes_up_per_round": sum(r["bytes_up"] for r in consortium_rounds) / n,
            },
            "sites": {
                "clients": sum(len(m) for m in self.members.values()),
                "updates_per_round": sum(s.updates_accepted for s in site_rounds) / n,
                "bytes_up": sum(s.bytes_up for s in site_rounds),
                "bytes_up_per_round": sum(s.bytes_up for s in site_rounds) / n,
                "per_site": {site: {"clients": len(self.members[site]),
                                    "updates_accepted": sum(s.updates_accepted for s in self.rounds[site]),
                                    "bytes_up": sum(s.bytes_up for s in self.rounds[site])}
                             for site in self.members},
            },
        }
