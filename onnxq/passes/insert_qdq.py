"""Build the QuantizeLinear/DequantizeLinear nodes a plan asks for, with calibrated parameters.

Weights and biases are stored as integers behind a DequantizeLinear; activations get a
QuantizeLinear → DequantizeLinear pair right after the node that produces them, read by all
their consumers. Activations that share parameters reuse the same scale and zero-point
initializers, which is what lets onnxruntime drop the pair around shape-only ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.passes.graph_utils import bypass, constant, drop_unused_initializers, set_initializer
from onnxq.quant import primitives as P
from onnxq.quant.plan import QuantPlan

ActivationParams = dict[str, tuple[np.float32, np.integer]]


@dataclass(frozen=True)
class QdqSummary:
    activations: int
    weights: int
    biases: int
    absorbed: int


def activation_params(
    plan: QuantPlan, ranges: dict[str, tuple[float, float]], target: P.IntRange
) -> ActivationParams:
    """Scale and zero point for every activation that owns its parameters."""
    params = {}
    for spec in plan.activations.values():
        if spec.shares is None:
            params[spec.tensor] = P.affine_params(*ranges[spec.observed], target)
    return params


def insert_qdq(
    graph: ir.Graph,
    plan: QuantPlan,
    params: ActivationParams,
    weight_target: P.IntRange,
) -> QdqSummary:
    """Rewrite `graph` in place into its QDQ form."""
    _remove_absorbed(graph, plan)
    values = _values_by_name(graph)
    weight_scales = {
        name: _quantize_weight(graph, values[name], spec.axis, weight_target)
        for name, spec in plan.weights.items()
    }
    for spec in plan.biases.values():
        activation_scale = params[plan.root(spec.activation)][0]
        _quantize_bias(graph, values[spec.name], activation_scale * weight_scales[spec.weight])
    shared: dict[str, tuple[ir.Value, ir.Value]] = {}
    for spec in plan.activations.values():
        root = plan.root(spec.tensor)
        if root not in shared:
            scale, zero_point = params[root]
            shared[root] = (
                set_initializer(graph, f"{root}_scale", np.asarray(scale, np.float32)),
                set_initializer(graph, f"{root}_zero_point", np.asarray(zero_point)),
            )
        _quantize_activation(graph, values[spec.tensor], *shared[root])
    graph.sort()
    drop_unused_initializers(graph)
    return QdqSummary(len(plan.activations), len(plan.weights), len(plan.biases), len(plan.absorbed))


def _remove_absorbed(graph: ir.Graph, plan: QuantPlan) -> None:
    for node in [n for n in graph if n.name in plan.absorbed]:
        bypass(graph, node, node.inputs[0])


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        values.update({v.name: v for v in node.outputs})
    return values


def _quantize_weight(graph: ir.Graph, value: ir.Value, axis: int | None, target: P.IntRange) -> np.ndarray:
    weight = constant(value)
    scale = P.symmetric_scale(P.weight_absmax(weight, axis), target)
    zero_point = np.zeros(scale.shape, target.dtype)
    integers = P.quantize(weight, scale, zero_point, target, axis)
    _dequantized_constant(graph, value, integers, scale, zero_point, axis)
    return scale


def _quantize_bias(graph: ir.Graph, value: ir.Value, scale: np.ndarray) -> None:
    bias = constant(value)
    scale = np.broadcast_to(np.asarray(scale, np.float32), bias.shape).copy()
    scale[scale == 0] = 1.0
    target = P.IntRange(-(2**31) + 1, 2**31 - 1, np.int32)
    integers = P.quantize(bias, scale, np.zeros(1, np.int32), target, axis=0)
    _dequantized_constant(graph, value, integers, scale, np.zeros(bias.shape, np.int32), axis=0)


def _dequantized_constant(
    graph: ir.Graph,
    value: ir.Value,
    integers: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    axis: int | None,
) -> None:
    """Replace a float initializer by integers + DequantizeLinear, for every reader."""
    name = value.name
    inputs = [
        set_initializer(graph, f"{name}_quantized", integers),
        set_initializer(graph, f"{name}_scale", scale),
        set_initializer(graph, f"{name}_zero_point", zero_point),
    ]
    attributes = {"axis": axis} if axis is not None and scale.ndim == 1 else {}
    dequantize = ir.node("DequantizeLinear", inputs, attributes, name=f"{name}_DequantizeLinear")
    dequantize.outputs[0].name = f"{name}_dequantized"
    dequantize.outputs[0].dtype = ir.DataType.FLOAT
    dequantize.outputs[0].shape = ir.Shape(integers.shape)
    ir.convenience.replace_all_uses_with(value, dequantize.outputs[0])
    graph.insert_before(next(iter(graph)), dequantize)


def _quantize_activation(graph: ir.Graph, value: ir.Value, scale: ir.Value, zero_point: ir.Value) -> None:
    uses = list(value.uses())
    name = value.name
    quantize = ir.node("QuantizeLinear", [value, scale, zero_point], name=f"{name}_QuantizeLinear")
    quantize.outputs[0].name = f"{name}_quantized"
    dequantize = ir.node(
        "DequantizeLinear",
        [quantize.outputs[0], scale, zero_point],
        name=f"{name}_DequantizeLinear",
    )
    dequantized = dequantize.outputs[0]
    dequantized.name = f"{name}_dequantized"
    dequantized.dtype, dequantized.shape = value.dtype, value.shape
    for user, index in uses:
        user.replace_input_with(index, dequantized)
    producer = value.producer()
    if producer is None:
        graph.insert_before(next(iter(graph)), [quantize, dequantize])
    else:
        graph.insert_after(producer, [quantize, dequantize])
