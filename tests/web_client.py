"""GET a URL of the operator view (hub or gateway) the way a scraper does."""

from __future__ import annotations


def http_get(url: str, token: str | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET, with a bearer token when given; an HTTP error is a status, not an exception."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
