"""The hub's side of one round: relay, track who is left, and unmask the sum.

The server never sees a key or an input in the clear. Each ``receive_*`` method
takes one client's message and refuses a bad one with SecAggError, leaving the
round as it was (the orchestrator counts the reason and goes on); each ``close_*``
method ends a stage at its deadline and returns the messages to relay, or aborts
the round with ``too_few_survivors``. Sets of clients, as in Bonawitz et al.:

- U1 advertised keys, U2 shared keys, U3 sent masked inputs, U4 answered unmasking.

Every member of U1 and U2 keeps at least ``threshold`` neighbours in its set (those
with fewer are left out, as if dropped), so every share that is needed has enough
holders; :meth:`finish` recovers the seed of each member of U3 and the s-key of each
member of U2 - U3 next to U3, from ``threshold`` shares given by U4.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from enum import Enum

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from models.protocol.secagg import shamir
from models.protocol.secagg.config import RoundConfig
from models.protocol.secagg.errors import SecAggError
from models.protocol.secagg.fixedpoint import ring_mask
from models.protocol.secagg.messages import (
    SEALED_SHARE_BYTES,
    AdvertiseKeys,
    KeyBundle,
    MaskedInput,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from models.protocol.secagg.primitives import KEY_BYTES, agree, commit, derive, prg, public_raw

__all__ = ["SecAggServer", "ServerStage"]


class ServerStage(Enum):
    """The stage whose messages the server takes now."""

    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASKING = "unmasking"
    DONE = "done"
    ABORTED = "aborted"


def prune(members: set[str], graph: Mapping[str, frozenset[str]], threshold: int) -> set[str]:
    """The largest subset of ``members`` in which everyone keeps ``threshold`` neighbours (a k-core)."""
    alive = set(members)
    while True:
        weak = {u for u in alive if len(graph[u] & alive) < threshold}
        if not weak:
            return alive
        alive -= weak


class SecAggServer:
    """The hub's state for one round. ``directory``: the pinned device public keys by client id.

    Sequence: ``receive_advertisement``* → :meth:`close_advertise` → ``receive_share_keys``* →
    :meth:`close_share_keys` → ``receive_masked_input``* → :meth:`close_masked_input` →
    ``receive_unmask``* → :meth:`finish`.
    """

    def __init__(self, config: RoundConfig, directory: Mapping[str, bytes]) -> None:
        self.config, self._directory = config, dict(directory)
        self._stage = ServerStage.ADVERTISE
        self._adverts: dict[str, AdvertiseKeys] = {}
        self._keys_seen: set[bytes] = set()
        self._u1: set[str] = set()
        self._bundled: dict[str, frozenset[str]] = {}
        self._share_keys: dict[str, ShareKeys] = {}
        self._u2: set[str] = set()
        self._masked: set[str] = set()
        self._masked_sum = np.zeros(config.vector_length, np.uint64)
        self._requests: dict[str, UnmaskRequest] = {}
        self._responses: dict[str, UnmaskResponse] = {}

    @property
    def stage(self) -> ServerStage:
        return self._stage

    @property
    def survivors(self) -> tuple[str, ...]:
        """U3: the clients whose inputs the sum holds (known once the masked-input stage closed)."""
        return tuple(sorted(self._requests))

    def _expect(self, stage: ServerStage) -> None:
        if self._stage is not stage:
            raise SecAggError("out_of_order", f"the round is at {self._stage.value}, not {stage.value}.")

    def _check_sender(self, round_id: str, sender: str, allowed: Container[str], received: Container[str],
                      what: str) -> None:
        if round_id != self.config.round_id:
            raise SecAggError("round_mismatch", f"a {what} for round {round_id} reached round {self.config.round_id}.",
                              client=sender)
        self.config.index(sender)
        if sender not in allowed:
            raise SecAggError("not_expected", f"{sender} left the round (or was left out) before this {what}.",
                              client=sender)
        if sender in received:
            raise SecAggError("duplicate", f"{sender} already sent its {what}.", client=sender)

    def _abort(self, detail: str, needed: int, got: int, client: str | None = None) -> SecAggError:
        self._stage = ServerStage.ABORTED
        return SecAggError("too_few_survivors", detail, client=client, needed=needed, got=got)

    def _survivors_of(self, stage: str, members: set[str]) -> set[str]:
        alive = prune(members, self.config.graph, self.config.threshold)
        if not alive:
            raise self._abort(f"after {stage} no client keeps {self.config.threshold} neighbours in the round.",
                              self.config.threshold + 1, len(members))
        return alive

    # -- stage 0: AdvertiseKeys --------------------------------------------------

    def receive_advertisement(self, msg: AdvertiseKeys) -> None:
        self._expect(ServerStage.ADVERTISE)
        self._check_sender(msg.round_id, msg.client_id, self.config.graph, self._adverts, "AdvertiseKeys")
        msg.verify(self.config, self._directory)
        keys = {msg.c_public, msg.s_public}
        if len(keys) < 2 or keys & self._keys_seen:
            raise SecAggError("duplicate_key", f"{msg.client_id} advertised a key seen before.", client=msg.client_id)
        self._keys_seen |= keys
        self._adverts[msg.client_id] = msg

    def close_advertise(self) -> dict[str, KeyBundle]:
        """U1, and for each member its neighbours' adverts to relay.

        Clients left with fewer than ``threshold`` neighbours in U1 get no bundle: the
        orchestrator treats them as dropped.
        """
        self._expect(ServerStage.ADVERTISE)
        self._u1 = self._survivors_of("AdvertiseKeys", set(self._adverts))
        bundles = {}
        for u in sorted(self._u1):
            peers = sorted(self.config.graph[u] & self._u1)
            self._bundled[u] = frozenset(peers)
            bundles[u] = KeyBundle(self.config.round_id, u, tuple(self._adverts[p] for p in peers))
        self._stage = ServerStage.SHARE_KEYS
        return bundles

    # -- stage 1: ShareKeys ------------------------------------------------------

    def receive_share_keys(self, msg: ShareKeys) -> None:
        self._expect(ServerStage.SHARE_KEYS)
        self._check_sender(msg.round_id, msg.sender, self._bundled, self._share_keys, "ShareKeys")
        recipients = [r for r, _ in msg.shares]
        if len(set(recipients)) != len(recipients) or set(recipients) != self._bundled[msg.sender]:
            raise SecAggError("bad_request", f"{msg.sender}'s shares are not addressed to exactly the neighbours"
                              " whose keys it was sent.", client=msg.sender)
        if any(len(box) != SEALED_SHARE_BYTES for _, box in msg.shares) or len(msg.seed_commitment) != 32:
            raise SecAggError("malformed", f"{msg.sender}'s shares have the wrong size.", client=msg.sender)
        self._share_keys[msg.sender] = msg

    def close_share_keys(self) -> dict[str, ShareBundle]:
        """U2, and for each member the share pairs its neighbours in U2 addressed to it (pruned as U1 is)."""
        self._expect(ServerStage.SHARE_KEYS)
        self._u2 = self._survivors_of("ShareKeys", set(self._share_keys))
        inbox: dict[str, list[tuple[str, bytes]]] = {u: [] for u in self._u2}
        for sender in sorted(self._u2):
            for recipient, box in self._share_keys[sender].shares:
                if recipient in self._u2:
                    inbox[recipient].append((sender, box))
        self._stage = ServerStage.MASKED_INPUT
        return {u: ShareBundle(self.config.round_id, u, tuple(inbox[u])) for u in sorted(self._u2)}

    # -- stage 2: MaskedInputCollection ------------------------------------------

    def receive_masked_input(self, msg: MaskedInput) -> None:
        self._expect(ServerStage.MASKED_INPUT)
        self._check_sender(msg.round_id, msg.sender, self._u2, self._masked, "MaskedInput")
        bits, m = self.config.modulus_bits, self.config.vector_length
        values = msg.values
        if msg.bits != bits or not isinstance(values, np.ndarray) or values.dtype != np.uint64 or values.shape != (m,):
            raise SecAggError("malformed", f"{msg.sender}'s masked input is not {m} values of {bits} bits.",
                              client=msg.sender)
        if bits < 64 and int(values.max()) >> bits:
            raise SecAggError("malformed", f"{msg.sender}'s masked input exceeds {bits} bits.", client=msg.sender)
        self._masked_sum += values  # one model-sized buffer, whatever the number of clients
        self._masked.add(msg.sender)

    def close_masked_input(self) -> dict[str, UnmaskRequest]:
        """U3, and for each member which of its U2 neighbours survived and which dropped.

        Aborts unless U3 has ``threshold`` members and every seed and s-key to recover
        (of U3, and of the dropped neighbours of U3) has ``threshold`` holders in U3.
        """
        self._expect(ServerStage.MASKED_INPUT)
        u3, t = set(self._masked), self.config.threshold
        if len(u3) < t:
            raise self._abort(f"{len(u3)} clients sent masked inputs; the threshold is {t}.", t, len(u3))
        for u in sorted(self._u2):
            holders = len(self.config.graph[u] & u3)
            if holders < t and (u in u3 or self.config.graph[u] & u3):
                raise self._abort(f"{u}'s secrets have {holders} holders left; the threshold is {t}.", t, holders, u)
        for u in sorted(u3):
            near = self.config.graph[u] & self._u2
            self._requests[u] = UnmaskRequest(self.config.round_id, u, tuple(sorted(near & u3)),
                                              tuple(sorted(near - u3)))
        self._stage = ServerStage.UNMASKING
        return dict(self._requests)

    # -- stage 3: Unmasking ------------------------------------------------------

    def receive_unmask(self, msg: UnmaskResponse) -> None:
        self._expect(ServerStage.UNMASKING)
        self._check_sender(msg.round_id, msg.sender, self._requests, self._responses, "UnmaskResponse")
        request = self._requests[msg.sender]
        if (tuple(p for p, _ in msg.seed_shares) != request.survivors
                or tuple(p for p, _ in msg.key_shares) != request.dropped):
            raise SecAggError("bad_request", f"{msg.sender}'s shares do not answer its UnmaskRequest.",
                              client=msg.sender)
        if any(not 0 <= s < shamir.PRIME for _, s in msg.seed_shares + msg.key_shares):
            raise SecAggError("malformed", f"{msg.sender} sent a share outside the field.", client=msg.sender)
        self._responses[msg.sender] = msg

    def finish(self) -> np.ndarray:
        """The sum mod 2^b of U3's inputs, (vector_length,) uint64.

        Raises ``too_few_survivors`` when a secret has fewer than ``threshold`` shares
        from U4, and ``bad_share`` when a recovered secret fails its public check
        (the seed's commitment, the s-key's advertised public key).
        """
        self._expect(ServerStage.UNMASKING)
        u3 = set(self._requests)
        seed_shares, key_shares = self._collect_shares()
        bits, m, digest = self.config.modulus_bits, self.config.vector_length, self.config.digest
        total = self._masked_sum.copy()
        for u in sorted(u3):
            seed = self._recover(u, seed_shares.get(u, []))
            if commit(seed, digest, self.config.index(u)) != self._share_keys[u].seed_commitment:
                raise self._bad_share(u, "self-mask seed")
            total -= prg(derive(seed, "self-mask", digest, self.config.index(u)), m, bits)
        dropped = {d for d in self._u2 - u3 if self.config.graph[d] & u3}
        for d in sorted(dropped):
            s_key = X25519PrivateKey.from_private_bytes(self._recover(d, key_shares.get(d, [])))
            if public_raw(s_key) != self._adverts[d].s_public:
                raise self._bad_share(d, "mask key")
            i = self.config.index(d)
            for u in sorted(self.config.graph[d] & u3):
                j = self.config.index(u)
                secret = agree(s_key, self._adverts[u].s_public)
                mask = prg(derive(secret, "pair-mask", digest, min(i, j), max(i, j)), m, bits)
                if j < i:  # u added this mask; take it off
                    total -= mask
                else:
                    total += mask
        self._stage = ServerStage.DONE
        return total & ring_mask(bits)

    def _collect_shares(self) -> tuple[dict[str, list[tuple[int, int]]], dict[str, list[tuple[int, int]]]]:
        seeds: dict[str, list[tuple[int, int]]] = {}
        keys: dict[str, list[tuple[int, int]]] = {}
        for holder in sorted(self._responses):
            x = self.config.index(holder)
            response = self._responses[holder]
            for peer, share in response.seed_shares:
                seeds.setdefault(peer, []).append((x, share))
            for peer, share in response.key_shares:
                keys.setdefault(peer, []).append((x, share))
        return seeds, keys

    def _recover(self, owner: str, points: list[tuple[int, int]]) -> bytes:
        t = self.config.threshold
        if len(points) < t:
            raise self._abort(f"{len(points)} clients answered with shares of {owner}'s secrets; the threshold is {t}.",
                              t, len(points), owner)
        return shamir.reconstruct(points, t, KEY_BYTES)

    def _bad_share(self, owner: str, what: str) -> SecAggError:
        self._stage = ServerStage.ABORTED
        return SecAggError("bad_share", f"the shares of {owner}'s {what} do not recover it: a holder lied.",
                           client=owner)
