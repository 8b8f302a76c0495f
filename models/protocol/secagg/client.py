"""A client's side of one round: a state machine that takes and returns messages.

Each method is one stage and may run once, in order; any refusal aborts the client
for the rest of the round (Bonawitz et al.: an honest client stops rather than
answer a hub that misbehaves). The client trusts only its device-key directory:
every key the hub relays must carry its owner's device signature over this round's
config, every share must decrypt under the pair's key, and at unmasking it reveals,
for each neighbour, either the share of its self-mask seed (it survived) or the
share of its mask key (it dropped), never both, once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from enum import Enum

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.secagg import shamir
from models.protocol.secagg.config import RoundConfig
from models.protocol.secagg.errors import SecAggError
from models.protocol.secagg.fixedpoint import levels, ring_mask, to_ring
from models.protocol.secagg.messages import (
    AdvertiseKeys,
    KeyBundle,
    MaskedInput,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from models.protocol.secagg.primitives import (
    KEY_BYTES,
    NONCE_BYTES,
    agree,
    commit,
    derive,
    new_x25519,
    open_sealed,
    prg,
    private_raw,
    public_raw,
    seal,
)
from models.protocol.signed import public_key_bytes

__all__ = ["ClientStage", "SecAggClient", "share_aad"]


class ClientStage(Enum):
    """Where a client is in the round; each stage method needs the one before it."""

    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    DONE = "done"
    ABORTED = "aborted"


def share_aad(digest: bytes, sender: int, recipient: int) -> bytes:
    """What an encrypted share pair is bound to: the round and the direction of the pair."""
    return b"wearfl-secagg/v1/share-aad\x00" + digest + sender.to_bytes(4, "big") + recipient.to_bytes(4, "big")


class SecAggClient:
    """One client in one round.

    ``signing_key``: the device's Ed25519 key. ``directory``: trusted device public
    keys by client id (a keyring from the operator, never from the hub), which must
    hold this client's own. ``randbytes``: the randomness source; tests pass a seeded
    one, production keeps :func:`os.urandom`.

    Stages: :meth:`advertise_keys` → :meth:`share_keys` → :meth:`masked_input` → :meth:`unmask`.
    """

    def __init__(
        self, client_id: str, config: RoundConfig, signing_key: Ed25519PrivateKey, directory: Mapping[str, bytes],
        *, randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.client_id, self.config = client_id, config
        self._index = config.index(client_id)
        if directory.get(client_id) != public_key_bytes(signing_key):
            raise SecAggError("bad_config", f"the directory does not pin {client_id}'s own device key.",
                              client=client_id)
        self._neighbours = config.neighbours(client_id)
        self._signing_key, self._directory, self._randbytes = signing_key, dict(directory), randbytes
        self._stage = ClientStage.NEW
        self._c_key: X25519PrivateKey | None = new_x25519(randbytes)
        self._s_key: X25519PrivateKey | None = new_x25519(randbytes)
        self._peers: dict[str, AdvertiseKeys] = {}
        self._seed = b""
        self._held: dict[str, tuple[int, int]] = {}

    @property
    def stage(self) -> ClientStage:
        return self._stage

    @contextmanager
    def _step(self, expected: ClientStage, after: ClientStage) -> Iterator[None]:
        if self._stage is ClientStage.ABORTED:
            raise SecAggError("aborted", f"{self.client_id} refused an earlier stage of this round.",
                              client=self.client_id)
        if self._stage is not expected:
            raise SecAggError("out_of_order", f"{self.client_id} is at stage {self._stage.value!r}; this call"
                              f" needs {expected.value!r}. Call the stages once each, in order.", client=self.client_id)
        try:
            yield
        except BaseException:
            self._abort()
            raise
        self._stage = after

    def _abort(self) -> None:
        self._stage = ClientStage.ABORTED
        self._forget()
        self._held = {}

    def _forget(self) -> None:
        """Drop the round's private keys and seed once no later stage needs them."""
        self._c_key = self._s_key = None
        self._peers, self._seed = {}, b""

    @staticmethod
    def _key(key: X25519PrivateKey | None) -> X25519PrivateKey:
        if key is None:
            raise SecAggError("out_of_order", "this round's keys are already discarded.")
        return key

    def _check_routing(self, round_id: str, recipient: str, what: str) -> None:
        if round_id != self.config.round_id or recipient != self.client_id:
            raise SecAggError("round_mismatch", f"a {what} for {recipient} in round {round_id} reached"
                              f" {self.client_id} in round {self.config.round_id}.", client=self.client_id)

    def _too_few(self, got: int, what: str) -> SecAggError:
        t = self.config.threshold
        return SecAggError("too_few_survivors", f"{self.client_id} has {got} {what}; the threshold is {t}.",
                           client=self.client_id, needed=t, got=got)

    # -- stage 0: AdvertiseKeys --------------------------------------------------

    def advertise_keys(self) -> AdvertiseKeys:
        """The client's two fresh X25519 public keys, signed with its device key over the round's config."""
        with self._step(ClientStage.NEW, ClientStage.ADVERTISED):
            c_public, s_public = public_raw(self._key(self._c_key)), public_raw(self._key(self._s_key))
            digest = self.config.digest
            signed = AdvertiseKeys.transcript(self.config.round_id, self.client_id, digest, c_public, s_public)
            return AdvertiseKeys(self.config.round_id, self.client_id, digest, c_public, s_public,
                                 self._signing_key.sign(signed))

    # -- stage 1: ShareKeys ------------------------------------------------------

    def share_keys(self, bundle: KeyBundle) -> ShareKeys:
        """Verify the neighbours' keys, then share the s-key and a fresh self-mask seed among them, encrypted."""
        with self._step(ClientStage.ADVERTISED, ClientStage.SHARED):
            self._check_routing(bundle.round_id, bundle.recipient, "KeyBundle")
            self._peers = self._verified_peers(bundle.adverts)
            if len(self._peers) < self.config.threshold:
                raise self._too_few(len(self._peers), "neighbours with keys")
            self._seed = self._randbytes(KEY_BYTES)
            peers = sorted(self._peers)
            xs = [self.config.index(p) for p in peers]
            t = self.config.threshold
            key_shares = shamir.split(private_raw(self._key(self._s_key)), xs, t, self._randbytes)
            seed_shares = shamir.split(self._seed, xs, t, self._randbytes)
            sealed = []
            for peer, x, key_share, seed_share in zip(peers, xs, key_shares, seed_shares, strict=True):
                key = derive(agree(self._key(self._c_key), self._peers[peer].c_public), "share",
                             self.config.digest, self._index, x)
                plaintext = shamir.share_to_bytes(key_share) + shamir.share_to_bytes(seed_share)
                aad = share_aad(self.config.digest, self._index, x)
                sealed.append((peer, seal(key, plaintext, aad, self._randbytes(NONCE_BYTES))))
            return ShareKeys(self.config.round_id, self.client_id, commit(self._seed, self.config.digest, self._index),
                             tuple(sealed))

    def _verified_peers(self, adverts: tuple[AdvertiseKeys, ...]) -> dict[str, AdvertiseKeys]:
        peers: dict[str, AdvertiseKeys] = {}
        seen = {public_raw(self._key(self._c_key)), public_raw(self._key(self._s_key))}
        for advert in adverts:
            peer = advert.client_id
            if peer not in self._neighbours:
                raise SecAggError("not_a_neighbour", f"the hub relayed keys of {peer}, not a neighbour of"
                                  f" {self.client_id}.", client=peer)
            if peer in peers:
                raise SecAggError("duplicate", f"the hub relayed {peer}'s keys twice.", client=peer)
            advert.verify(self.config, self._directory)
            if advert.c_public == advert.s_public or {advert.c_public, advert.s_public} & seen:
                raise SecAggError("duplicate_key", f"{peer} advertised a key seen before.", client=peer)
            seen |= {advert.c_public, advert.s_public}
            peers[peer] = advert
        return peers

    # -- stage 2: MaskedInputCollection ------------------------------------------

    def masked_input(self, bundle: ShareBundle, x: np.ndarray) -> MaskedInput:
        """Store the shares addressed to this client, then mask ``x`` with its seed and every sharing neighbour.

        x: (vector_length,) integers in [-L, L], e.g. from :func:`~fixedpoint.encode`.
        A bad ``x`` raises SecAggError ``bad_input`` and leaves the client as it was.
        """
        values = self._checked_input(x)
        with self._step(ClientStage.SHARED, ClientStage.MASKED):
            self._check_routing(bundle.round_id, bundle.recipient, "ShareBundle")
            self._held = self._open_shares(bundle.shares)
            if len(self._held) < self.config.threshold:
                raise self._too_few(len(self._held), "neighbours that shared keys")
            m, bits, digest = self.config.vector_length, self.config.modulus_bits, self.config.digest
            y = to_ring(values, bits)
            y += prg(derive(self._seed, "self-mask", digest, self._index), m, bits)
            for peer in sorted(self._held):
                other = self.config.index(peer)
                secret = agree(self._key(self._s_key), self._peers[peer].s_public)
                mask = prg(derive(secret, "pair-mask", digest, min(self._index, other), max(self._index, other)),
                           m, bits)
                if self._index < other:
                    y += mask
                else:
                    y -= mask
            y &= ring_mask(bits)
            self._forget()
            return MaskedInput(self.config.round_id, self.client_id, bits, y)

    def _checked_input(self, x: np.ndarray) -> np.ndarray:
        values = np.asarray(x)
        if values.shape != (self.config.vector_length,) or not np.issubdtype(values.dtype, np.integer):
            raise SecAggError("bad_input", f"the input must be {self.config.vector_length} integers, got"
                              f" {values.dtype}{list(values.shape)}.", client=self.client_id)
        bound = levels(self.config.value_bits)
        if values.size and (int(values.max()) > bound or int(values.min()) < -bound):
            raise SecAggError("bad_input", f"input values must lie in [-{bound}, {bound}] for"
                              f" {self.config.value_bits}-bit encoding.", client=self.client_id)
        return values.astype(np.int64)

    def _open_shares(self, sealed: tuple[tuple[str, bytes], ...]) -> dict[str, tuple[int, int]]:
        held: dict[str, tuple[int, int]] = {}
        for peer, box in sealed:
            if peer not in self._peers:
                raise SecAggError("not_a_neighbour", f"the hub relayed shares from {peer}, whose keys"
                                  f" {self.client_id} never accepted.", client=peer)
            if peer in held:
                raise SecAggError("duplicate", f"the hub relayed {peer}'s shares twice.", client=peer)
            sender = self.config.index(peer)
            key = derive(agree(self._key(self._c_key), self._peers[peer].c_public), "share", self.config.digest,
                         sender, self._index)
            plaintext = open_sealed(key, box, share_aad(self.config.digest, sender, self._index))
            size = shamir.SHARE_BYTES
            held[peer] = (shamir.share_from_bytes(plaintext[:size]), shamir.share_from_bytes(plaintext[size:]))
        return held

    # -- stage 3: Unmasking ------------------------------------------------------

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Seed shares of the surviving neighbours and s-key shares of the dropped ones; once, never both for a peer."""
        with self._step(ClientStage.MASKED, ClientStage.DONE):
            self._check_routing(request.round_id, request.recipient, "UnmaskRequest")
            survivors, dropped = set(request.survivors), set(request.dropped)
            both = survivors & dropped
            if both:
                raise SecAggError("both_shares", f"refused: the hub asked {self.client_id} for both shares of"
                                  f" {sorted(both)}, which would unmask their inputs.", client=min(both))
            if len(survivors) + len(dropped) != len(request.survivors) + len(request.dropped):
                raise SecAggError("duplicate", "the UnmaskRequest lists a neighbour twice.", client=self.client_id)
            if survivors | dropped != set(self._held):
                raise SecAggError("bad_request", f"the UnmaskRequest's peers are not the {len(self._held)}"
                                  f" neighbours that shared with {self.client_id}.", client=self.client_id)
            if len(survivors) < self.config.threshold:
                raise self._too_few(len(survivors), "surviving neighbours")
            seed_shares = tuple((p, self._held[p][1]) for p in sorted(survivors))
            key_shares = tuple((p, self._held[p][0]) for p in sorted(dropped))
            self._held = {}
            return UnmaskResponse(self.config.round_id, self.client_id, seed_shares, key_shares)
