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
    opset = next((o.version for o in result.opset_import if o.domain in ("", "ai.onnx")), 0)
    nodes = []
    for node in result.graph.node:
        is_fused = node.domain == MICROSOFT and node.op_type == "FusedConv"
        nodes += _unfused(node, opset) if is_fused else [node]
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    return result, f"unfused {len(fused)} onnxruntime FusedConv nodes into Conv and their activations"


def _unfused(node: onnx.NodeProto, opset: int) -> list[onnx.NodeProto]:
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    activation = attributes.get("activation", b"")
    activation = activation.decode() if isinstance(activation, bytes) else activation
    params = list(attributes.get("activation_params", []))
    conv_inputs = list(node.input[:3])
    residual = node.input[3] if len(node.input) > 3 and node.input[3] else None
    output = node.output[0]
    name = node.name or output
    conv_attributes = {k: v for k, v in attributes.items() if k in CONV_ATTRIBUTES}
    conv_attributes = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in conv_attributes.items()}
    steps = [("Conv", conv_attributes)]
    if residual is not None:
        steps.append(("Add", {}))
    if activation:
        steps.append(_activation(activation, params, opset, name))
    nodes = []
    source = conv_inputs
    for index, (op_type, attrs) in enumerate(steps):
        last = index == len(steps) - 1
        target = output if last else f"{name}_{op_type.lower()}_output"
        inputs = source if op_type != "Add" else [source[0], residual]
        if op_type == "Clip" and opset >= 11:
            low, high = attrs.pop("min"), attrs.pop("max")
            inputs = [source[0], *_clip_bounds(nodes, name, low, high)]
        nodes.append(helper.make_node(op_type, inputs, [target], name=f"{name}_{op_type}", **attrs))
        source = [target]
    return nodes


def _activation(kind: str, params: list[float], opset: int, name: str) -> tuple[str, dict]:
    if kind in ("Relu", "Sigmoid", "Tanh"):
        return kind, {}
    if kind == "LeakyRelu":
        return kind, {"alpha": params[0]} if params else {}
    if kind == "HardSigmoid":
        return kind, {"alpha": params[0], "beta": params[1]} if len(params) >= 2 else {}
    if kind == "Clip":
        return kind, {"min": params[0], "max": params[1]}
    raise OnnxqError(f"FusedConv {name!r} has an activation onnxq does not know: {kind}")


def _clip_bounds(nodes: list[onnx.NodeProto], name: str, low: float, high: float) -> list[str]:
    """Clip's bounds as Constant nodes (inputs from opset 11 on)."""
    names = []
    for side, value in (("min", low), ("max", high)):
        constant = f"{name}_clip_{side}"
        nodes.append(
            helper.make_node(
                "Constant",
                [],
                [constant],
                name=f"{constant}_Constant",
                value=helper.make_tensor(constant, 1, [], [value]),
            )
        )
        names.append(constant)
    return names
