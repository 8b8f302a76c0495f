"""The hub's durable state: one SQLite database (WAL) in the state directory, or a PostgreSQL database.

Why SQLite: the hub must persist an accepted update before it acknowledges it, survive
a restart with its counters, pinned keys and open round intact, and let ``wearfl
status`` read all of it while the hub runs. WAL mode lets readers in during writes;
every write is in a transaction, and :meth:`HubStore.transaction` groups the writes of
a whole batch of messages into one commit (one fsync), which is what lets intake keep
up with the broker.

Tables::

    clients     id, public_key, accepted, last_sequence, last_seen
    updates     (client, sequence) primary key, round, base_version, num_examples,
                received_at, size, sha256, payload (the raw signed bytes, kept while
                the round is open so a restarted hub can rebuild its aggregate)
    rejections  reason -> count
    counters    name -> count (duplicates_dropped)
    rounds      one row per closed round: versions, participants, bytes, metrics
    kv          small JSON values: current round and model version, strategy state

``status()`` is the contract of ``wearfl status --json``. With ``--state postgresql://...``
the same tables live in PostgreSQL (:mod:`hub.database`), which several hub replicas share.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hub.database import Database, PostgresDatabase, SqliteDatabase, is_database_url, redact
from models.errors import ConfigError
from models.protocol.messages import REJECT_REASONS

__all__ = ["DB_NAME", "HubStore", "RoundRecord", "StoredUpdate"]

log = logging.getLogger(__name__)

DB_NAME = "hub.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    id TEXT PRIMARY KEY,
    public_key {BLOB} NOT NULL,
    accepted {INT} NOT NULL DEFAULT 0,
    last_sequence {INT},
    last_seen {FLOAT}
);
CREATE TABLE IF NOT EXISTS updates (
    client TEXT NOT NULL,
    sequence {INT} NOT NULL,
    round {INT} NOT NULL,
    base_version {INT} NOT NULL,
    num_examples {INT} NOT NULL,
    received_at {FLOAT} NOT NULL,
    size {INT} NOT NULL,
    sha256 TEXT NOT NULL,
    payload {BLOB},
    PRIMARY KEY (client, sequence)
) {WITHOUT_ROWID};
CREATE INDEX IF NOT EXISTS updates_by_round ON updates (round);
CREATE INDEX IF NOT EXISTS updates_in_arrival_order ON updates (round, received_at, client, sequence);
CREATE TABLE IF NOT EXISTS rejections (reason TEXT PRIMARY KEY, count {INT} NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value {INT} NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round {INT} PRIMARY KEY,
    base_version {INT} NOT NULL,
    model_version {INT} NOT NULL,
    opened_at {FLOAT},
    closed_at {FLOAT} NOT NULL,
    participants {INT} NOT NULL,
    num_examples {INT} NOT NULL,
    updates_rejected {INT} NOT NULL,
    bytes_up {INT} NOT NULL,
    bytes_down {INT} NOT NULL,
    metrics TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS replicas (id TEXT PRIMARY KEY, heartbeat {FLOAT} NOT NULL, started {FLOAT} NOT NULL);
"""

SCHEMA_VERSION = 1
"""The layout of these tables; a store written by a newer layout is refused, not misread."""

ROUND_LOCK = 7262
"""PostgreSQL advisory lock between replicas' intake (shared) and the leader marking a round closing (exclusive)."""


@dataclass(frozen=True)
class StoredUpdate:
    """One accepted update as stored (``payload`` None once its round has closed)."""

    client: str
    sequence: int
    round: int
    base_version: int
    num_examples: int
    received_at: float
    payload: bytes | None


@dataclass(frozen=True)
class RoundRecord:
    """What is kept of a closed round."""

    round: int
    base_version: int
    model_version: int
    opened_at: float | None
    closed_at: float
    participants: int
    num_examples: int
    updates_rejected: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


class HubStore:
    """The state of one hub (or of its replicas); safe to call from one thread at a time (a lock guards it).

    ``state`` is the state directory (SQLite) or a ``postgresql://`` URL. ``synchronous`` is
    SQLite's durability level: ``FULL`` (default) fsyncs every commit, so an acknowledged
    update survives power loss; ``NORMAL`` survives a crash of the hub process only.
    PostgreSQL's is the server's (``synchronous_commit``, on by default).
    """

    def __init__(self, state: str | os.PathLike[str], *, synchronous: str = "FULL", create: bool = True) -> None:
        self._db: Database
        if is_database_url(state):
            self.state_dir, self.path = None, None
            self.where = redact(str(state))
            self._db = PostgresDatabase(str(state))
            if not create and self._db.execute("SELECT to_regclass('kv')").fetchone()[0] is None:
                self._db.close()
                raise ConfigError(f"no hub state in the database {self.where}; is --state right?")
            self._db.create(SCHEMA)
        else:
            self.state_dir = Path(state)
            self.path = self.state_dir / DB_NAME
            self.where = str(self.state_dir)
            if not create and not self.path.is_file():
                raise ConfigError(f"no hub state in {self.state_dir} ({DB_NAME} is missing); is --state right?")
            self._db = SqliteDatabase(self.state_dir, DB_NAME, SCHEMA, what=f"the hub database {DB_NAME}",
                                      advice="restore it or use another --state.", synchronous=synchronous)
        self._lock = threading.RLock()
        self._depth = 0
        self._check_schema(write=create)

    def _check_schema(self, write: bool) -> None:
        written = self.get("schema")
        if written is not None and int(written) > SCHEMA_VERSION:
            self.close()
            raise ConfigError(f"the hub state in {self.where} was written by a newer wearfl (schema {written}, "
                              f"this one reads {SCHEMA_VERSION}); upgrade this hub, or give another --state.")
        if written is None and write:
            self.put("schema", SCHEMA_VERSION)

    def claim(self, federation: str) -> None:
        """Bind the state to ``federation`` on first use; ConfigError when it belongs to another one."""
        with self.transaction():
            owner = self.get("federation")
            if owner is None:
                self.put("federation", federation)
        if owner is not None and owner != federation:
            raise ConfigError(f"the hub state in {self.where} belongs to federation {owner!r}, not {federation!r}; "
                              "give that federation's --state, or the right --federation.")

    @property
    def integrity_error(self) -> type[BaseException]:
        """What :meth:`record_update` raises for an update already stored."""
        return self._db.integrity_error

    @property
    def storage_errors(self) -> tuple[type[BaseException], ...]:
        """The errors of this back-end that mean its storage failed (not a bug)."""
        return self._db.storage_errors

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> HubStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ----------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything inside commits together or not at all; nested uses join the outer one."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._db.begin(write=True)
            self._depth = 1
            try:
                yield
                self._db.commit()
            except BaseException:
                self._rollback()
                raise
            finally:
                self._depth = 0

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Several reads from one snapshot, without the write lock; inside a transaction, that one's view."""
        with self._lock:
            if self._depth:
                yield
                return
            self._db.begin(write=False)
            self._depth = 1
            try:
                yield
            finally:
                self._depth = 0
                self._db.commit()

    def _rollback(self) -> None:
        self._db.rollback()

    # -- clients and keys ------------------------------------------------------------

    def pinned_keys(self) -> dict[str, bytes]:
        """``{client: raw public key}`` of every client seen so far."""
        with self._lock:
            return {c: bytes(k) for c, k in self._db.execute("SELECT id, public_key FROM clients")}

    def clients_state(self, clients: Sequence[str]) -> tuple[dict[str, bytes], dict[str, int]]:
        """(pinned keys, last stored sequences) of these clients only: what one intake batch needs to know."""
        found: tuple[dict[str, bytes], dict[str, int]] = ({}, {})
        wanted = sorted(set(clients))
        with self._lock:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start:start + 500]
                rows = self._db.execute("SELECT id, public_key, last_sequence FROM clients WHERE id IN "
                                        f"({', '.join('?' * len(chunk))})", tuple(chunk))
                for client, key, last in rows:
                    found[0][client] = bytes(key)
                    if last is not None:
                        found[1][client] = int(last)
        return found

    def pin_key(self, client: str, public_key: bytes, now: float | None = None) -> bool:
        """Record ``client``'s key; True (and a warning in the log) when the client is new."""
        now = time.time() if now is None else now
        with self.transaction():
            cur = self._db.execute("INSERT INTO clients (id, public_key, last_seen) VALUES (?, ?, ?)"
                                   " ON CONFLICT (id) DO NOTHING", (client, public_key, now))
            if cur.rowcount == 1:
                log.info("pinned key for client %s (%s...)", client, public_key.hex()[:16])
                return True
            cur = self._db.execute("UPDATE clients SET public_key = ? WHERE id = ? AND public_key != ?",
                                   (public_key, client, public_key))
            if cur.rowcount:
                log.info("key of client %s replaced from the keyring", client)
            return False

    def touch(self, client: str, now: float | None = None) -> None:
        """Note that a verified message from ``client`` arrived."""
        with self.transaction():
            self._db.execute("UPDATE clients SET last_seen = ? WHERE id = ?",
                             (time.time() if now is None else now, client))

    # -- updates ---------------------------------------------------------------------

    def stored_update(self, client: str, sequence: int) -> tuple[int, str] | None:
        """``(round, sha256)`` of the stored update (client, sequence), or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT round, sha256 FROM updates WHERE client = ? AND sequence = ?", (client, sequence)
            ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def last_sequences(self) -> dict[str, int]:
        """``{client: highest sequence number stored}`` for every client with a stored update."""
        with self._lock:
            rows = self._db.execute("SELECT id, last_sequence FROM clients WHERE last_sequence IS NOT NULL")
            return {c: int(s) for c, s in rows}

    def record_update(
        self, client: str, sequence: int, round_number: int, base_version: int, num_examples: int,
        payload: bytes, received_at: float | None = None,
    ) -> None:
        """Store an accepted update and count it for its client, atomically.

        The client must have a pinned key. :attr:`integrity_error` when (client,
        sequence) is already stored: check :meth:`stored_update` first.
        """
        now = time.time() if received_at is None else received_at
        digest = hashlib.sha256(payload).hexdigest()
        with self.transaction():
            self._db.execute(
                "INSERT INTO updates (client, sequence, round, base_version, num_examples, received_at, size, sha256,"
                " payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (client, sequence, round_number, base_version, num_examples, now, len(payload), digest, payload),
            )
            cur = self._db.execute(
                "UPDATE clients SET accepted = accepted + 1, last_seen = ?,"
                f" last_sequence = {self._db.greatest}(COALESCE(last_sequence, -1), ?) WHERE id = ?",
                (now, sequence, client),
            )
            if cur.rowcount != 1:
                raise ValueError(f"client {client!r} has no pinned key; pin it before recording its updates")

    def iter_round_updates(self, round_number: int, page: int = 64) -> Iterator[StoredUpdate]:
        """The accepted updates of ``round_number``, oldest first, read ``page`` at a time.

        A resumed round of a thousand clients then holds one page of payloads, not all of them.
        """
        query = ("SELECT client, sequence, round, base_version, num_examples, received_at, payload FROM updates"
                 " WHERE round = ? {} ORDER BY received_at, client, sequence LIMIT ?")
        after: tuple[float, str, int] | None = None
        while True:
            with self._lock:
                if after is None:
                    rows = self._db.execute(query.format(""), (round_number, page)).fetchall()
                else:
                    rows = self._db.execute(query.format("AND (received_at, client, sequence) > (?, ?, ?)"),
                                            (round_number, *after, page)).fetchall()
            for c, s, r, b, n, t, p in rows:
                yield StoredUpdate(c, s, r, b, n, t, None if p is None else bytes(p))
            if len(rows) < page:
                return
            after = (rows[-1][5], rows[-1][0], rows[-1][1])

    def has_update_in(self, client: str, round_number: int) -> bool:
        """Whether ``client`` has an update stored for ``round_number`` (one per client per round)."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM updates WHERE round = ? AND client = ? LIMIT 1",
                                    (round_number, client)).fetchone() is not None

    def round_totals(self, round_number: int) -> tuple[int, int]:
        """(clients, examples) of the updates stored for ``round_number``."""
        with self._lock:
            clients, examples = self._db.execute(
                "SELECT COUNT(DISTINCT client), COALESCE(SUM(num_examples), 0) FROM updates WHERE round = ?",
                (round_number,)).fetchone()
        return int(clients), int(examples)

    def round_update_digests(self, round_number: int) -> list[str]:
        """The sha256 of every update accepted into ``round_number`` (kept after the payloads go)."""
        with self._lock:
            rows = self._db.execute("SELECT sha256 FROM updates WHERE round = ? ORDER BY sha256",
                                    (round_number,)).fetchall()
        return [r[0] for r in rows]

    # -- counters --------------------------------------------------------------------

    def count_rejection(self, reason: str, n: int = 1, client: str | None = None) -> None:
        """A refused update; ``client``: the known client it came from (counted per client too), else None."""
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        with self.transaction():
            self._db.execute(
                "INSERT INTO rejections (reason, count) VALUES (?, ?)"
                " ON CONFLICT (reason) DO UPDATE SET count = rejections.count + excluded.count", (reason, n)
            )
            if client:
                self._add_counter(f"client:rejected:{client}", n)

    def count_declined(self, reason: str, n: int = 1, client: str | None = None) -> None:
        """An edge declined a round it was expected in (``reason``: a :data:`hub.presence.DECLINE_REASONS` code)."""
        with self.transaction():
            self._add_counter(f"declined:{reason}", n)
            if client:
                self._add_counter(f"client:declined:{client}", n)

    def put_stragglers(self, round_number: int, n: int) -> None:
        """How many edges the round expected that neither answered nor declined by its close."""
        with self.transaction():
            self._db.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name)"
                             " DO UPDATE SET value = excluded.value", (f"stragglers:{round_number}", n))

    def stragglers(self) -> dict[int, int]:
        """{round: edges expected that never answered}, for the rounds that recorded it."""
        with self._lock:
            rows = self._db.execute("SELECT name, value FROM counters WHERE name LIKE 'stragglers:%'").fetchall()
        return {int(name.split(":", 1)[1]): n for name, n in rows}

    def _add_counter(self, name: str, n: int) -> None:
        self._db.execute("INSERT INTO counters (name, value) VALUES (?, ?)"
                         " ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value", (name, n))

    def count_shed(self, n: int) -> None:
        """Messages the hub's session dropped unread because the intake was behind (edges re-send updates)."""
        with self.transaction():
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES ('messages_shed', ?)"
                " ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value", (n,)
            )

    def count_duplicate(self, n: int = 1) -> None:
        with self.transaction():
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES ('duplicates_dropped', ?)"
                " ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value", (n,)
            )

    # -- replicas (a shared PostgreSQL database) ---------------------------------------

    def intake_barrier(self) -> tuple[int | None, int | None]:
        """(the round the hubs are in, the round being closed or None), inside an intake transaction.

        On PostgreSQL it first takes the round lock shared, so a leader marking the round closing
        (:meth:`mark_closing`) waits for this transaction to commit, and every transaction after
        that sees the mark: an update is either in the closing round's aggregate or refused.
        """
        if self._db.dialect == "postgresql":
            self._db.execute("SELECT pg_advisory_xact_lock_shared(?)", (ROUND_LOCK,))
        return self.get("round"), self.get("closing")

    def mark_closing(self, round_number: int | None) -> None:
        """The leader closes ``round_number``: no replica stores another update for it (None: clear the mark)."""
        with self.transaction():
            if self._db.dialect == "postgresql":
                self._db.execute("SELECT pg_advisory_xact_lock(?)", (ROUND_LOCK,))
            self.put("closing", round_number)

    def round_summary(self, round_number: int) -> tuple[set[str], int, int, int]:
        """(clients, updates, examples, bytes) stored for ``round_number``, by every replica."""
        with self.reading():
            clients = {r[0] for r in self._db.execute("SELECT DISTINCT client FROM updates WHERE round = ?",
                                                      (round_number,))}
            n, examples, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(num_examples), 0), COALESCE(SUM(size), 0) FROM updates WHERE round = ?",
                (round_number,)).fetchone()
        return clients, int(n), int(examples), int(size)

    def replicas(self) -> dict[str, float]:
        """{replica id: its last heartbeat (Unix time)}."""
        with self._lock:
            return {r: float(t) for r, t in self._db.execute("SELECT id, heartbeat FROM replicas ORDER BY id")}

    # -- rounds and small values ----------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """A JSON value from ``kv``."""
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        with self.transaction():
            self._db.execute("INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE"
                             " SET value = excluded.value", (key, json.dumps(value)))

    def record_round(self, record: RoundRecord, next_round: int, keep_payloads: bool = False) -> None:
        """Record a closed round and move the current round and model version on, atomically.

        The stored payloads of the closed round are dropped (their metadata and sha256 stay)
        unless ``keep_payloads``: only the open round's are needed to resume.
        """
        d = asdict(record)
        d["metrics"] = json.dumps(record.metrics, sort_keys=True)
        with self.transaction():
            self._db.execute(
                "INSERT INTO rounds (round, base_version, model_version, opened_at, closed_at, participants,"
                " num_examples, updates_rejected, bytes_up, bytes_down, metrics) VALUES (:round, :base_version,"
                " :model_version, :opened_at, :closed_at, :participants, :num_examples, :updates_rejected, :bytes_up,"
                " :bytes_down, :metrics)", d,
            )
            if not keep_payloads:
                self._db.execute("UPDATE updates SET payload = NULL WHERE round = ?", (record.round,))
            self.put("round", next_round)
            self.put("model_version", record.model_version)

    def rounds_completed(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])

    def rounds(self) -> list[RoundRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT round, base_version, model_version, opened_at, closed_at, participants, num_examples,"
                " updates_rejected, bytes_up, bytes_down, metrics FROM rounds ORDER BY round"
            ).fetchall()
        return [RoundRecord(*row[:10], metrics=json.loads(row[10])) for row in rows]

    # -- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The contract of ``wearfl status --json``.

        ``{"model_version", "rounds_completed", "updates_accepted", "updates_rejected":
        {reason: count} (every reason, 0 included), "duplicates_dropped", "clients": {id:
        {"accepted", "last_sequence" (None before the first accepted update),
        "last_seen" (Unix time of its last verified update), "rejected" (its updates refused),
        "declined" (rounds it sat out)}}, "personalization": {id: {"round",
        "examples", "global": metrics, "personalized": metrics}}}``: the last is each client's
        latest federated evaluation of the global model and of its own fine-tuned weights.
        ``"messages_shed"``: messages the hub's MQTT session dropped unread while its intake was
        behind (a flood; an edge re-sends an update that got no receipt).
        ``"declined"``: {reason: count} of rounds that expected edges sat out (apart from
        rejections). ``"waiting"``: None, or the open round's latest "waiting for" report:
        ``round``, ``since``, ``deadline`` (Unix time), ``answered``, ``edges`` ({client: what it
        last said it was doing}) and ``declined`` ({client: reason}).
        ``"global_metrics"``: None, or the latest federated evaluation: ``round``, ``model_version``
        (the model the edges evaluated) and ``metrics`` (example-weighted means, ``eval_clients``).
        ``"explanation"``: None, or with ``explain`` in the task the latest round's federated attribution map
        (:meth:`hub.explanations.FederatedExplanations.result`).
        ``"privacy"``: None, or under a DP strategy the epsilon spent so far at ``delta``, the
        sampling assumption, the budget, ``per_round`` epsilons and ``budget_reached``.
        ``"upstream"``: None, or on a site hub its link to the consortium: ``site``, ``broker``,
        ``connected``, ``consortium_version`` and ``consortium_round`` (the latest it took), and
        ``partial`` (``round``, ``state``: ``pending`` until the consortium's receipt, then
        ``acknowledged``). ``"sites"``: on a consortium hub, the clients that are site hubs.
        ``"leader"``: the replica id of the hub that closes rounds (None for a hub on SQLite),
        ``"replicas"``: {replica id: last heartbeat} of the hubs sharing a PostgreSQL state.
        Read in one transaction, so ``updates_accepted`` always equals the sum of the clients'
        ``accepted``.
        """
        with self.reading():
            version = self._db.execute("SELECT value FROM kv WHERE key = 'model_version'").fetchone()
            rounds = self._db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
            accepted = self._db.execute("SELECT COUNT(*) FROM updates").fetchone()[0]
            rejected = dict.fromkeys(REJECT_REASONS, 0)
            rejected.update(self._db.execute("SELECT reason, count FROM rejections").fetchall())
            dup = self._db.execute("SELECT value FROM counters WHERE name = 'duplicates_dropped'").fetchone()
            shed = self._db.execute("SELECT value FROM counters WHERE name = 'messages_shed'").fetchone()
            declined = {name.split(":", 1)[1]: n for name, n in self._db.execute(
                "SELECT name, value FROM counters WHERE name LIKE 'declined:%' ORDER BY name")}
            clients = {
                c: {"accepted": a, "last_sequence": s, "last_seen": t, "rejected": 0, "declined": 0}
                for c, a, s, t in self._db.execute(
                    "SELECT id, accepted, last_sequence, last_seen FROM clients ORDER BY id")
            }
            for name, n in self._db.execute("SELECT name, value FROM counters WHERE name LIKE 'client:%'"):
                _, kind, client = name.split(":", 2)
                clients.setdefault(client, {"accepted": 0, "last_sequence": None, "last_seen": None,
                                            "rejected": 0, "declined": 0})[kind] = n
            clients = dict(sorted(clients.items()))
            evaluated = self._db.execute("SELECT round, base_version, metrics FROM rounds WHERE metrics != '{}'"
                                         " ORDER BY round DESC LIMIT 1").fetchone()
        return {
            "model_version": None if version is None else json.loads(version[0]),
            "rounds_completed": rounds,
            "updates_accepted": accepted,
            "updates_rejected": rejected,
            "duplicates_dropped": 0 if dup is None else dup[0],
            "messages_shed": 0 if shed is None else shed[0],
            "declined": declined,
            "clients": clients,
            "global_metrics": None if evaluated is None else {
                "round": evaluated[0], "model_version": evaluated[1], "metrics": json.loads(evaluated[2])},
            "personalization": self.get("personalization", {}),
            "explanation": self.get("explanation"),
            "privacy": self.get("privacy"),
            "waiting": self.get("waiting"),
            "upstream": self.get("upstream"),
            "sites": self.get("sites", []),
            "leader": self.get("leader"),
            "replicas": self.replicas(),
        }
