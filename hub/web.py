"""The hub's operator view over HTTP: ``/metrics``, ``/api/status``, ``/api/dashboard`` and the dashboard page.

``wearfl hub --http HOST:PORT`` (and ``wearfl simulate --http``) starts it. Everything is read
from the hub's own state when a request comes (the SQLite store, in one read transaction, and
a snapshot of who is online), so ``/metrics``, ``/api/status`` and ``wearfl status --json``
agree at any moment. The page is read-only: only GET is served. Loopback needs no token; any
other address needs ``--http-token``, given as ``Authorization: Bearer TOKEN`` or ``?token=``.

Metrics follow Prometheus' conventions: a ``wearfl_`` prefix, base units (seconds, bytes),
``_total`` on counters, and no per-client labels (a client table belongs in ``/api/status``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict
from importlib import resources
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from hub.store import HubStore
from models.errors import ConfigError
from models.transport.http_server import RouteServer

__all__ = ["DURATION_BUCKETS", "HubCollector", "OperatorView"]

log = logging.getLogger(__name__)

DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
"""Upper bounds (seconds) of ``wearfl_round_duration_seconds``: from a laptop's second to a ward's hour."""

Live = Callable[[], dict[str, Any]]
"""The hub's in-memory view: ``online`` (client ids), ``doing`` ({client: last status line}),
``declined`` ({client: reason} in the open round), ``round`` (the open one or None),
``parameters`` (values in an update), ``ledger`` (entries, head, version), ``federation``, ``task``."""


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class HubCollector:
    """Prometheus metrics of one hub, made from its store and live view at each scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any] | None]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        if snap is None:
            return
        status, rounds, live = snap["status"], snap["rounds"], snap["live"]
        yield _counter("wearfl_rounds_completed", "Rounds closed with a new global model.", status["rounds_completed"])
        yield _counter("wearfl_updates_accepted", "Updates verified, validated and stored.", status["updates_accepted"])
        rejected = CounterMetricFamily("wearfl_updates_rejected", "Updates refused, by reason.", labels=["reason"])
        for reason, n in sorted(status["updates_rejected"].items()):
            rejected.add_metric([reason], n)
        yield rejected
        declined = CounterMetricFamily("wearfl_rounds_declined", "Rounds an expected edge sat out, by reason.",
                                       labels=["reason"])
        for reason, n in sorted(status["declined"].items()):
            declined.add_metric([reason], n)
        yield declined
        yield _counter("wearfl_duplicates_dropped", "Updates received again and answered from the store.",
                       status["duplicates_dropped"])
        yield _counter("wearfl_messages_shed", "Messages dropped unread while the intake was behind.",
                       status["messages_shed"])
        yield _counter("wearfl_update_bytes", "Bytes of updates received (accepted, duplicate and rejected).",
                       sum(r["bytes_up"] for r in rounds))
        yield _counter("wearfl_model_bytes", "Bytes of models and tasks sent to edges.",
                       sum(r["bytes_down"] for r in rounds))
        yield _gauge("wearfl_model_version", "Version of the current global model.", status["model_version"] or 0)
        yield _gauge("wearfl_clients_online", "Member edges whose status says online.", len(live["online"]))
        yield _gauge("wearfl_clients_known", "Clients with an accepted, rejected or declined update.",
                     len(status["clients"]))
        durations = [r["duration_s"] for r in rounds]
        buckets = [(floatToGoString(b), sum(d <= b for d in durations)) for b in DURATION_BUCKETS]
        yield HistogramMetricFamily("wearfl_round_duration_seconds", "Time from a round's opening to its close.",
                                    buckets=[*buckets, ("+Inf", len(durations))], sum_value=sum(durations))
        evaluation = status.get("global_metrics")
        metric = GaugeMetricFamily("wearfl_global_metric", "The latest federated evaluation of the global model.",
                                   labels=["metric"])
        for name, value in sorted((evaluation or {}).get("metrics", {}).items()):
            if not name.startswith("eval_"):
                metric.add_metric([name], value)
        yield metric
        privacy = status.get("privacy")
        if privacy:
            yield _gauge("wearfl_privacy_epsilon_spent", "Differential-privacy epsilon spent so far.",
                         privacy["epsilon"])
            if privacy.get("budget_epsilon"):
                yield _gauge("wearfl_privacy_epsilon_budget", "The epsilon budget the hub stops at.",
                             privacy["budget_epsilon"])


def round_rows(store: HubStore) -> list[dict[str, Any]]:
    """Every closed round as plain JSON (``stragglers``: None where the hub did not record it)."""
    stragglers = store.stragglers()
    return [{**asdict(r), "stragglers": stragglers.get(r.round), "duration_s": max(0.0, r.closed_at - r.opened_at)}
            for r in store.rounds()]


class OperatorView:
    """The hub's routes over its state, served by a :class:`RouteServer` (:meth:`start`, :meth:`stop`)."""

    def __init__(self, host: str, port: int, store: Callable[[], HubStore | None], live: Live,
                 token: str | None = None) -> None:
        self._store, self._live = store, live
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(HubCollector(self.snapshot))
        self.server = RouteServer(host, port, {
            "/metrics": lambda: (generate_latest(self.registry), CONTENT_TYPE_LATEST),
            "/api/status": lambda: (self._json(self.status(), indent=2), "application/json"),
            "/api/dashboard": lambda: (self._json(self.snapshot_or_error()), "application/json"),
            "/": lambda: (_page("dashboard.html"), "text/html; charset=utf-8"),
            "/dashboard.js": lambda: (_page("dashboard.js"), "text/javascript; charset=utf-8"),
            "/dashboard.css": lambda: (_page("dashboard.css"), "text/css; charset=utf-8"),
        }, token)

    @staticmethod
    def _json(value: Any, indent: int | None = None) -> bytes:
        return json.dumps(value, indent=indent, sort_keys=True).encode()

    def status(self) -> dict[str, Any]:
        """Exactly what ``wearfl status --json`` prints."""
        store = self._store()
        if store is None:
            raise ConfigError("the hub is starting: its state is not open yet")
        return store.status()

    def snapshot(self) -> dict[str, Any] | None:
        """Status, rounds and the live view, for metrics and the dashboard; None before the state is open."""
        store = self._store()
        if store is None:
            return None
        with store.reading():  # one snapshot for the status and the rounds
            status, rounds = store.status(), round_rows(store)
        return {"status": status, "rounds": rounds, "live": self._live()}

    def snapshot_or_error(self) -> dict[str, Any]:
        snap = self.snapshot()
        if snap is None:
            raise ConfigError("the hub is starting: its state is not open yet")
        return snap

    def start(self) -> tuple[str, int]:
        """Bind and serve in daemon threads; the bound (host, port). ConfigError when the address is taken."""
        bound = self.server.start()
        log.info("operator view on %s (/metrics, /api/status)", self.server.url)
        return bound

    def stop(self) -> None:
        self.server.stop()

    @property
    def url(self) -> str:
        return self.server.url


def _page(name: str) -> bytes:
    return resources.files("hub").joinpath("dashboard", name).read_bytes()
