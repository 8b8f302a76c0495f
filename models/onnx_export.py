"""ONNX export built with ``onnx.helper``: opset 13, IR version 8, dynamic batch.

IR 8 because older onnxruntime builds for ARM gateways reject newer IR versions.
The graph takes (batch, channels, time) float32 and outputs the model's final
values: class probabilities (batch, classes) or BPM (batch,).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.lowering import ConvOp, DenseOp, HeadOp, PoolOp, lower
from models.model import Model

__all__ = ["IR_VERSION", "OPSET", "export_onnx"]

OPSET = 13
IR_VERSION = 8


def export_onnx(model: Model) -> bytes:
    """The model as a serialized, checked ONNX graph."""
    spec = model.spec
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current = "input"

    def init(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    for op in lower(model):
        out = f"{op.name}_out"
        if isinstance(op, ConvOp):
            nodes.append(helper.make_node(
                "Conv", [current, init(f"{op.name}.weight", op.weight), init(f"{op.name}.bias", op.bias)],
                [out if not op.relu else f"{op.name}_pre"], name=op.name,
                kernel_shape=[op.weight.shape[2]], strides=[op.stride], pads=[op.padding[0], op.padding[1]],
                dilations=[op.dilation],
            ))
        elif isinstance(op, PoolOp):
            nodes.append(helper.make_node("ReduceMean", [current], [out], name=op.name, axes=[2], keepdims=0))
        elif isinstance(op, DenseOp):
            nodes.append(helper.make_node(
                "Gemm", [current, init(f"{op.name}.weight", op.weight), init(f"{op.name}.bias", op.bias)],
                [out if not op.relu else f"{op.name}_pre"], name=op.name, transB=1,
            ))
        elif isinstance(op, HeadOp):
            out = "output"
            if op.kind == "softmax":
                nodes.append(helper.make_node("Softmax", [current], [out], name="softmax", axis=1))
            else:
                nodes.append(helper.make_node(
                    "Reshape", [current, init("value_shape", np.array([-1], dtype=np.int64))], [out], name="value",
                ))
        if isinstance(op, ConvOp | DenseOp) and op.relu:
            nodes.append(helper.make_node("Relu", [f"{op.name}_pre"], [out], name=f"{op.name}_relu"))
        current = out

    out_shape: list[str | int] = ["batch", len(spec.classes)] if spec.is_classifier else ["batch"]
    graph = helper.make_graph(
        nodes,
        f"wearfl_{spec.task.replace('-', '_')}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", len(spec.channels), spec.window])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
        initializer=inits,
    )
    onnx_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="wearfl", ir_version=IR_VERSION,
    )
    meta = {"wearfl_spec": spec.to_json(), "wearfl_version": str(model.version)}
    helper.set_model_props(onnx_model, meta)
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model.SerializeToString()
