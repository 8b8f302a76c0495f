"""Inference back-ends behind one interface: numpy, onnxruntime and LiteRT.

``open_model(path_or_model, backend)`` gives a :class:`Predictor` whatever the file
(model package, ``.onnx``, ``.tflite``); each back-end takes float32 windows
(batch, channels, time) and returns the model's outputs (probabilities or BPM).
LiteRT is ``ai_edge_litert``; where only the older ``tflite_runtime`` exists (Pi
images), it is used instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from models.errors import BackendUnavailable, ConfigError, InputError, ModelFormatError
from models.model import Model, check_input
from models.spec import ModelSpec

__all__ = ["BACKENDS", "LiteRTPredictor", "NumpyPredictor", "OnnxPredictor", "Predictor", "open_model"]

BACKENDS = ("numpy", "onnxruntime", "litert")
TFLITE_SPEC_KEY = "wearfl_spec"
MAX_MODEL_BYTES = 64 * 1024 * 1024


class Predictor(Protocol):
    """Anything that maps windows to model outputs."""

    backend: str
    spec: ModelSpec | None

    def predict(self, x: np.ndarray) -> np.ndarray: ...


def _checked(x: np.ndarray, spec: ModelSpec | None, shape: tuple[int, ...]) -> np.ndarray:
    if spec is not None:
        return check_input(x, spec)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 3 or tuple(x.shape[1:]) != tuple(shape):
        raise InputError(f"input has shape {x.shape}; the model needs (batch, {shape[0]}, {shape[1]}).")
    if not np.all(np.isfinite(x)):
        raise InputError("input holds NaN or infinite values; clean or drop those windows.")
    return x


class NumpyPredictor:
    """The training engine itself; the reference the others are checked against."""

    backend = "numpy"

    def __init__(self, model: Model) -> None:
        self.model, self.spec = model, model.spec

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x)


class OnnxPredictor:
    """onnxruntime on one thread (gateways have few cores and other work to do)."""

    backend = "onnxruntime"

    def __init__(self, onnx_bytes: bytes, spec: ModelSpec | None = None, threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable("onnxruntime is not installed; `pip install onnxruntime`.") from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
            raise ModelFormatError(f"onnxruntime cannot load the model: {exc}") from exc
        if spec is None:
            meta = self.session.get_modelmeta().custom_metadata_map
            spec = ModelSpec.from_json(meta["wearfl_spec"]) if "wearfl_spec" in meta else None
        self.spec = spec
        inp = self.session.get_inputs()[0]
        self._input, self._shape = inp.name, tuple(inp.shape[1:])

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = _checked(x, self.spec, self._shape)
        return self.session.run(None, {self._input: x})[0]


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as exc:
            raise BackendUnavailable(
                "no TFLite runtime is installed; `pip install ai-edge-litert` (or tflite-runtime on older Pis)."
            ) from exc
    return Interpreter


def tflite_spec(data: bytes) -> ModelSpec | None:
    """The wearfl spec stored in a ``.tflite`` file's metadata, if any."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        return None
    try:
        m = schema.Model.GetRootAs(data, 0)
        for i in range(m.MetadataLength()):
            meta = m.Metadata(i)
            if meta.Name() == TFLITE_SPEC_KEY.encode():
                buf = m.Buffers(meta.Buffer()).DataAsNumpy()
                return ModelSpec.from_json(bytes(buf).decode())
    except (IndexError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise ModelFormatError(f"the .tflite file's metadata is corrupt ({exc}).") from exc
    return None


class LiteRTPredictor:
    """LiteRT (``ai_edge_litert``) or ``tflite_runtime`` on one thread."""

    backend = "litert"

    def __init__(self, tflite_bytes: bytes, spec: ModelSpec | None = None, threads: int = 1) -> None:
        interpreter = _interpreter_class()
        try:
            self.interpreter = interpreter(model_content=tflite_bytes, num_threads=threads)
        except (ValueError, RuntimeError) as exc:
            raise ModelFormatError(f"LiteRT cannot load the model: {exc}") from exc
        self.spec = spec if spec is not None else tflite_spec(tflite_bytes)
        self._in = self.interpreter.get_input_details()[0]
        self._out = self.interpreter.get_output_details()[0]
        self._batch = -1

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = _checked(x, self.spec, tuple(self._in["shape"][1:]))
        it = self.interpreter
        if x.shape[0] != self._batch:
            it.resize_tensor_input(self._in["index"], list(x.shape), strict=False)
            it.allocate_tensors()
            self._batch = x.shape[0]
        it.set_tensor(self._in["index"], x)
        it.invoke()
        return it.get_tensor(self._out["index"]).copy()


def _read(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_MODEL_BYTES:
            raise ModelFormatError(f"{path} is larger than the {MAX_MODEL_BYTES}-byte model limit.")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelFormatError(f"model file {path} does not exist.") from exc
    except (IsADirectoryError, PermissionError) as exc:
        raise ModelFormatError(f"cannot read model file {path}: {exc.strerror}.") from exc


def open_model(source: Model | str | os.PathLike[str], backend: str | None = None) -> Predictor:
    """A predictor for a model, a package path, or an exported ``.onnx`` / ``.tflite`` file.

    ``backend`` defaults to numpy for packages, onnxruntime for ``.onnx`` and LiteRT for
    ``.tflite``. A package runs on any back-end (it is exported in memory); an exported
    file runs only on its own runtime.
    """
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}.")
    if isinstance(source, Model):
        model = source
    else:
        path = Path(source)
        suffix = path.suffix.lower()
        if suffix in (".onnx", ".tflite"):
            native = "onnxruntime" if suffix == ".onnx" else "litert"
            if backend not in (None, native):
                raise ConfigError(f"{path} is a {suffix} file and runs only on the {native} backend.")
            data = _read(path)
            return OnnxPredictor(data) if native == "onnxruntime" else LiteRTPredictor(data)
        from models.package import load_package

        model = load_package(path)
    if backend in (None, "numpy"):
        return NumpyPredictor(model)
    if backend == "onnxruntime":
        from models.onnx_export import export_onnx

        return OnnxPredictor(export_onnx(model), model.spec)
    from models.tflite_export import export_tflite

    return LiteRTPredictor(export_tflite(model), model.spec)
