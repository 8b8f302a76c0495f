"""Export a model to TensorFlow Lite without TensorFlow: float32 or full-integer int8.

Why: gateways and phones run LiteRT (TFLite), but TensorFlow is a large dependency
that the numpy engine does not need. The flatbuffer is written directly with the
object API of the schema module that the ``ai-edge-litert`` wheel ships
(``ai_edge_litert.schema_py_generated``), from the same lowered ops
(:func:`models.lowering.lower`: BatchNorm folded, ReLU fused, head scale folded)
that the ONNX exporter reads.

The graph, for a window x (batch, channels, time)::

    TRANSPOSE -> (N, T, C) -> RESHAPE (N, 1, T, C) -> CONV_2D (fused ReLU) ...
    -> MEAN over axes [1, 2] -> FULLY_CONNECTED ... -> SOFTMAX | RESHAPE (N,)

Every activation keeps batch -1 in its ``shape_signature`` and every RESHAPE uses
-1 for the batch, so ``resize_tensor_input`` to any batch works.

``int8=True`` gives a full-integer graph with a float interface, per the TFLite
int8 quantization spec: QUANTIZE at the input and DEQUANTIZE at the output;
activations int8 per-tensor asymmetric, their ranges calibrated (min/max, widened
to hold 0) by running the lowered ops in numpy over calibration windows; CONV_2D
and FULLY_CONNECTED weights int8 symmetric per output channel in [-127, 127]
(``quantized_dimension`` 0) with int32 biases at scale input_scale * weight_scale[c];
TRANSPOSE, RESHAPE and PAD keep their input's scale and zero point; MEAN output is
calibrated on its own (the kernel rescales, and the pooled range is narrower than
its input's); SOFTMAX outputs scale 1/256, zero point -128.

Calibrate with real windows: without them, 256 seeded standard-normal windows
are used, which only suit inputs standardized to about zero mean and unit variance.
Inputs outside the calibrated input range are clipped by the QUANTIZE op.
"""

from __future__ import annotations

from dataclasses import dataclass

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as tfl

from models.errors import ConfigError
from models.lowering import ConvOp, DenseOp, HeadOp, InferenceOp, PoolOp, lower
from models.model import Model, check_input

__all__ = ["DEFAULT_CALIBRATION_WINDOWS", "export_tflite"]

F32 = np.float32
DEFAULT_CALIBRATION_WINDOWS = 256
_CALIBRATION_SEED = 0
_CALIBRATION_CHUNK = 512
_BUFFER_ALIGNMENT = 16  # what the TFLite converter uses; lets kernels read constants in place

# Op versions as TFLite's op_version.cc assigns them: int8 kernels need the higher ones.
_FLOAT_VERSIONS = {
    tfl.BuiltinOperator.TRANSPOSE: 1,
    tfl.BuiltinOperator.RESHAPE: 1,
    tfl.BuiltinOperator.PAD: 1,
    tfl.BuiltinOperator.CONV_2D: 1,
    tfl.BuiltinOperator.MEAN: 1,
    tfl.BuiltinOperator.FULLY_CONNECTED: 1,
    tfl.BuiltinOperator.SOFTMAX: 1,
}
_INT8_VERSIONS = {
    tfl.BuiltinOperator.QUANTIZE: 1,
    tfl.BuiltinOperator.DEQUANTIZE: 2,
    tfl.BuiltinOperator.TRANSPOSE: 2,
    tfl.BuiltinOperator.RESHAPE: 1,
    tfl.BuiltinOperator.PAD: 2,
    tfl.BuiltinOperator.CONV_2D: 3,
    tfl.BuiltinOperator.MEAN: 2,
    tfl.BuiltinOperator.FULLY_CONNECTED: 4,
    tfl.BuiltinOperator.SOFTMAX: 2,
}
_PLACEHOLDER_FOR_GREATER_OP_CODES = 127


@dataclass(frozen=True)
class _QParams:
    """Per-tensor asymmetric int8 quantization: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int

    def tensor(self) -> tfl.QuantizationParametersT:
        return tfl.QuantizationParametersT(scale=[self.scale], zeroPoint=[self.zero_point])


_SOFTMAX_Q = _QParams(float(F32(1.0 / 256.0)), -128)


def _qparams(lo: float, hi: float) -> _QParams:
    """int8 parameters covering [lo, hi] widened to hold 0 exactly."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-8:  # a constant-zero tensor: any scale represents it
        hi = lo + 1.0
    scale = F32((hi - lo) / 255.0)
    zero_point = int(np.clip(np.round(-128.0 - lo / float(scale)), -128, 127))
    return _QParams(float(scale), zero_point)


def _quantize_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel (axis 0) in [-127, 127]; returns (q, scales)."""
    flat = weight.reshape(weight.shape[0], -1)
    scale = (np.abs(flat).max(axis=1) / F32(127.0)).astype(F32)
    scale = np.where(scale > 0, scale, F32(1.0)).astype(F32)
    q = np.clip(np.rint(flat / scale[:, None]), -127, 127).astype(np.int8)
    return q.reshape(weight.shape), scale


def _quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias at scale input_scale * weight_scale[c] (float32 product, as the kernels check)."""
    scale = (F32(input_scale) * weight_scale).astype(F32)
    q = np.clip(np.rint(bias.astype(np.float64) / scale), -(2**31), 2**31 - 1).astype(np.int32)
    return q, scale


class _AlignedBufferT(tfl.BufferT):
    """A buffer whose data starts on a 16-byte boundary, written in one copy."""

    def Pack(self, builder: flatbuffers.Builder) -> int:
        data = None
        if self.data is not None:
            payload = self.data.tobytes()
            builder.StartVector(1, len(payload), _BUFFER_ALIGNMENT)
            builder.head -= len(payload)
            builder.Bytes[builder.head : builder.head + len(payload)] = payload
            builder.vectorNumElems = len(payload)
            data = builder.EndVector()
        tfl.BufferStart(builder)
        if data is not None:
            tfl.BufferAddData(builder, data)
        return tfl.BufferEnd(builder)


class _Graph:
    """Tensors, buffers, operators and op codes of one subgraph, added in order."""

    def __init__(self, versions: dict[int, int]) -> None:
        self.versions = versions
        self.tensors: list[tfl.TensorT] = []
        self.buffers: list[tfl.BufferT] = [tfl.BufferT()]  # buffer 0: empty, by convention
        self.operators: list[tfl.OperatorT] = []
        self.opcodes: dict[int, int] = {}

    def constant(
        self, name: str, array: np.ndarray, ttype: int, quant: tfl.QuantizationParametersT | None = None
    ) -> int:
        array = np.ascontiguousarray(array)
        self.buffers.append(_AlignedBufferT(data=array.view(np.uint8).reshape(-1)))
        tensor = tfl.TensorT(shape=list(array.shape), type=ttype, buffer=len(self.buffers) - 1, name=name,
                             quantization=quant)
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def int32(self, name: str, values: list[int] | np.ndarray) -> int:
        return self.constant(name, np.asarray(values, dtype=np.int32), tfl.TensorType.INT32)

    def activation(self, name: str, tail: tuple[int, ...], q: _QParams | None) -> int:
        """A (batch, *tail) tensor: shape [1, *tail], signature [-1, *tail]; int8 when ``q`` is given."""
        tensor = tfl.TensorT(
            shape=[1, *tail],
            shapeSignature=[-1, *tail],
            type=tfl.TensorType.FLOAT32 if q is None else tfl.TensorType.INT8,
            buffer=0,
            name=name,
            quantization=None if q is None else q.tensor(),
        )
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def op(
        self, code: int, inputs: list[int], outputs: list[int], options_type: int = 0, options: object = None
    ) -> None:
        if code not in self.opcodes:
            self.opcodes[code] = len(self.opcodes)
        self.operators.append(tfl.OperatorT(
            opcodeIndex=self.opcodes[code], inputs=inputs, outputs=outputs,
            builtinOptionsType=options_type, builtinOptions=options,
        ))

    def serialize(
        self, inputs: list[int], outputs: list[int], description: str, metadata: dict[str, bytes] | None = None
    ) -> bytes:
        entries = []
        for key, value in (metadata or {}).items():
            self.buffers.append(_AlignedBufferT(data=np.frombuffer(value, dtype=np.uint8)))
            entries.append(tfl.MetadataT(name=key, buffer=len(self.buffers) - 1))
        codes = [
            tfl.OperatorCodeT(
                deprecatedBuiltinCode=min(code, _PLACEHOLDER_FOR_GREATER_OP_CODES),
                builtinCode=code,
                version=self.versions[code],
            )
            for code in self.opcodes  # dicts keep insertion order: index i is the i-th code added
        ]
        subgraph = tfl.SubGraphT(tensors=self.tensors, inputs=inputs, outputs=outputs, operators=self.operators,
                                 name="main")
        signature = tfl.SignatureDefT(
            inputs=[tfl.TensorMapT(name="input", tensorIndex=inputs[0])],
            outputs=[tfl.TensorMapT(name="output", tensorIndex=outputs[0])],
            signatureKey="serving_default",
            subgraphIndex=0,
        )
        model = tfl.ModelT(version=3, operatorCodes=codes, subgraphs=[subgraph], description=description,
                           buffers=self.buffers, signatureDefs=[signature],
                           metadata=entries or None)
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def _check_structure(ops: list[InferenceOp]) -> tuple[list[ConvOp], list[DenseOp], HeadOp]:
    """Split ops into convolutions, dense layers and head; raise unless conv* pool dense+ head."""
    kinds = "".join("c" if isinstance(o, ConvOp) else "p" if isinstance(o, PoolOp) else
                    "d" if isinstance(o, DenseOp) else "h" for o in ops)
    n_conv = len(kinds) - len(kinds.lstrip("c"))
    rest = kinds[n_conv:]
    if not (rest.startswith("pd") and rest.endswith("h") and set(rest[1:-1]) == {"d"}):
        names = ", ".join(f"{o.name} ({type(o).__name__})" for o in ops)
        raise ConfigError(
            "TFLite export supports Conv1D blocks, then one global average pool, then Dense layers; "
            f"this model lowers to: {names}."
        )
    convs = [o for o in ops if isinstance(o, ConvOp)]
    denses = [o for o in ops if isinstance(o, DenseOp)]
    head = ops[-1]
    assert isinstance(head, HeadOp)
    if head.kind not in ("softmax", "value"):
        raise ConfigError(f"TFLite export does not support output head {head.kind!r}.")
    return convs, denses, head


def _calibrate(ops: list[InferenceOp], windows: np.ndarray) -> dict[str, tuple[float, float]]:
    """Min and max of the input and of each op's output over ``windows``, in chunks."""
    ranges: dict[str, tuple[float, float]] = {}

    def update(name: str, x: np.ndarray) -> None:
        lo, hi = float(x.min()), float(x.max())
        old = ranges.get(name)
        ranges[name] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    for start in range(0, len(windows), _CALIBRATION_CHUNK):
        x = windows[start : start + _CALIBRATION_CHUNK]
        update("input", x)
        for op in ops[:-1]:  # the head's output range is fixed (softmax) or the last dense's (value)
            x = op.forward(x)
            update(op.name, x)
    return ranges


def _same_padding(length: int, span: int, stride: int) -> tuple[int, int]:
    """What TFLite's SAME padding adds (left, right) for an input length and effective kernel span."""
    out = -(-length // stride)
    total = max((out - 1) * stride + span - length, 0)
    return total // 2, total - total // 2


def export_tflite(model: Model, *, int8: bool = False, calibration: np.ndarray | None = None) -> bytes:
    """The model as a TFLite flatbuffer: float32 input (batch, channels, time), output ``"output"``.

    The output is class probabilities (batch, classes) for a classifier, values
    (batch,) such as BPM for a regressor. ``int8=True`` quantizes the internals to
    int8 (float input and output kept); ``calibration`` windows (n, channels, time)
    set the activation ranges, else 256 seeded standard-normal windows do (real
    windows calibrate much better). Raises :class:`ConfigError` for models the
    exporter cannot express and :class:`InputError` for unusable calibration windows.
    """
    if calibration is not None and not int8:
        raise ConfigError("calibration windows only apply to an int8 export; pass int8=True or drop them.")
    ops = lower(model)
    convs, denses, head = _check_structure(ops)
    channels, length = model.spec.input_shape

    q: dict[str, _QParams] = {}
    if int8:
        if calibration is None:
            rng = np.random.default_rng(_CALIBRATION_SEED)
            calibration = rng.standard_normal((DEFAULT_CALIBRATION_WINDOWS, channels, length), dtype=F32)
        calibration = check_input(calibration, model.spec, "calibration windows")
        q = {name: _qparams(lo, hi) for name, (lo, hi) in _calibrate(ops, calibration).items()}
    B = tfl.BuiltinOperator
    g = _Graph(_INT8_VERSIONS if int8 else _FLOAT_VERSIONS)

    graph_input = g.activation("input", (channels, length), None)
    x, xq = graph_input, None
    if int8:
        xq = q["input"]
        x = g.activation("input_int8", (channels, length), xq)
        g.op(B.QUANTIZE, [graph_input], [x], tfl.BuiltinOptions.QuantizeOptions, tfl.QuantizeOptionsT())

    y = g.activation("input_ntc", (length, channels), xq)
    g.op(B.TRANSPOSE, [x, g.int32("transpose_perm", [0, 2, 1])], [y],
         tfl.BuiltinOptions.TransposeOptions, tfl.TransposeOptionsT())
    x = g.activation("input_nhwc", (1, length, channels), xq)
    g.op(B.RESHAPE, [y, g.int32("input_nhwc_shape", [-1, 1, length, channels])], [x],
         tfl.BuiltinOptions.ReshapeOptions, tfl.ReshapeOptionsT(newShape=[-1, 1, length, channels]))

    for conv in convs:
        out_ch, in_ch, kernel = conv.weight.shape
        if in_ch != channels:
            raise ConfigError(f"Conv1D {conv.name!r} expects {in_ch} input channels but receives {channels}.")
        span = conv.dilation * (kernel - 1) + 1
        left, right = conv.padding
        if (left, right) == (0, 0):
            padding = tfl.Padding.VALID
        elif (left, right) == _same_padding(length, span, conv.stride):
            padding = tfl.Padding.SAME
        else:  # an explicit PAD (with the zero point in int8, i.e. real 0), then VALID
            padding = tfl.Padding.VALID
            padded = g.activation(f"{conv.name}/padded", (1, length + left + right, channels), xq)
            pads = g.int32(f"{conv.name}/paddings", [[0, 0], [0, 0], [left, right], [0, 0]])
            g.op(B.PAD, [x, pads], [padded], tfl.BuiltinOptions.PadOptions, tfl.PadOptionsT())
            x = padded
        out_len = (length + left + right - span) // conv.stride + 1
        if out_len < 1:
            raise ConfigError(f"Conv1D {conv.name!r} receives {length} samples, fewer than its kernel spans.")
        filt = conv.weight.transpose(0, 2, 1)[:, None, :, :].astype(F32)  # (O, 1, K, C): OHWI
        oq = q.get(conv.name)
        if int8:
            assert xq is not None and oq is not None
            wq, w_scale = _quantize_per_channel(filt)
            bq, b_scale = _quantize_bias(conv.bias, xq.scale, w_scale)
            w = g.constant(f"{conv.name}/filter", wq, tfl.TensorType.INT8, tfl.QuantizationParametersT(
                scale=w_scale.tolist(), zeroPoint=[0] * out_ch, quantizedDimension=0))
            b = g.constant(f"{conv.name}/bias", bq, tfl.TensorType.INT32, tfl.QuantizationParametersT(
                scale=b_scale.tolist(), zeroPoint=[0] * out_ch, quantizedDimension=0))
        else:
            w = g.constant(f"{conv.name}/filter", filt, tfl.TensorType.FLOAT32)
            b = g.constant(f"{conv.name}/bias", conv.bias.astype(F32), tfl.TensorType.FLOAT32)
        y = g.activation(f"{conv.name}/output", (1, out_len, out_ch), oq)
        g.op(B.CONV_2D, [x, w, b], [y], tfl.BuiltinOptions.Conv2DOptions, tfl.Conv2DOptionsT(
            padding=padding, strideW=conv.stride, strideH=1, dilationWFactor=conv.dilation, dilationHFactor=1,
            fusedActivationFunction=tfl.ActivationFunctionType.RELU if conv.relu else tfl.ActivationFunctionType.NONE,
        ))
        x, xq, channels, length = y, oq, out_ch, out_len

    pool = ops[len(convs)]
    pq = q.get(pool.name)
    y = g.activation(f"{pool.name}/output", (channels,), pq)
    g.op(B.MEAN, [x, g.int32(f"{pool.name}/axes", [1, 2])], [y],
         tfl.BuiltinOptions.ReducerOptions, tfl.ReducerOptionsT(keepDims=False))
    x, xq = y, pq

    for dense in denses:
        out_f, in_f = dense.weight.shape
        if in_f != channels:
            raise ConfigError(f"Dense {dense.name!r} expects {in_f} features but receives {channels}.")
        oq = q.get(dense.name)
        if int8:
            assert xq is not None and oq is not None
            wq, w_scale = _quantize_per_channel(dense.weight.astype(F32))
            bq, b_scale = _quantize_bias(dense.bias, xq.scale, w_scale)
            w = g.constant(f"{dense.name}/weight", wq, tfl.TensorType.INT8, tfl.QuantizationParametersT(
                scale=w_scale.tolist(), zeroPoint=[0] * out_f, quantizedDimension=0))
            b = g.constant(f"{dense.name}/bias", bq, tfl.TensorType.INT32, tfl.QuantizationParametersT(
                scale=b_scale.tolist(), zeroPoint=[0] * out_f, quantizedDimension=0))
        else:
            w = g.constant(f"{dense.name}/weight", dense.weight.astype(F32), tfl.TensorType.FLOAT32)
            b = g.constant(f"{dense.name}/bias", dense.bias.astype(F32), tfl.TensorType.FLOAT32)
        y = g.activation(f"{dense.name}/output", (out_f,), oq)
        g.op(B.FULLY_CONNECTED, [x, w, b], [y], tfl.BuiltinOptions.FullyConnectedOptions,
             tfl.FullyConnectedOptionsT(
                 fusedActivationFunction=tfl.ActivationFunctionType.RELU if dense.relu
                 else tfl.ActivationFunctionType.NONE))
        x, xq, channels = y, oq, out_f

    out_name = "output_int8" if int8 else "output"
    if head.kind == "softmax":
        oq = _SOFTMAX_Q if int8 else None
        y = g.activation(out_name, (channels,), oq)
        g.op(B.SOFTMAX, [x], [y], tfl.BuiltinOptions.SoftmaxOptions, tfl.SoftmaxOptionsT(beta=1.0))
        tail: tuple[int, ...] = (channels,)
    else:
        if channels != 1:
            raise ConfigError(f"a value head needs a single output, the last Dense layer has {channels}.")
        oq = xq
        y = g.activation(out_name, (), oq)
        g.op(B.RESHAPE, [x, g.int32("output_shape", [-1])], [y],
             tfl.BuiltinOptions.ReshapeOptions, tfl.ReshapeOptionsT(newShape=[-1]))
        tail = ()
    x = y
    if int8:
        y = g.activation("output", tail, None)
        g.op(B.DEQUANTIZE, [x], [y], tfl.BuiltinOptions.DequantizeOptions, tfl.DequantizeOptionsT())
        x = y

    kind = "int8" if int8 else "float32"
    description = f"wearfl {model.spec.task} model v{model.version} ({kind})"
    # The spec rides along so that a bare .tflite file still knows its channels and classes.
    return g.serialize([graph_input], [x], description, {"wearfl_spec": model.spec.to_json().encode()})
