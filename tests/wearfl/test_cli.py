"""The CLI contract: exact command forms, JSON keys, and one clear error line with exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models import load_package
from wearfl.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def activity_pkg(tmp_path, capsys):
    path = tmp_path / "act.safetensors"
    assert run(capsys, "init", "--task", "activity", "--out", path, "--seed", "3")[0] == 0
    return path


def test_init_writes_a_package_with_the_requested_spec(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    code, _, _ = run(capsys, "init", "--task", "activity", "--out", path, "--channels", "acc_x", "acc_y", "acc_z",
                     "--window", "100", "--classes", "rest,walk,run", "--seed", "4")
    model = load_package(path)
    assert code == 0
    assert model.spec.channels == ("acc_x", "acc_y", "acc_z") and model.spec.window == 100
    assert model.spec.classes == ("rest", "walk", "run")


def test_init_is_deterministic_for_a_seed(tmp_path, capsys):
    for name in ("a", "b"):
        run(capsys, "init", "--task", "heart-rate", "--out", tmp_path / name, "--seed", "5")
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_info_json_reports_the_contract_keys(activity_pkg, capsys):
    code, out, _ = run(capsys, "info", "--model", activity_pkg, "--json")
    info = json.loads(out)
    assert code == 0
    assert info["task"] == "activity" and info["version"] == 0
    assert info["channels"] == ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]
    assert info["window"] == 128 and info["sampling_rate_hz"] == 50.0
    assert len(info["classes"]) == 6 and 5_000 < info["parameters"] < 20_000


@pytest.mark.parametrize("backend", ["numpy", "onnxruntime", "litert"])
def test_predict_json_gives_probabilities_and_labels(activity_pkg, tmp_path, capsys, backend):
    x = np.random.default_rng(0).standard_normal((3, 6, 128)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, _ = run(capsys, "predict", "--model", activity_pkg, "--input", tmp_path / "x.npy",
                       "--backend", backend, "--json")
    result = json.loads(out)
    probs = np.array(result["predictions"])
    classes = json.loads(run(capsys, "info", "--model", activity_pkg, "--json")[1])["classes"]
    assert code == 0 and probs.shape == (3, 6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert result["labels"] == [classes[i] for i in probs.argmax(axis=1)]


@pytest.mark.parametrize("fmt,suffix", [("onnx", "onnx"), ("tflite", "tflite"), ("tflite-int8", "tflite")])
def test_export_then_predict_on_the_exported_file(tmp_path, capsys, fmt, suffix):
    pkg, out_file = tmp_path / "hr.safetensors", tmp_path / f"hr.{suffix}"
    run(capsys, "init", "--task", "heart-rate", "--out", pkg)
    x = np.random.default_rng(1).standard_normal((4, 4, 256)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert run(capsys, "export", "--model", pkg, "--format", fmt, "--out", out_file)[0] == 0
    code, out, _ = run(capsys, "predict", "--model", out_file, "--input", tmp_path / "x.npy", "--json")
    bpm = np.array(json.loads(out)["predictions"])
    reference = np.array(json.loads(run(capsys, "predict", "--model", pkg, "--input", tmp_path / "x.npy",
                                        "--json")[1])["predictions"])
    assert code == 0 and bpm.shape == (4,)
    assert "labels" not in json.loads(out)
    np.testing.assert_allclose(bpm, reference, atol=1e-3 if fmt != "tflite-int8" else 5.0)


def _bad_inputs(tmp_path):
    good = np.zeros((2, 6, 128), np.float32)
    nan = good.copy()
    nan[0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "shape.npy", np.zeros((2, 5, 128), np.float32))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "junk.npy").write_bytes(b"garbage")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    return {
        "missing model": ["predict", "--model", tmp_path / "none.safetensors", "--input", tmp_path / "nan.npy"],
        "corrupt model": ["info", "--model", tmp_path / "corrupt.safetensors"],
        "missing input": [None, tmp_path / "none.npy"],
        "junk input": [None, tmp_path / "junk.npy"],
        "pickled input": [None, tmp_path / "obj.npy"],
        "wrong shape": [None, tmp_path / "shape.npy"],
        "nan": [None, tmp_path / "nan.npy"],
        "bad task": ["init", "--task", "sleep", "--out", tmp_path / "x"],
        "bad window": ["init", "--task", "activity", "--out", tmp_path / "x", "--window", "-3"],
    }


@pytest.mark.parametrize(
    "case",
    ["missing model", "corrupt model", "missing input", "junk input", "pickled input", "wrong shape", "nan",
     "bad task", "bad window"],
)
def test_bad_input_gives_one_error_line_and_exit_2(activity_pkg, tmp_path, capsys, case):
    argv = _bad_inputs(tmp_path)[case]
    if argv[0] is None:
        argv = ["predict", "--model", activity_pkg, "--input", argv[1]]
    code, _out, err = run(capsys, *argv) if case not in ("bad task", "bad window") else _argparse(capsys, argv)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in err


def _argparse(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exc.value.code, out, err
