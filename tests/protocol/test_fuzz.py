"""Fuzzing the network-facing parsers: every hostile input is a typed rejection, never a crash.

What: hypothesis drives random bytes, truncated and bit-flipped signed updates (with and
without a fresh signature), hand-framed safetensors that declare huge header lengths,
shapes and offsets, hostile codec tensors (wrong dtypes and shapes, NaN/Inf, indices out
of range) and codec metadata, and random JSON, into ``verify_and_parse``,
``parse_update_meta``, ``UpdateCodec.decode``, ``parse_model``, ``parse_json``,
``Task``/``Receipt.from_bytes`` and the hub's metrics parser.

Why: these parsers face the network (anyone can publish on the broker, and without a
keyring anyone's key is trusted on first use), so each must either return a valid result
or raise its typed error (:class:`SigningError`, :class:`CodecError`; for model messages
also :class:`WearflError`, which the edge catches): any other exception escapes the hub's
and the edge's handlers. Inputs that declare huge sizes must not make the parser allocate
more than a small multiple of what was actually received (measured with ``tracemalloc``,
which sees numpy's buffers; the Rust side of safetensors is not traced).

Over 12,000 cases in all, derandomized so that CI always runs the same ones. Known bugs
are kept as strict xfail tests, one per bug, each pinned to the exception it raises today.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import tracemalloc
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from hub.intake import DEFAULT_MAX_UPDATE_BYTES
from hub.rounds import MetricsCollector
from models import Model, activity_spec
from models.errors import WearflError
from models.package import FORMAT as PACKAGE_FORMAT
from models.protocol.codec import SCHEMES, CodecConfig, CodecError, UpdateCodec
from models.protocol.messages import (
    MAX_JSON_BYTES,
    REJECT_REASONS,
    UPDATE_FORMAT,
    ModelMessage,
    Receipt,
    Task,
    UpdateMeta,
    build_model,
    build_update,
    parse_json,
    parse_model,
    parse_update_meta,
)
from models.protocol.signed import (
    SIG_BYTES,
    SIGNATURE_TENSOR,
    TRAILER_BYTES,
    SignedMessage,
    SigningError,
    public_key_bytes,
    sign_tensors,
    verify_and_parse,
)

# -- settings and keys ---------------------------------------------------------------

FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same cases on every run: CI is deterministic
    database=None,  # nothing written to .hypothesis/, no replay of local failures in CI
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
BUG = settings(FUZZ, phases=[Phase.explicit, Phase.generate])  # xfail tests: no shrinking of a known failure

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
PUB = public_key_bytes(KEY)
MAX_BYTES = DEFAULT_MAX_UPDATE_BYTES  # the hub's bound on an update
MIB = 1 << 20

SIGNING_REASONS = {"oversize", "malformed", "key_mismatch", "bad_signature"}
CODEC_REASONS = {"malformed", "wrong_shape", "non_finite"}
assert SIGNING_REASONS | CODEC_REASONS <= set(REJECT_REASONS)

LAYOUTS = (
    {"b.weight": (7, 5), "a.bias": (3,), "c": (2, 2, 2)},  # 46 values
    {"w": (1,)},
    {"conv.weight": (4, 3, 5), "conv.bias": (4,), "fc.weight": (2, 4), "fc.bias": (2,)},  # 78 values
    {"big": (300, 230)},  # 69,000 values: top-k indices are uint32
)
LAYOUT_CHOICES = (0, 0, 0, 1, 1, 2, 2, 2, 3)  # the big layout less often: it costs more per case
BLOCKS = (8, 16, 64, 256, 65536)
FRACTIONS = (1e-9, 0.01, 0.04, 0.5, 1.0)

HUGE_INTS = (2**31 - 1, 2**31, 2**32, 2**40, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30)
NUMERIC_STRINGS = ("", "0", "-1", "78", " 78 ", "1e3", "1e400", "nan", "inf", "-inf", "0x10", "1_000",
                   "\u0667\u0668", "9" * 5000)

# -- helpers -------------------------------------------------------------------------


def sign_raw(body: bytes, key: Ed25519PrivateKey = KEY) -> bytes:
    """``body``, then ``key``'s public key and a signature over both: exactly what verify_and_parse checks."""
    signed = body + public_key_bytes(key)
    return signed + key.sign(signed)


def frame(header: bytes, body: bytes = b"", declared: int | None = None) -> bytes:
    """Safetensors framing by hand: 8-byte little-endian header length (``declared``, any u64), header, data."""
    n = len(header) if declared is None else declared % 2**64
    return struct.pack("<Q", n) + header + body


def signature_entry(offset: int) -> dict[str, Any]:
    return {"dtype": "U8", "shape": [TRAILER_BYTES], "data_offsets": [offset, offset + TRAILER_BYTES]}


def update_meta_dict(codec_meta: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    meta = UpdateMeta(client="edge-1", round=1, base_version=0, base_hash="0" * 64, num_examples=10, sequence=3,
                      codec=dict(codec_meta), timestamp=1.7e9, metrics={"loss": 0.5})
    return {"format": UPDATE_FORMAT, **asdict(meta), **changes}


def check_reason(exc: SigningError | CodecError) -> None:
    allowed = SIGNING_REASONS if isinstance(exc, SigningError) else CODEC_REASONS
    assert exc.reason in allowed, f"untyped reason {exc.reason!r}"
    assert isinstance(exc.detail, str)


def check_delta(codec: UpdateCodec, delta: Mapping[str, np.ndarray]) -> None:
    """What a successful decode must give: the model's names and shapes, finite float32."""
    assert sorted(delta) == codec.names
    for name, values in delta.items():
        assert values.shape == codec.shapes[name] and values.dtype == np.float32
        assert np.all(np.isfinite(values))


def hub_pipeline(data: bytes, codec: UpdateCodec, expected_key: bytes | None = None) -> Any:
    """Verify, read the metadata, decode, in the hub's order (Intake._verified then _checked).

    Returns the decoded delta or the typed rejection; anything else propagates and fails the test.
    """
    try:
        message = verify_and_parse(data, MAX_BYTES, expected_key)
        meta = parse_update_meta(message)
        check_update_meta(meta)
        delta = codec.decode(message.tensors, meta.codec)
    except (SigningError, CodecError) as exc:
        check_reason(exc)
        return exc
    check_delta(codec, delta)
    return delta


def check_update_meta(meta: UpdateMeta) -> None:
    assert isinstance(meta.client, str) and isinstance(meta.base_hash, str) and isinstance(meta.codec, dict)
    assert all(isinstance(v, int) for v in (meta.round, meta.base_version, meta.num_examples, meta.sequence))
    assert meta.num_examples >= 1 and meta.sequence >= 0 and meta.round >= 0 and math.isfinite(meta.timestamp)
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in meta.metrics.items())


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    """The peak of Python and numpy allocations made inside the block, in bytes (``box[0]`` after it)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    box = [0]
    try:
        yield box
    finally:
        box[0] = tracemalloc.get_traced_memory()[1] - base
        if started:
            tracemalloc.stop()


def allocation_bound(size: int) -> int:
    """What parsing ``size`` received bytes may allocate: a small multiple plus a constant."""
    return 4 * size + MIB


@functools.lru_cache(maxsize=None)
def update_pool() -> tuple[tuple[bytes, UpdateCodec], ...]:
    """Valid signed updates: every layout and scheme, as the edge builds them."""
    pool = []
    for i, shapes in enumerate(LAYOUTS):
        for scheme in SCHEMES:
            codec = UpdateCodec(shapes, CodecConfig(scheme=scheme, block=16, topk_fraction=0.25))
            rng = np.random.default_rng(i)
            delta = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
            tensors, codec_meta, _ = codec.encode(delta, rng)
            meta = UpdateMeta(**{k: v for k, v in update_meta_dict(codec_meta).items() if k != "format"})
            pool.append((build_update(meta, tensors, KEY), codec))
    return tuple(pool)


@functools.lru_cache(maxsize=None)
def model_message() -> bytes:
    return build_model(Model(activity_spec(), seed=0, version=4), 4, KEY)


def model_metadata() -> dict[str, Any]:
    return verify_and_parse(model_message(), 1 << 26).metadata


def model_tensors() -> dict[str, np.ndarray]:
    return verify_and_parse(model_message(), 1 << 26).tensors


def parse_model_typed(data: bytes, expected_key: bytes | None = None) -> ModelMessage | Exception:
    """parse_model's result, or its typed rejection: SigningError, or the WearflError the edge also catches."""
    try:
        return parse_model(data, expected_key)
    except SigningError as exc:
        check_reason(exc)
        return exc
    except WearflError as exc:
        return exc


# -- strategies ----------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE_INTS), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(NUMERIC_STRINGS),
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
sizes = st.one_of(st.integers(0, 16), st.sampled_from(HUGE_INTS), st.integers(0, 2**64 + 8), st.integers(-3, -1))
DTYPE_NAMES = ("F32", "F16", "BF16", "F64", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL",
               "F8_E4M3", "C64", "F4", "XX", "")
DTYPE_BYTES = {"F32": 4, "F16": 2, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8,
               "U64": 8, "BOOL": 1, "C64": 8}
NP_DTYPES = (np.float16, np.float32, np.float64, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
             np.int64, np.bool_, np.complex64)


@st.composite
def encoded_updates(draw: st.DrawFn) -> tuple[UpdateCodec, dict[str, np.ndarray], dict[str, Any]]:
    """A codec (layout and config) and a valid encoding of a random delta."""
    shapes = LAYOUTS[draw(st.sampled_from(LAYOUT_CHOICES))]
    config = CodecConfig(scheme=draw(st.sampled_from(SCHEMES)), block=draw(st.sampled_from(BLOCKS)),
                         topk_fraction=draw(st.sampled_from(FRACTIONS)))
    codec = UpdateCodec(shapes, config)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from((0.0, 1e-30, 0.01, 1.0, 1e30)))
    delta = {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    tensors, meta, _ = codec.encode(delta, rng)
    return codec, tensors, meta


def _poke_value(draw: st.DrawFn, t: np.ndarray, n: int) -> np.ndarray:
    """One hostile value in ``t``'s dtype: NaN/Inf/huge for floats, extremes and ``n`` for integers."""
    with np.errstate(all="ignore"):
        if t.dtype.kind in "fc":
            v = draw(st.sampled_from((np.nan, np.inf, -np.inf, -0.0, 3.4e38, -3.4e38, -1.0, 1e-45)))
            return np.array([v], np.float64).astype(t.dtype)
        if t.dtype.kind in "iu":
            info = np.iinfo(t.dtype)
            v = draw(st.sampled_from((int(info.min), int(info.max), 0, -1, n, n - 1, n + 1, -128, -8)))
            return np.array([v], np.int64).astype(t.dtype)  # wraps, as bytes on the wire would
        return np.array([draw(st.booleans())], t.dtype)


@st.composite
def hostile_tensors(draw: st.DrawFn) -> tuple[UpdateCodec, dict[str, np.ndarray], dict[str, Any], list[str]]:
    """A valid encoding, then up to four edits: dtype, length, rank, NaN/Inf and out-of-range values, names."""
    codec, tensors, meta = draw(encoded_updates())
    tensors = {k: v.copy() for k, v in tensors.items()}
    ops = draw(st.lists(st.sampled_from(("dtype", "truncate", "extend", "rank", "drop", "add", "poke", "poke",
                                         "order", "swap")), max_size=4))
    for op in ops:
        name = draw(st.sampled_from((*sorted(tensors), "delta", "q", "scales", "idx", "extra")))
        t = tensors.get(name)
        if op == "add" or t is None:
            dtype = draw(st.sampled_from(NP_DTYPES))
            tensors[name] = np.zeros(draw(st.integers(0, 80)), dtype)
        elif op == "dtype":
            with np.errstate(all="ignore"):
                tensors[name] = t.astype(draw(st.sampled_from(NP_DTYPES)))
        elif op == "truncate" and t.ndim == 1:
            tensors[name] = t[: draw(st.integers(0, max(len(t) - 1, 0)))]
        elif op == "extend" and t.ndim == 1:
            tensors[name] = np.concatenate([t, np.zeros(draw(st.integers(1, 70_000)), t.dtype)])
        elif op == "rank":
            tensors[name] = draw(st.sampled_from((t.reshape(1, -1), t.reshape(-1, 1), t.reshape(-1)[:1].reshape(()))))
        elif op == "drop":
            del tensors[name]
        elif op == "poke" and t.size:
            flat = t.reshape(-1).copy()
            flat[draw(st.integers(0, flat.size - 1))] = _poke_value(draw, flat, codec.size)[0]
            tensors[name] = flat.reshape(t.shape)
        elif op == "order" and t.ndim == 1 and len(t) > 1:
            tensors[name] = draw(st.sampled_from((t[::-1].copy(), np.concatenate([t[:1], t[:-1]]))))
        elif op == "swap" and len(tensors) > 1:
            other = draw(st.sampled_from(sorted(set(tensors) - {name})))
            tensors[name], tensors[other] = tensors[other], t
    return codec, tensors, meta, ops


@st.composite
def hostile_codec_meta(draw: st.DrawFn) -> tuple[UpdateCodec, dict[str, np.ndarray], dict[str, Any]]:
    """Valid tensors with codec metadata whose scheme, n, block and k are missing, near or anything."""
    codec, tensors, meta = draw(encoded_updates())
    meta = dict(meta)
    near = {
        "scheme": st.sampled_from((*SCHEMES, "INT8", " none", "zip", "")),
        "n": st.sampled_from((codec.size, codec.size - 1, codec.size + 1, 0, -codec.size, float(codec.size),
                              str(codec.size), True)),
        "block": st.sampled_from((0, 1, 7, 8, 65536, 65537, -8, 8.9, "16", False)),
        "k": st.sampled_from((0, 1, -1, codec.size, codec.size + 1, 1.5, "2", None)),
        "extra": json_values,
    }
    for key in draw(st.lists(st.sampled_from(sorted(near)), max_size=4, unique=True)):
        action = draw(st.sampled_from(("drop", "near", "near", "any")))
        if action == "drop":
            meta.pop(key, None)
        else:
            meta[key] = draw(near[key] if action == "near" else json_values)
    return codec, tensors, meta


@st.composite
def flipped(draw: st.DrawFn, data: bytes, region: tuple[int, int] | None = None) -> tuple[bytes, dict[int, int]]:
    """``data`` with 1 to 8 bytes XORed with non-zero masks (distinct positions)."""
    lo, hi = region or (0, len(data))
    flips = draw(st.dictionaries(st.integers(lo, hi - 1), st.integers(1, 255), min_size=1, max_size=8))
    out = bytearray(data)
    for pos, mask in flips.items():
        out[pos] ^= mask
    return bytes(out), flips


@st.composite
def crafted_messages(draw: st.DrawFn, signed: bool) -> tuple[bytes, UpdateCodec]:
    """Safetensors framed by hand: huge declared header lengths, shapes and offsets, odd dtypes and names.

    Mostly consistent enough to get through the framing, so the content checks are what must reject;
    ``signed``: with a valid signature (by a fresh key), else a random trailer.
    """
    shapes = LAYOUTS[draw(st.sampled_from(LAYOUT_CHOICES))]
    codec = UpdateCodec(shapes)
    entries: dict[str, Any] = {}
    offset = 0
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.one_of(st.sampled_from(("delta", "q", "scales", "idx", SIGNATURE_TENSOR, "x")),
                              st.text(max_size=6)))
        dtype = draw(st.sampled_from(DTYPE_NAMES))
        shape = draw(st.one_of(st.lists(sizes, max_size=4), st.sampled_from(([0, 2**40], [2**40], [2**64 - 1],
                                                                            [0, 2**64 - 1], [2**32, 2**32, 0]))))
        known = dtype in DTYPE_BYTES and all(isinstance(d, int) and d >= 0 for d in shape)
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype] if known else None
        if nbytes is not None and nbytes <= 4096 and draw(st.integers(0, 3)):
            offsets: Any = [offset, offset + nbytes]
            offset += nbytes
        else:
            offsets = draw(st.one_of(st.lists(sizes, min_size=2, max_size=2), st.lists(sizes, max_size=3),
                                     st.just([offset, offset + (nbytes or 2**40)])))
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    body = bytes(offset) if draw(st.integers(0, 3)) else draw(st.binary(max_size=64))
    n = draw(st.sampled_from((codec.size, codec.size, codec.size + 1, 0, 2**40, 2**63, 2**64)))
    codec_meta = {"scheme": draw(st.sampled_from(SCHEMES)), "n": n, "block": draw(st.sampled_from((16, 2**40))),
                  "k": draw(st.sampled_from((1, n, 2**40)))}
    metadata: Any = draw(st.one_of(
        st.just(json.dumps(update_meta_dict(codec_meta))), st.just(json.dumps(update_meta_dict(codec_meta))),
        json_values.map(json.dumps), json_values,
    ))
    header: dict[str, Any] = {}
    if draw(st.integers(0, 5)):
        header["__metadata__"] = {"wearfl": metadata} if draw(st.integers(0, 5)) else metadata
    header.update(entries)
    if draw(st.integers(0, 3)):
        header[SIGNATURE_TENSOR] = signature_entry(len(body))
    raw_header = json.dumps(header).encode() + b" " * draw(st.integers(0, 7))
    declared = draw(st.one_of(st.none(), st.none(), st.sampled_from(HUGE_INTS), st.integers(0, len(raw_header) + 300)))
    raw = frame(raw_header, body, declared)
    data = sign_raw(raw, OTHER_KEY) if signed else raw + draw(st.binary(min_size=TRAILER_BYTES,
                                                                         max_size=TRAILER_BYTES))
    return data, codec


@st.composite
def framed_garbage(draw: st.DrawFn) -> bytes:
    """Random bytes behind a plausible header length and ``{``: gets past the hub's framing sniff."""
    rest = draw(st.binary(min_size=TRAILER_BYTES + 1, max_size=600))
    n = draw(st.one_of(st.integers(2, len(rest)), st.sampled_from(HUGE_INTS)))
    trailer = draw(st.one_of(st.binary(min_size=SIG_BYTES, max_size=SIG_BYTES), st.just(bytes(SIG_BYTES))))
    key = draw(st.sampled_from((PUB, bytes(32), b"\xff" * 32)))
    return frame(b"{" + rest, b"", n) + key + trailer


def json_text(values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return values.map(lambda v: json.dumps(v).encode())


RAW_TOKENS = (b"NaN", b"-Infinity", b"1e999", b"-1e999", b"1" * 5000, b"1.5", b"-0", b'"12"', b"null", b"true",
              b"[]", b"{}", b'"\\ud800"', b"[1, 2]", b'{"a": 1}', b"12345678901234567890123")


@st.composite
def json_objects_with_raw_tokens(draw: st.DrawFn) -> bytes:
    """A JSON object of the messages' field names whose values are raw tokens (NaN, 1e999, 5000 digits...)."""
    keys = draw(st.lists(st.sampled_from(("round", "model_version", "config", "deadline", "clients", "client",
                                          "sequence", "status", "reason", "num_examples", "metrics", "state")),
                         unique=True, max_size=8))
    fields = [b'"%s": %s' % (k.encode(), draw(st.sampled_from(RAW_TOKENS))) for k in keys]
    return b"{" + b", ".join(fields) + b"}"


def message_objects() -> st.SearchStrategy[bytes]:
    field_values = st.one_of(json_values, st.sampled_from(("accepted", "duplicate", "rejected", "online")),
                             st.lists(st.text(max_size=4), max_size=3),
                             st.dictionaries(st.text(max_size=4), json_scalars, max_size=3))
    names = st.sampled_from(("round", "model_version", "config", "deadline", "clients", "client", "sequence",
                             "status", "reason", "detail", "num_examples", "metrics", "state", "extra"))
    return json_text(st.dictionaries(names, field_values, max_size=8))


# -- signed messages: random bytes, truncations, bit flips -------------------------------


@settings(FUZZ, max_examples=1500)
@given(data=st.one_of(st.binary(max_size=512), framed_garbage()), max_bytes=st.sampled_from((MAX_BYTES, 200, 0)),
       pinned=st.booleans())
def test_random_bytes_are_typed_rejections(data, max_bytes, pinned):
    with pytest.raises(SigningError) as info:
        verify_and_parse(data, max_bytes, PUB if pinned else None)
    check_reason(info.value)


def test_oversize_is_refused_before_any_copy():
    data = bytes(MAX_BYTES + 1)
    with peak_memory() as peak, pytest.raises(SigningError, match="oversize"):
        verify_and_parse(data, MAX_BYTES)
    assert peak[0] < MIB


def test_the_valid_pool_parses():
    """The baseline the mutation tests start from: every unmodified message is accepted."""
    for data, codec in update_pool():
        assert isinstance(hub_pipeline(data, codec, PUB), dict)
    assert isinstance(parse_model_typed(model_message(), PUB), ModelMessage)


@settings(FUZZ, max_examples=1000)
@given(st.data())
def test_truncated_updates_are_typed_rejections(data):
    message, codec = data.draw(st.sampled_from(update_pool()))
    cut = data.draw(st.integers(0, len(message) - 1))
    resign = data.draw(st.booleans())
    if not resign:  # the trailer is gone or misplaced: the signature cannot verify
        with pytest.raises(SigningError) as info:
            verify_and_parse(message[:cut], MAX_BYTES)
        check_reason(info.value)
        return
    # a hostile sender signs the truncated file itself: the content checks must reject it
    body = message[: min(cut, len(message) - TRAILER_BYTES)]
    result = hub_pipeline(sign_raw(body, OTHER_KEY), codec)
    if body != message[:-TRAILER_BYTES]:
        assert isinstance(result, SigningError)


@settings(FUZZ, max_examples=1200)
@given(st.data())
def test_flipped_updates_fail_the_signature_or_are_typed_rejections(data):
    message, codec = data.draw(st.sampled_from(update_pool()))
    mode = data.draw(st.sampled_from(("flip", "flip", "resign-header", "resign-tensors")))
    if mode == "flip":
        tampered, flips = data.draw(flipped(message))
        pinned = data.draw(st.booleans())
        with pytest.raises(SigningError) as info:
            verify_and_parse(tampered, MAX_BYTES, PUB if pinned else None)
        key_changed = any(len(message) - TRAILER_BYTES <= p < len(message) - SIG_BYTES for p in flips)
        assert info.value.reason == ("key_mismatch" if pinned and key_changed else "bad_signature")
        return
    # flipped, then signed again by whoever flipped: header JSON, metadata and tensor bytes must be checked
    (n,) = struct.unpack("<Q", message[:8])
    body = message[:-TRAILER_BYTES]
    region = (0, 8 + n) if mode == "resign-header" else (8 + n, len(body))
    tampered, _ = data.draw(flipped(body, region))
    hub_pipeline(sign_raw(tampered, OTHER_KEY), codec)


# -- hand-framed safetensors: huge declared sizes ------------------------------------


@settings(FUZZ, max_examples=800)
@given(crafted_messages(signed=False), st.booleans())
def test_crafted_unsigned_messages_fail_the_signature_without_allocating(crafted, pinned):
    data, _ = crafted
    with peak_memory() as peak, pytest.raises(SigningError) as info:
        verify_and_parse(data, MAX_BYTES, PUB if pinned else None)
    assert info.value.reason in ({"key_mismatch"} if pinned else {"bad_signature", "malformed"})
    assert peak[0] <= allocation_bound(len(data))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@settings(FUZZ, max_examples=1500)
@given(crafted_messages(signed=True))
@example((sign_raw(frame(json.dumps({"delta": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]},
                                     SIGNATURE_TENSOR: signature_entry(2**42)}).encode())),
          UpdateCodec(LAYOUTS[0])))
@example((sign_raw(frame(b'{"__metadata__": {}}', b"", 2**64 - 1)), UpdateCodec(LAYOUTS[0])))
def test_crafted_signed_messages_are_rejected_on_content_without_allocating(crafted):
    """Past the signature (any key is trusted on first use), huge declared sizes must still be refused cheaply."""
    data, codec = crafted
    with peak_memory() as peak:
        result = hub_pipeline(data, codec)
    assert peak[0] <= allocation_bound(len(data)), f"{peak[0]} bytes allocated parsing {len(data)}"
    if isinstance(result, SigningError):
        assert result.reason == "malformed"


# -- the update codec ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@settings(FUZZ, max_examples=2000)
@given(hostile_tensors())
def test_codec_decode_of_hostile_tensors(case):
    codec, tensors, meta, ops = case
    inputs = sum(t.nbytes for t in tensors.values())
    with peak_memory() as peak:
        try:
            delta = codec.decode(tensors, meta)
        except CodecError as exc:
            check_reason(exc)
            delta = None
    assert peak[0] <= 8 * (inputs + 4 * codec.size) + MIB
    if delta is not None:
        check_delta(codec, delta)
    elif not ops:
        pytest.fail("an unmodified encoding was rejected")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@settings(FUZZ, max_examples=1200)
@given(hostile_codec_meta())
def test_codec_decode_of_hostile_metadata(case):
    codec, tensors, meta = case
    inputs = sum(t.nbytes for t in tensors.values())
    with peak_memory() as peak:
        try:
            check_delta(codec, codec.decode(tensors, meta))
        except CodecError as exc:
            check_reason(exc)
    assert peak[0] <= 8 * (inputs + 4 * codec.size) + MIB


# -- update metadata -----------------------------------------------------------------


@settings(FUZZ, max_examples=1000)
@given(st.data())
def test_hostile_update_metadata_is_malformed_not_a_crash(data):
    _, codec = data.draw(st.sampled_from(update_pool()))
    message = verify_and_parse(data.draw(st.sampled_from(update_pool()))[0], MAX_BYTES)
    metadata = dict(message.metadata)
    fields = ("format", "client", "round", "base_version", "base_hash", "num_examples", "sequence", "codec",
              "timestamp", "metrics", "extra")
    for key in data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=5, unique=True)):
        if data.draw(st.integers(0, 4)) == 0:
            metadata.pop(key, None)
        else:
            metadata[key] = data.draw(json_values)
    signed = sign_tensors(message.tensors, metadata, OTHER_KEY)
    hub_pipeline(signed, codec)
    try:  # and the parser alone, on metadata that never went through JSON
        check_update_meta(parse_update_meta(SignedMessage(PUB, metadata, message.tensors)))
    except SigningError as exc:
        check_reason(exc)


# -- JSON messages -------------------------------------------------------------------


def _parse_metrics(data: bytes) -> bool:
    return MetricsCollector().add("edge-1", data)  # the hub's parser; it reports False for unusable


JSON_PARSERS: dict[str, Callable[[bytes], Any]] = {
    "json": lambda d: parse_json(d, "status"), "task": Task.from_bytes, "receipt": Receipt.from_bytes,
    "metrics": _parse_metrics,
}


@settings(FUZZ, max_examples=1500)
@given(st.one_of(
    st.binary(max_size=256), json_text(json_values), message_objects(), message_objects(),
    json_objects_with_raw_tokens(), st.integers(0, 2 * MAX_JSON_BYTES).map(lambda k: b"{}" + b" " * k),
    st.binary(max_size=64).map(lambda b: b"\xef\xbb\xbf" + b),
))
def test_json_parsers_return_or_raise_typed(data):
    for name, parser in JSON_PARSERS.items():
        try:
            result = parser(data)
        except SigningError as exc:
            assert name != "metrics"
            check_reason(exc)
            continue
        if name == "task":
            assert isinstance(result.round, int) and isinstance(result.config, dict)
            assert result.clients is None or all(isinstance(c, str) for c in result.clients)
        elif name == "receipt":
            assert result.final and isinstance(result.client, str) and isinstance(result.sequence, int)
        elif name == "json":
            assert isinstance(result, dict)


# -- model messages ------------------------------------------------------------------

SPEC_FIELDS = ("task", "channels", "window", "sampling_rate_hz", "classes", "head")  # layers, preprocessing: xfails


@settings(FUZZ, max_examples=500)
@given(st.data())
def test_model_messages_return_or_raise_typed(data):
    message = model_message()
    mode = data.draw(st.sampled_from(("truncate", "flip", "resign-tensors", "metadata", "spec")))
    if mode == "truncate":
        result = parse_model_typed(message[: data.draw(st.integers(0, len(message) - 1))])
        assert isinstance(result, SigningError)
        return
    if mode == "flip":
        tampered, _ = data.draw(flipped(message))
        result = parse_model_typed(tampered, PUB)
        assert isinstance(result, SigningError) and result.reason in ("bad_signature", "key_mismatch")
        return
    if mode == "resign-tensors":
        (n,) = struct.unpack("<Q", message[:8])
        tampered, _ = data.draw(flipped(message[:-TRAILER_BYTES], (8 + n, len(message) - TRAILER_BYTES)))
        parse_model_typed(sign_raw(tampered, OTHER_KEY))
        return
    metadata = model_metadata()
    if mode == "metadata":
        for key in data.draw(st.lists(st.sampled_from(("format", "version", "round", "spec", "task")), min_size=1,
                                      unique=True)):
            metadata[key] = data.draw(json_values)
    else:
        spec = json.loads(metadata["spec"])
        for key in data.draw(st.lists(st.sampled_from(SPEC_FIELDS), min_size=1, unique=True)):
            spec[key] = data.draw(json_values)
        metadata["spec"] = json.dumps(spec)
    parse_model_typed(sign_tensors(model_tensors(), metadata, OTHER_KEY))


# -- known bugs: strict xfails, one per bug ------------------------------------------


def _model_with(architecture: list[dict[str, Any]] | None = None, preprocessing: Any = None,
                spec_text: str | None = None, tensors: Mapping[str, np.ndarray] | None = None) -> bytes:
    """A model message signed by a fresh key (trusted on first use) whose spec says what the test wants."""
    spec = asdict(activity_spec())
    if architecture is not None:
        spec["architecture"] = architecture
    if preprocessing is not None:
        spec["preprocessing"] = preprocessing
    metadata = {"format": PACKAGE_FORMAT, "task": "activity", "version": 1, "round": 1,
                "spec": spec_text if spec_text is not None else json.dumps(spec)}
    return sign_tensors(tensors if tensors is not None else {"w": np.zeros(1, np.float32)}, metadata, OTHER_KEY)


@pytest.mark.xfail(strict=True, raises=RecursionError, reason=(
    "models/protocol/messages.py parse_json catches ValueError/UnicodeDecodeError only; json.loads raises "
    "RecursionError on ~1,000+ nested arrays/objects (b'[' * 10000 is 10 KB, under MAX_JSON_BYTES), which "
    "escapes Task/Receipt.from_bytes, the hub's status handler and MetricsCollector.add"))
@settings(BUG, max_examples=50)
@given(depth=st.integers(2_000, 12_000), opener=st.sampled_from((b"[", b'{"a":')),
       parser=st.sampled_from(sorted(JSON_PARSERS)))
@example(depth=10_000, opener=b"[", parser="task")
def test_json_parsers_survive_deep_nesting(depth, opener, parser):
    data = (opener * depth)[:MAX_JSON_BYTES]
    try:
        JSON_PARSERS[parser](data)
    except SigningError as exc:
        check_reason(exc)


@pytest.mark.xfail(strict=True, raises=RecursionError, reason=(
    "models/protocol/signed.py verify_and_parse: after the signature check, json.loads of the header and of "
    "__metadata__['wearfl'] raise RecursionError on deeply nested JSON (e.g. metadata '[' * 10000), which the "
    "except (ValueError, KeyError, TypeError, SafetensorError) misses; it also escapes hub/intake.py "
    "Intake._verified and so Intake.process_batch (the whole batch's transaction is rolled back)"))
@settings(BUG, max_examples=50)
@given(depth=st.integers(2_000, 50_000), where=st.sampled_from(("header", "metadata")))
@example(depth=10_000, where="metadata")
def test_signed_parser_survives_deep_nesting(depth, where):
    if where == "header":
        raw = frame(b'{"x":' + b"[" * depth)
    else:
        header = {"__metadata__": {"wearfl": "[" * depth}, SIGNATURE_TENSOR: signature_entry(0)}
        raw = frame(json.dumps(header).encode())
    hub_pipeline(sign_raw(raw, OTHER_KEY), UpdateCodec(LAYOUTS[0]))


@pytest.mark.xfail(strict=True, raises=RecursionError, reason=(
    "models/spec.py ModelSpec.from_json catches (ValueError, KeyError, TypeError) around json.loads; a signed "
    "model message whose metadata 'spec' is a deeply nested JSON string ('[' * 10000) raises RecursionError "
    "out of parse_model"))
@settings(BUG, max_examples=20)
@given(depth=st.integers(2_000, 50_000))
@example(depth=10_000)
def test_model_spec_survives_deep_nesting(depth):
    parse_model_typed(_model_with(spec_text="[" * depth))


@pytest.mark.xfail(strict=True, raises=AttributeError, reason=(
    "models/spec.py ModelSpec.validate calls .items() on preprocessing['bandpass'] and ['normalization'] "
    "without checking they are objects: a signed model message with preprocessing {'bandpass': [1, 2]} "
    "raises AttributeError out of parse_model (neither SigningError nor WearflError)"))
@settings(BUG, max_examples=100)
@given(preprocessing=st.dictionaries(st.sampled_from(("bandpass", "normalization", "x")), json_values, max_size=2))
@example(preprocessing={"bandpass": [1, 2]})
def test_model_spec_survives_hostile_preprocessing(preprocessing):
    parse_model_typed(_model_with(preprocessing=preprocessing))


@pytest.mark.xfail(strict=True, raises=ZeroDivisionError, reason=(
    "models/engine/layers.py Dense.__init__ computes sqrt(6.0 / in_features) before any check: a signed model "
    "message with a dense layer of in_features 0 raises ZeroDivisionError, which build_layer (models/engine/"
    "network.py) and parse_model do not catch"))
@settings(BUG, max_examples=100)
@given(in_features=st.integers(0, 64), out_features=st.integers(0, 64))
@example(in_features=0, out_features=2)
def test_model_layers_survive_zero_sizes(in_features, out_features):
    layer = {"type": "dense", "name": "fc", "in_features": in_features, "out_features": out_features}
    tensors = {"fc.weight": np.zeros((out_features, in_features), np.float32),
               "fc.bias": np.zeros(out_features, np.float32)}
    parse_model_typed(_model_with([layer], tensors=tensors))


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "models/protocol/messages.py parse_model builds Model(spec) (models/engine/network.py Network -> layers) "
    "from the message's declared layer sizes before comparing them with the tensors it carries: a ~1 KB "
    "message declaring dense 2048x2048 allocates ~64 MiB (float64 init, float32 value and grad), beyond "
    "MAX_MODEL_BYTES (16 MiB); sizes like 2**18 x 2**18 ask numpy for hundreds of GiB (MemoryError)"))
@settings(BUG, max_examples=25)
@given(in_features=st.integers(1, 2048), out_features=st.integers(1, 2048))
@example(in_features=2048, out_features=2048)
def test_model_declared_layer_sizes_do_not_allocate(in_features, out_features):
    data = _model_with([{"type": "dense", "name": "fc", "in_features": in_features, "out_features": out_features}])
    with peak_memory() as peak:
        parse_model_typed(data)
    assert peak[0] <= allocation_bound(len(data)), f"{peak[0]} bytes allocated parsing {len(data)}"


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "models/protocol/signed.py verify_and_parse: a signed header (under MAX_HEADER_BYTES = 1 MiB) listing "
    "10,000 empty tensors is a ~640 KB message, but json.loads of the header plus safetensors' load (one "
    "dict and one ndarray per tensor) allocate ~17 MiB of Python objects: over 25x the input and over the "
    "hub's 4 MiB update bound"))
@settings(BUG, max_examples=3)
@given(count=st.integers(2_000, 12_000))
@example(count=10_000)
def test_many_tiny_tensors_do_not_amplify_allocation(count):
    header: dict[str, Any] = {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(count)}
    header[SIGNATURE_TENSOR] = signature_entry(0)
    data = sign_raw(frame(json.dumps(header, separators=(",", ":")).encode()), OTHER_KEY)
    with peak_memory() as peak:
        result = hub_pipeline(data, UpdateCodec(LAYOUTS[0]))
    assert isinstance(result, CodecError)  # parsed, then refused by the codec
    assert peak[0] <= allocation_bound(len(data)), f"{peak[0]} bytes allocated parsing {len(data)}"
