"""Models saved after onnxruntime's own optimizer: its fused Conv back into standard ops.

A model written by an onnxruntime session (`optimized_model_filepath`, or tools that ship such
files) holds com.microsoft FusedConv nodes: a Conv, an optional residual input Z added to it, and
its activation, in one node no other tool knows. onnxq plans and quantizes Conv nodes, so each
FusedConv is written out again as Conv (→ Add Z) → activation, exactly what it computes;
onnxruntime fuses them again when it runs the quantized model.

The NCHWc layout ops a session writes at its highest level (com.microsoft.nchwc: ReorderInput,
blocked Conv and pools) are tied to the vector width of the machine that wrote them; such a
model is refused with the reason.
"""

from __future__ import annotations

import onnx
from onnx import helper

from onnxq.errors import OnnxqError
from onnxq.passes.graph_utils import opset_version

MICROSOFT = "com.microsoft"
NCHWC = "com.microsoft.nchwc"
CONV_ATTRIBUTES = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


def standard_ops(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """`model` with every FusedConv unfused, and a note; the model itself when it has none."""
    if any(node.domain == NCHWC for node in model.graph.node):
        raise OnnxqError(
            "the model holds onnxruntime's NCHWc layout ops (com.microsoft.nchwc), written for one "
            "machine's vector width by a session at its highest optimization level: give onnxq "
            "the exported model, or one saved at ORT_ENABLE_EXTENDED or below"
        )
    fused = [node for node in model.graph.node if node.domain == MICROSOFT and node.op_type == "FusedConv"]
    if not fused:
        return model, None
    result = onnx.ModelProto()
    result.CopyFrom(model)
    opset = opset_version(result)
    nodes = []
    for node in result.graph.node:
        is_fused = node.domain == MICROSOFT and node.op_type == "FusedConv"
        nodes += _unfused(node, opset) if is_fused else [node]
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    return result, f"unfused {len(fused)} onnxruntime FusedConv nodes into Conv and their activations"


def _unfused(node: onnx.NodeProto, opset: int) -> list[onnx.NodeProto]:
    """Conv (→ Add Z) (→ activation), the last writing the FusedConv's output."""
    attributes = {a.name: _text(helper.get_attribute_value(a)) for a in node.attribute}
    name = node.name or node.output[0]
    conv = {k: v for k, v in attributes.items() if k in CONV_ATTRIBUTES}
    nodes = [helper.make_node("Conv", node.input[:3], [f"{name}_conv_output"], name=f"{name}_Conv", **conv)]
    if len(node.input) > 3 and node.input[3]:
        inputs = [nodes[-1].output[0], node.input[3]]
        nodes.append(helper.make_node("Add", inputs, [f"{name}_add_output"], name=f"{name}_Add"))
    if attributes.get("activation"):
        params = list(attributes.get("activation_params", []))
        nodes += _activation(attributes["activation"], params, nodes[-1].output[0], name, opset)
    nodes[-1].output[0] = node.output[0]
    return nodes


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _activation(kind: str, params: list[float], source: str, name: str, opset: int) -> list[onnx.NodeProto]:
    """The activation node (Clip's bounds as Constants before it from opset 11 on)."""
    inputs, attrs, nodes = [source], {}, []
    if kind == "LeakyRelu" and params:
        attrs = {"alpha": params[0]}
    elif kind == "HardSigmoid" and len(params) >= 2:
        attrs = {"alpha": params[0], "beta": params[1]}
    elif kind == "Clip" and opset >= 11:
        nodes = [
            _scalar(f"{name}_clip_{side}", value) for side, value in (("min", params[0]), ("max", params[1]))
        ]
        inputs += [constant.output[0] for constant in nodes]
    elif kind == "Clip":
        attrs = {"min": params[0], "max": params[1]}
    elif kind not in ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid"):
        raise OnnxqError(f"FusedConv {name!r} has an activation onnxq does not know: {kind}")
    output = f"{name}_{kind.lower()}_output"
    return [*nodes, helper.make_node(kind, inputs, [output], name=f"{name}_{kind}", **attrs)]


def _scalar(name: str, value: float) -> onnx.NodeProto:
    tensor = helper.make_tensor(name, onnx.TensorProto.FLOAT, [], [value])
    return helper.make_node("Constant", [], [name], name=f"{name}_Constant", value=tensor)
