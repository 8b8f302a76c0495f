"""Secure aggregation (SecAgg / SecAgg+): the hub learns the sum of the updates, not one of them.

The cryptographic core of Bonawitz et al. 2017 ("Practical Secure Aggregation for
Privacy-Preserving Machine Learning") with the sparse neighbourhoods of Bell et al.
2020 ("Secure Single-Server Aggregation with (Poly)Logarithmic Overhead"), as a pure
library: every stage takes and returns messages with ``to_bytes``/``from_bytes``;
transport, deadlines and persistence belong to the orchestrator. One round::

    hub (orchestrator)                                  each client u
    config = RoundConfig.create(round_id, roster, m)  ─▶  c = SecAggClient(u, config, device_key, directory)
    server = SecAggServer(config, directory)
    server.receive_advertisement(m)         ◀─ AdvertiseKeys ─  c.advertise_keys()
    bundles = server.close_advertise()      ─ KeyBundle ─▶      c.share_keys(bundle)
    server.receive_share_keys(m)            ◀─ ShareKeys ─
    bundles = server.close_share_keys()     ─ ShareBundle ─▶    c.masked_input(bundle, encode(delta, ...))
    server.receive_masked_input(m)          ◀─ MaskedInput ─
    requests = server.close_masked_input()  ─ UnmaskRequest ─▶  c.unmask(request)
    server.receive_unmask(m)                ◀─ UnmaskResponse ─
    total = server.finish()
    mean = decode(total, len(server.survivors), config.value_range, config.value_bits, config.modulus_bits)

Clients that miss a deadline are simply not received; a ``close_*`` call ends the
stage. Everything refused raises :class:`SecAggError` with a ``reason``.
"""

from models.protocol.secagg.client import ClientStage, SecAggClient
from models.protocol.secagg.config import RoundConfig, default_threshold
from models.protocol.secagg.errors import SecAggError
from models.protocol.secagg.fixedpoint import decode, encode, from_ring, modulus_bits, ring_sum, to_ring
from models.protocol.secagg.graph import choose_degree, complete_graph, harary_graph
from models.protocol.secagg.messages import (
    AdvertiseKeys,
    KeyBundle,
    MaskedInput,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from models.protocol.secagg.server import SecAggServer, ServerStage

__all__ = [
    "AdvertiseKeys",
    "ClientStage",
    "KeyBundle",
    "MaskedInput",
    "RoundConfig",
    "SecAggClient",
    "SecAggError",
    "SecAggServer",
    "ServerStage",
    "ShareBundle",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
    "choose_degree",
    "complete_graph",
    "decode",
    "default_threshold",
    "encode",
    "from_ring",
    "harary_graph",
    "modulus_bits",
    "ring_sum",
    "to_ring",
]
