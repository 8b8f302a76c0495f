"""Parity of the inference back-ends: numpy, onnxruntime and LiteRT run the same model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import synthetic_activity

from models import ConfigError, InputError, Model, activity_spec, default_spec
from models.inference import open_model
from models.onnx_export import IR_VERSION, OPSET, export_onnx


def _close(a: np.ndarray, b: np.ndarray) -> None:
    """|a - b| <= 1e-5 * max(1, |a|) elementwise, a being the numpy reference."""
    bound = 1e-5 * np.maximum(1.0, np.abs(a))
    worst = float(np.max(np.abs(a - b) - bound))
    assert a.shape == b.shape and worst <= 0, f"outputs differ beyond 1e-5 relative (excess {worst:g})"


@pytest.fixture(params=["activity", "heart-rate"])
def trained(request, trained_activity, trained_heart_rate):
    return trained_activity if request.param == "activity" else trained_heart_rate


def _inputs(model: Model, x: np.ndarray) -> list[np.ndarray]:
    rng = np.random.default_rng(9)
    random = rng.standard_normal((64, *model.spec.input_shape)).astype(np.float32) * 3
    return [x[:1], x[:64], random[:1], random]


@pytest.mark.parametrize("backend", ["onnxruntime", "litert"])
def test_backends_match_numpy(trained, backend):
    model, x, _ = trained
    reference = open_model(model, "numpy")
    other = open_model(model, backend)
    for batch in _inputs(model, x):
        _close(reference.predict(batch), other.predict(batch))


def test_onnx_graph_is_opset_13_ir_8_with_dynamic_batch(trained_activity):
    model, _x, _ = trained_activity
    graph = onnx.load_from_string(export_onnx(model))
    assert graph.ir_version == IR_VERSION == 8
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [OPSET] == [13]
    dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "batch" and not dim.HasField("dim_value")


def test_exported_files_carry_their_spec(tmp_path, trained_activity):
    from models.tflite_export import export_tflite

    model, x, _ = trained_activity
    (tmp_path / "m.onnx").write_bytes(export_onnx(model))
    (tmp_path / "m.tflite").write_bytes(export_tflite(model))
    for name in ("m.onnx", "m.tflite"):
        predictor = open_model(tmp_path / name)
        assert predictor.spec == model.spec
        _close(model.predict(x[:8]), predictor.predict(x[:8]))


def test_custom_channels_and_window_export_and_run():
    spec = default_spec("activity", channels=["acc_x", "acc_y", "acc_z"], window=100, classes=["a", "b", "c"])
    model = Model(spec, seed=2)
    x, _ = synthetic_activity(5, seed=0, spec=spec)
    for backend in ("onnxruntime", "litert"):
        _close(model.predict(x), open_model(model, backend).predict(x))


def test_exported_file_runs_only_on_its_runtime(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(export_onnx(Model(activity_spec(), seed=0)))
    with pytest.raises(ConfigError, match="onnxruntime"):
        open_model(path, "litert")


@pytest.mark.parametrize("backend", ["numpy", "onnxruntime", "litert"])
def test_every_backend_rejects_wrong_shapes_and_nan(backend):
    predictor = open_model(Model(activity_spec(), seed=0), backend)
    with pytest.raises(InputError, match="shape"):
        predictor.predict(np.zeros((2, 6, 100), np.float32))
    x = np.zeros((2, 6, 128), np.float32)
    x[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        predictor.predict(x)
