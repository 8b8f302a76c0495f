"""MQTT topics of one federation, all under ``wearfl/v1/<federation>/`` (see DESIGN.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from models.errors import ConfigError

__all__ = ["NAME_PATTERN", "Topics", "check_name"]

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(kind: str, value: str) -> str:
    """A federation or client id: 1-64 of letters, digits, ``_ . -`` (no MQTT wildcards or slashes)."""
    if not NAME_PATTERN.fullmatch(value or ""):
        raise ConfigError(f"{kind} {value!r} must be 1-64 letters, digits, '_', '.' or '-', starting alphanumeric.")
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names for ``federation``; ``client_from`` reads the client id back out of a topic."""

    federation: str
    prefix: str = "wearfl/v1"

    def __post_init__(self) -> None:
        check_name("federation", self.federation)

    @property
    def root(self) -> str:
        return f"{self.prefix}/{self.federation}"

    @property
    def model(self) -> str:
        return f"{self.root}/model"

    @property
    def task(self) -> str:
        return f"{self.root}/task"

    @property
    def grant(self) -> str:
        """Retained: the consortium's grant that lets a site hub sign tasks and receipts (site hubs only)."""
        return f"{self.root}/grant"

    def update(self, client: str) -> str:
        return f"{self.root}/update/{client}"

    def status(self, client: str) -> str:
        return f"{self.root}/status/{client}"

    def metrics(self, client: str) -> str:
        return f"{self.root}/metrics/{client}"

    def receipt(self, client: str) -> str:
        return f"{self.root}/receipt/{client}"

    def secagg_up(self, client: str) -> str:
        """A client's secure-aggregation messages to the hub."""
        return f"{self.root}/secagg/{client}"

    def secagg_down(self, client: str) -> str:
        """The hub's secure-aggregation messages to one client."""
        return f"{self.root}/secagg-to/{client}"

    def all_of(self, kind: str) -> str:
        return f"{self.root}/{kind}/+"

    def shared_updates(self, group: str = "wearfl-hub") -> str:
        """The hub's shared subscription: several hub workers split the intake (MQTT 5)."""
        return f"$share/{group}/{self.all_of('update')}"

    def client_from(self, topic: str, kind: str) -> str | None:
        head = f"{self.root}/{kind}/"
        if not topic.startswith(head):
            return None
        client = topic[len(head) :]
        return client if NAME_PATTERN.fullmatch(client) else None
