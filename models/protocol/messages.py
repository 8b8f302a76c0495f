"""The messages of the protocol: signed updates and models, and the JSON ones.

Updates and global models are signed safetensors (:mod:`models.protocol.signed`);
task, receipt, status and metrics messages are small JSON objects. Builders and
parsers live side by side so the edge and the hub cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, Self

import numpy as np

from models.model import Model
from models.package import FORMAT as PACKAGE_FORMAT
from models.protocol.ed25519 import Ed25519PrivateKey, Ed25519PublicKey, InvalidSignature
from models.protocol.signed import SignedMessage, SigningError, sign_tensors, verify_and_parse
from models.spec import ModelSpec, declared_parameters

__all__ = [
    "LEGACY_TASK_KEYS",
    "MAX_COUNTER",
    "MAX_JSON_BYTES",
    "MAX_MODEL_BYTES",
    "REJECT_REASONS",
    "Grant",
    "ModelMessage",
    "Receipt",
    "Task",
    "UpdateMeta",
    "build_model",
    "build_update",
    "current_task_keys",
    "model_hash",
    "parse_json",
    "parse_model",
    "parse_update_meta",
]

MAX_MODEL_BYTES = 16 * 1024 * 1024
MAX_JSON_BYTES = 64 * 1024
UPDATE_FORMAT = "wearfl-update/1"
RECEIPT_DOMAIN = b"wearfl-receipt/1\n"
TASK_DOMAIN = b"wearfl-task/1\n"
GRANT_DOMAIN = b"wearfl-grant/1\n"
MAX_COUNTER = 1 << 62
"""Rounds, versions, sequences and example counts stay below this: each fits SQLite's INTEGER, and sums of a
few still fit in 64 bits."""
MAX_TASK_KEYS = 64
MAX_TASK_CLIENTS = 100_000

REJECT_REASONS = (
    "oversize", "malformed", "unsigned", "bad_signature", "key_mismatch", "unknown_client", "client_mismatch",
    "replayed", "stale", "not_selected", "wrong_shape", "non_finite", "norm_bound", "round_closed", "duplicate_round",
    "too_many_examples", "too_many_clients",
)
"""Why an update can be refused; every receipt and counter uses these names."""


def model_hash(message: bytes) -> str:
    """The id edges quote as ``base_hash``: SHA-256 of the signed model message."""
    return hashlib.sha256(message).hexdigest()


# -- updates -------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateMeta:
    """What travels with an update's tensors, all of it covered by the signature."""

    client: str
    round: int
    base_version: int
    base_hash: str
    num_examples: int
    sequence: int
    codec: dict[str, Any]
    timestamp: float = field(default_factory=time.time)
    metrics: dict[str, float] = field(default_factory=dict)


def build_update(meta: UpdateMeta, tensors: Mapping[str, np.ndarray], key: Ed25519PrivateKey) -> bytes:
    return sign_tensors(tensors, {"format": UPDATE_FORMAT, **asdict(meta)}, key)


def parse_update_meta(message: SignedMessage) -> UpdateMeta:
    """Typed metadata of a verified update; :class:`SigningError` ``malformed`` when it is not."""
    m = message.metadata
    try:
        if m.get("format") != UPDATE_FORMAT:
            raise ValueError(f"format {m.get('format')!r} is not {UPDATE_FORMAT}")
        meta = UpdateMeta(
            client=str(m["client"]), round=int(m["round"]), base_version=int(m["base_version"]),
            base_hash=str(m["base_hash"]), num_examples=int(m["num_examples"]), sequence=int(m["sequence"]),
            codec=dict(m["codec"]), timestamp=float(m["timestamp"]),
            metrics={str(k): float(v) for k, v in dict(m.get("metrics", {})).items()},
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise SigningError("malformed", f"update metadata is invalid ({exc})") from None
    if meta.num_examples < 1 or meta.sequence < 0 or meta.round < 0 or not math.isfinite(meta.timestamp):
        raise SigningError("malformed", "num_examples must be >= 1, sequence and round >= 0")
    if not all(v < MAX_COUNTER for v in (meta.sequence, meta.round, meta.base_version, meta.num_examples)):
        raise SigningError("malformed", "sequence, round, base_version and num_examples must be below 2**62")
    return meta


# -- global models -------------------------------------------------------------------


@dataclass(frozen=True)
class ModelMessage:
    """A verified global model and who signed it."""

    model: Model
    round: int
    public_key: bytes
    hash: str
    ledger: dict[str, Any] | None = None
    federation: str | None = None


def build_model(model: Model, round_number: int, key: Ed25519PrivateKey,
                ledger: dict[str, Any] | None = None, federation: str | None = None) -> bytes:
    """The retained ``model`` message: a package (plain safetensors) plus the hub's signature.

    ``ledger``: the model's entry in the hub's ledger, which edges check on adopting it.
    ``federation``: the federation it is released to, signed with it, so that a model of one
    federation cannot be replayed into another that trusts the same hub key.
    """
    meta: dict[str, Any] = {"format": PACKAGE_FORMAT, "task": model.spec.task, "version": int(model.version),
                            "spec": model.spec.to_json(), "round": int(round_number)}
    if ledger is not None:
        meta["ledger"] = ledger
    if federation is not None:
        meta["federation"] = federation
    return sign_tensors(model.network.state_dict(), meta, key)


def parse_model(data: bytes, expected_key: bytes | None = None) -> ModelMessage:
    """Verify and load a model message; :class:`SigningError` or ModelFormatError when it is bad."""
    message = verify_and_parse(data, MAX_MODEL_BYTES, expected_key)
    m = message.metadata
    try:
        if m.get("format") != PACKAGE_FORMAT:
            raise ValueError("not a wearfl model package")
        spec = ModelSpec.from_json(m["spec"])
        carried = sum(int(t.size) for t in message.tensors.values())
        if declared_parameters(spec) != carried:  # checked before any layer is allocated
            raise ValueError(f"its spec declares {declared_parameters(spec)} numbers, the message carries {carried}")
        model = Model(spec, version=int(m["version"]))
        model.network.load_state_dict(message.tensors)
        round_number = int(m["round"])
        if not (0 <= round_number < MAX_COUNTER and 0 <= model.version < MAX_COUNTER):
            raise ValueError("its round and version must be 0 .. 2**62")
        ledger = m.get("ledger")
        if ledger is not None and not isinstance(ledger, dict):
            raise ValueError("its ledger entry is not an object")
        federation = m.get("federation")
        if federation is not None and not isinstance(federation, str):
            raise ValueError("its federation is not a string")
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise SigningError("malformed", f"model message is invalid ({exc})") from None
    return ModelMessage(model, round_number, message.public_key, model_hash(data), ledger, federation)


# -- JSON messages -------------------------------------------------------------------


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    """A bounded JSON object; :class:`SigningError` ``oversize``/``malformed`` otherwise."""
    if len(data) > MAX_JSON_BYTES:
        raise SigningError("oversize", f"{what} of {len(data)} bytes exceeds {MAX_JSON_BYTES}")
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise SigningError("malformed", f"{what} is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise SigningError("malformed", f"{what} is not a JSON object")
    return value


LEGACY_TASK_KEYS = {"clip_norm": "grad_clip", "update_clip_norm": "update_clip"}
"""Task keys of wearfl 0.1 and their names now: the gradient clip and the update clip."""


def current_task_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with 0.1 key names replaced by today's (a today's name, when present, wins)."""
    out = {k: v for k, v in config.items() if k not in LEGACY_TASK_KEYS}
    for old, new in LEGACY_TASK_KEYS.items():
        if old in config and new not in config:
            out[new] = config[old]
    return out


def _signature_of(d: Mapping[str, Any]) -> str | None:
    signature = d.get("signature")
    if signature is not None and not (isinstance(signature, str) and len(signature) == 128):
        raise ValueError("the signature is not 64 bytes of hex")
    return signature


def _verify_hex(public_key: bytes, signature: str | None, signed: bytes) -> bool:
    if signature is None:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(bytes.fromhex(signature), signed)
    except (InvalidSignature, ValueError):
        return False
    return True


class _HubSigned:
    """A frozen dataclass whose ``signature`` (hex) is the hub's Ed25519 signature over every other field,
    under the class's ``DOMAIN`` (so a receipt's signature never verifies as a task's)."""

    DOMAIN: ClassVar[bytes]
    signature: str | None
    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ()
    """Fields added later: left out while None, so the bytes (and signatures) of older messages stay the same."""

    def _fields(self) -> dict[str, Any]:
        # shallow: the fields are JSON values already, and asdict's deep copy was most of a receipt's cost
        body = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        for name in self.OMITTED_WHEN_NONE:
            if body[name] is None:
                del body[name]
        return body

    def _signed_bytes(self) -> bytes:
        body = {k: v for k, v in self._fields().items() if k != "signature"}
        return self.DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def to_bytes(self) -> bytes:
        return json.dumps(self._fields(), sort_keys=True).encode()

    def signed(self, key: Ed25519PrivateKey) -> Self:
        """This message signed by the hub's ``key``."""
        return replace(self, signature=key.sign(self._signed_bytes()).hex())  # type: ignore[type-var]

    def verify(self, public_key: bytes) -> bool:
        """Whether the holder of ``public_key`` signed exactly these fields."""
        return _verify_hex(public_key, self.signature, self._signed_bytes())


@dataclass(frozen=True)
class Task(_HubSigned):
    """The retained ``task``: the round the edges should train for, and its flat config.

    ``clients``: the edges selected for this round (None: every edge). Keys renamed in 0.2
    (:data:`LEGACY_TASK_KEYS`) are read under their new names, and written under both for
    one release, so hubs and edges of neighbouring versions understand each other.

    ``federation`` and ``signature``: the hub signs every task (:meth:`signed`) for its
    federation; an edge acts only on a task that verifies against the hub key it pinned
    (:meth:`verify`), since anyone who can publish on ``task`` could otherwise set its
    round, learning rate or CPU budget.

    ``upstream``: in a federation of sites, a site hub's task (signed by the key a :class:`Grant`
    names) carries the consortium hub's own signed task as JSON; an edge checks that the site kept
    its round, model and settings, so a site chooses only which of its gateways train, and when.
    """

    DOMAIN: ClassVar[bytes] = TASK_DOMAIN
    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ("upstream",)
    round: int
    model_version: int
    config: dict[str, float | int | str | bool] = field(default_factory=dict)
    deadline: float | None = None
    clients: tuple[str, ...] | None = None
    federation: str | None = None
    signature: str | None = None
    upstream: str | None = None

    def selects(self, client: str) -> bool:
        return self.clients is None or client in self.clients

    def to_bytes(self) -> bytes:
        body = self._fields()
        body["config"] = {**self.config, **{old: self.config[new] for old, new in LEGACY_TASK_KEYS.items()
                                             if new in self.config}}
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Task:
        """A task whose every field has its type and bounds; :class:`SigningError` ``malformed`` otherwise.

        The signature is not checked here (:meth:`verify`), nor the config's values against what
        an edge accepts (that is the edge's policy)."""
        d = parse_json(data, "task")
        try:
            clients = d.get("clients")
            if clients is not None and not (isinstance(clients, list) and len(clients) <= MAX_TASK_CLIENTS
                                            and all(isinstance(c, str) and len(c) <= 64 for c in clients)):
                raise TypeError(f"clients must be a list of at most {MAX_TASK_CLIENTS} client ids")
            config = d.get("config", {})
            if not isinstance(config, dict) or len(config) > MAX_TASK_KEYS:
                raise TypeError(f"config must be an object of at most {MAX_TASK_KEYS} settings")
            for key, value in config.items():
                if not isinstance(value, bool | int | float | str):
                    raise TypeError(f"config {key!r} must be a number, string or boolean")
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"config {key!r} is not finite")
            federation = d.get("federation")
            if federation is not None and not isinstance(federation, str):
                raise TypeError("federation must be a string")
            upstream = d.get("upstream")
            if upstream is not None and not (isinstance(upstream, str) and len(upstream) <= MAX_JSON_BYTES // 2):
                raise TypeError(f"upstream must be a task's JSON of at most {MAX_JSON_BYTES // 2} characters")
            task = cls(int(d["round"]), int(d["model_version"]), current_task_keys(config),
                       None if d.get("deadline") is None else float(d["deadline"]),
                       None if clients is None else tuple(clients), federation, _signature_of(d), upstream)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise SigningError("malformed", f"task is invalid ({exc})") from None
        if not (0 <= task.round < MAX_COUNTER and 0 <= task.model_version < MAX_COUNTER):
            raise SigningError("malformed", "task round and model_version must be 0 .. 2**62")
        if task.deadline is not None and not math.isfinite(task.deadline):
            raise SigningError("malformed", "task deadline is not finite")
        return task


@dataclass(frozen=True)
class Grant(_HubSigned):
    """The top hub's word that ``key`` (a site hub's Ed25519 public key, 64 hex digits) may sign the tasks and
    receipts of ``site``'s gateways in ``federation``.

    In a federation of sites, gateways pin the consortium hub's key: models reach them as the
    consortium signed them, so a site hub cannot forge one. A site runs its own rounds, though
    (its selection, its deadline), and answers its gateways' updates; it signs those tasks and
    receipts with its own key, which the consortium vouches for with a grant (retained on the
    site's broker at ``grant``). An edge believes a task or receipt signed by the pinned key, or by
    the key of a grant the pinned key signed for its federation.
    """

    DOMAIN: ClassVar[bytes] = GRANT_DOMAIN
    federation: str
    site: str
    key: str
    signature: str | None = None

    @property
    def public_key(self) -> bytes:
        return bytes.fromhex(self.key)

    @classmethod
    def from_bytes(cls, data: bytes) -> Grant:
        """A grant whose fields have their types; :class:`SigningError` ``malformed`` otherwise (the
        signature is checked by :meth:`verify`)."""
        d = parse_json(data, "grant")
        try:
            fields = {name: d[name] for name in ("federation", "site", "key")}
            if not all(isinstance(v, str) and 0 < len(v) <= 128 for v in fields.values()):
                raise TypeError("federation, site and key must be non-empty strings")
            if len(bytes.fromhex(fields["key"])) != 32:
                raise ValueError("key must be an Ed25519 public key (64 hex digits)")
            return cls(**fields, signature=_signature_of(d))
        except (KeyError, TypeError, ValueError) as exc:
            raise SigningError("malformed", f"grant is invalid ({exc})") from None


@dataclass(frozen=True)
class Receipt(_HubSigned):
    """The hub's answer to one update: ``accepted``, ``duplicate`` (stored before) or ``rejected``.

    ``signature``: the hub's Ed25519 signature (hex) over every other field. An edge drops an
    update from its outbox on a final receipt, so a receipt forged by anyone who can publish
    on ``receipt/<client>`` could make it lose an update; the edge checks the signature
    against the hub key it pinned and ignores a receipt that fails. ``digest`` (SHA-256 of
    the update's bytes) and ``federation`` bind it to one update of one federation: a signed
    receipt cannot be replayed onto another update under the same sequence number.
    """

    DOMAIN: ClassVar[bytes] = RECEIPT_DOMAIN
    client: str
    sequence: int
    status: str
    reason: str | None = None
    detail: str | None = None
    round: int | None = None
    model_version: int | None = None
    digest: str | None = None
    federation: str | None = None
    signature: str | None = None

    @property
    def final(self) -> bool:
        """The hub stored the update (or refused it for good): the edge may drop it from its outbox."""
        return self.status in ("accepted", "duplicate", "rejected")

    @classmethod
    def from_bytes(cls, data: bytes) -> Receipt:
        d = parse_json(data, "receipt")
        try:
            digest, federation = d.get("digest"), d.get("federation")
            if not all(v is None or isinstance(v, str) for v in (digest, federation, d.get("reason"), d.get("detail"))):
                raise TypeError("digest, federation, reason and detail must be strings")
            receipt = cls(str(d["client"]), int(d["sequence"]), str(d["status"]), d.get("reason"), d.get("detail"),
                          d.get("round"), d.get("model_version"), digest, federation, _signature_of(d))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise SigningError("malformed", f"receipt is invalid ({exc})") from None
        if receipt.status not in ("accepted", "duplicate", "rejected"):
            raise SigningError("malformed", f"receipt status {receipt.status!r} is unknown")
        return receipt
