"""The Mosquitto limits: one source, and every config wearfl ships or writes carries it."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.errors import ConfigError
from models.transport.mosquitto import limit_lines
from wearfl.broker import mosquitto_config

DEPLOY_CONF = Path(__file__).resolve().parents[3] / "scripts" / "deploy" / "mosquitto.conf"


def test_the_deploy_config_carries_the_same_limits_as_the_generated_ones() -> None:
    shipped = DEPLOY_CONF.read_text().splitlines()

    missing = [line for line in limit_lines() if line not in shipped]

    assert missing == []


def test_the_laptop_broker_config_raises_the_queue_past_mosquittos_default() -> None:
    text = mosquitto_config(1883)

    assert "max_queued_messages 100000" in text.splitlines()
    assert "max_packet_size 16777216" in text.splitlines()


def test_impossible_limits_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="broker limits"):
        limit_lines(max_packet_size=5)
