"""Fold a constant scale or shift right after a Conv, ConvTranspose or Gemm into its weights and bias.

Some exporters write a layer's bias, or a learnable affine after it, as separate nodes
(paddle2onnx: Conv → Add(bias); PP-LCNet's scale/shift blocks; tf2onnx's Mul/Add by constants).
Left alone, the layer's output is quantized before the shift is added, so its 8-bit range
covers the wrong values, and the Add runs in float between two Q/DQ pairs. With c a scalar or a
per-output-channel constant:
    Mul(y, c): W'[k] = W[k] · c[k], b'[k] = b[k] · c[k]        Div(y, c): the same with 1/c
    Add(y, c): b'[k] = b[k] + c[k]                             Sub(y, c): the same with −c
The fold is skipped when the layer's output is read elsewhere or the constant does not broadcast
per output channel; shared weights or bias fold into copies of the layer's own. A Transpose read
only by the Mul/Add may stand between them (tf2onnx without its optimizer: Conv → Transpose to
NHWC → Mul/Add by a per-channel constant along the last axis): the constant is then read along
the axis the Transpose moved the channels to, and the Transpose stays. BatchNorm
statistics kept for a layer's output (fold_bn) follow the fold, so they still describe the
tensor the layer now produces.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.passes.fold_bn import ChannelStatistics
from onnxq.passes.graph_utils import (
    bypass,
    constant,
    drop_unused_initializers,
    output_channel_axis,
    scaled_gemm,
    set_initializer,
    single_consumer,
)

LAYERS = ("Conv", "ConvTranspose", "Gemm")
AFFINE = ("Mul", "Div", "Add", "Sub")


def fold_affine(graph: ir.Graph, statistics: dict[str, ChannelStatistics] | None = None) -> list[str]:
    """Fold every foldable constant Mul/Div/Add/Sub after a layer, repeatedly; returns their names.

    `statistics` (layer node → its output's, from fold_bn) is updated in place."""
    folded: list[str] = []
    statistics = statistics if statistics is not None else {}
    while True:
        done = [node for node in list(graph) if _fold_one(graph, node, statistics)]
        if not done:
            break
        folded += [node.name or node.outputs[0].name for node in done]
    drop_unused_initializers(graph)
    return folded


def _fold_one(graph: ir.Graph, node: ir.Node, statistics: dict[str, ChannelStatistics]) -> bool:
    if node.op_type not in AFFINE or node.domain != "" or len(node.inputs) != 2:
        return False
    layer, value, kept = _layer_and_constant(node)
    if layer is None or value is None:
        return False
    weight = constant(layer.inputs[1])
    axis = output_channel_axis(layer, weight) if weight is not None else None
    if weight is None or axis is None:
        return False
    if scaled_gemm(layer):
        return False
    rank = weight.ndim if layer.op_type != "Gemm" else 2
    per_channel = _per_channel(value, rank, weight.shape[axis], _channel_axis(kept, rank))
    bias_value = layer.inputs[2] if len(layer.inputs) > 2 else None
    bias = constant(bias_value)
    if per_channel is None or (bias_value is not None and bias is None):
        return False
    bias = np.zeros(weight.shape[axis]) if bias is None else np.broadcast_to(bias, per_channel.shape)
    if node.op_type in ("Div", "Mul"):
        if node.op_type == "Div" and not np.all(per_channel):
            return False
        factor = 1.0 / per_channel if node.op_type == "Div" else per_channel
        shape = [1] * weight.ndim
        shape[axis] = -1
        new_weight = (weight.astype(np.float64) * factor.reshape(shape)).astype(weight.dtype)
        layer.replace_input_with(1, set_initializer(graph, layer.inputs[1].name, new_weight))
        bias = bias * factor
        shift = np.zeros_like(factor)
    else:
        shift = per_channel if node.op_type == "Add" else -per_channel
        bias = bias + shift
        factor = np.ones_like(shift)
    if layer.name in statistics:
        statistics[layer.name] = statistics[layer.name].affine(factor, shift)
    name = (bias_value.name if bias_value else layer.name) + "_folded_affine"
    if len(layer.inputs) < 3:
        layer.resize_inputs(3)
    layer.replace_input_with(2, set_initializer(graph, name, bias.astype(weight.dtype)))
    bypass(graph, node, (kept or layer).outputs[0])
    return True


def _layer_and_constant(node: ir.Node) -> tuple[ir.Node | None, np.ndarray | None, ir.Node | None]:
    """The layer whose only reader is `node` (or a Transpose read only by `node`), the constant
    it is combined with, and that Transpose (None where the layer feeds `node` directly)."""
    for index in (0, 1):
        if node.op_type in ("Div", "Sub") and index == 1:
            break  # c / y and c − y are not affine in the layer's output
        source, other = node.inputs[index], node.inputs[1 - index]
        producer = source.producer() if source is not None else None
        kept = producer if producer is not None and producer.op_type == "Transpose" else None
        if kept is not None and (kept.domain != "" or single_consumer(source) is not node):
            continue
        layer_output = kept.inputs[0] if kept is not None else source
        layer = layer_output.producer() if layer_output is not None else None
        reader = kept if kept is not None else node
        if layer is not None and layer.op_type in LAYERS and layer.domain == "":
            value = constant(other)
            if value is not None and single_consumer(layer_output) is reader:
                return layer, np.asarray(value, np.float64), kept
    return None, None, None


def _channel_axis(transpose: ir.Node | None, rank: int) -> int:
    """Where the layer's channel axis (1) sits in what the Mul/Add reads."""
    if transpose is None:
        return 1
    perm = transpose.attributes.get_ints("perm", list(reversed(range(rank))))
    return list(perm).index(1)


def _per_channel(value: np.ndarray, rank: int, channels: int, axis: int = 1) -> np.ndarray | None:
    """The constant as one number per output channel (at `axis` of what it is combined with:
    axis 1 of the layer's output), or None."""
    if value.size == 1:
        return np.full(channels, float(value.ravel()[0]))
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if shape[axis] != channels or any(d != 1 for i, d in enumerate(shape) if i != axis):
        return None
    return value.reshape(channels)
