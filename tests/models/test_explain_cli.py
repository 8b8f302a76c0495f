"""``wearfl explain``: the command line over models/attribution.py and models/explanation_plot.py.

The command is run in-process (``wearfl.cli.main``) on a package made with ``wearfl init`` and on its ``.onnx``
export; every refusal is one ``error:`` line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import activity_spec, heart_rate_spec
from models.attribution import default_span, gradient_times_input, integrated_gradients, occlusion
from models.package import load_package
from wearfl.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JSON_KEYS = ["method", "channels", "targets", "outputs", "baseline_outputs", "attributions"]
ACTIVITY = activity_spec()
HEART_RATE = heart_rate_spec()


def save_windows(path: Path, spec: Any, n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, *spec.input_shape)).astype(np.float32)
    np.save(path, x)
    return x


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An activity package (``wearfl init``), its ``.onnx`` export, three windows; a heart-rate package and two."""
    root = tmp_path_factory.mktemp("explain")
    out: dict[str, Any] = {"root": root}
    out["package"], out["onnx"] = root / "P.safetensors", root / "M.onnx"
    assert main(["init", "--task", "activity", "--out", str(out["package"])]) == 0
    assert main(["export", "--model", str(out["package"]), "--format", "onnx", "--out", str(out["onnx"])]) == 0
    out["windows"] = root / "x.npy"
    out["x"] = save_windows(out["windows"], ACTIVITY, 3)
    out["hr_package"] = root / "H.safetensors"
    assert main(["init", "--task", "heart-rate", "--out", str(out["hr_package"])]) == 0
    out["hr_windows"] = root / "hx.npy"
    out["hx"] = save_windows(out["hr_windows"], HEART_RATE, 2, seed=1)
    return out


def explain_cli(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the fixtures printed
    code = main(["explain", *(str(a) for a in argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def explain_json(capsys: pytest.CaptureFixture[str], *argv: Any) -> dict[str, Any]:
    code, out, err = explain_cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def assert_one_error_line(code: int, out: str, err: str) -> str:
    assert code != 0
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --- --json -------------------------------------------------------------------------------------------------


def test_json_has_the_documented_keys_shape_and_predicted_targets(capsys, files):
    d = explain_json(capsys, "--model", files["package"], "--input", files["windows"])
    assert list(d) == JSON_KEYS
    assert d["method"] == "integrated-gradients"  # the default method
    assert d["channels"] == list(ACTIVITY.channels)
    a = np.asarray(d["attributions"])
    assert a.shape == (3, len(ACTIVITY.channels), ACTIVITY.window)
    predicted = load_package(files["package"]).predict(files["x"])
    assert d["targets"] == predicted.argmax(axis=1).tolist()
    np.testing.assert_allclose(d["outputs"], predicted.max(axis=1), rtol=1e-5, atol=1e-6)
    assert len(d["baseline_outputs"]) == 3


def test_json_integrated_gradients_add_up_to_the_output_change(capsys, files):
    d = explain_json(capsys, "--model", files["package"], "--input", files["windows"])
    change = np.asarray(d["outputs"], np.float64) - np.asarray(d["baseline_outputs"], np.float64)
    sums = np.asarray(d["attributions"], np.float64).sum(axis=(1, 2))
    assert np.abs(change).max() > 1e-3  # there is a change to account for
    gap = np.abs(sums - change)
    assert np.all((gap <= 0.02 * np.abs(change)) | (gap <= 1e-3)), (sums, change)


# --- --target ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "index"), [("walking", 0), ("laying", 5), ("3", 3), ("0", 0)])
def test_target_by_name_or_index_is_explained_for_every_window(capsys, files, target, index):
    d = explain_json(capsys, "--model", files["package"], "--input", files["windows"], "--target", target,
                     "--method", "gradient")
    assert d["targets"] == [index] * 3
    probabilities = load_package(files["package"]).predict(files["x"])
    np.testing.assert_allclose(d["outputs"], probabilities[:, index], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["running", "Walking", "99", "-1"])
def test_an_unknown_target_is_one_error_line_naming_the_classes(capsys, files, target):
    line = assert_one_error_line(*explain_cli(capsys, "--model", files["package"], "--input", files["windows"],
                                              "--target", target))
    for name in ACTIVITY.classes:
        assert name in line


# --- methods and exported models ------------------------------------------------------------------------


def test_gradient_on_a_package_is_gradient_times_input(capsys, files):
    d = explain_json(capsys, "--model", files["package"], "--input", files["windows"], "--method", "gradient")
    assert list(d) == JSON_KEYS and d["method"] == "gradient"
    expected = gradient_times_input(load_package(files["package"]), files["x"])
    assert d["targets"] == expected.targets.tolist()
    np.testing.assert_allclose(d["attributions"], expected.attributions, rtol=1e-4, atol=1e-7)
    assert np.abs(expected.attributions).max() > 0


def test_occlusion_on_a_package_gives_each_patch_its_output_drop(capsys, files):
    d = explain_json(capsys, "--model", files["package"], "--input", files["windows"], "--method", "occlusion")
    assert d["method"] == "occlusion"
    a = np.asarray(d["attributions"])
    assert a.shape == files["x"].shape
    span = default_span(ACTIVITY.window)
    patches = a.reshape(3, len(ACTIVITY.channels), -1, span)
    np.testing.assert_array_equal(patches, np.repeat(patches[..., :1], span, axis=3))  # constant per patch
    # one patch by hand: window 1, channel 2, samples 16..24 set to the zero baseline
    model = load_package(files["package"])
    occluded = files["x"][1:2].copy()
    occluded[0, 2, 16:16 + span] = 0.0
    target = d["targets"][1]
    drop = model.predict(files["x"][1:2])[0, target] - model.predict(occluded)[0, target]
    assert a[1, 2, 16] == pytest.approx(float(drop), abs=1e-6)
    np.testing.assert_allclose(a, occlusion(model, files["x"]).attributions, atol=1e-6)


def test_occlusion_on_the_onnx_export_agrees_with_the_package(capsys, files):
    on_package = explain_json(capsys, "--model", files["package"], "--input", files["windows"],
                              "--method", "occlusion")
    on_onnx = explain_json(capsys, "--model", files["onnx"], "--input", files["windows"], "--method", "occlusion")
    assert list(on_onnx) == JSON_KEYS and on_onnx["method"] == "occlusion"
    assert on_onnx["targets"] == on_package["targets"]
    for key in ("outputs", "baseline_outputs", "attributions"):
        np.testing.assert_allclose(on_onnx[key], on_package[key], rtol=0, atol=1e-4, err_msg=key)
    assert np.abs(np.asarray(on_package["attributions"])).max() > 1e-3  # the agreement compares something


@pytest.mark.parametrize("method", ["integrated-gradients", "gradient"])
def test_gradient_methods_on_an_onnx_file_are_one_clear_error(capsys, files, method):
    line = assert_one_error_line(*explain_cli(capsys, "--model", files["onnx"], "--input", files["windows"],
                                              "--method", method))
    assert "occlusion" in line and ".onnx" in line


# --- heart rate --------------------------------------------------------------------------------------------


def test_a_heart_rate_package_explains_its_one_output(capsys, files):
    d = explain_json(capsys, "--model", files["hr_package"], "--input", files["hr_windows"])
    assert d["targets"] == [0, 0]
    assert d["channels"] == list(HEART_RATE.channels)
    assert np.asarray(d["attributions"]).shape == (2, *HEART_RATE.input_shape)
    np.testing.assert_allclose(d["outputs"], load_package(files["hr_package"]).predict(files["hx"]), rtol=1e-5)
    change = np.asarray(d["outputs"], np.float64) - np.asarray(d["baseline_outputs"], np.float64)
    gap = np.abs(np.asarray(d["attributions"], np.float64).sum(axis=(1, 2)) - change)
    assert np.all((gap <= 0.02 * np.abs(change)) | (gap <= 1e-3)), (gap, change)


@pytest.mark.parametrize("method", ["integrated-gradients", "occlusion"])
def test_a_heart_rate_package_refuses_a_class_target(capsys, files, method):
    line = assert_one_error_line(*explain_cli(capsys, "--model", files["hr_package"], "--input",
                                              files["hr_windows"], "--target", "1", "--method", method))
    assert "--target" in line


# --- bad input ---------------------------------------------------------------------------------------------


def test_a_missing_input_file_is_one_error_line(capsys, files):
    missing = files["root"] / "nowhere.npy"
    line = assert_one_error_line(*explain_cli(capsys, "--model", files["package"], "--input", missing))
    assert str(missing) in line


@pytest.mark.parametrize("kind", ["text", "npz", "pickled"])
def test_an_input_that_is_not_a_npy_array_is_one_error_line(capsys, files, tmp_path, kind):
    path = tmp_path / f"windows.{kind}"
    if kind == "text":
        path.write_text("0.1, 0.2, 0.3\n")
    elif kind == "npz":
        with path.open("wb") as f:
            np.savez(f, x=files["x"])
    else:
        with path.open("wb") as f:  # a file handle: np.save would add .npy to the name
            np.save(f, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    assert_one_error_line(*explain_cli(capsys, "--model", files["package"], "--input", path))


@pytest.mark.parametrize("shape", [(3, 5, 128), (3, 6, 64), (3, 6, 128, 1), (768,)])
@pytest.mark.parametrize(("model", "method"), [("package", "integrated-gradients"), ("package", "gradient"),
                                               ("package", "occlusion"), ("onnx", "occlusion")])
def test_windows_of_the_wrong_shape_are_one_error_line(capsys, files, tmp_path, shape, model, method):
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros(shape, np.float32))
    assert_one_error_line(*explain_cli(capsys, "--model", files[model], "--input", path, "--method", method))


def test_a_single_2d_window_is_explained_or_refused_without_a_traceback(capsys, files, tmp_path):
    path = tmp_path / "one.npy"
    np.save(path, files["x"][0])  # (channels, samples), as `wearfl predict` accepts it
    code, out, err = explain_cli(capsys, "--model", files["package"], "--input", path)
    if code == 0:
        assert len(out.strip().splitlines()) == 2  # the heading and the one window
    else:
        assert_one_error_line(code, out, err)


# --- --plot and the human output -----------------------------------------------------------------------


def test_plot_writes_a_png_and_each_window_gets_a_line_naming_label_and_channel(capsys, files, tmp_path):
    png = tmp_path / "out.png"
    code, out, err = explain_cli(capsys, "--model", files["package"], "--input", files["windows"], "--plot", png)
    assert code == 0, err
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"wrote {png}")
    rows = [line for line in lines if line[:1].isdigit()]
    assert len(rows) == 3
    model = load_package(files["package"])
    expected = integrated_gradients(model, files["x"])  # what the command computes by default
    for i, row in enumerate(rows):
        fields = row.split("\t")
        assert fields[0] == str(i)
        assert fields[1] == ACTIVITY.classes[int(expected.targets[i])]
        channel, _, _, _ = expected.strongest(i, default_span(ACTIVITY.window))
        assert fields[-1].startswith(f"most: {ACTIVITY.channels[channel]} ")


def test_plot_with_json_keeps_stdout_json(capsys, files, tmp_path):
    png, one = tmp_path / "out.png", tmp_path / "one.npy"
    np.save(one, files["x"][:1])
    code, out, err = explain_cli(capsys, "--model", files["onnx"], "--input", one, "--method", "occlusion",
                                 "--plot", png, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert list(d) == JSON_KEYS and len(d["targets"]) == 1
    assert f"wrote {png}" in err
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_the_human_output_of_a_heart_rate_model_names_bpm(capsys, files):
    code, out, err = explain_cli(capsys, "--model", files["hr_package"], "--input", files["hr_windows"],
                                 "--method", "gradient")
    assert code == 0, err
    rows = [line.split("\t") for line in out.strip().splitlines()[1:]]
    assert len(rows) == 2
    for fields in rows:
        assert fields[1] == "BPM"
        assert fields[-1].split()[1] in HEART_RATE.channels


def test_plot_into_a_missing_folder_is_refused_before_any_work(capsys, files, tmp_path, monkeypatch):
    import models.attribution

    def no_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("explained although --plot cannot be written")

    monkeypatch.setattr(models.attribution, "explain", no_work)
    folder = tmp_path / "not-there"
    line = assert_one_error_line(*explain_cli(capsys, "--model", files["package"], "--input", files["windows"],
                                              "--plot", folder / "out.png"))
    assert str(folder) in line
    assert not folder.exists()


def test_plot_onto_an_existing_folder_is_one_error_line(capsys, files, tmp_path):
    folder = tmp_path / "plots"
    folder.mkdir()
    one = tmp_path / "one.npy"
    np.save(one, files["x"][:1])
    assert_one_error_line(*explain_cli(capsys, "--model", files["package"], "--input", one, "--method",
                                       "gradient", "--plot", folder))
    assert folder.is_dir() and not any(folder.iterdir())
