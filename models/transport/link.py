"""One MQTT client's topics and, once it runs, its session: what its parts publish through."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from models.errors import BrokerUnavailable
from models.protocol.topics import Topics
from models.transport.mqtt import MqttSession

__all__ = ["Link"]

log = logging.getLogger(__name__)


class Link:
    """A client's topics and, once it runs, its MQTT session (an edge's, or a site hub's upstream)."""

    def __init__(self, client_id: str, topics: Topics, publish_timeout_s: float) -> None:
        self.client_id, self.topics, self.publish_timeout_s = client_id, topics, publish_timeout_s
        self._session: MqttSession | None = None

    @property
    def session(self) -> MqttSession:
        if self._session is None:
            raise RuntimeError(f"{self.client_id!r} is not running")
        return self._session

    @session.setter
    def session(self, session: MqttSession) -> None:
        self._session = session

    @property
    def opened(self) -> MqttSession | None:
        """The session, or None before the edge opened one."""
        return self._session

    async def publish_json(self, topic: str, body: Mapping[str, Any], retain: bool = False) -> bool:
        """Publish ``body`` as JSON with QoS 1; False (logged) when the broker did not take it."""
        try:
            await self.session.publish(topic, json.dumps(body, sort_keys=True).encode(), qos=1, retain=retain,
                                       timeout=self.publish_timeout_s)
        except BrokerUnavailable as exc:
            log.debug("%s: publishing on %s failed (%s)", self.client_id, topic, exc)
            return False
        return True
