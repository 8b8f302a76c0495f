"""The one error of secure aggregation, with a short ``reason`` code.

Every stage of the protocol refuses what it cannot use with a :class:`SecAggError`:
the orchestrator counts ``reason``, drops the message (hub side) or abandons the round
(client side), and never has to parse the message text. Reasons:

==================== ====================================================================
``too_few_survivors`` fewer than ``threshold`` clients (in a neighbourhood) are left: abort
``out_of_order``      a stage called before the one it follows, or twice
``aborted``           a client that refused an earlier stage refuses every later one
``both_shares``       the hub asked for both kinds of share of one peer: refused
``bad_signature``     an advertised key pair whose device signature does not verify
``unknown_client``    a client id outside the round's roster or the key directory
``not_a_neighbour``   a message from or about a client outside the neighbourhood
``not_expected``      a message from a client that left the round (or was left out) earlier
``round_mismatch``    a message for another round, another recipient or another config
``duplicate``         a second message from one client, or a peer listed twice
``duplicate_key``     a public key advertised twice (replayed or copied)
``bad_key``           a public key that yields a degenerate (all-zero) shared secret
``bad_ciphertext``    an encrypted share that does not decrypt under the pair's key
``bad_request``       a request whose peers do not match what this party knows
``bad_share``         reconstructed secrets that do not match their public commitments
``bad_input``         a local input of the wrong shape, type or range
``bad_config``        round parameters that cannot work
``overflow``          an aggregate outside the range ``n`` clients can produce
``malformed``         bytes that do not parse as the expected message
``oversize``          bytes beyond the size bound, refused before parsing
==================== ====================================================================
"""

from __future__ import annotations

from models.errors import SecAggError

__all__ = ["SecAggError"]


