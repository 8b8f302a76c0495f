"""The messages of the four stages, each with ``to_bytes`` and a bounded ``from_bytes``.

================ ============= ======================================================
message          direction     content
================ ============= ======================================================
AdvertiseKeys    client → hub  the client's two X25519 public keys, device-signed
KeyBundle        hub → client  the neighbours' AdvertiseKeys
ShareKeys        client → hub  a commitment to the self-mask seed; an encrypted share
                               pair (s-key share, seed share) per neighbour
ShareBundle      hub → client  the encrypted share pairs addressed to the client
MaskedInput      client → hub  y = x + PRG(b) + Σ ±PRG(s_uv) mod 2^b
UnmaskRequest    hub → client  which neighbours survived and which dropped
UnmaskResponse   client → hub  seed shares of survivors, s-key shares of the dropped
================ ============= ======================================================

``from_bytes`` checks syntax only (framing, sizes, ids, field elements); whether a
message fits the round (roster, neighbourhood, signatures) is the client's and the
server's check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from models.protocol.ed25519 import Ed25519PublicKey, InvalidSignature
from models.protocol.secagg.config import MAX_CLIENTS, MAX_VALUES, RoundConfig
from models.protocol.secagg.errors import SecAggError
from models.protocol.secagg.primitives import KEY_BYTES, NONCE_BYTES, TAG_BYTES
from models.protocol.secagg.shamir import SHARE_BYTES, share_from_bytes, share_to_bytes
from models.protocol.secagg.wire import MAX_MESSAGE_BYTES, Reader, Writer
from models.protocol.signed import is_weak_key

__all__ = [
    "SEALED_SHARE_BYTES", "AdvertiseKeys", "KeyBundle", "MaskedInput", "ShareBundle", "ShareKeys", "UnmaskRequest",
    "UnmaskResponse",
]

SIGNATURE_BYTES = 64
DIGEST_BYTES = 32
SEALED_SHARE_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES
"""An encrypted share pair: nonce, s-key share and seed share, Poly1305 tag (160 bytes)."""
_MIN_NAME = 2
"""The fewest bytes a name takes on the wire (length byte and one character)."""

ADVERTISE, KEY_BUNDLE, SHARE_KEYS, SHARE_BUNDLE, MASKED_INPUT, UNMASK_REQUEST, UNMASK_RESPONSE = range(1, 8)
TRANSCRIPT = 0x80


# -- AdvertiseKeys and KeyBundle -----------------------------------------------------


@dataclass(frozen=True)
class AdvertiseKeys:
    """A client's per-round public keys: ``c`` encrypts shares, ``s`` agrees masks; signed with its device key."""

    round_id: str
    client_id: str
    config_digest: bytes
    c_public: bytes
    s_public: bytes
    signature: bytes

    @staticmethod
    def transcript(round_id: str, client_id: str, digest: bytes, c_public: bytes, s_public: bytes) -> bytes:
        """What the device key signs: every field, bound to the round's config digest."""
        return (Writer(TRANSCRIPT).fixed(b"advertise").name(round_id).name(client_id)
                .fixed(digest).fixed(c_public).fixed(s_public).to_bytes())

    def verify(self, config: RoundConfig, directory: Mapping[str, bytes]) -> None:
        """Raise SecAggError unless this advert is for ``config`` and signed by the client's pinned device key."""
        if self.round_id != config.round_id or self.config_digest != config.digest:
            raise SecAggError("round_mismatch", f"{self.client_id}'s keys are for another round or config.",
                              client=self.client_id)
        config.index(self.client_id)
        device = directory.get(self.client_id)
        if device is None:
            raise SecAggError("unknown_client", f"no device key is pinned for {self.client_id}.", client=self.client_id)
        message = self.transcript(self.round_id, self.client_id, self.config_digest, self.c_public, self.s_public)
        try:
            if is_weak_key(device):
                raise InvalidSignature
            Ed25519PublicKey.from_public_bytes(device).verify(self.signature, message)
        except (InvalidSignature, ValueError):
            raise SecAggError("bad_signature", f"{self.client_id}'s advertised keys are not signed by its device key;"
                              " the relay altered or substituted them.", client=self.client_id) from None

    def to_bytes(self) -> bytes:
        return (Writer(ADVERTISE).name(self.round_id).name(self.client_id).fixed(self.config_digest)
                .fixed(self.c_public).fixed(self.s_public).fixed(self.signature).to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> AdvertiseKeys:
        r = Reader(data, ADVERTISE, "AdvertiseKeys", max_bytes=512)
        msg = cls(r.name(), r.name(), r.fixed(DIGEST_BYTES), r.fixed(KEY_BYTES), r.fixed(KEY_BYTES),
                  r.fixed(SIGNATURE_BYTES))
        r.end()
        return msg


@dataclass(frozen=True)
class KeyBundle:
    """The hub's relay of the recipient's neighbours' adverts (those that arrived)."""

    round_id: str
    recipient: str
    adverts: tuple[AdvertiseKeys, ...]

    def to_bytes(self) -> bytes:
        w = Writer(KEY_BUNDLE).name(self.round_id).name(self.recipient).u32(len(self.adverts))
        for advert in self.adverts:
            raw = advert.to_bytes()
            w.u32(len(raw)).fixed(raw)
        return w.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyBundle:
        r = Reader(data, KEY_BUNDLE, "KeyBundle", max_bytes=400 * MAX_CLIENTS)
        round_id, recipient = r.name(), r.name()
        adverts = []
        for _ in range(r.count(MAX_CLIENTS, 4)):
            size = r.u32()
            adverts.append(AdvertiseKeys.from_bytes(r.fixed(size)))
        r.end()
        return cls(round_id, recipient, tuple(adverts))


# -- ShareKeys and ShareBundle -------------------------------------------------------


def _write_sealed(w: Writer, items: tuple[tuple[str, bytes], ...]) -> None:
    w.u32(len(items))
    for peer, sealed in items:
        w.name(peer).fixed(sealed)


def _read_sealed(r: Reader) -> tuple[tuple[str, bytes], ...]:
    return tuple((r.name(), r.fixed(SEALED_SHARE_BYTES))
                 for _ in range(r.count(MAX_CLIENTS, _MIN_NAME + SEALED_SHARE_BYTES)))


@dataclass(frozen=True)
class ShareKeys:
    """A client's encrypted share pairs, ``(recipient, sealed)``, and its seed commitment."""

    round_id: str
    sender: str
    seed_commitment: bytes
    shares: tuple[tuple[str, bytes], ...]

    def to_bytes(self) -> bytes:
        w = Writer(SHARE_KEYS).name(self.round_id).name(self.sender).fixed(self.seed_commitment)
        _write_sealed(w, self.shares)
        return w.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareKeys:
        r = Reader(data, SHARE_KEYS, "ShareKeys", max_bytes=(SEALED_SHARE_BYTES + 66) * MAX_CLIENTS + 256)
        msg = cls(r.name(), r.name(), r.fixed(DIGEST_BYTES), _read_sealed(r))
        r.end()
        return msg


@dataclass(frozen=True)
class ShareBundle:
    """The hub's relay of the share pairs addressed to ``recipient``, ``(sender, sealed)``."""

    round_id: str
    recipient: str
    shares: tuple[tuple[str, bytes], ...]

    def to_bytes(self) -> bytes:
        w = Writer(SHARE_BUNDLE).name(self.round_id).name(self.recipient)
        _write_sealed(w, self.shares)
        return w.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareBundle:
        r = Reader(data, SHARE_BUNDLE, "ShareBundle", max_bytes=(SEALED_SHARE_BYTES + 66) * MAX_CLIENTS + 256)
        msg = cls(r.name(), r.name(), _read_sealed(r))
        r.end()
        return msg


# -- MaskedInput ---------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """A client's masked vector: ``values`` (m,) uint64 residues mod 2^``bits``.

    On the wire each value takes ``ceil(bits / 8)`` little-endian bytes.
    """

    round_id: str
    sender: str
    bits: int
    values: np.ndarray

    def to_bytes(self) -> bytes:
        width = -(-self.bits // 8)
        packed = np.ascontiguousarray(self.values, "<u8").view(np.uint8).reshape(-1, 8)[:, :width]
        return (Writer(MASKED_INPUT).name(self.round_id).name(self.sender).u8(self.bits).u32(len(self.values))
                .fixed(packed.tobytes()).to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> MaskedInput:
        """Parse; ``max_bytes`` lets the orchestrator bound it by :meth:`RoundConfig.masked_input_bytes`."""
        r = Reader(data, MASKED_INPUT, "MaskedInput", max_bytes)
        round_id, sender, bits, n = r.name(), r.name(), r.u8(), r.u32()
        if not 1 <= bits <= 64 or not 1 <= n <= MAX_VALUES:
            raise SecAggError("malformed", f"a MaskedInput of {n} values of {bits} bits is out of range.")
        width = -(-bits // 8)
        raw = np.frombuffer(r.fixed(n * width), np.uint8).reshape(n, width)
        r.end()
        wide = np.zeros((n, 8), np.uint8)
        wide[:, :width] = raw
        values = wide.view("<u8").reshape(n).astype(np.uint64)
        if bits < 64 and int(values.max()) >> bits:
            raise SecAggError("malformed", f"a MaskedInput holds values of more than {bits} bits.")
        return cls(round_id, sender, bits, values)


# -- UnmaskRequest and UnmaskResponse ------------------------------------------------


def _write_names(w: Writer, names: tuple[str, ...]) -> None:
    w.u32(len(names))
    for name in names:
        w.name(name)


def _read_names(r: Reader) -> tuple[str, ...]:
    return tuple(r.name() for _ in range(r.count(MAX_CLIENTS, _MIN_NAME)))


@dataclass(frozen=True)
class UnmaskRequest:
    """The hub's view of the recipient's neighbourhood: who sent a masked input and who dropped."""

    round_id: str
    recipient: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]

    def to_bytes(self) -> bytes:
        w = Writer(UNMASK_REQUEST).name(self.round_id).name(self.recipient)
        _write_names(w, self.survivors)
        _write_names(w, self.dropped)
        return w.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        r = Reader(data, UNMASK_REQUEST, "UnmaskRequest", max_bytes=2 * 70 * MAX_CLIENTS + 256)
        msg = cls(r.name(), r.name(), _read_names(r), _read_names(r))
        r.end()
        return msg


def _write_shares(w: Writer, shares: tuple[tuple[str, int], ...]) -> None:
    w.u32(len(shares))
    for peer, share in shares:
        w.name(peer).fixed(share_to_bytes(share))


def _read_shares(r: Reader) -> tuple[tuple[str, int], ...]:
    return tuple((r.name(), share_from_bytes(r.fixed(SHARE_BYTES)))
                 for _ in range(r.count(MAX_CLIENTS, _MIN_NAME + SHARE_BYTES)))


@dataclass(frozen=True)
class UnmaskResponse:
    """A survivor's answer: ``(peer, share)`` of survivors' seeds and of the dropped peers' s-keys."""

    round_id: str
    sender: str
    seed_shares: tuple[tuple[str, int], ...]
    key_shares: tuple[tuple[str, int], ...]

    def to_bytes(self) -> bytes:
        w = Writer(UNMASK_RESPONSE).name(self.round_id).name(self.sender)
        _write_shares(w, self.seed_shares)
        _write_shares(w, self.key_shares)
        return w.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskResponse:
        r = Reader(data, UNMASK_RESPONSE, "UnmaskResponse", max_bytes=2 * 140 * MAX_CLIENTS + 256)
        msg = cls(r.name(), r.name(), _read_shares(r), _read_shares(r))
        r.end()
        return msg
