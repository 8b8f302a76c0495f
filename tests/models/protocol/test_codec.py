"""Update codec and signed messages: exact sizes, unbiasedness, round trips, hostile input."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load as st_load

from models import Model, activity_spec
from models.errors import ConfigError
from models.protocol.codec import CodecConfig, CodecError, UpdateCodec
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.messages import UpdateMeta, build_model, build_update, parse_model, parse_update_meta
from models.protocol.signed import SigningError, verify_and_parse

SHAPES = {"b.weight": (7, 5), "a.bias": (3,), "c": (2, 2, 2)}  # 46 values


def _delta(seed: int = 0, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("scheme", ["none", "int8", "int4", "topk"])
def test_round_trip_keeps_names_shapes_and_values(scheme):
    codec = UpdateCodec(SHAPES, CodecConfig(quantize=scheme, block=8, topk_fraction=1.0))
    delta = _delta()
    tensors, meta, _ = codec.encode(delta, np.random.default_rng(0))
    decoded = codec.decode(tensors, meta)
    assert {k: v.shape for k, v in decoded.items()} == SHAPES
    tol = {"none": 0, "int8": 0.35 / 127, "int4": 0.35 / 7, "topk": 0.35 / 127}[scheme]
    for k in SHAPES:
        np.testing.assert_allclose(decoded[k], delta[k], atol=tol)


@pytest.mark.parametrize("scheme,levels", [("int8", 127), ("int4", 7)])
def test_stochastic_rounding_is_unbiased(scheme, levels):
    codec = UpdateCodec(SHAPES, CodecConfig(quantize=scheme, block=16))
    delta = _delta(1)
    rng = np.random.default_rng(2)
    mean = np.mean([codec.flatten(codec.decode(*codec.encode(delta, rng)[:2])) for _ in range(4000)], axis=0)
    step = np.abs(codec.flatten(delta)).max() / levels
    np.testing.assert_allclose(mean, codec.flatten(delta), atol=0.05 * step)


def test_exact_byte_counts_of_each_scheme():
    n, block = 10_000, 256
    codec = lambda scheme: UpdateCodec({"w": (n,)}, CodecConfig(quantize=scheme, block=block, topk_fraction=0.04))  # noqa: E731
    delta = {"w": np.random.default_rng(0).standard_normal(n).astype(np.float32)}
    sizes = {s: sum(t.nbytes for t in codec(s).encode(delta, np.random.default_rng(0))[0].values())
             for s in ("none", "int8", "int4", "topk")}
    blocks = -(-n // block)
    assert sizes["none"] == 4 * n
    assert sizes["int8"] == n + 4 * blocks
    assert sizes["int4"] == n // 2 + 4 * blocks
    assert sizes["topk"] == 400 * 2 + 400 + 4 * 2


def test_topk_error_feedback_sends_everything_eventually():
    codec = UpdateCodec(SHAPES, CodecConfig(quantize="topk", block=8, topk_fraction=0.1))
    delta, residual, sent = _delta(3), None, np.zeros(46, np.float32)
    rng = np.random.default_rng(0)
    for _ in range(40):
        tensors, meta, residual = codec.encode(delta, rng, residual)
        sent += codec.flatten(codec.decode(tensors, meta))
    np.testing.assert_allclose(sent / 40, codec.flatten(delta), atol=0.02)


def test_clipping_bounds_the_l2_norm():
    codec = UpdateCodec(SHAPES, CodecConfig(quantize="none", update_clip=0.5))
    tensors, _, _ = codec.encode(_delta(scale=10.0), np.random.default_rng(0))
    assert np.linalg.norm(tensors["delta"]) == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda t, m: t.update(q=t["q"][:-1]), "wrong_shape"),
        (lambda t, m: t.update(q=t["q"].astype(np.int16)), "wrong_shape"),
        (lambda t, m: t.update(scales=np.full_like(t["scales"], np.nan)), "non_finite"),
        (lambda t, m: m.update(n=999), "wrong_shape"),
        (lambda t, m: m.update(scheme="zip"), "malformed"),
        (lambda t, m: m.pop("block"), "malformed"),
        (lambda t, m: t.update(extra=np.zeros(3, np.float32)), "wrong_shape"),
    ],
)
def test_hostile_payloads_are_typed_rejections(mutate, reason):
    codec = UpdateCodec(SHAPES, CodecConfig(quantize="int8", block=8))
    tensors, meta, _ = codec.encode(_delta(), np.random.default_rng(0))
    mutate(tensors, meta)
    with pytest.raises(CodecError) as info:
        codec.decode(tensors, meta)
    assert info.value.reason == reason


def test_signed_update_round_trips_and_any_tampering_is_caught():
    key = Ed25519PrivateKey.generate()
    codec = UpdateCodec(SHAPES, CodecConfig(quantize="int8", block=8))
    tensors, codec_meta, _ = codec.encode(_delta(), np.random.default_rng(0))
    meta = UpdateMeta("edge-1", 3, 2, "ab" * 32, 120, 7, codec_meta)
    data = build_update(meta, tensors, key)
    message = verify_and_parse(data, 1 << 20)
    assert parse_update_meta(message) == meta
    np.testing.assert_array_equal(message.tensors["q"], tensors["q"])
    for position in (0, 20, len(data) // 2, len(data) - 97, len(data) - 1):
        tampered = bytearray(data)
        tampered[position] ^= 1
        with pytest.raises(SigningError) as info:
            verify_and_parse(bytes(tampered), 1 << 20)
        assert info.value.reason in ("bad_signature", "malformed")
    other = Ed25519PrivateKey.generate()
    with pytest.raises(SigningError, match="key_mismatch"):
        verify_and_parse(build_update(meta, tensors, other), 1 << 20, expected_key=message.public_key)
    with pytest.raises(SigningError, match="oversize"):
        verify_and_parse(data, len(data) - 1)


def test_the_signed_model_is_plain_safetensors():
    key = Ed25519PrivateKey.generate()
    model = Model(activity_spec(), seed=0, version=4)
    data = build_model(model, 4, key)
    plain = st_load(data)  # any safetensors reader, no wearfl involved
    np.testing.assert_array_equal(plain["conv1.weight"], model.network.state_dict()["conv1.weight"])
    parsed = parse_model(data)
    assert parsed.model.version == 4 and parsed.round == 4 and parsed.model.spec == model.spec


def test_infinite_numbers_in_metadata_are_malformed_not_crashes():
    key = Ed25519PrivateKey.generate()
    codec = UpdateCodec(SHAPES, CodecConfig(quantize="topk", block=8))
    tensors, codec_meta, _ = codec.encode(_delta(), np.random.default_rng(0))
    data = build_update(UpdateMeta("edge-1", 3, 2, "ab" * 32, 120, 7, codec_meta), tensors, key)
    message = verify_and_parse(data, 1 << 20)
    message.metadata["round"] = float("inf")
    with pytest.raises(SigningError, match="malformed"):
        parse_update_meta(message)
    for field in ("n", "k"):
        with pytest.raises(CodecError) as info:
            codec.decode(message.tensors, {**codec_meta, field: float("inf")})
        assert info.value.reason == "malformed"


def test_the_task_config_maps_to_the_codec_in_one_place_with_its_defaults() -> None:
    assert CodecConfig.from_task({}) == CodecConfig()
    assert CodecConfig.from_task(CodecConfig(quantize="topk", update_clip=2.0).task_config()) == CodecConfig(
        quantize="topk", update_clip=2.0)
    with pytest.raises(ConfigError, match="quantization"):
        CodecConfig.from_task({"quantize": "int3"})
    with pytest.raises(ConfigError, match="update encoding"):
        CodecConfig.from_task({"block": "many"})
