"""HardSwish between two quantized tensors, written so that onnxruntime runs it on integers.

onnxruntime has no integer HardSwish: DequantizeLinear → HardSwish → QuantizeLinear runs float,
expanded to HardSigmoid and Mul, four passes over the tensor, where a float model pays nothing
(its HardSwish is fused into the Conv before it). The same function written as

    h = QuantizeLinear(DequantizeLinear(x, s/6) + 0.5, 1/255, 0)    the saturation is Clip(·, 0, 1)
    y = DequantizeLinear(x, s) · DequantizeLinear(h, 1/255)          then the chain's QuantizeLinear

is fused by onnxruntime into QLinearAdd and QLinearMul (uint8 activations only): 0.35–0.59× the
time of the float form on the zoo's map sizes, and no output more than one step away from it
(BENCHMARKS.md "HardSwish on integer kernels", tools/hardswish_kernels.py). h's rounding, at most
1/510 of x, is the only new error.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.passes.graph_utils import constant, set_initializer

GATE_SCALE = np.float32(1 / 255)  # h in [0, 1] on uint8 from zero point 0: the Clip is saturation
HALF = (np.uint8(127), np.float32(0.5 / 127))  # 0.5 exactly, as a uint8 constant onnxruntime can fuse
PRODUCT = "product"  # the last node's part name: integer_hardswishes counts by it


def hardswish_on_integers(graph: ir.Graph) -> int:
    """Rewrite every uint8 DequantizeLinear → HardSwish → QuantizeLinear in `graph` (in place)
    into the QLinearAdd / QLinearMul form; returns how many were rewritten."""
    chains = [node for node in graph if _rewritable(node)]
    if not chains:
        return 0
    shared = {
        "gate_scale": set_initializer(graph, "onnxq_hardswish_gate_scale", np.asarray(GATE_SCALE)),
        "gate_zero_point": set_initializer(graph, "onnxq_hardswish_gate_zero_point", np.asarray(np.uint8(0))),
        "half": set_initializer(graph, "onnxq_hardswish_half", np.asarray(HALF[0])),
        "half_scale": set_initializer(graph, "onnxq_hardswish_half_scale", np.asarray(HALF[1])),
    }
    for node in chains:
        _rewrite(graph, node, shared)
    return len(chains)


def integer_hardswishes(model: onnx.ModelProto) -> int:
    """How many HardSwishes of a saved model this pass wrote for integer kernels (by the name it
    gives each one's final Mul)."""
    return sum(
        node.op_type == "Mul" and node.name.endswith(f"_integer_{PRODUCT}") for node in model.graph.node
    )


def _rewritable(node: ir.Node) -> bool:
    """A HardSwish that reads a DequantizeLinear of uint8 on one scale and that only
    QuantizeLinears read."""
    if node.op_type != "HardSwish" or node.domain != "":
        return False
    dequantize = node.inputs[0].producer()
    if dequantize is None or dequantize.op_type != "DequantizeLinear" or len(dequantize.inputs) != 3:
        return False
    scale, zero_point = (constant(value) for value in dequantize.inputs[1:])
    output = node.outputs[0]
    readers = output.consumers()
    return (
        scale is not None
        and zero_point is not None
        and scale.size == 1
        and zero_point.dtype == np.uint8
        and bool(readers)
        and not output.is_graph_output()
        and all(reader.op_type == "QuantizeLinear" for reader in readers)
    )


def _rewrite(graph: ir.Graph, node: ir.Node, shared: dict[str, ir.Value]) -> None:
    dequantize = node.inputs[0].producer()
    output = node.outputs[0]
    like = {"shape": output.shape, "type": output.type}  # every new tensor has x's shape
    gate_like = {"shape": output.shape, "type": ir.TensorType(ir.DataType.UINT8)}
    integers, scale, zero_point = dequantize.inputs
    sixth = set_initializer(
        graph, f"{node.name}_scale_sixth", np.asarray(constant(scale).reshape(()) / 6, np.float32)
    )
    gate_params = [shared["gate_scale"], shared["gate_zero_point"]]
    x_sixth = _node(node, "x_sixth", "DequantizeLinear", [integers, sixth, zero_point], like)
    half = _node(node, "half", "DequantizeLinear", [shared["half"], shared["half_scale"]], {})
    shifted = _node(node, "shifted", "Add", [x_sixth.outputs[0], half.outputs[0]], like)
    gate = _node(node, "gate", "QuantizeLinear", [shifted.outputs[0], *gate_params], gate_like)
    gate_float = _node(node, "gate_float", "DequantizeLinear", [gate.outputs[0], *gate_params], like)
    product = _node(node, PRODUCT, "Mul", [node.inputs[0], gate_float.outputs[0]], like)
    graph.insert_before(node, [x_sixth, half, shifted, gate, gate_float, product])
    name = output.name
    output.replace_all_uses_with(product.outputs[0])
    graph.remove(node, safe=True)
    product.outputs[0].name = name


def _node(hardswish: ir.Node, part: str, op_type: str, inputs: list[ir.Value], typed: dict) -> ir.Node:
    name = f"{hardswish.name}_integer_{part}"
    return ir.Node("", op_type, inputs=inputs, outputs=[ir.Value(name=name, **typed)], name=name)
