"""One round's public parameters, which every party derives everything else from.

The hub publishes a :class:`RoundConfig`; each client signs its advertised keys
together with the config's digest, so a hub that shows two clients different
configs (another roster, threshold or graph) is caught by the signatures.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from models.errors import ConfigError
from models.protocol.secagg import graph
from models.protocol.secagg.errors import SecAggError
from models.protocol.secagg.fixedpoint import MAX_VALUE_BITS, modulus_bits
from models.protocol.topics import NAME_PATTERN

__all__ = ["MAX_CLIENTS", "MAX_VALUES", "RoundConfig", "default_threshold"]

MAX_CLIENTS = 16384
MAX_VALUES = 1 << 24
MAX_CONFIG_BYTES = 80 * MAX_CLIENTS + 4096
SEED_BYTES = 32


def default_threshold(degree: int) -> int:
    """``k // 2 + 1``: a strict majority of a neighbourhood.

    Then no two disjoint groups of neighbours can each reach the threshold, so a hub
    that tells some neighbours a client dropped and others that it survived cannot
    collect both kinds of share (with no corrupted clients helping it).
    """
    return degree // 2 + 1


@dataclass(frozen=True)
class RoundConfig:
    """The parameters of one secure-aggregation round.

    ``roster``: the invited client ids, sorted; a client's share point is its index + 1.
    ``degree``: neighbours per client (``n - 1``: all-to-all). ``threshold``: shares
    that recover a client's secrets, ``2 <= t <= degree``. ``vector_length``: values
    per update. ``value_bits`` and ``value_range``: the common fixed-point encoding, ``value_bits``
    bits over [-value_range, value_range] (``clip`` in the wire format, wearfl-secagg-config/1).
    ``graph_seed``: the public seed of the neighbourhood graph.

    A threshold above half the neighbourhood (:func:`default_threshold`) keeps a hub
    that lies about who dropped from collecting both kinds of share of one client; a
    lower one tolerates more dropouts but protects only against a hub that follows
    the protocol (honest-but-curious).
    """

    round_id: str
    roster: tuple[str, ...]
    threshold: int
    degree: int
    vector_length: int
    value_bits: int = 16
    value_range: float = 1.0
    graph_seed: bytes = field(default=bytes(SEED_BYTES))

    def __post_init__(self) -> None:
        def bad(detail: str) -> SecAggError:
            return SecAggError("bad_config", detail)

        if not NAME_PATTERN.fullmatch(self.round_id):
            raise bad(f"round id {self.round_id!r} must be 1-64 letters, digits, '_', '.' or '-'.")
        n = len(self.roster)
        if not 3 <= n <= MAX_CLIENTS:
            raise bad(f"a round needs 3..{MAX_CLIENTS} clients, got {n}.")
        if any(not NAME_PATTERN.fullmatch(u) for u in self.roster):
            raise bad("every client id must be 1-64 letters, digits, '_', '.' or '-'.")
        if list(self.roster) != sorted(set(self.roster)):
            raise bad("the roster must be sorted and without repeats.")
        if not (self.degree == n - 1 or (self.degree % 2 == 0 and 2 <= self.degree < n - 1)):
            raise bad(f"degree must be {n - 1} (all-to-all) or even in 2..{n - 2}, got {self.degree}.")
        if not 2 <= self.threshold <= self.degree:
            raise bad(f"threshold must be 2..{self.degree} (the neighbourhood), got {self.threshold}.")
        if not 1 <= self.vector_length <= MAX_VALUES:
            raise bad(f"vector length must be 1..{MAX_VALUES}, got {self.vector_length}.")
        if not (isinstance(self.value_range, float) and math.isfinite(self.value_range) and self.value_range > 0):
            raise bad(f"value range must be a finite float > 0, got {self.value_range!r}.")
        if len(self.graph_seed) != SEED_BYTES:
            raise bad(f"the graph seed must be {SEED_BYTES} bytes.")
        if not 2 <= self.value_bits <= MAX_VALUE_BITS:
            raise bad(f"value bits must be 2..{MAX_VALUE_BITS}, got {self.value_bits}.")
        try:
            modulus_bits(self.value_bits, n)
        except ConfigError as exc:
            raise bad(str(exc)) from None

    @classmethod
    def create(
        cls, round_id: str, roster: list[str] | tuple[str, ...], vector_length: int, *, value_bits: int = 16,
        value_range: float = 1.0, degree: int | None = None, threshold: int | None = None,
        graph_seed: bytes | None = None,
        all_to_all_below: int = graph.ALL_TO_ALL_BELOW,
    ) -> RoundConfig:
        """A config with defaults: degree by :func:`~graph.choose_degree`, threshold a neighbourhood majority."""
        ids = tuple(sorted(set(roster)))
        k = graph.choose_degree(len(ids), all_to_all_below=all_to_all_below) if degree is None else degree
        t = default_threshold(k) if threshold is None else threshold
        seed = os.urandom(SEED_BYTES) if graph_seed is None else graph_seed
        return cls(round_id, ids, t, k, vector_length, value_bits, float(value_range), seed)

    @property
    def n(self) -> int:
        return len(self.roster)

    @property
    def modulus_bits(self) -> int:
        """Ring bits ``b``: the sum of every roster client's values fits with its sign."""
        return modulus_bits(self.value_bits, self.n)

    @property
    def masked_input_bytes(self) -> int:
        """The largest MaskedInput of this round on the wire: a bound to check before parsing one."""
        return 5 + 2 * 65 + 5 + self.vector_length * -(-self.modulus_bits // 8)

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of :meth:`to_bytes`: what signatures and key derivations bind to."""
        return hashlib.sha256(self.to_bytes()).digest()

    @cached_property
    def _index(self) -> dict[str, int]:
        return {u: i + 1 for i, u in enumerate(self.roster)}

    @cached_property
    def graph(self) -> dict[str, frozenset[str]]:
        return graph.neighbourhoods(self.roster, self.degree, self.graph_seed)

    def index(self, client: str) -> int:
        """The client's share point, 1..n; SecAggError ``unknown_client`` outside the roster."""
        try:
            return self._index[client]
        except KeyError:
            raise SecAggError("unknown_client", f"{client!r} is not in round {self.round_id}'s roster.",
                              client=client) from None

    def neighbours(self, client: str) -> frozenset[str]:
        self.index(client)
        return self.graph[client]

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces): equal configs give equal bytes and digests."""
        body: dict[str, Any] = {
            "format": "wearfl-secagg-config/1", "round_id": self.round_id, "roster": list(self.roster),
            "threshold": self.threshold, "degree": self.degree, "vector_length": self.vector_length,
            "value_bits": self.value_bits, "clip": self.value_range, "graph_seed": self.graph_seed.hex(),
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundConfig:
        """A config from :meth:`to_bytes`; SecAggError ``oversize``, ``malformed`` or ``bad_config``."""
        if len(data) > MAX_CONFIG_BYTES:
            raise SecAggError("oversize", f"a round config of {len(data)} bytes exceeds {MAX_CONFIG_BYTES}.")
        try:
            d = json.loads(data)
            if not isinstance(d, dict) or d.get("format") != "wearfl-secagg-config/1":
                raise ValueError("not a wearfl-secagg-config/1 object")
            ints = [d[k] for k in ("threshold", "degree", "vector_length", "value_bits")]
            roster, round_id, seed = d["roster"], d["round_id"], bytes.fromhex(d["graph_seed"])
            if not all(type(v) is int for v in ints) or type(d["clip"]) is not float:
                raise TypeError("threshold, degree, vector_length and value_bits must be integers, clip a float")
            if not (isinstance(roster, list) and all(isinstance(u, str) for u in roster) and isinstance(round_id, str)):
                raise TypeError("roster must be a list of ids and round_id a string")
        except (ValueError, KeyError, TypeError, RecursionError, UnicodeDecodeError) as exc:
            raise SecAggError("malformed", f"not a readable round config ({exc}).") from None
        config = cls(round_id, tuple(roster), ints[0], ints[1], ints[2], ints[3], d["clip"], seed)
        if config.to_bytes() != bytes(data):
            raise SecAggError("malformed", "the round config is not in canonical form.")
        return config
