"""Hub replicas sharing one PostgreSQL database: who leads, and who is alive.

Any number of ``wearfl hub`` processes with the same ``--state postgresql://...`` take
updates from the broker's shared subscription, verify and store them before acknowledging.
Exactly one, the **leader**, selects clients, closes rounds, aggregates, registers and
publishes. Leadership is a PostgreSQL session-level advisory lock held on this module's own
connection: it is the leader's for as long as that connection lives, and the server drops
it the moment the leader's process dies (its socket closes) or its connection is cut; another
replica takes it at its next heartbeat (:data:`BEAT_S`). Every replica writes its heartbeat
to the ``replicas`` table, which ``wearfl status`` shows.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from hub.database import PostgresDatabase
from models.protocol.topics import check_name

__all__ = ["BEAT_S", "LEADER_LOCK", "Replicas", "default_replica_id"]

log = logging.getLogger(__name__)

LEADER_LOCK = 7261_0001
"""The advisory lock the leader holds for as long as it leads."""
BEAT_S = 1.0
"""How often a replica writes its heartbeat and, when it does not lead, tries to take the lead."""


def default_replica_id() -> str:
    """``<host>-<pid>``: unique among the replicas of one machine and across machines."""
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname().split(".")[0]) or "host"
    return f"{host}-{os.getpid()}"


class Replicas:
    """This replica's heartbeat and its claim on the lead, over a connection of its own."""

    def __init__(self, url: str, replica_id: str) -> None:
        self.replica_id = check_name("replica id", replica_id)
        self.db = PostgresDatabase(url)
        self.leading = False
        self.started = time.time()

    def beat(self) -> bool:
        """(worker thread) Write the heartbeat; try to take the lead if it is free. True while leading.

        A storage error (the database went away) ends any lead this replica held: the server drops
        the lock with the connection, so the next beat that gets through competes for it afresh.
        """
        try:
            return self._beat()
        except self.db.storage_errors:
            self.leading = False
            raise

    def step_down(self) -> None:
        """Give up the lead (a new connection holds no lock)."""
        self.leading = False
        try:
            self.db.reconnect()
        except self.db.storage_errors as exc:
            log.debug("replica %s: reconnecting failed (%s)", self.replica_id, exc)

    def _beat(self) -> bool:
        now = time.time()
        self.db.execute("INSERT INTO replicas (id, heartbeat, started) VALUES (?, ?, ?) ON CONFLICT (id)"
                        " DO UPDATE SET heartbeat = excluded.heartbeat", (self.replica_id, now, self.started))
        if not self.leading:
            self.leading = bool(self.db.execute("SELECT pg_try_advisory_lock(?)", (LEADER_LOCK,)).fetchone()[0])
            if self.leading:
                log.debug("replica %s holds the lead", self.replica_id)
        return self.leading

    def close(self) -> None:
        """Leave: the lead (if held) goes with the connection."""
        self.db.close()
