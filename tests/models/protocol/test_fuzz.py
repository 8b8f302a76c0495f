"""Fuzzing the network-facing parsers: every hostile input is a typed rejection, never a crash.

What: hypothesis drives random bytes, truncated and bit-flipped signed updates (with and
without a fresh signature), hand-framed safetensors that declare huge header lengths,
shapes and offsets, hostile codec tensors (wrong dtypes and shapes, NaN/Inf, indices out
of range) and codec metadata, and random JSON, into ``verify_and_parse``,
``parse_update_meta``, ``UpdateCodec.decode``, ``parse_model``, ``parse_json``,
``Task``/``Receipt.from_bytes``, the hub's metrics parser and the edge's ledger-entry check.

Why: these parsers face the network (anyone can publish on the broker, and without a
keyring anyone's key is trusted on first use), so each must either return a valid result
or raise its typed error (:class:`SigningError`, :class:`CodecError`; for model messages
also :class:`WearflError`, which the edge catches): any other exception escapes the hub's
and the edge's handlers. Inputs that declare huge sizes must not make the parser allocate
more than a small multiple of what was actually received (measured with ``tracemalloc``,
which sees numpy's buffers; the Rust side of safetensors is not traced).

10,900 generated cases in all (about 25 s on a 2-core VM), derandomized so that CI always
runs the same ones. The last group guards the bugs this harness found (deep JSON nesting,
hostile specs, declared sizes that allocate, thousands of tiny tensors, small-order keys).
"""

from __future__ import annotations

import functools
import json
import math
import struct
import tracemalloc
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save

from hub.intake import DEFAULT_MAX_UPDATE_BYTES
from hub.reports import MetricsCollector
from models import Model, activity_spec
from models.errors import WearflError
from models.package import FORMAT as PACKAGE_FORMAT
from models.protocol.codec import SCHEMES, CodecConfig, CodecError, UpdateCodec
from models.protocol.ed25519 import Ed25519PrivateKey
from models.protocol.ledger import GENESIS, check_entry, entry_hash
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

pytestmark = pytest.mark.slow  # the quick loop is `pytest -m "not slow"`
BUG = settings(FUZZ, phases=[Phase.explicit, Phase.generate])  # the bug guards: no shrinking

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
PUB = public_key_bytes(KEY)
MAX_BYTES = DEFAULT_MAX_UPDATE_BYTES  # the hub's bound on an update
MIB = 1 << 20

SIGNING_REASONS = {"oversize", "malformed", "key_mismatch", "bad_signature"}
CODEC_REASONS = {"malformed", "wrong_shape", "non_finite"}
assert set(REJECT_REASONS) >= SIGNING_REASONS | CODEC_REASONS

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


def signed_header(entries: Mapping[str, Any], body: bytes = b"", declared: int | None = None) -> bytes:
    """A message with valid update metadata (for LAYOUTS[0]), ``entries`` and the signature entry, signed."""
    meta = {"scheme": "none", "n": 46, "block": 16}
    header = {"__metadata__": {"wearfl": json.dumps(update_meta_dict(meta))}, **entries,
              SIGNATURE_TENSOR: signature_entry(len(body))}
    return sign_raw(frame(json.dumps(header, separators=(",", ":")).encode(), body, declared), OTHER_KEY)


def update_meta_dict(codec_meta: Mapping[str, Any]) -> dict[str, Any]:
    """Valid update metadata as it travels (JSON under ``wearfl``)."""
    meta = UpdateMeta(client="edge-1", round=1, base_version=0, base_hash="0" * 64, num_examples=10, sequence=3,
                      codec=dict(codec_meta), timestamp=1.7e9, metrics={"loss": 0.5})
    return {"format": UPDATE_FORMAT, **asdict(meta)}


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


def allocation_bound(size: int, model_values: int = 0) -> int:
    """What parsing ``size`` received bytes may allocate: a small multiple plus a constant.

    ``model_values``: decoding an update also makes a few float32 arrays of the hub's own model size.
    """
    return 4 * size + MIB + 32 * model_values


@functools.cache
def update_pool() -> tuple[tuple[bytes, UpdateCodec], ...]:
    """Valid signed updates: every layout and scheme, as the edge builds them."""
    pool = []
    for i, shapes in enumerate(LAYOUTS):
        for scheme in SCHEMES:
            codec = UpdateCodec(shapes, CodecConfig(quantize=scheme, block=16, topk_fraction=0.25))
            rng = np.random.default_rng(i)
            delta = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
            tensors, codec_meta, _ = codec.encode(delta, rng)
            meta = UpdateMeta(**{k: v for k, v in update_meta_dict(codec_meta).items() if k != "format"})
            pool.append((build_update(meta, tensors, KEY), codec))
    return tuple(pool)


@functools.cache
def small_parsed_pool() -> tuple[tuple[SignedMessage, UpdateCodec], ...]:
    """The pool's small updates, parsed once: the metadata tests re-sign their tensors."""
    return tuple((verify_and_parse(data, MAX_BYTES), codec) for data, codec in update_pool() if codec.size < 1000)


@functools.cache
def model_message() -> bytes:
    return build_model(Model(activity_spec(), seed=0, version=4), 4, KEY)


@functools.cache
def _model_parsed() -> SignedMessage:
    return verify_and_parse(model_message(), 1 << 26)


def model_metadata() -> dict[str, Any]:
    return dict(_model_parsed().metadata)


def model_tensors() -> dict[str, np.ndarray]:
    return _model_parsed().tensors


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
# Strategies are built once (module level or cached): building one per draw costs more than the parse.


@functools.cache
def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.integers(lo, hi)


@functools.cache
def pick(*values: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from(values)


def choose(draw: st.DrawFn, values: Any) -> Any:
    """One of ``values`` (any sequence, hashable or not)."""
    return values[draw(ints(0, len(values) - 1))]


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE_INTS), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(NUMERIC_STRINGS),
)


def _json_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


json_values = st.recursive(json_scalars, _json_containers, max_leaves=6)
sizes = st.one_of(st.integers(0, 16), st.sampled_from(HUGE_INTS), st.integers(0, 2**64 + 8), st.integers(-3, -1))
DTYPE_NAMES = ("F32", "F16", "BF16", "F64", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL",
               "F8_E4M3", "C64", "F4", "XX", "")
DTYPE_BYTES = {"F32": 4, "F16": 2, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8,
               "U64": 8, "BOOL": 1, "C64": 8}
NP_DTYPES = (np.float16, np.float32, np.float64, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
             np.int64, np.bool_, np.complex64)
TENSOR_OPS = st.lists(st.sampled_from(("dtype", "truncate", "extend", "rank", "drop", "add", "poke", "poke", "order",
                                       "swap")), max_size=4)
META_KEYS = st.lists(st.sampled_from(("block", "extra", "k", "n", "scheme")), max_size=4, unique=True)
TENSOR_NAMES = st.one_of(st.sampled_from(("delta", "q", "scales", "idx", SIGNATURE_TENSOR, "x")), st.text(max_size=6))
SHAPES = st.one_of(st.lists(sizes, max_size=4),
                   st.sampled_from(([0, 2**40], [2**40], [2**64 - 1], [0, 2**64 - 1], [2**32, 2**32, 0])))
OFFSETS = st.one_of(st.lists(sizes, min_size=2, max_size=2), st.lists(sizes, max_size=3))
SHORT_BINARY = st.binary(max_size=64)
# a real key and a random signature (small-order keys are test_small_order_keys_do_not_verify's)
TRAILERS = st.tuples(st.sampled_from((PUB, public_key_bytes(OTHER_KEY))),
                     st.binary(min_size=SIG_BYTES, max_size=SIG_BYTES)).map(b"".join)
SIGNATURES = st.one_of(st.binary(min_size=SIG_BYTES, max_size=SIG_BYTES), st.just(bytes(SIG_BYTES)))
GARBAGE = st.binary(min_size=TRAILER_BYTES + 1, max_size=600)
FIELD_NAMES = ("round", "model_version", "config", "deadline", "clients", "client", "sequence", "status", "reason",
               "num_examples", "metrics", "state")


@st.composite
def encoded_updates(draw: st.DrawFn) -> tuple[UpdateCodec, dict[str, np.ndarray], dict[str, Any]]:
    """A codec (layout and config) and a valid encoding of a random delta."""
    shapes = LAYOUTS[draw(pick(*LAYOUT_CHOICES))]
    config = CodecConfig(quantize=draw(pick(*SCHEMES)), block=draw(pick(*BLOCKS)), topk_fraction=draw(pick(*FRACTIONS)))
    codec = UpdateCodec(shapes, config)
    rng = np.random.default_rng(draw(ints(0, 2**32 - 1)))
    scale = draw(pick(0.0, 1e-30, 0.01, 1.0, 1e30))
    delta = {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    tensors, meta, _ = codec.encode(delta, rng)
    return codec, tensors, meta


ENCODED = encoded_updates()


def _poke_value(draw: st.DrawFn, t: np.ndarray, n: int) -> np.ndarray:
    """One hostile value in ``t``'s dtype: NaN/Inf/huge for floats, extremes and ``n`` for integers."""
    with np.errstate(all="ignore"):
        if t.dtype.kind in "fc":
            v = draw(pick(np.nan, np.inf, -np.inf, -0.0, 3.4e38, -3.4e38, -1.0, 1e-45))
            return np.array([v], np.float64).astype(t.dtype)
        if t.dtype.kind in "iu":
            info = np.iinfo(t.dtype)
            v = choose(draw, (int(info.min), int(info.max), 0, -1, n, n - 1, n + 1, -128, -8))
            return np.array([v], np.int64).astype(t.dtype)  # wraps, as bytes on the wire would
        return np.array([draw(pick(False, True))], t.dtype)


@st.composite
def hostile_tensors(draw: st.DrawFn) -> tuple[UpdateCodec, dict[str, np.ndarray], dict[str, Any], list[str]]:
    """A valid encoding, then up to four edits: dtype, length, rank, NaN/Inf and out-of-range values, names."""
    codec, tensors, meta = draw(ENCODED)
    tensors = {k: v.copy() for k, v in tensors.items()}
    ops = draw(TENSOR_OPS)
    for op in ops:
        own = op != "add" and tensors and draw(ints(0, 4))  # mostly edit a tensor the update has
        name = choose(draw, sorted(tensors) if own else ("delta", "q", "scales", "idx", "extra"))
        t = tensors.get(name)
        if op == "add" or t is None:
            tensors[name] = np.zeros(draw(ints(0, 80)), draw(pick(*NP_DTYPES)))
        elif op == "dtype":
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
                tensors[name] = t.astype(draw(pick(*NP_DTYPES)))
        elif op == "truncate" and t.ndim == 1:
            tensors[name] = t[: draw(ints(0, 70_000)) % max(len(t), 1)]
        elif op == "extend" and t.ndim == 1:
            tensors[name] = np.concatenate([t, np.zeros(draw(ints(1, 70_000)), t.dtype)])
        elif op == "rank" and t.size:
            how = draw(ints(0, 2))
            tensors[name] = t.reshape(1, -1) if how == 0 else t.reshape(-1, 1) if how == 1 else t.reshape(-1)[0]
        elif op == "drop":
            del tensors[name]
        elif op == "poke" and t.size:
            flat = t.reshape(-1).copy()
            flat[draw(ints(0, 2**20)) % flat.size] = _poke_value(draw, flat, codec.size)[0]
            tensors[name] = flat.reshape(t.shape)
        elif op == "order" and t.ndim == 1 and len(t) > 1:
            tensors[name] = t[::-1].copy() if draw(pick(False, True)) else np.concatenate([t[:1], t[:-1]])
        elif op == "swap" and len(tensors) > 1:
            other = choose(draw, sorted(set(tensors) - {name}))
            tensors[name], tensors[other] = tensors[other], t
    return codec, tensors, meta, ops


@st.composite
def hostile_codec_meta(draw: st.DrawFn) -> tuple[UpdateCodec, dict[str, np.ndarray], dict[str, Any]]:
    """Valid tensors with codec metadata whose scheme, n, block and k are missing, near or anything."""
    codec, tensors, meta = draw(ENCODED)
    meta = dict(meta)
    size = codec.size
    near = {
        "scheme": (*SCHEMES, "INT8", " none", "zip", ""),
        "n": (size, size - 1, size + 1, 0, -size, float(size), str(size), True),
        "block": (0, 1, 7, 8, 65536, 65537, -8, 8.9, "16", False),
        "k": (0, 1, -1, size, size + 1, 1.5, "2", None),
        "extra": (None,),
    }
    for key in draw(META_KEYS):
        action = draw(pick("drop", "near", "near", "near", "any"))
        if action == "drop":
            meta.pop(key, None)
        else:
            meta[key] = choose(draw, near[key]) if action == "near" else draw(json_values)
    return codec, tensors, meta


@functools.cache
def _flips(lo: int, hi: int) -> st.SearchStrategy[dict[int, int]]:
    return st.dictionaries(st.integers(lo, hi - 1), st.integers(1, 255), min_size=1, max_size=8)


def flipped(draw: st.DrawFn, data: bytes, region: tuple[int, int] | None = None) -> tuple[bytes, dict[int, int]]:
    """``data`` with 1 to 8 bytes XORed with non-zero masks (distinct positions)."""
    lo, hi = region or (0, len(data))
    flips = draw(_flips(lo, hi))
    out = bytearray(data)
    for pos, mask in flips.items():
        out[pos] ^= mask
    return bytes(out), flips


CRAFT_TWEAKS = ("none", "huge_dim", "extra_dim", "zero_size_huge_dim", "huge_offset", "dtype", "declared",
                "codec_meta")


def _tweaked_update(draw: st.DrawFn) -> tuple[bytes, UpdateCodec]:
    """A real update file (safetensors' own writer) with one declaration made hostile, before signing."""
    codec, tensors, codec_meta = draw(ENCODED)
    tweak = draw(pick(*CRAFT_TWEAKS))
    if tweak == "codec_meta":
        codec_meta = {**codec_meta, draw(pick("n", "k", "block")): draw(pick(*HUGE_INTS))}
    raw = st_save({**tensors, SIGNATURE_TENSOR: np.zeros(TRAILER_BYTES, np.uint8)},
                  metadata={"wearfl": json.dumps(update_meta_dict(codec_meta))})
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n : -TRAILER_BYTES]
    entry = header[choose(draw, sorted(k for k in header if k != "__metadata__"))]
    declared = None
    if tweak == "huge_dim":
        entry["shape"][-1] = draw(pick(*HUGE_INTS))
    elif tweak == "extra_dim":
        entry["shape"].append(draw(pick(0, *HUGE_INTS)))
    elif tweak == "zero_size_huge_dim":
        entry["shape"] = [0, draw(pick(*HUGE_INTS))]
    elif tweak == "huge_offset":
        entry["data_offsets"][draw(ints(0, 1))] = draw(pick(*HUGE_INTS))
    elif tweak == "dtype":
        entry["dtype"] = draw(pick(*DTYPE_NAMES))
    elif tweak == "declared":
        declared = draw(pick(*HUGE_INTS)) if draw(pick(False, True)) else max(0, n + draw(ints(-64, 64)))
    return frame(json.dumps(header).encode(), data, declared), codec


@st.composite
def crafted_messages(draw: st.DrawFn, signed: bool) -> tuple[bytes, UpdateCodec]:
    """Safetensors framed by hand: huge declared header lengths, shapes and offsets, odd dtypes and names.

    Two thirds are a real update with one hostile declaration (so each check is reached), a third is
    built from scratch. ``signed``: with a valid signature (by a fresh key), else a random trailer.
    """
    if draw(ints(0, 2)):
        raw, codec = _tweaked_update(draw)
        return (sign_raw(raw, OTHER_KEY) if signed else raw + draw(TRAILERS)), codec
    codec = UpdateCodec(LAYOUTS[draw(pick(*LAYOUT_CHOICES))])
    entries: dict[str, Any] = {}
    offset = 0
    for _ in range(draw(ints(0, 4))):
        name = draw(TENSOR_NAMES)
        dtype = draw(pick(*DTYPE_NAMES))
        shape = draw(SHAPES)
        known = dtype in DTYPE_BYTES and all(isinstance(d, int) and d >= 0 for d in shape)
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype] if known else None
        if nbytes is not None and nbytes <= 4096 and draw(ints(0, 3)):
            offsets: Any = [offset, offset + nbytes]
            offset += nbytes
        elif draw(ints(0, 2)):
            offsets = draw(OFFSETS)
        else:
            offsets = [offset, offset + (nbytes or 2**40)]
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    body = bytes(offset) if draw(ints(0, 3)) else draw(SHORT_BINARY)
    n = choose(draw, (codec.size, codec.size, codec.size + 1, 0, 2**40, 2**63, 2**64))
    codec_meta = {"scheme": draw(pick(*SCHEMES)), "n": n, "block": draw(pick(16, 2**40)),
                  "k": choose(draw, (1, n, 2**40))}
    how = draw(ints(0, 3))
    metadata: Any = (json.dumps(update_meta_dict(codec_meta)) if how < 2 else
                     json.dumps(draw(json_values)) if how == 2 else draw(json_values))
    header: dict[str, Any] = {}
    if draw(ints(0, 5)):
        header["__metadata__"] = {"wearfl": metadata} if draw(ints(0, 5)) else metadata
    header.update(entries)
    if draw(ints(0, 3)):
        header[SIGNATURE_TENSOR] = signature_entry(len(body))
    raw_header = json.dumps(header).encode() + b" " * draw(ints(0, 7))
    how = draw(ints(0, 3))
    declared = (None if how < 2 else draw(pick(*HUGE_INTS)) if how == 2 else
                max(0, len(raw_header) + draw(ints(-300, 300))))
    raw = frame(raw_header, body, declared)
    data = sign_raw(raw, OTHER_KEY) if signed else raw + draw(TRAILERS)
    return data, codec


@st.composite
def framed_garbage(draw: st.DrawFn) -> bytes:
    """Random bytes behind a plausible header length and ``{``: gets past the hub's framing sniff."""
    rest = draw(GARBAGE)
    n = 2 + draw(ints(0, 600)) % (len(rest) - 1) if draw(ints(0, 3)) else draw(pick(*HUGE_INTS))
    trailer = draw(SIGNATURES)
    key = draw(pick(PUB, bytes(32), b"\xff" * 32))
    return frame(b"{" + rest, b"", n) + key + trailer


def json_text(values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return values.map(_encode_json)


def _encode_json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _padded_object(spaces: int) -> bytes:
    return b"{}" + b" " * spaces


def _with_bom(data: bytes) -> bytes:
    return b"\xef\xbb\xbf" + data


RAW_TOKENS = (b"NaN", b"-Infinity", b"1e999", b"-1e999", b"1" * 5000, b"1.5", b"-0", b'"12"', b"null", b"true",
              b"[]", b"{}", b'"\\ud800"', b"[1, 2]", b'{"a": 1}', b"12345678901234567890123")


@st.composite
def json_objects_with_raw_tokens(draw: st.DrawFn) -> bytes:
    """A JSON object of the messages' field names whose values are raw tokens (NaN, 1e999, 5000 digits...)."""
    keys = draw(st.lists(pick(*FIELD_NAMES), unique=True, max_size=8))
    fields = [b'"%s": %s' % (k.encode(), draw(pick(*RAW_TOKENS))) for k in keys]
    return b"{" + b", ".join(fields) + b"}"


def message_objects() -> st.SearchStrategy[bytes]:
    field_values = st.one_of(json_values, st.sampled_from(("accepted", "duplicate", "rejected", "online")),
                             st.lists(st.text(max_size=4), max_size=3),
                             st.dictionaries(st.text(max_size=4), json_scalars, max_size=3))
    return json_text(st.dictionaries(pick(*FIELD_NAMES, "detail", "extra"), field_values, max_size=8))


# -- signed messages: random bytes, truncations, bit flips -------------------------------


@settings(FUZZ, max_examples=1700)
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


@settings(FUZZ, max_examples=1100)
@given(st.data())
def test_truncated_updates_are_typed_rejections(data):
    message, codec = choose(data.draw, update_pool())
    cut = data.draw(ints(0, len(message) - 1))
    resign = data.draw(pick(False, True))
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


@settings(FUZZ, max_examples=1100)
@given(st.data())
def test_flipped_updates_fail_the_signature_or_are_typed_rejections(data):
    message, codec = choose(data.draw, update_pool())
    mode = data.draw(pick("flip", "flip", "resign-header", "resign-tensors"))
    if mode == "flip":
        tampered, flips = flipped(data.draw, message)
        pinned = data.draw(pick(False, True))
        with pytest.raises(SigningError) as info:
            verify_and_parse(tampered, MAX_BYTES, PUB if pinned else None)
        key_changed = any(len(message) - TRAILER_BYTES <= p < len(message) - SIG_BYTES for p in flips)
        assert info.value.reason == ("key_mismatch" if pinned and key_changed else "bad_signature")
        return
    # flipped, then signed again by whoever flipped: header JSON, metadata and tensor bytes must be checked
    (n,) = struct.unpack("<Q", message[:8])
    body = message[:-TRAILER_BYTES]
    region = (0, 8 + n) if mode == "resign-header" else (8 + n, len(body))
    tampered, _ = flipped(data.draw, body, region)
    hub_pipeline(sign_raw(tampered, OTHER_KEY), codec)


# -- hand-framed safetensors: huge declared sizes ------------------------------------


@settings(FUZZ, max_examples=600)
@given(crafted_messages(signed=False), st.booleans())
def test_crafted_unsigned_messages_fail_the_signature_without_allocating(crafted, pinned):
    data, _ = crafted
    with peak_memory() as peak, pytest.raises(SigningError) as info:
        verify_and_parse(data, MAX_BYTES, PUB if pinned else None)
    claimed = data[-TRAILER_BYTES:-SIG_BYTES]
    assert info.value.reason == ("key_mismatch" if pinned and claimed != PUB else "bad_signature")
    assert peak[0] <= allocation_bound(len(data))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@settings(FUZZ, max_examples=1500)
@given(crafted_messages(signed=True))
@example((signed_header({"delta": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}),
          UpdateCodec(LAYOUTS[0])))
@example((signed_header({"delta": {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]}}),
          UpdateCodec(LAYOUTS[0])))
@example((signed_header({"delta": {"dtype": "F32", "shape": [46], "data_offsets": [0, 184]}}, bytes(184), 2**64 - 1),
          UpdateCodec(LAYOUTS[0])))
def test_crafted_signed_messages_are_rejected_on_content_without_allocating(crafted):
    """Past the signature (any key is trusted on first use), huge declared sizes must still be refused cheaply."""
    data, codec = crafted
    with peak_memory() as peak:
        result = hub_pipeline(data, codec)
    assert peak[0] <= allocation_bound(len(data), codec.size), f"{peak[0]} bytes allocated parsing {len(data)}"
    if isinstance(result, SigningError):
        assert result.reason == "malformed"


# -- the update codec ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@settings(FUZZ, max_examples=1500)
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
    assert peak[0] <= allocation_bound(inputs, codec.size)
    if delta is not None:
        check_delta(codec, delta)
    elif not ops:
        pytest.fail("an unmodified encoding was rejected")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@settings(FUZZ, max_examples=900)
@given(hostile_codec_meta())
def test_codec_decode_of_hostile_metadata(case):
    codec, tensors, meta = case
    inputs = sum(t.nbytes for t in tensors.values())
    with peak_memory() as peak:
        try:
            check_delta(codec, codec.decode(tensors, meta))
        except CodecError as exc:
            check_reason(exc)
    assert peak[0] <= allocation_bound(inputs, codec.size)


# -- update metadata -----------------------------------------------------------------

UPDATE_FIELDS = st.lists(st.sampled_from(("format", "client", "round", "base_version", "base_hash", "num_examples",
                                          "sequence", "codec", "timestamp", "metrics", "extra")),
                         min_size=1, max_size=5, unique=True)


@settings(FUZZ, max_examples=700)
@given(st.data())
def test_hostile_update_metadata_is_malformed_not_a_crash(data):
    message, codec = choose(data.draw, small_parsed_pool())
    metadata = dict(message.metadata)
    for key in data.draw(UPDATE_FIELDS):
        if data.draw(ints(0, 4)) == 0:
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


def _parse_status(data: bytes) -> dict[str, Any]:
    return parse_json(data, "status")  # the hub then reads .get("state")


JSON_PARSERS: dict[str, Callable[[bytes], Any]] = {
    "json": _parse_status, "task": Task.from_bytes, "receipt": Receipt.from_bytes,
    "metrics": _parse_metrics,
}


@settings(FUZZ, max_examples=1100)
@given(st.one_of(
    st.binary(max_size=256), json_text(json_values), message_objects(), message_objects(),
    json_objects_with_raw_tokens(), st.integers(0, 2 * MAX_JSON_BYTES).map(_padded_object),
    st.binary(max_size=64).map(_with_bom),
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

SPEC_FIELDS = ("task", "channels", "window", "sampling_rate_hz", "classes", "head")  # layers: guards below
SPEC_KEYS = st.lists(st.sampled_from(SPEC_FIELDS), min_size=1, unique=True)
MODEL_FIELDS = st.lists(st.sampled_from(("format", "version", "round", "spec", "task", "ledger")), min_size=1,
                        unique=True)


@settings(FUZZ, max_examples=400)
@given(st.data())
def test_model_messages_return_or_raise_typed(data):
    message = model_message()
    mode = data.draw(pick("truncate", "flip", "resign-tensors", "metadata", "spec"))
    if mode == "truncate":
        result = parse_model_typed(message[: data.draw(ints(0, len(message) - 1))])
        assert isinstance(result, SigningError)
        return
    if mode == "flip":
        tampered, _ = flipped(data.draw, message)
        result = parse_model_typed(tampered, PUB)
        assert isinstance(result, SigningError) and result.reason in ("bad_signature", "key_mismatch")
        return
    if mode == "resign-tensors":
        (n,) = struct.unpack("<Q", message[:8])
        tampered, _ = flipped(data.draw, message[:-TRAILER_BYTES], (8 + n, len(message) - TRAILER_BYTES))
        parse_model_typed(sign_raw(tampered, OTHER_KEY))
        return
    metadata = model_metadata()
    if mode == "metadata":
        for key in data.draw(MODEL_FIELDS):
            metadata[key] = data.draw(json_values)
    else:
        spec = json.loads(metadata["spec"])
        for key in data.draw(SPEC_KEYS):
            spec[key] = data.draw(json_values)
        metadata["spec"] = json.dumps(spec)
    result = parse_model_typed(sign_tensors(model_tensors(), metadata, OTHER_KEY))
    if isinstance(result, ModelMessage):
        assert result.ledger is None or isinstance(result.ledger, dict)


LEDGER_FIELDS = st.lists(st.sampled_from(("hash", "version", "files", "prev", "updates", "extra")), max_size=4,
                         unique=True)


@settings(FUZZ, max_examples=300)
@given(st.data())
def test_ledger_entries_give_a_reason_or_none(data):
    """The ledger entry a model message carries (any JSON object, after parse_model) is checked, never a crash."""
    entry: Any = {"version": 1, "files": {"model.safetensors": "ab" * 32}, "prev": GENESIS, "updates": []}
    for key in data.draw(LEDGER_FIELDS):
        entry[key] = data.draw(json_values)
    if data.draw(pick(True, False)):
        entry["hash"] = entry_hash(entry)  # a self-consistent entry, so the later checks run
    if not data.draw(ints(0, 7)):
        entry = data.draw(json_values)
    previous = choose(data.draw, (None, {"version": 0, "hash": GENESIS}, {"version": 0, "hash": "b" * 64}))
    reason = check_entry(entry, 1, "ab" * 32, previous)
    assert reason is None or isinstance(reason, str)


# -- bugs this harness found, now guarded ----------------------------------------------


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


@settings(BUG, max_examples=20)
@given(depth=st.integers(2_000, 50_000))
@example(depth=10_000)
def test_model_spec_survives_deep_nesting(depth):
    parse_model_typed(_model_with(spec_text="[" * depth))


@settings(BUG, max_examples=100)
@given(preprocessing=st.dictionaries(st.sampled_from(("bandpass", "normalization", "x")), json_values, max_size=2))
@example(preprocessing={"bandpass": [1, 2]})
def test_model_spec_survives_hostile_preprocessing(preprocessing):
    parse_model_typed(_model_with(preprocessing=preprocessing))


@settings(BUG, max_examples=100)
@given(in_features=st.integers(0, 64), out_features=st.integers(0, 64))
@example(in_features=0, out_features=2)
def test_model_layers_survive_zero_sizes(in_features, out_features):
    layer = {"type": "dense", "name": "fc", "in_features": in_features, "out_features": out_features}
    tensors = {"fc.weight": np.zeros((out_features, in_features), np.float32),
               "fc.bias": np.zeros(out_features, np.float32)}
    parse_model_typed(_model_with([layer], tensors=tensors))


@settings(BUG, max_examples=25)
@given(in_features=st.integers(1, 2048), out_features=st.integers(1, 2048))
@example(in_features=2048, out_features=2048)
def test_model_declared_layer_sizes_do_not_allocate(in_features, out_features):
    data = _model_with([{"type": "dense", "name": "fc", "in_features": in_features, "out_features": out_features}])
    with peak_memory() as peak:
        parse_model_typed(data)
    assert peak[0] <= allocation_bound(len(data)), f"{peak[0]} bytes allocated parsing {len(data)}"


@settings(BUG, max_examples=3)
@given(count=st.integers(2_000, 12_000))
@example(count=10_000)
def test_many_tiny_tensors_do_not_amplify_allocation(count):
    data = signed_header({f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(count)})
    with peak_memory() as peak:
        result = hub_pipeline(data, UpdateCodec(LAYOUTS[0]))
    assert isinstance(result, (SigningError, CodecError))  # refused, by the parser or by the codec
    assert peak[0] <= allocation_bound(len(data)), f"{peak[0]} bytes allocated parsing {len(data)}"


IDENTITY_POINT = b"\x01" + bytes(31)  # the Ed25519 neutral element: a public key of order 1


@settings(BUG, max_examples=50)
@given(index=st.integers(0, len(LAYOUTS) * len(SCHEMES) - 1))
@example(index=0)
def test_small_order_keys_do_not_verify(index):
    message, codec = update_pool()[index]
    forged = message[:-TRAILER_BYTES] + IDENTITY_POINT + IDENTITY_POINT + bytes(32)
    result = hub_pipeline(forged, codec)
    assert isinstance(result, SigningError) and result.reason == "bad_signature", "forged without a private key"
