"""Secure aggregation: exact sums under dropouts, hiding, refusals, Shamir, graphs, message parsing."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy import stats

from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.secagg import (
    AdvertiseKeys,
    ClientStage,
    KeyBundle,
    MaskedInput,
    RoundConfig,
    SecAggClient,
    SecAggError,
    SecAggServer,
    ServerStage,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    choose_degree,
    complete_graph,
    decode,
    encode,
    harary_graph,
    modulus_bits,
    ring_sum,
    shamir,
    to_ring,
)
from models.protocol.secagg.fixedpoint import from_ring, step
from models.protocol.secagg.wire import MAX_MESSAGE_BYTES
from models.protocol.signed import public_key_bytes

VALUE_BITS, CLIP = 16, 1.0


@dataclass
class Round:
    """A round's config, clients and server, all in process, and what each stage sent (as bytes)."""

    config: RoundConfig
    clients: dict[str, SecAggClient]
    server: SecAggServer
    device_keys: dict[str, Ed25519PrivateKey]
    wire: dict[str, dict[str, bytes]]


def make_round(n: int, m: int, seed: int, *, degree: int | None = None, threshold: int | None = None,
               round_id: str = "r1") -> Round:
    rng = np.random.default_rng(seed)
    roster = [f"edge-{i:02d}" for i in range(n)]
    keys = {u: Ed25519PrivateKey.from_private_bytes(rng.bytes(32)) for u in roster}
    directory = {u: public_key_bytes(k) for u, k in keys.items()}
    config = RoundConfig.create(round_id, roster, m, value_bits=VALUE_BITS, value_range=CLIP, degree=degree,
                                threshold=threshold, graph_seed=rng.bytes(32))
    clients = {u: SecAggClient(u, config, keys[u], directory, randbytes=random.Random(seed * 1000 + i).randbytes)
               for i, u in enumerate(roster)}
    return Round(config, clients, SecAggServer(config, directory), keys, {})


def inputs_for(config: RoundConfig, seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: encode((scale * rng.standard_normal(config.vector_length)).astype(np.float32), CLIP, VALUE_BITS, rng)
            for u in config.roster}


def advertise(r: Round) -> dict[str, KeyBundle]:
    for u, client in r.clients.items():
        raw = client.advertise_keys().to_bytes()
        r.wire.setdefault("advertise", {})[u] = raw
        r.server.receive_advertisement(AdvertiseKeys.from_bytes(raw))
    return r.server.close_advertise()


def share(r: Round, bundles: dict[str, KeyBundle], skip: set[str] = frozenset()) -> dict[str, ShareBundle]:
    for u, bundle in bundles.items():
        if u in skip:
            continue
        r.wire.setdefault("key_bundle", {})[u] = bundle.to_bytes()
        raw = r.clients[u].share_keys(KeyBundle.from_bytes(bundle.to_bytes())).to_bytes()
        r.wire.setdefault("share_keys", {})[u] = raw
        r.server.receive_share_keys(ShareKeys.from_bytes(raw))
    return r.server.close_share_keys()


def mask(r: Round, bundles: dict[str, ShareBundle], inputs: dict[str, np.ndarray],
         drop: set[str] = frozenset()) -> dict[str, UnmaskRequest]:
    for u, bundle in bundles.items():
        if u in drop:
            continue
        r.wire.setdefault("share_bundle", {})[u] = bundle.to_bytes()
        raw = r.clients[u].masked_input(ShareBundle.from_bytes(bundle.to_bytes()), inputs[u]).to_bytes()
        r.wire.setdefault("masked_input", {})[u] = raw
        r.server.receive_masked_input(MaskedInput.from_bytes(raw))
    return r.server.close_masked_input()


def unmask(r: Round, requests: dict[str, UnmaskRequest], drop: set[str] = frozenset()) -> np.ndarray:
    for u, request in requests.items():
        if u in drop:
            continue
        r.wire.setdefault("unmask_request", {})[u] = request.to_bytes()
        raw = r.clients[u].unmask(UnmaskRequest.from_bytes(request.to_bytes())).to_bytes()
        r.wire.setdefault("unmask_response", {})[u] = raw
        r.server.receive_unmask(UnmaskResponse.from_bytes(raw))
    return r.server.finish()


def expected_sum(config: RoundConfig, inputs: dict[str, np.ndarray], members) -> np.ndarray:
    bits = config.modulus_bits
    return ring_sum([to_ring(inputs[u], bits) for u in members], bits)


@pytest.fixture(scope="module")
def small_round() -> tuple[Round, dict[str, np.ndarray], np.ndarray]:
    """Six clients, all-to-all, one drops after sharing keys: every message kind recorded."""
    r = make_round(6, 64, seed=7, threshold=3)
    inputs = inputs_for(r.config, 8)
    requests = mask(r, share(r, advertise(r)), inputs, drop={"edge-05"})
    return r, inputs, unmask(r, requests)


# -- 1. acceptance: exact sums of the survivors under heavy dropout -------------------


@pytest.mark.parametrize("degree,threshold", [(None, None), (24, 10)], ids=["all_to_all", "secagg_plus"])
def test_hub_recovers_exact_sum_of_survivors_when_40_percent_drop(degree, threshold):
    # 50 clients, 10k values; 30% drop after ShareKeys, 10% more after their masked upload.
    # SecAgg+ at n = 50: 24 neighbours (choose_degree without the all-to-all cut-off). Losing
    # 40% of a 24-neighbourhood leaves as few as 11 holders here, so the threshold (10) must be
    # below a majority: secure against an honest-but-curious hub, not a lying one (see RoundConfig).
    r = make_round(50, 10_000, seed=1, degree=degree, threshold=threshold)
    inputs = inputs_for(r.config, 2)
    order = list(np.random.default_rng(3).permutation(r.config.roster))
    gone_before_masking, gone_before_unmasking = set(order[:15]), set(order[15:20])

    requests = mask(r, share(r, advertise(r)), inputs, drop=gone_before_masking)
    total = unmask(r, requests, drop=gone_before_unmasking)

    survivors = sorted(set(r.config.roster) - gone_before_masking)
    assert r.config.degree == (49 if degree is None else 24)
    assert r.server.survivors == tuple(survivors)
    assert total.dtype == np.uint64
    assert np.array_equal(total, expected_sum(r.config, inputs, survivors))
    mean = decode(total, len(survivors), CLIP, VALUE_BITS, r.config.modulus_bits)
    plain = np.mean([inputs[u] for u in survivors], axis=0) * step(CLIP, VALUE_BITS)
    np.testing.assert_allclose(mean, plain, atol=1e-7)


def test_decoded_mean_is_within_one_step_of_the_clipped_mean():
    rng = np.random.default_rng(4)
    deltas = [(rng.standard_normal(5000) * s).astype(np.float32) for s in (0.001, 0.01, 0.1)]
    bits = modulus_bits(VALUE_BITS, len(deltas))
    total = ring_sum([to_ring(encode(d, CLIP, VALUE_BITS, rng), bits) for d in deltas], bits)
    clipped = [d * min(1.0, CLIP / float(np.linalg.norm(d))) for d in deltas]

    error = decode(total, 3, CLIP, VALUE_BITS, bits) - np.mean(clipped, axis=0)

    assert np.abs(error).max() < step(CLIP, VALUE_BITS)
    assert np.abs(error.mean()) < 0.05 * step(CLIP, VALUE_BITS)  # unbiased


def test_stochastic_rounding_is_unbiased():
    unit = step(CLIP, VALUE_BITS)
    codes = encode(np.full(20_000, 0.3 * unit), CLIP, VALUE_BITS, np.random.default_rng(5))
    assert set(np.unique(codes)) == {0, 1}
    assert abs(codes.mean() - 0.3) < 0.02


def test_modulus_bits_hold_the_signed_sum_of_n_clients():
    assert modulus_bits(16, 1) == 16
    assert modulus_bits(16, 2) == 17
    assert modulus_bits(16, 50) == 22
    assert modulus_bits(8, 1024) == 18
    full = np.full(50, (1 << 15) - 1, np.int64)
    bits = modulus_bits(16, 50)
    assert np.array_equal(from_ring(ring_sum([to_ring(full, bits)] * 50, bits), bits), full * 50)
    assert np.array_equal(from_ring(ring_sum([to_ring(-full, bits)] * 50, bits), bits), -full * 50)
    with pytest.raises(ValueError):
        modulus_bits(48, 1 << 17)


def test_decode_refuses_a_sum_that_n_clients_cannot_make():
    bits = modulus_bits(VALUE_BITS, 4)
    with pytest.raises(SecAggError) as err:
        decode(to_ring(np.array([3 * ((1 << 15) - 1) + 1]), bits), 3, CLIP, VALUE_BITS, bits)
    assert err.value.reason == "overflow"


# -- 2. a masked input hides its input --------------------------------------------------


def test_masked_input_is_uniform_and_uncorrelated_with_its_input():
    r = make_round(5, 10_000, seed=5)
    t = np.linspace(0, 40 * np.pi, 10_000)
    x = encode((0.015 * np.sin(t)).astype(np.float32), CLIP, VALUE_BITS, np.random.default_rng(6))
    inputs = {u: x for u in r.config.roster}
    mask(r, share(r, advertise(r)), inputs)
    bits = r.config.modulus_bits

    y = MaskedInput.from_bytes(r.wire["masked_input"]["edge-00"]).values

    assert stats.kstest(to_ring(x, bits) / 2.0**bits, "uniform").pvalue < 1e-6  # the input is far from uniform
    assert stats.kstest(y / 2.0**bits, "uniform").pvalue > 0.01
    assert abs(stats.pearsonr(x.astype(float), y.astype(float)).statistic) < 0.05


# -- 3. never both shares of one peer -------------------------------------------------


def _masked_round(seed: int = 9) -> tuple[Round, dict[str, UnmaskRequest]]:
    r = make_round(5, 32, seed=seed, threshold=2)
    return r, mask(r, share(r, advertise(r)), inputs_for(r.config, seed), drop={"edge-04"})


def test_request_for_both_shares_of_one_peer_is_refused():
    r, requests = _masked_round()
    honest = requests["edge-00"]
    greedy = replace(honest, dropped=(*honest.dropped, honest.survivors[0]))

    with pytest.raises(SecAggError) as err:
        r.clients["edge-00"].unmask(greedy)

    assert err.value.reason == "both_shares"
    assert err.value.client == honest.survivors[0]
    assert r.clients["edge-00"].stage is ClientStage.ABORTED
    with pytest.raises(SecAggError) as again:
        r.clients["edge-00"].unmask(honest)
    assert again.value.reason == "aborted"


def test_a_second_unmask_request_is_refused():
    r, requests = _masked_round()
    honest = requests["edge-00"]
    r.clients["edge-00"].unmask(honest)
    flipped = replace(honest, survivors=honest.survivors[1:], dropped=(*honest.dropped, honest.survivors[0]))

    with pytest.raises(SecAggError) as err:
        r.clients["edge-00"].unmask(flipped)

    assert err.value.reason == "out_of_order"


def test_request_leaving_too_few_surviving_neighbours_is_refused():
    r, requests = _masked_round()
    honest = requests["edge-00"]
    thin = replace(honest, survivors=honest.survivors[:1], dropped=(*honest.dropped, *honest.survivors[1:]))

    with pytest.raises(SecAggError) as err:
        r.clients["edge-00"].unmask(thin)

    assert err.value.reason == "too_few_survivors"


def test_request_naming_other_peers_is_refused():
    r, requests = _masked_round()
    honest = requests["edge-00"]
    with pytest.raises(SecAggError) as err:
        r.clients["edge-00"].unmask(replace(honest, dropped=()))
    assert err.value.reason == "bad_request"


# -- 4. a relaying hub cannot substitute keys -----------------------------------------


def test_substituted_public_key_is_detected_by_its_signature():
    r = make_round(5, 16, seed=11)
    bundles = advertise(r)
    bundle = bundles["edge-00"]
    victim = bundle.adverts[1]
    hub_key = X25519PrivateKey.generate().public_key().public_bytes_raw()
    swapped = replace(bundle, adverts=(bundle.adverts[0], replace(victim, s_public=hub_key), *bundle.adverts[2:]))

    with pytest.raises(SecAggError) as err:
        r.clients["edge-00"].share_keys(swapped)

    assert err.value.reason == "bad_signature"
    assert err.value.client == victim.client_id
    assert r.clients["edge-00"].stage is ClientStage.ABORTED


def test_hub_refuses_an_advert_under_a_stolen_name_or_from_another_round():
    r = make_round(5, 16, seed=12)
    other = make_round(5, 16, seed=12, round_id="r2")
    mine = r.clients["edge-01"].advertise_keys()

    with pytest.raises(SecAggError) as renamed:
        r.server.receive_advertisement(replace(mine, client_id="edge-02"))
    with pytest.raises(SecAggError) as replayed:
        r.server.receive_advertisement(other.clients["edge-01"].advertise_keys())

    assert renamed.value.reason == "bad_signature"
    assert replayed.value.reason == "round_mismatch"
    r.server.receive_advertisement(mine)


def test_a_key_copied_from_another_client_is_refused():
    # edge-02 signs edge-01's mask key as its own: the signature is valid, the key is not fresh.
    r = make_round(5, 16, seed=22)
    adverts = {u: c.advertise_keys() for u, c in r.clients.items()}
    a1, a2 = adverts["edge-01"], adverts["edge-02"]
    signed = AdvertiseKeys.transcript("r1", "edge-02", a2.config_digest, a2.c_public, a1.s_public)
    copycat = replace(a2, s_public=a1.s_public, signature=r.device_keys["edge-02"].sign(signed))
    bundle = KeyBundle("r1", "edge-00", (a1, copycat, adverts["edge-03"], adverts["edge-04"]))

    with pytest.raises(SecAggError) as client_side:
        r.clients["edge-00"].share_keys(bundle)
    r.server.receive_advertisement(a1)
    with pytest.raises(SecAggError) as hub_side:
        r.server.receive_advertisement(copycat)

    assert client_side.value.reason == hub_side.value.reason == "duplicate_key"


def test_altered_or_misaddressed_share_is_refused():
    r = make_round(5, 16, seed=13)
    bundles = share(r, advertise(r))
    (sender, box), *rest = bundles["edge-00"].shares
    altered = replace(bundles["edge-00"], shares=((sender, box[:-1] + bytes([box[-1] ^ 1])), *rest))
    meant_for_edge_01 = dict(bundles["edge-01"].shares)["edge-02"]
    misaddressed = replace(bundles["edge-03"], shares=tuple(
        (p, meant_for_edge_01 if p == "edge-02" else b) for p, b in bundles["edge-03"].shares))

    (sender, box), *rest = bundles["edge-01"].shares
    truncated = replace(bundles["edge-01"], shares=((sender, box[:5]), *rest))

    reasons = set()
    for client, bundle in (("edge-00", altered), ("edge-03", misaddressed), ("edge-01", truncated)):
        with pytest.raises(SecAggError) as err:
            r.clients[client].masked_input(bundle, np.zeros(16, np.int64))
        reasons.add(err.value.reason)

    assert reasons == {"bad_ciphertext"}


def test_a_share_nudged_to_shift_the_seed_is_caught_by_its_commitment():
    r, requests = _masked_round()
    responses = {u: r.clients[u].unmask(q) for u, q in requests.items()}
    peer, value = responses["edge-00"].seed_shares[0]
    holders = sorted(u for u, answer in responses.items() if peer in dict(answer.seed_shares))
    xs = [r.config.index(u) for u in holders[: r.config.threshold]]
    assert holders[0] == "edge-00"
    weight = shamir.lagrange_at_zero([(x, int(x == xs[0])) for x in xs])  # edge-00's Lagrange coefficient
    nudged = (value + pow(weight, -1, shamir.PRIME)) % shamir.PRIME  # the recovered seed becomes seed + 1
    responses["edge-00"] = replace(responses["edge-00"],
                                   seed_shares=((peer, nudged), *responses["edge-00"].seed_shares[1:]))
    for response in responses.values():
        r.server.receive_unmask(response)

    with pytest.raises(SecAggError) as err:
        r.server.finish()

    assert err.value.reason == "bad_share"
    assert err.value.client == peer


def test_hub_refuses_shares_not_addressed_to_exactly_the_neighbours():
    r = make_round(5, 16, seed=21)
    bundles = advertise(r)
    msg = r.clients["edge-00"].share_keys(bundles["edge-00"])

    with pytest.raises(SecAggError) as err:
        r.server.receive_share_keys(replace(msg, shares=msg.shares[:-1]))

    assert err.value.reason == "bad_request"
    r.server.receive_share_keys(msg)


# -- 5. too few survivors ---------------------------------------------------------------


def test_too_few_masked_inputs_abort_the_round():
    r = make_round(6, 16, seed=14, threshold=4)
    bundles = share(r, advertise(r))

    with pytest.raises(SecAggError) as err:
        mask(r, bundles, inputs_for(r.config, 14), drop={"edge-00", "edge-01", "edge-02"})

    assert err.value.reason == "too_few_survivors"
    assert (err.value.needed, err.value.got) == (4, 3)
    assert r.server.stage is ServerStage.ABORTED


def test_survivors_without_enough_surviving_neighbours_abort_before_any_share_is_asked():
    r = make_round(5, 16, seed=23, threshold=3)
    bundles = share(r, advertise(r))

    with pytest.raises(SecAggError) as err:
        mask(r, bundles, inputs_for(r.config, 23), drop={"edge-00", "edge-01"})

    assert err.value.reason == "too_few_survivors"
    assert (err.value.needed, err.value.got) == (3, 2)


def test_too_few_unmask_answers_abort_the_round():
    r = make_round(6, 16, seed=15, threshold=4)
    requests = mask(r, share(r, advertise(r)), inputs_for(r.config, 15))

    with pytest.raises(SecAggError) as err:
        unmask(r, requests, drop={"edge-00", "edge-01", "edge-02"})

    assert err.value.reason == "too_few_survivors"
    assert err.value.needed == 4


def test_unrecoverable_key_of_a_dropped_client_aborts_rather_than_returning_a_wrong_sum():
    # SecAgg+ graph: edge-00 drops before masking, then all but one of its neighbours drop
    # before unmasking, while every survivor's own seed keeps enough holders.
    r = make_round(12, 8, seed=30, degree=6, threshold=2)
    graph, dropped = r.config.graph, "edge-00"
    survivors = set(r.config.roster) - {dropped}
    gone = next(set(c) for c in itertools.combinations(sorted(graph[dropped]), 5)
                if all(len(graph[u] & (survivors - set(c))) >= 2 for u in survivors))
    requests = mask(r, share(r, advertise(r)), inputs_for(r.config, 30), drop={dropped})

    with pytest.raises(SecAggError) as err:
        unmask(r, requests, drop=gone)

    assert err.value.reason == "too_few_survivors"
    assert err.value.client == dropped


def test_too_few_advertised_keys_abort_on_both_sides():
    r = make_round(6, 16, seed=16, threshold=4)
    bundles = advertise(r)
    short = replace(bundles["edge-00"], adverts=bundles["edge-00"].adverts[:3])
    with pytest.raises(SecAggError) as client_side:
        r.clients["edge-00"].share_keys(short)

    r2 = make_round(6, 16, seed=16, threshold=4)
    for u in ("edge-00", "edge-01", "edge-02", "edge-03"):
        r2.server.receive_advertisement(r2.clients[u].advertise_keys())
    with pytest.raises(SecAggError) as hub_side:
        r2.server.close_advertise()

    assert client_side.value.reason == hub_side.value.reason == "too_few_survivors"


# -- the client's state machine -------------------------------------------------------


def test_client_refuses_stages_out_of_order():
    r = make_round(5, 16, seed=17)
    client = r.clients["edge-00"]
    with pytest.raises(SecAggError) as early:
        client.masked_input(ShareBundle("r1", "edge-00", ()), np.zeros(16, np.int64))
    assert early.value.reason == "out_of_order"
    assert client.stage is ClientStage.NEW  # refusing an out-of-order call changes nothing
    client.advertise_keys()
    with pytest.raises(SecAggError) as twice:
        client.advertise_keys()
    assert twice.value.reason == "out_of_order"


def test_bad_local_input_is_refused_without_aborting():
    r = make_round(5, 16, seed=18)
    bundles = share(r, advertise(r))
    client = r.clients["edge-00"]
    for bad in (np.zeros(15, np.int64), np.zeros(16, np.float32), np.full(16, 1 << 15)):
        with pytest.raises(SecAggError) as err:
            client.masked_input(bundles["edge-00"], bad)
        assert err.value.reason == "bad_input"
    assert client.stage is ClientStage.SHARED
    client.masked_input(bundles["edge-00"], np.zeros(16, np.int64))


def test_hub_refuses_duplicates_and_strangers():
    r = make_round(5, 16, seed=19)
    advert = r.clients["edge-00"].advertise_keys()
    r.server.receive_advertisement(advert)
    with pytest.raises(SecAggError) as dup:
        r.server.receive_advertisement(advert)
    with pytest.raises(SecAggError) as early:
        r.server.receive_masked_input(MaskedInput("r1", "edge-00", 19, np.zeros(16, np.uint64)))
    assert (dup.value.reason, early.value.reason) == ("duplicate", "out_of_order")


def test_hub_refuses_a_client_that_left_earlier():
    r = make_round(5, 16, seed=20, threshold=2)
    share(r, advertise(r), skip={"edge-04"})
    late = MaskedInput("r1", "edge-04", r.config.modulus_bits, np.zeros(16, np.uint64))

    with pytest.raises(SecAggError) as err:
        r.server.receive_masked_input(late)

    assert err.value.reason == "not_expected"


# -- 6. Shamir and the neighbourhood graph -------------------------------------------


def test_any_t_shares_recover_the_secret_and_t_minus_1_do_not():
    randbytes = random.Random(20).randbytes
    secret = randbytes(32)
    xs, t = list(range(1, 21)), 8
    shares = shamir.split(secret, xs, t, randbytes)
    points = list(zip(xs, shares, strict=True))
    pick = random.Random(21)

    for _ in range(10):
        assert shamir.reconstruct(pick.sample(points, t), t, 32) == secret
    for _ in range(10):
        subset = pick.sample(points, t - 1)
        assert shamir.lagrange_at_zero(subset) != int.from_bytes(secret, "big")
    with pytest.raises(SecAggError) as err:
        shamir.reconstruct(points[: t - 1], t, 32)
    assert err.value.reason == "too_few_survivors"


def test_t_minus_1_shares_look_the_same_whatever_the_secret():
    randbytes = random.Random(22).randbytes
    xs, t = [3, 7, 11, 19], 4
    low = [shamir.split(bytes(32), xs, t, randbytes)[:3] for _ in range(300)]
    high = [shamir.split(b"\xff" * 32, xs, t, randbytes)[:3] for _ in range(300)]

    for column in range(3):
        a = [s[column] / shamir.PRIME for s in low]
        b = [s[column] / shamir.PRIME for s in high]
        assert stats.ks_2samp(a, b).pvalue > 0.01
        assert stats.kstest(a, "uniform").pvalue > 0.01


def _connected(graph: dict[str, frozenset[str]], removed: set[str] = frozenset()) -> bool:
    nodes = set(graph) - removed
    start = next(iter(nodes))
    seen, frontier = {start}, [start]
    while frontier:
        for v in graph[frontier.pop()] - removed - seen:
            seen.add(v)
            frontier.append(v)
    return seen == nodes


def test_harary_graph_is_regular_symmetric_and_k_connected():
    ids = [f"c{i:03d}" for i in range(200)]
    k = choose_degree(200)
    graph = harary_graph(ids, k, b"\x01" * 32)
    pick = random.Random(23)

    assert k == 32
    assert all(len(nbrs) == k and u not in nbrs for u, nbrs in graph.items())
    assert all(u in graph[v] for u, nbrs in graph.items() for v in nbrs)
    assert all(_connected(graph, set(pick.sample(ids, k - 1))) for _ in range(20))
    assert harary_graph(ids, k, b"\x02" * 32) != graph
    assert harary_graph(ids, k, b"\x01" * 32) == graph


def test_small_rounds_are_all_to_all_and_large_ones_log_degree():
    assert choose_degree(50) == 49
    assert choose_degree(1000) == 40
    assert choose_degree(10_000) == 54
    assert choose_degree(50, all_to_all_below=10) == 24
    config = RoundConfig.create("r", [f"c{i}" for i in range(50)], 8, graph_seed=bytes(32))
    assert config.graph == complete_graph(config.roster)
    assert config.threshold == 25


def test_round_config_refuses_parameters_that_cannot_work():
    good = RoundConfig.create("r", ["a", "b", "c", "d", "e"], 8, graph_seed=bytes(32))
    for change in ({"threshold": 1}, {"threshold": 5}, {"degree": 3}, {"roster": ("b", "a", "c")},
                   {"roster": ("a", "b")}, {"vector_length": 0}, {"value_range": float("nan")}, {"round_id": "a/b"}):
        with pytest.raises(SecAggError) as err:
            replace(good, **change)
        assert err.value.reason == "bad_config"


# -- 7. messages on the wire ----------------------------------------------------------


PARSERS = {
    "advertise": AdvertiseKeys, "key_bundle": KeyBundle, "share_keys": ShareKeys, "share_bundle": ShareBundle,
    "masked_input": MaskedInput, "unmask_request": UnmaskRequest, "unmask_response": UnmaskResponse,
}


@pytest.mark.parametrize("kind", sorted(PARSERS))
def test_messages_round_trip_and_refuse_truncated_or_garbage_bytes(small_round, kind):
    r, _, _ = small_round
    parser = PARSERS[kind]
    raw = r.wire[kind]["edge-01"]
    pick = random.Random(24)

    assert parser.from_bytes(raw).to_bytes() == raw
    for cut in {0, 3, 5, 6, len(raw) // 2, len(raw) - 1, *pick.sample(range(len(raw)), 8)}:
        with pytest.raises(SecAggError) as err:
            parser.from_bytes(raw[:cut])
        assert err.value.reason == "malformed"
    for bad in (raw + b"\x00", pick.randbytes(len(raw)), b"WSA\x01" + pick.randbytes(200), raw[:4] + b"\x7f" + raw[5:]):
        with pytest.raises(SecAggError) as err:
            parser.from_bytes(bad)
        assert err.value.reason == "malformed"
    huge = memoryview(np.zeros(MAX_MESSAGE_BYTES + 1, np.uint8))  # pages never touched: the bound comes first
    with pytest.raises(SecAggError) as err:
        parser.from_bytes(huge)
    assert err.value.reason == "oversize"


def test_parsers_refuse_values_beyond_their_range(small_round):
    r, _, _ = small_round
    raw_masked = r.wire["masked_input"]["edge-01"]
    assert len(raw_masked) <= r.config.masked_input_bytes
    with pytest.raises(SecAggError) as err:
        MaskedInput.from_bytes(raw_masked, max_bytes=len(raw_masked) - 1)
    assert err.value.reason == "oversize"

    masked = MaskedInput.from_bytes(r.wire["masked_input"]["edge-01"])
    too_wide = replace(masked, bits=24, values=masked.values | np.uint64(1 << 23))
    raw = bytearray(too_wide.to_bytes())
    raw[raw.index(bytes([24]), 5)] = 23  # claim 23 bits, carry 24
    with pytest.raises(SecAggError) as err:
        MaskedInput.from_bytes(bytes(raw))
    assert err.value.reason == "malformed"

    response = UnmaskResponse.from_bytes(r.wire["unmask_response"]["edge-01"])
    outside = bytearray(response.to_bytes())
    share_at = outside.index(shamir.share_to_bytes(response.seed_shares[0][1]))
    outside[share_at : share_at + shamir.SHARE_BYTES] = b"\xff" * shamir.SHARE_BYTES
    with pytest.raises(SecAggError) as err:
        UnmaskResponse.from_bytes(bytes(outside))
    assert err.value.reason == "malformed"


def test_round_config_round_trips_and_refuses_garbage(small_round):
    r, _, _ = small_round
    raw = r.config.to_bytes()
    assert RoundConfig.from_bytes(raw) == r.config
    assert RoundConfig.from_bytes(raw).digest == r.config.digest
    for bad in (raw[:-1], b"[]", b"\xff\xfe", raw.replace(b'"threshold":3', b'"threshold":"3"'),
                raw.replace(b'"clip":1.0', b'"clip":1.00')):
        with pytest.raises(SecAggError) as err:
            RoundConfig.from_bytes(bad)
        assert err.value.reason == "malformed"


def test_small_round_sums_exactly(small_round):
    r, inputs, total = small_round
    survivors = [u for u in r.config.roster if u != "edge-05"]
    assert np.array_equal(total, expected_sum(r.config, inputs, survivors))
