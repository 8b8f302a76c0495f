"""Update intake: every message on ``update/<client>`` becomes a receipt, and at most one stored update.

Why one pipeline: an update comes from an untrusted network, so each step only runs
once the cheaper, safer ones passed, and every refusal is a typed reason
(:data:`models.protocol.messages.REJECT_REASONS`) that is counted and answered. The
order:

1. client id from the topic (``malformed`` if unreadable);
2. size bound (``oversize``), before a byte is parsed; safetensors framing (``malformed``):
   the header length must fit and the header start with ``{``; a header that names no
   signature tensor (found by a byte search, nothing parsed) is ``unsigned``;
3. signature, against the key pinned for the client (trust on first use) or the
   keyring's (``unknown_client`` for a client it lacks); ``bad_signature`` (altered
   bytes), ``key_mismatch`` (signed by another key: forged), ``malformed``. Tensors are
   parsed only after this check;
4. update metadata (``malformed``); its client must be the topic's (``client_mismatch``);
   ``num_examples`` at most ``max_examples`` (``too_many_examples``): it weights the update
   in the mean, so an unbounded count would let one update outweigh the federation;
5. sequence numbers: each client's grow strictly, and the round they were stored in is
   kept. The same bytes again while their round is open (a QoS 1 redelivery, an outbox
   re-send): receipt ``duplicate``, counted apart, not accepted. A sequence number used
   before in any other way (a copy from a closed round, other bytes under a used
   number, a number below the client's last stored one): rejected ``replayed``;
6. base model version must be the open round's (``stale``), the round open and the
   update's own (``round_closed``), its client among the round's selected ones when
   the hub selected some (``not_selected``), and without an update in this round yet
   (``duplicate_round``: one update per client per round, whatever its sequence);
7. decode the tensors (``wrong_shape``, ``non_finite``, ``malformed``); an L2 norm above
   ``max_update_norm``, when one is set, is rejected ``norm_bound``;
8. a new client's key is pinned (trust on first use) only now, by an update that passed
   every check: updates refused as ``stale`` cannot squat client ids. With
   ``max_pinned``, a client past that many is refused ``too_many_clients``;
9. persist, then the receipt ``accepted``.

Receipts for a message whose sequence cannot be read carry ``sequence = -1``; one whose
topic names no valid client carries ``client = ""`` (there is no topic to answer on). A
message refused before its signature was checked, from a client the hub does not know
(neither in the keyring nor pinned), gets no receipt either: junk on ``update/<any id>``
must not make the hub publish one message per message (it is counted all the same). Every
receipt names the federation and the SHA-256 of the update it answers.
:meth:`Intake.process_batch` runs many messages in one store transaction (one commit);
nothing here touches the network.

The intake keeps no round of its own: each call is handed the open round
(:class:`hub.round_state.RoundView`: number, base version, open or not, whose updates it
takes) and only reads it. Its own state is what it keeps of the store: pinned keys and
each client's last sequence.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hub.round_state import RoundView
from hub.store import HubStore
from models.errors import UpdateRejected
from models.protocol.codec import CodecError, UpdateCodec
from models.protocol.messages import MAX_COUNTER, REJECT_REASONS, Receipt, UpdateMeta, parse_update_meta
from models.protocol.signed import SIGNATURE_TENSOR, TRAILER_BYTES, SigningError, verify_and_parse
from models.protocol.topics import Topics

__all__ = ["DEFAULT_MAX_EXAMPLES", "DEFAULT_MAX_UPDATE_BYTES", "AcceptedUpdate", "Intake", "StaleRound"]

log = logging.getLogger(__name__)

DEFAULT_MAX_UPDATE_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_EXAMPLES = 1_000_000
"""The most examples one update may claim (a gateway trains on thousands of windows a round)."""
MAX_EXAMPLES_BOUND = 1 << 40  # a million clients' sums of these still fit SQLite's INTEGER


@dataclass(frozen=True)
class AcceptedUpdate:
    """An update that passed every check and is stored: its metadata and its decoded delta."""

    meta: UpdateMeta
    delta: dict[str, np.ndarray]
    size: int
    norm: float | None = None  # the delta's L2 norm, computed when max_update_norm is set
    staleness: int = 0  # how many model versions behind the hub's the update's base is

    @property
    def client(self) -> str:
        return self.meta.client

    @property
    def num_examples(self) -> int:
        return self.meta.num_examples


class Intake:
    """Validates and stores updates for the open round of one federation.

    ``keyring`` (``{client: raw public key}``) limits intake to those clients and keys;
    without one, the first verified update of a client pins its key. Updates for any
    other round or base model version than the open round's (handed to each call) are
    refused, except that with ``max_staleness`` > 0 (asynchronous aggregation) an update
    up to that many versions behind, from an earlier round, is taken. ``max_update_norm``:
    a larger update is rejected (``norm_bound``). ``max_examples``: the most examples an
    update may claim. ``max_pinned``: without a keyring, the most clients whose keys are
    pinned (None: no bound). ``shared``: other hub replicas write the same store, so each batch
    reads the pinned keys and sequences afresh and passes the store's round barrier
    (:meth:`hub.store.HubStore.intake_barrier`): a batch for a round that is being closed is
    refused ``round_closed``, and one for a round the store has left raises :class:`StaleRound`.
    """

    def __init__(
        self,
        store: HubStore,
        topics: Topics,
        codec: UpdateCodec,
        *,
        max_update_bytes: int = DEFAULT_MAX_UPDATE_BYTES,
        max_update_norm: float | None = None,
        keyring: Mapping[str, bytes] | None = None,
        max_staleness: int = 0,
        max_examples: int = DEFAULT_MAX_EXAMPLES,
        max_pinned: int | None = None,
        shared: bool = False,
    ) -> None:
        if not 1 <= max_examples <= MAX_EXAMPLES_BOUND:
            raise ValueError(f"max_examples must be 1 .. 2**40, got {max_examples}")
        if max_pinned is not None and max_pinned < 1:
            raise ValueError(f"max_pinned must be >= 1, got {max_pinned}")
        if max_update_bytes < 1024:
            raise ValueError(f"max_update_bytes must be at least 1024, got {max_update_bytes}")
        if max_update_norm is not None and not (math.isfinite(max_update_norm) and max_update_norm > 0):
            raise ValueError(f"max_update_norm must be finite and > 0, got {max_update_norm}")
        self.store, self.topics, self.codec = store, topics, codec
        self.max_update_bytes = int(max_update_bytes)
        self.max_update_norm = max_update_norm
        self.keyring = dict(keyring) if keyring is not None else None
        self.max_staleness = int(max_staleness)
        self.max_examples, self.max_pinned = int(max_examples), max_pinned
        self.shared = shared
        self._keys = store.pinned_keys()
        self._last_sequence = store.last_sequences()

    @property
    def known(self) -> int:
        """How many clients belong by a pinned key (it grows as keys are pinned)."""
        return len(self._keys)

    def knows(self, client: str) -> bool:
        """Whether ``client`` belongs: in the keyring, or (without one) its key is pinned."""
        return client in (self.keyring if self.keyring is not None else self._keys)

    def process(
        self, topic: str, payload: bytes, current: RoundView, received_at: float | None = None
    ) -> tuple[Receipt, AcceptedUpdate | None]:
        """One message for the ``current`` round: its receipt, and the accepted update when it was stored."""
        return self.process_batch([(topic, payload)], current, received_at)[0]

    def process_batch(
        self, messages: Sequence[tuple[str, bytes]], current: RoundView, received_at: float | None = None
    ) -> list[tuple[Receipt, AcceptedUpdate | None]]:
        """Many messages for the ``current`` round in one store transaction: all durable when this returns."""
        now = time.time() if received_at is None else received_at
        try:
            with self.store.transaction():
                if self.shared:
                    current = self._through_barrier(current, messages)
                return [self._process(topic, bytes(payload), current, now) for topic, payload in messages]
        except BaseException:
            # keys pinned and sequences stored in the rolled-back transaction are gone
            self._keys, self._last_sequence = self.store.pinned_keys(), self.store.last_sequences()
            raise

    def _through_barrier(self, current: RoundView, messages: Sequence[tuple[str, bytes]]) -> RoundView:
        """(in the batch's transaction) What other replicas stored of this batch's clients, and whether
        ``current`` still takes updates."""
        round_number, closing = self.store.intake_barrier()
        if round_number is not None and round_number != current.round:
            raise StaleRound(round_number)
        clients = [c for topic, _ in messages if (c := self.topics.client_from(topic, "update")) is not None]
        keys, sequences = self.store.clients_state(clients)
        self._keys.update(keys)
        self._last_sequence.update(sequences)
        return _Closed(current) if closing == current.round else current

    def _process(self, topic: str, payload: bytes, current: RoundView,
                 now: float) -> tuple[Receipt, AcceptedUpdate | None]:
        client = self.topics.client_from(topic, "update")
        if client is None:
            rej = UpdateRejected("malformed", f"topic {topic[:200]!r} names no valid client")
            return self._rejected(current, "", rej)
        digest = hashlib.sha256(payload).hexdigest()
        try:
            meta, tensors, public_key = self._verified(client, payload)
        except UpdateRejected as rej:
            return self._rejected(current, client, rej, digest, answer=self.knows(client))
        try:
            if self._is_duplicate(meta, digest, current):
                self.store.touch(client, now)
                self.store.count_duplicate()
                log.debug("duplicate update %s/%d dropped", client, meta.sequence)
                return self._receipt(current, client, meta.sequence, "duplicate", digest=digest), None
            accepted = self._checked(meta, tensors, len(payload), current)
            self._pin(client, public_key, meta.sequence, now)
        except UpdateRejected as rej:
            self.store.touch(client, now)  # verified: the client is alive, its update just unusable
            return self._rejected(current, client, rej, digest)
        # Filed under the hub's open round: an asynchronous hub takes updates from earlier rounds.
        self.store.record_update(client, meta.sequence, current.round, meta.base_version, meta.num_examples, payload,
                                 now)
        self._last_sequence[client] = max(self._last_sequence.get(client, -1), meta.sequence)
        return self._receipt(current, client, meta.sequence, "accepted", digest=digest), accepted

    def _pin(self, client: str, public_key: bytes, sequence: int, now: float) -> None:
        """Pin a new client's key (trust on first use), once its update passed every check."""
        if self._keys.get(client) == public_key:
            return
        if self.keyring is None and client not in self._keys and self.max_pinned is not None \
                and len(self._keys) >= self.max_pinned:
            raise UpdateRejected("too_many_clients", f"the hub already pins {len(self._keys)} clients "
                                 f"(max_pinned {self.max_pinned})", sequence)
        self.store.pin_key(client, public_key, now)
        self._keys[client] = public_key

    def _is_duplicate(self, meta: UpdateMeta, digest: str, current: RoundView) -> bool:
        """True for a harmless re-send within its open round; raises ``replayed`` for any other reuse."""
        seq = meta.sequence
        stored = self.store.stored_update(meta.client, seq)
        if stored is not None:
            stored_round, stored_digest = stored
            if stored_digest != digest:
                raise UpdateRejected("replayed", f"sequence {seq} is already used by another stored update", seq)
            if not (current.is_open and stored_round == current.round):
                raise UpdateRejected("replayed", f"sequence {seq} was stored in round {stored_round}, which is closed; "
                                     "this copy is dropped", seq)
            return True
        last = self._last_sequence.get(meta.client, -1)
        if seq <= last:
            raise UpdateRejected("replayed", f"sequence {seq} is not above the client's last stored sequence {last}",
                                        seq)
        return False

    def _verified(self, client: str, payload: bytes) -> tuple[UpdateMeta, Mapping[str, np.ndarray], bytes]:
        """Steps 2-4: size, signature, metadata, client; (metadata, tensors, the signer's key)."""
        if len(payload) > self.max_update_bytes:
            raise UpdateRejected("oversize", f"{len(payload)} bytes exceeds the {self.max_update_bytes}-byte bound")
        if not _looks_like_safetensors(payload):
            raise UpdateRejected("malformed", "the payload is not a signed safetensors message")
        if not _names_signature(payload):
            raise UpdateRejected("unsigned", "the update carries no signature; sign it with the device key")
        if self.keyring is not None:
            expected = self.keyring.get(client)
            if expected is None:
                raise UpdateRejected("unknown_client", f"client {client!r} is not in the hub's keyring")
        else:
            expected = self._keys.get(client)
        try:
            message = verify_and_parse(payload, self.max_update_bytes, expected)
            meta = parse_update_meta(message)
        except SigningError as exc:
            raise UpdateRejected(exc.reason, exc.detail) from None
        except (ValueError, TypeError, OverflowError, KeyError) as exc:  # hostile metadata the parser missed
            raise UpdateRejected("malformed", f"update metadata is invalid ({type(exc).__name__})") from None
        if not all(0 <= v < MAX_COUNTER for v in (meta.sequence, meta.round, meta.base_version, meta.num_examples)):
            raise UpdateRejected("malformed", "sequence, round, base_version and num_examples must be below 2**62")
        if meta.client != client:
            raise UpdateRejected("client_mismatch",
                                 f"the update names client {meta.client[:64]!r}, the topic {client!r}", meta.sequence)
        if meta.num_examples > self.max_examples:
            raise UpdateRejected("too_many_examples", f"the update claims {meta.num_examples} examples, more than "
                                 f"max_examples {self.max_examples}", meta.sequence)
        return meta, message.tensors, message.public_key

    def _checked(self, meta: UpdateMeta, tensors: Mapping[str, np.ndarray], size: int,
                 current: RoundView) -> AcceptedUpdate:
        """Steps 6-7: round and version, then the tensors themselves."""
        seq, accepting = meta.sequence, current.accepting
        staleness = current.base_version - meta.base_version
        if not 0 <= staleness <= self.max_staleness:
            allowed = f" (at most {self.max_staleness} versions behind)" if self.max_staleness else ""
            raise UpdateRejected("stale", f"the update is based on model v{meta.base_version}, the round on "
                                 f"v{current.base_version}{allowed}", seq)
        in_round = meta.round == current.round if not self.max_staleness else meta.round <= current.round
        if not current.is_open or not in_round:
            state = f"round {current.round} is {'open' if current.is_open else 'closed'}"
            raise UpdateRejected("round_closed", f"the update is for round {meta.round}; {state}", seq)
        if accepting is not None and meta.round == current.round and meta.client not in accepting:
            raise UpdateRejected("not_selected", f"client {meta.client!r} is not among the {len(accepting)} "
                                 f"clients selected for round {current.round}", seq)
        if self.store.has_update_in(meta.client, current.round):
            raise UpdateRejected("duplicate_round", f"client {meta.client!r} already has an update in round "
                                 f"{current.round}; one update per client per round", seq)
        try:
            delta = self.codec.decode(tensors, meta.codec)
        except CodecError as exc:
            raise UpdateRejected(exc.reason, exc.detail, seq) from None
        except (ValueError, TypeError, OverflowError, KeyError) as exc:  # hostile codec metadata
            raise UpdateRejected("malformed", f"the update does not decode ({type(exc).__name__})", seq) from None
        norm = None
        if self.max_update_norm is not None:
            norm = l2_norm(delta)
            if not norm <= self.max_update_norm:
                raise UpdateRejected("norm_bound", f"the update's L2 norm {norm:.4g} exceeds max_update_norm "
                                     f"{self.max_update_norm:g}", seq)
        return AcceptedUpdate(meta, delta, size, norm, staleness)

    def decode_stored(self, payload: bytes, model_version: int) -> AcceptedUpdate | None:
        """An update stored earlier, verified and decoded again (to rebuild a round on ``model_version``).

        None when it no longer verifies or decodes."""
        try:
            message = verify_and_parse(payload, max(self.max_update_bytes, len(payload)))
            meta = parse_update_meta(message)
            expected = (self.keyring if self.keyring is not None else self._keys).get(meta.client)
            if expected is not None and expected != message.public_key:
                return None
            delta = self.codec.decode(message.tensors, meta.codec)
        except (SigningError, CodecError, ValueError, TypeError, OverflowError, KeyError):
            return None
        return AcceptedUpdate(meta, delta, len(payload), staleness=max(model_version - meta.base_version, 0))

    def _rejected(self, current: RoundView, client: str, rej: UpdateRejected, digest: str | None = None,
                  answer: bool = True) -> tuple[Receipt, None]:
        """Count a refusal; its receipt (client ``""``, so not sent, unless ``answer`` and the topic names one)."""
        if rej.reason not in REJECT_REASONS:  # a codec or signing reason receipts do not know
            rej = UpdateRejected("malformed", rej.detail, rej.sequence)
        self.store.count_rejection(rej.reason, client=client if answer and self.knows(client) else None)
        log.log(logging.INFO if answer else logging.DEBUG, "rejected update from %s (sequence %d): %s: %s",
                client or "?", rej.sequence, rej.reason, rej.detail)
        return self._receipt(current, client if answer else "", rej.sequence, "rejected", rej.reason, rej.detail,
                             digest), None

    def _receipt(self, current: RoundView, client: str, sequence: int, status: str, reason: str | None = None,
                 detail: str | None = None, digest: str | None = None) -> Receipt:
        return Receipt(client, sequence, status, reason, detail, current.round, current.base_version, digest,
                       self.topics.federation)


class StaleRound(Exception):
    """The store's round moved on (another replica closed it): read the round again and retry the batch."""

    def __init__(self, round_number: int) -> None:
        super().__init__(f"the hubs are in round {round_number}")
        self.round = round_number


@dataclass(frozen=True)
class _Closed:
    """A round another replica is closing, as the intake sees it: closed."""

    view: RoundView

    @property
    def round(self) -> int:
        return self.view.round

    @property
    def base_version(self) -> int:
        return self.view.base_version

    @property
    def is_open(self) -> bool:
        return False

    @property
    def accepting(self) -> frozenset[str] | None:
        return self.view.accepting


def l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all of a delta's values together, summed in float64."""
    flat = np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in delta.values()])
    return math.sqrt(float(np.dot(flat, flat)))


def _names_signature(data: bytes) -> bool:
    """Whether the header mentions the signature tensor: a byte search, nothing parsed."""
    n = int.from_bytes(data[:8], "little")
    return f'"{SIGNATURE_TENSOR}"'.encode() in data[8 : 8 + n]


def _looks_like_safetensors(data: bytes) -> bool:
    """A framing sniff, nothing parsed: a little-endian header length that fits, then ``{``.

    Garbage fails here as ``malformed`` instead of reaching the signature check as
    ``bad_signature``, which is kept for messages that look right but were altered.
    """
    if len(data) < 8 + 2 + TRAILER_BYTES:
        return False
    n = int.from_bytes(data[:8], "little")
    return 2 <= n <= len(data) - 8 - TRAILER_BYTES and data[8] == 0x7B
