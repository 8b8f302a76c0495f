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

import hmac
import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from hub.store import HubStore
from models.errors import ConfigError

__all__ = ["DURATION_BUCKETS", "HubCollector", "OperatorView", "check_http_address", "parse_http_address"]

log = logging.getLogger(__name__)

DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
"""Upper bounds (seconds) of ``wearfl_round_duration_seconds``: from a laptop's second to a ward's hour."""

Live = Callable[[], dict[str, Any]]
"""The hub's in-memory view: ``online`` (client ids), ``doing`` ({client: last status line}),
``declined`` ({client: reason} in the open round), ``round`` (the open one or None),
``parameters`` (of the current model), ``ledger_head``, ``federation``, ``task``."""


def parse_http_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``:PORT`` alone means loopback) as (host, port); ConfigError otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--http {text!r}: give HOST:PORT, e.g. 127.0.0.1:9100 (port 0 picks a free one).")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_http_address(host: str, token: str | None) -> None:
    """Anything but loopback needs a token: the page shows who takes part and how the model does."""
    if not _is_loopback(host) and not token:
        raise ConfigError(f"--http {host}: serving beyond this machine needs --http-token TOKEN "
                          "(clients then send 'Authorization: Bearer TOKEN' or open /?token=TOKEN).")


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
    return [{"round": r.round, "stragglers": stragglers.get(r.round), "base_version": r.base_version,
             "model_version": r.model_version,
             "opened_at": r.opened_at, "closed_at": r.closed_at, "duration_s": max(0.0, r.closed_at - r.opened_at),
             "participants": r.participants, "num_examples": r.num_examples, "updates_rejected": r.updates_rejected,
             "bytes_up": r.bytes_up, "bytes_down": r.bytes_down, "metrics": r.metrics} for r in store.rounds()]


class _Handler(BaseHTTPRequestHandler):
    view: OperatorView  # set on the subclass made per server
    server_version = "wearfl"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.client_address[0], *args)

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, code: HTTPStatus, text: str) -> None:
        self._send(code, (text + "\n").encode(), "text/plain; charset=utf-8")

    def _authorized(self, query: dict[str, list[str]]) -> bool:
        token = self.view.token
        if not token:
            return True
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip() or query.get("token", [""])[0]
        return hmac.compare_digest(given.encode(), token.encode())

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if not self._authorized(parse_qs(url.query)):
            self._error(HTTPStatus.UNAUTHORIZED, "unauthorized: send 'Authorization: Bearer TOKEN' or ?token=TOKEN")
            return
        try:
            route = self.view.routes.get(url.path)
            if route is None:
                self._error(HTTPStatus.NOT_FOUND, f"not found: {url.path} (try /, /metrics, /api/status)")
                return
            body, content_type = route()
        except ConfigError as exc:  # e.g. no state yet
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
            return
        except Exception:  # a bug must not kill the server thread; the hub goes on
            log.exception("http %s failed", url.path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the hub's log)")
            return
        self._send(HTTPStatus.OK, body, content_type)

    do_HEAD = do_GET

    def _refuse(self) -> None:
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, "read-only: only GET")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse


class OperatorView:
    """A small threaded HTTP server over a hub's state; :meth:`start` binds, :meth:`stop` closes."""

    def __init__(self, host: str, port: int, store: Callable[[], HubStore | None], live: Live,
                 token: str | None = None) -> None:
        check_http_address(host, token)
        self.host, self.port, self.token = host, port, token
        self._store, self._live = store, live
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(HubCollector(self.snapshot))
        self.routes: dict[str, Callable[[], tuple[bytes, str]]] = {
            "/metrics": lambda: (generate_latest(self.registry), CONTENT_TYPE_LATEST),
            "/api/status": lambda: (self._json(self.status(), indent=2), "application/json"),
            "/api/dashboard": lambda: (self._json(self.snapshot_or_error()), "application/json"),
            "/": lambda: (_page("dashboard.html"), "text/html; charset=utf-8"),
            "/dashboard.js": lambda: (_page("dashboard.js"), "text/javascript; charset=utf-8"),
            "/dashboard.css": lambda: (_page("dashboard.css"), "text/css; charset=utf-8"),
        }

    @staticmethod
    def _json(value: Any, indent: int | None = None) -> bytes:
        return json.dumps(value, indent=indent, sort_keys=True).encode()

    def _running_store(self) -> HubStore:
        store = self._store()
        if store is None:
            raise ConfigError("the hub is starting: its state is not open yet")
        return store

    def status(self) -> dict[str, Any]:
        """Exactly what ``wearfl status --json`` prints."""
        return self._running_store().status()

    def snapshot(self) -> dict[str, Any] | None:
        """Status, rounds and the live view, for metrics and the dashboard; None before the state is open."""
        store = self._store()
        if store is None:
            return None
        with store.transaction():  # one read snapshot for the status and the rounds
            status, rounds = store.status(), round_rows(store)
        return {"status": status, "rounds": rounds, "live": self._live()}

    def snapshot_or_error(self) -> dict[str, Any]:
        snap = self.snapshot()
        if snap is None:
            raise ConfigError("the hub is starting: its state is not open yet")
        return snap

    def start(self) -> tuple[str, int]:
        """Bind and serve in a daemon thread; the bound (host, port). ConfigError when the address is taken."""
        handler = type("Handler", (_Handler,), {"view": self})
        try:
            self._server = ThreadingHTTPServer((self.host, self.port), handler)
        except OSError as exc:
            raise ConfigError(f"--http {self.host}:{self.port}: cannot listen ({exc.strerror}); "
                              "choose another port.") from exc
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="wearfl-http", daemon=True)
        self._thread.start()
        log.info("operator view on http://%s:%d/ (/metrics, /api/status)", self.host, self.port)
        return self.host, self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


def _page(name: str) -> bytes:
    return resources.files("hub").joinpath("dashboard", name).read_bytes()
