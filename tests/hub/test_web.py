"""The operator view's HTTP rules: addresses, the token, read-only routes, and metrics from the store."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families
from web_client import http_get as fetch

from hub.store import HubStore, RoundRecord
from hub.web import OperatorView
from models.errors import ConfigError
from models.transport.http_server import check_http_address, parse_http_address

LIVE = {"federation": "f", "online": ["a"], "doing": {"a": "training round 2"}, "declined": {}, "round": None,
        "task": "activity", "parameters": 100, "ledger": None}




@pytest.fixture
def store(tmp_path):
    with HubStore(tmp_path) as store:
        store.pin_key("a", b"k" * 32)
        store.record_update("a", 0, 1, 0, 10, b"x")
        store.count_rejection("stale", 2)
        store.record_round(RoundRecord(1, 0, 1, 100.0, 112.0, 1, 10, 2, 5000, 9000, {"accuracy": 0.5,
                                                                                    "eval_clients": 1}), 2)
        store.put_stragglers(1, 1)
        yield store


@pytest.mark.parametrize(("text", "expected"), [(":9100", ("127.0.0.1", 9100)), ("0.0.0.0:0", ("0.0.0.0", 0)),
                                                ("[::1]:80", ("::1", 80))])
def test_addresses_parse(text, expected):
    assert parse_http_address(text) == expected


@pytest.mark.parametrize("text", ["9100", "host:", "host:http", "h:70000"])
def test_a_bad_address_is_one_config_error(text):
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_http_address(text)


def test_beyond_loopback_needs_a_token():
    check_http_address("127.0.0.1", None)
    check_http_address("::1", None)
    check_http_address("0.0.0.0", "secret")
    with pytest.raises(ConfigError, match="--http-token"):
        check_http_address("0.0.0.0", None)


def test_a_token_guards_every_route_and_metrics_come_from_the_store(store):
    view = OperatorView("127.0.0.1", 0, lambda: store, lambda: LIVE, token="s3cret")
    view.start()
    try:
        base = view.url
        assert fetch(base + "api/status")[0] == 401
        assert fetch(base + "metrics", token="wrong")[0] == 401
        code, body = fetch(base + "api/status", token="s3cret")
        assert code == 200 and json.loads(body) == store.status()
        assert fetch(base + "?token=s3cret")[0] == 200
        code, body = fetch(base + "metrics", token="s3cret")
        samples = {(s.name, tuple(s.labels.items())): s.value
                   for f in text_string_to_metric_families(body.decode()) for s in f.samples}
        assert samples[("wearfl_updates_rejected_total", (("reason", "stale"),))] == 2
        assert samples[("wearfl_round_duration_seconds_bucket", (("le", "15.0"),))] == 1
        assert samples[("wearfl_round_duration_seconds_bucket", (("le", "5.0"),))] == 0
        assert samples[("wearfl_round_duration_seconds_sum", ())] == 12.0
        assert samples[("wearfl_update_bytes_total", ())] == 5000
        assert samples[("wearfl_global_metric", (("metric", "accuracy"),))] == 0.5
        assert ("wearfl_global_metric", (("metric", "eval_clients"),)) not in samples
        assert samples[("wearfl_clients_online", ())] == 1
        code, body = fetch(base + "api/dashboard", token="s3cret")
        rounds = json.loads(body)["rounds"]
        assert rounds[0]["stragglers"] == 1 and rounds[0]["duration_s"] == 12.0
    finally:
        view.stop()


def test_before_the_state_is_open_the_view_says_so(store):
    view = OperatorView("127.0.0.1", 0, lambda: None, lambda: LIVE)
    view.start()
    try:
        code, body = fetch(view.url + "api/status")
        assert code == 503 and b"starting" in body
        assert fetch(view.url + "metrics")[0] == 200  # empty until the state opens
    finally:
        view.stop()
