"""The edge's footprint (issue 13): what ``wearfl edge`` imports, its process settings, and buffers
that never need twice their size. ``scripts/bench_edge_footprint.py`` measures the resident set."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from edge_client.finetune import release_free_memory
from edge_client.replay import ReplayBuffer
from models import InputError, heart_rate_spec
from models.files import write_atomic
from models.model import check_input
from wearfl.cli import COMMANDS, build_parser, command_of

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("scipy", "matplotlib", "onnx", "onnxruntime", "ai_edge_litert", "tflite_runtime", "torch", "pandas",
         "hub", "http", "email", "cryptography")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_the_edge_path_imports_nothing_heavy(tmp_path):
    """The CLI's edge parser, the runtime, both replayable sources, live inference and a fit:
    no scipy, matplotlib, ONNX or LiteRT, no hub, and not paho's urllib.request (http, email)."""
    from edge_client.sources.recordings import write_recording

    t = np.arange(3000) / 50.0
    write_recording(tmp_path / "p01.csv", t, acc_x=np.zeros(3000), acc_y=np.zeros(3000), acc_z=np.ones(3000),
                    ppg=np.sin(2 * np.pi * 1.2 * t), hr_bpm=np.full(3000, 72.0))
    (tmp_path / "dataset.toml").write_text("sampling_rate_hz = 50\n")
    code = f"""
import sys
from wearfl.cli import build_parser
build_parser("edge")
import edge_client.runtime
from edge_client.edge_command import resolve_source
from edge_client.pipeline import windows_from_chunks
from edge_client.finetune import EdgeTrainer
from edge_client.replay import ReplayBuffer
from models.inference import NumpyPredictor
from models.model import Model
from models.spec import default_spec
spec = default_spec("heart-rate")
for spec_text in ("sim:0/wearer-01", "recordings:{tmp_path}/p01"):
    source = resolve_source(spec_text, "wearer-01")
    windows, _ = windows_from_chunks(source.chunks(500), spec, source.sampling_rate_hz)
    NumpyPredictor(Model(spec)).predict(windows.x[-1:])
buffer = ReplayBuffer(spec.input_shape)
buffer.add(windows.x, windows.hr_bpm, "reference")
EdgeTrainer(spec, buffer).fit(Model(spec).network.state_dict(), {{"min_new_windows": 0}})
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
assert not heavy, heavy
"""
    done = _run(code)
    assert done.returncode == 0, done.stderr


def test_secure_aggregation_and_key_formats_load_only_when_used(tmp_path):
    """The edge's runtime, its device key (made, then read back), a signed update and its check:
    neither the SecAgg+ library (X25519, AES-GCM, HKDF) nor cryptography (Ed25519 is libsodium's; cryptography's
    Rust extension alone is ~7 MB resident) is imported; the first secure round imports SecAgg+."""
    code = f"""
import base64, sys
from pathlib import Path
import numpy as np
import edge_client.runtime
from edge_client.secure_aggregation import SecureParticipant, round_config_of
from models.protocol.identity import load_or_create_key, public_hex
from models.protocol.signed import sign_tensors, verify_and_parse
key = load_or_create_key(Path({str(tmp_path)!r}) / "device.key")
again = load_or_create_key(Path({str(tmp_path)!r}) / "device.key")
assert public_hex(key) == public_hex(again)
signed = sign_tensors({{"w": np.ones(3, np.float32)}}, {{"round": 1}}, key)
verify_and_parse(signed, 1 << 20)
lazy = ("models.protocol.secagg", "cryptography")
loaded = [m for m in sys.modules if m.startswith(lazy)]
assert not loaded, loaded
assert round_config_of({{}}) is None
from models.protocol.secagg import RoundConfig
from models.protocol.ed25519 import Ed25519PrivateKey
keys = {{c: Ed25519PrivateKey.generate() for c in ("a", "b", "c")}}
directory = {{c: k.public_key().public_bytes_raw() for c, k in keys.items()}}
config = round_config_of({{"secagg": base64.b64encode(RoundConfig.create("r1", list(keys), 4).to_bytes()).decode()}})
participant = SecureParticipant("a", config, keys["a"], directory, np.zeros(4, np.float32), np.random.default_rng(0))
assert participant.start() and not participant.done and not participant.succeeded
from models.errors import SecAggError
try:
    participant.answer(b"junk")
except SecAggError as exc:
    print("refused:", exc.reason)
"""
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert "refused: malformed" in done.stdout


def test_the_device_key_file_is_what_cryptography_writes_and_other_pem_keys_still_load(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from models.errors import ConfigError
    from models.protocol.identity import load_or_create_key, public_hex

    ours = load_or_create_key(tmp_path / "device.key")
    key = Ed25519PrivateKey.from_private_bytes(ours.private_bytes_raw())
    assert ours.sign(b"message") == key.sign(b"message")  # Ed25519 is deterministic: the two libraries agree
    written = (tmp_path / "device.key").read_bytes()
    assert written == key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    assert (tmp_path / "device.key").stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(tmp_path / "device.key").private_bytes_raw() == key.private_bytes_raw()
    assert public_hex(ours) == key.public_key().public_bytes(serialization.Encoding.Raw,
                                                            serialization.PublicFormat.Raw).hex()
    # a key written another way (OpenSSH's own format) goes through cryptography's loader
    other = Ed25519PrivateKey.generate()
    (tmp_path / "ssh.key").write_bytes(other.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.OpenSSH,
                                                           serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="is not a PEM Ed25519 private key"):
        load_or_create_key(tmp_path / "ssh.key")  # as before: load_pem_private_key refuses OpenSSH keys
    (tmp_path / "crlf.key").write_bytes(other.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()).replace(b"\n", b"\r\n"))
    assert load_or_create_key(tmp_path / "crlf.key").private_bytes_raw() == other.private_bytes_raw()
    (tmp_path / "ec.key").write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="holds a ECPrivateKey, not an Ed25519 key"):
        load_or_create_key(tmp_path / "ec.key")
    for junk in (b"", b"-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n",
                 b"-----BEGIN PRIVATE KEY-----\n" + __import__("base64").b64encode(bytes(48)) +
                 b"\n-----END PRIVATE KEY-----\n"):
        (tmp_path / "bad.key").write_bytes(junk)
        with pytest.raises(ConfigError, match="restore it or remove it"):
            load_or_create_key(tmp_path / "bad.key")


def test_the_cli_imports_only_the_command_it_runs():
    done = _run("import sys\nfrom wearfl.cli import main\n"
                "assert 'numpy' not in sys.modules\n"
                "try:\n    main(['edge', '--help'])\nexcept SystemExit:\n    pass\n"
                "print(sorted(m for m in sys.modules if m.split('.')[0] in ('hub', 'wearfl')))")
    assert done.returncode == 0, done.stderr
    assert "--source SPEC" in done.stdout
    loaded = json.loads(done.stdout.splitlines()[-1].replace("'", '"'))
    assert loaded == ["wearfl", "wearfl.cli", "wearfl.process_tuning"]


def test_every_command_is_registered_by_its_module():
    everything = build_parser()
    names = set(everything._subparsers._group_actions[0].choices)  # argparse keeps them here
    assert names == set(COMMANDS)
    for name in COMMANDS:
        assert name in build_parser(name)._subparsers._group_actions[0].choices
    assert command_of(["-v", "-v", "edge", "--source", "x"]) == "edge" and command_of(["--version"]) is None


def test_a_gateway_process_has_one_blas_thread():
    code = """
import os, sys
from wearfl.cli import tune_gateway_process
tune_gateway_process()
import numpy
from threadpoolctl import threadpool_info
blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
assert blas and set(blas) == {1}, blas
assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
"""
    done = _run(code)
    assert done.returncode == 0, done.stderr
    # an explicit setting wins
    done = subprocess.run([sys.executable, "-c", "from wearfl.cli import tune_gateway_process; import os;"
                           "tune_gateway_process(); print(os.environ['OPENBLAS_NUM_THREADS'])"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, "OPENBLAS_NUM_THREADS": "2"})
    assert done.stdout.strip() == "2", done.stderr


def test_a_simulation_process_tunes_malloc_and_keeps_one_blas_thread():
    code = """
import ctypes, os, sys
from wearfl.process_tuning import tune_simulation_process
assert tune_simulation_process() is sys.platform.startswith("linux")
import numpy
from threadpoolctl import threadpool_info
blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
assert blas and set(blas) == {1}, blas
"""
    done = _run(code)
    assert done.returncode == 0, done.stderr


def test_paho_s_urllib_request_loads_when_used():
    done = _run("import sys, models.transport.mqtt\n"
                "assert 'http.client' not in sys.modules\n"
                "import urllib.request\n"
                "from urllib.request import Request\n"
                "assert urllib.request.getproxies() is not None and Request.__module__ == 'urllib.request'\n"
                "assert 'http.client' in sys.modules\n")
    assert done.returncode == 0, done.stderr


def _filled(n: int = 70, capacity: int = 100) -> ReplayBuffer:
    rng = np.random.default_rng(0)
    buf = ReplayBuffer((4, 256), max_windows=capacity)
    buf.add(rng.standard_normal((n, 4, 256)), rng.uniform(50, 150, n), ["reference"] * (n - 10) + ["pseudo"] * 10)
    return buf


@pytest.mark.parametrize("task", ["activity", "heart-rate"])
def test_the_default_replay_buffer_is_4_mib_and_holds_a_30_minute_stream(task):
    """Full, a gateway's replay buffer is resident: 4 MiB by default. Every training result here was
    measured on 30-minute streams; their training windows (all but the 1 in 5 held out) still fit whole."""
    from edge_client.config import EdgeConfig
    from edge_client.edge_command import add_edge_command
    from models.spec import default_spec

    spec = default_spec(task)
    buf = ReplayBuffer(spec.input_shape)
    full = buf.capacity * (int(np.prod(spec.input_shape)) * 4 + 8)
    assert full <= 4 * 1024 * 1024 < full + int(np.prod(spec.input_shape)) * 4 + 8
    samples = 30 * 60 * spec.sampling_rate_hz
    hop = spec.window // 2
    windows = int((samples - spec.window) // hop + 1)
    assert buf.capacity >= windows - windows // 5
    config = EdgeConfig("mqtt://127.0.0.1:1883", "fed", "wearer-01", Path("/nonexistent"))
    assert (config.replay_max_windows, config.replay_max_bytes) == (buf.max_windows, buf.max_bytes)
    import argparse

    parser = argparse.ArgumentParser()
    add_edge_command(parser.add_subparsers())
    args = parser.parse_args(["edge", "--source", "sim:0/wearer-01", "--broker", "mqtt://127.0.0.1:1883",
                              "--federation", "fed", "--state", "/nonexistent"])
    assert (args.replay_windows, args.replay_mib << 20) == (buf.max_windows, buf.max_bytes)


def test_replay_files_are_safetensors_byte_for_byte(tmp_path):
    buf = _filled()
    buf.save(tmp_path / "r.safetensors")
    written = (tmp_path / "r.safetensors").read_bytes()
    header = json.loads(written[8 : 8 + int.from_bytes(written[:8], "little")])
    reference = st_save({"x": buf.x.copy(), "y": buf.y.copy(), "source": buf.source.copy()},
                        metadata=header["__metadata__"])
    assert written == reference
    tensors = st_load(written)
    np.testing.assert_array_equal(tensors["x"], buf.x)
    # and a file safetensors wrote (as before) loads
    (tmp_path / "old.safetensors").write_bytes(reference)
    loaded = ReplayBuffer.load(tmp_path / "old.safetensors")
    np.testing.assert_array_equal(loaded.x, buf.x)
    assert loaded.source_counts() == buf.source_counts() and loaded.seen == buf.seen


@pytest.mark.parametrize("damage", ["truncated", "trailing", "shape"])
def test_a_damaged_replay_file_is_refused(tmp_path, damage):
    buf = _filled()
    path = tmp_path / "r.safetensors"
    buf.save(path)
    data = path.read_bytes()
    if damage == "truncated":
        data = data[:-5]
    elif damage == "trailing":
        data += b"\0"
    else:
        data = data.replace(b'"shape":[70,4,256]', b'"shape":[70,4,255]')
    path.write_bytes(data)
    with pytest.raises(Exception, match="move it aside"):
        ReplayBuffer.load(path)


def test_the_replay_buffer_grows_in_place_and_saves_and_loads_without_a_copy(tmp_path):
    buf = ReplayBuffer((4, 256), max_windows=2048)
    storage = buf._x  # the point: it stays the same array
    rng = np.random.default_rng(1)
    for _ in range(20):
        buf.add(rng.standard_normal((50, 4, 256)).astype(np.float32), np.ones(50), "reference")
    assert buf._x is storage and len(buf) == 1000 and buf.x.base is storage
    tracemalloc.start()
    try:
        buf.save(tmp_path / "r.safetensors")
        saved_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        loaded = ReplayBuffer.load(tmp_path / "r.safetensors")
        load_peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert saved_peak < 0.05 * buf.nbytes
    assert load_peak < loaded._x.nbytes + 0.05 * buf.nbytes  # the storage, and no second copy
    np.testing.assert_array_equal(loaded.x, buf.x)


def test_write_atomic_writes_a_sequence_of_buffers(tmp_path):
    a = np.arange(5, dtype=np.float32)
    write_atomic(tmp_path / "f", [b"head", memoryview(a).cast("B"), b"tail"])
    assert (tmp_path / "f").read_bytes() == b"head" + a.tobytes() + b"tail"


def test_check_input_finds_non_finite_values_without_a_mask_of_the_input():
    spec = heart_rate_spec()
    x = np.zeros((1024, *spec.input_shape), np.float32)
    tracemalloc.start()
    try:
        check_input(x, spec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < x.size // 8  # isfinite(x) alone would be x.size bytes (here 1 MiB)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[3, 1, 7] = bad
        with pytest.raises(InputError, match="first at window 3"):
            check_input(y, spec)
    big = np.full((2, *spec.input_shape), 3e38, np.float32)  # finite, though its sum overflows float32
    assert check_input(big, spec) is big


def test_release_free_memory_is_safe_to_call():
    release_free_memory()
