"""Round policy and federated-evaluation metrics: pure decisions, no broker."""

from __future__ import annotations

import json

import pytest

from hub.reports import MetricsCollector
from hub.rounds import RoundPolicy
from models.errors import ConfigError


def test_a_round_closes_when_clients_per_round_have_sent():
    policy = RoundPolicy(min_clients=2, clients_per_round=3, timeout_s=60)
    assert policy.decide(2, online=10, now=0, deadline=60) == "wait"
    assert policy.decide(3, online=10, now=0, deadline=60) == "close"


def test_by_default_a_round_waits_for_every_online_edge_but_at_least_min_clients():
    policy = RoundPolicy(min_clients=2, timeout_s=60)
    assert policy.decide(3, online=4, now=0, deadline=60) == "wait"
    assert policy.decide(4, online=4, now=0, deadline=60) == "close"
    assert policy.decide(1, online=0, now=0, deadline=60) == "wait"
    assert policy.decide(2, online=0, now=0, deadline=60) == "close"


def test_at_the_deadline_min_clients_close_and_fewer_extend():
    policy = RoundPolicy(min_clients=2, clients_per_round=5, timeout_s=60)
    assert policy.decide(2, online=5, now=60, deadline=60) == "close"
    assert policy.decide(1, online=5, now=61, deadline=60) == "extend"


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError):
        RoundPolicy(min_clients=0)
    with pytest.raises(ConfigError):
        RoundPolicy(timeout_s=0)


def test_metrics_are_weighted_by_examples_and_kept_per_round():
    collector = MetricsCollector()
    report = lambda r, n, acc: json.dumps(  # noqa: E731
        {"round": r, "model_version": 0, "num_examples": n, "metrics": {"accuracy": acc}}).encode()
    assert collector.add("a", report(1, 30, 0.9))
    assert collector.add("b", report(1, 10, 0.5))
    assert collector.add("a", report(2, 5, 0.1))
    assert not collector.add("c", b"not json")
    assert not collector.add("c", report(1, 0, 0.5))

    result = collector.result(1)

    assert result["accuracy"] == pytest.approx((30 * 0.9 + 10 * 0.5) / 40)
    assert result["eval_clients"] == 2 and result["eval_examples"] == 40
    collector.forget_before(2)
    assert collector.result(1) == {} and collector.result(2)["accuracy"] == pytest.approx(0.1)


def test_metrics_from_the_network_are_bounded_and_only_the_open_rounds_are_kept():
    collector = MetricsCollector()
    huge = b'{"round": 1, "model_version": 0, "num_examples": 1' + b"0" * 400 + b', "metrics": {"loss": 1.0}}'
    assert not collector.add("a", huge, open_round=1)  # 10**400 examples: refused, never a float overflow
    many = json.dumps({"round": 1, "model_version": 0, "num_examples": 5,
                       "metrics": {f"m{i}": 1.0 for i in range(500)}}).encode()
    assert not collector.add("a", many, open_round=1)
    future = json.dumps({"round": 9, "model_version": 0, "num_examples": 5, "metrics": {"loss": 1.0}}).encode()
    assert not collector.add("a", future, open_round=1)
    odd = json.dumps({"round": 1, "model_version": 0, "num_examples": 5,
                      "metrics": {"loss": 1e300, "accuracy": 0.5}}).encode()
    assert collector.add("a", odd, open_round=1)
    assert collector.result(1) == {"accuracy": 0.5, "eval_clients": 1.0, "eval_examples": 5.0}
