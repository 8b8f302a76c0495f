"""A small read-only HTTP server for operators: routes of GET handlers, loopback or a bearer token.

The hub's operator view (:mod:`hub.web`) and a gateway's ``/metrics`` (:mod:`edge_client.metrics`)
both serve through it. It runs in daemon threads beside the asyncio loop, so a slow scraper
never holds up MQTT; handlers read copies of state only. Loopback needs no token; any other
address needs one, sent as ``Authorization: Bearer TOKEN`` or ``?token=TOKEN``. Only GET (and
HEAD) are served.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from models.errors import ConfigError

__all__ = ["Route", "RouteServer", "check_http_address", "parse_http_address"]

log = logging.getLogger(__name__)

Route = Callable[[], tuple[bytes, str]]
"""A GET handler: (body, content type). ConfigError means "not ready" (503)."""


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


class _Handler(BaseHTTPRequestHandler):
    view: RouteServer  # set on the subclass made per server
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


class RouteServer:
    """Serve ``routes`` on ``host:port`` in daemon threads; :meth:`start` binds, :meth:`stop` closes."""

    def __init__(self, host: str, port: int, routes: Mapping[str, Route], token: str | None = None,
                 what: str = "--http") -> None:
        check_http_address(host, token)
        self.host, self.port, self.token, self.routes, self.what = host, port, token, dict(routes), what
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        """Bind and serve; the bound (host, port). ConfigError when the address cannot be used."""
        handler = type("Handler", (_Handler,), {"view": self})
        try:
            self._server = ThreadingHTTPServer((self.host, self.port), handler)
        except OSError as exc:
            raise ConfigError(f"{self.what} {self.host}:{self.port}: cannot listen ({exc.strerror}); "
                              "choose another port.") from exc
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="wearfl-http", daemon=True)
        self._thread.start()
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
