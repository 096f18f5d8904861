"""Which channels can move between two layers, and how a move rewrites them.

A pair is a producer layer whose output channels reach a consumer layer's input channels one to
one, through at most one positively homogeneous activation (or a Mul/Div by a constant, a
scaler): scaling the producer's output channel k by s[k] (its weights and bias, or the
constant) and the consumer's input channel k by 1/s[k] leaves the consumer's output unchanged.
onnxq.passes.equalize chooses s; this module finds the pairs and applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.passes.graph_utils import (
    attribute,
    clip_bounds,
    constant,
    output_channel_axis,
    scaled_gemm,
    set_initializer,
    single_consumer,
)

PRODUCERS = ("Conv", "Gemm", "MatMul")
CONSUMERS = ("Conv", "Gemm", "MatMul")
HOMOGENEOUS = ("Relu", "LeakyRelu")
# A Mul or Div by a constant, the last op of an activation exported op by op (paddle2onnx's
# hard-swish x·Clip(x + 3, 0, 6) / 6): s folds exactly into the constant, whatever came before.
SCALERS = ("Mul", "Div")


@dataclass(frozen=True)
class Pair:
    """A producer whose output channels reach the consumer's input channels one to one."""

    producer: str
    activation: str | None  # the activation between them, by node name
    consumer: str
    tensor: str  # the consumer's data input, whose channels are equalized
    depthwise: bool  # the consumer reads every channel with its own weights only
    clip: float | None  # c of a Clip(0, c) between them
    dense_rows: bool  # Gemm/MatMul: channels on the last axis (a Conv's on axis 1)
    constant_input: int | None = None  # a Mul/Div producer: the input holding its constant


def find_pairs(graph: ir.Graph) -> list[Pair]:
    """Every producer → [activation] → consumer chain the pass can rescale exactly, and every
    Mul/Div by a constant that feeds a Conv."""
    pairs = []
    for node in graph:
        if node.domain != "":
            continue
        if node.op_type in PRODUCERS and scalable_producer(node):
            chain = _follow(node)
        elif node.op_type in SCALERS:
            chain = _follow_scaler(node)
        else:
            continue
        if chain is not None:
            pairs.append(Pair(node.name, *chain))
    return pairs


def channel_axis(pair: Pair) -> int:
    """The axis of the pair's tensor that holds its channels."""
    return -1 if pair.dense_rows else 1


def apply_scales(graph: ir.Graph, pair: Pair, scales: np.ndarray) -> None:
    """Scale the producer's output channels by `scales` and the consumer's inputs by 1/scales."""
    nodes = {node.name: node for node in graph}
    producer, consumer = nodes[pair.producer], nodes[pair.consumer]
    weight = constant(consumer.inputs[1])
    _set_weight(graph, consumer, 1, _input_scaled(consumer, weight, 1.0 / scales))
    if pair.constant_input is not None:
        index = pair.constant_input
        factors = scales if producer.op_type == "Mul" else 1.0 / scales
        per_channel = factors.reshape(-1, *[1] * (weight.ndim - 2))
        _set_weight(graph, producer, index, constant(producer.inputs[index]).astype(np.float64) * per_channel)
    else:
        scale_layer_output(graph, producer, scales)


def scale_layer_output(graph: ir.Graph, producer: ir.Node, scales: np.ndarray) -> None:
    """Scale a layer's weights and bias per output channel."""
    weight = constant(producer.inputs[1])
    axis = output_channel_axis(producer, weight)
    _set_weight(graph, producer, 1, _scaled(weight, axis, scales))
    if len(producer.inputs) > 2 and producer.inputs[2] is not None:
        bias = constant(producer.inputs[2])
        _set_weight(graph, producer, 2, (bias.astype(np.float64) * np.broadcast_to(scales, bias.shape)))


def _follow(producer: ir.Node) -> tuple | None:
    """(activation, consumer, tensor, depthwise, clip) from the producer's output, or None."""
    output = producer.outputs[0]
    reader = single_consumer(output)
    activation, clip = None, None
    if reader is not None and reader.domain == "" and reader.op_type in (*HOMOGENEOUS, "Clip"):
        clip = _clip_top(reader) if reader.op_type == "Clip" else None
        if reader.op_type == "Clip" and clip is None:
            return None
        activation, output = reader, reader.outputs[0]
        reader = single_consumer(output)
    if reader is None or reader.op_type not in CONSUMERS or reader.domain != "":
        return None
    if len(reader.inputs) < 2 or reader.inputs[0] is not output or not scalable_consumer(reader):
        return None
    if (reader.op_type == "Conv") != (producer.op_type == "Conv"):
        return None  # channels on axis 1 of a Conv's output, on the last axis of a Gemm/MatMul's
    depthwise = reader.op_type == "Conv" and is_depthwise(reader)
    name = activation.name if activation is not None else None
    return name, reader.name, output.name, depthwise, clip, reader.op_type != "Conv"


def _follow_scaler(node: ir.Node) -> tuple | None:
    """(activation, consumer, tensor, depthwise, clip, dense_rows, constant_input) from a Mul/Div
    by a scalar or per-channel constant whose output only a Conv reads as its data input."""
    index = constant_operand(node)
    output = node.outputs[0]
    reader = single_consumer(output)
    if index is None or reader is None or reader.op_type != "Conv" or reader.domain != "":
        return None
    if len(reader.inputs) < 2 or reader.inputs[0] is not output or not scalable_consumer(reader):
        return None
    weight = constant(reader.inputs[1])
    channels = attribute(reader, "group", 1) * weight.shape[1]
    value = constant(node.inputs[index])
    per_channel = (channels, *[1] * (weight.ndim - 2))
    leading = next((axis for axis, size in enumerate(value.shape) if size != 1), value.ndim)
    if value.size != 1 and (value.ndim > weight.ndim or value.shape[leading:] != per_channel):
        return None  # a constant that varies along another axis than the channels'
    return None, reader.name, output.name, is_depthwise(reader), None, False, index


def constant_operand(node: ir.Node) -> int | None:
    """The input of a Mul (either) or Div (the divisor) that is a float constant while the other
    is not, or None."""
    if len(node.inputs) != 2 or any(value is None for value in node.inputs):
        return None
    for index in (0, 1) if node.op_type == "Mul" else (1,):
        value = constant(node.inputs[index])
        if value is not None and value.dtype.kind == "f" and constant(node.inputs[1 - index]) is None:
            return index
    return None


def scalable_producer(node: ir.Node) -> bool:
    weight = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or node.inputs[0] is None or constant(node.inputs[0]) is not None:
        return False
    if scaled_gemm(node) or (node.op_type == "MatMul" and weight.ndim != 2):
        return False
    if node.op_type == "Gemm" and attribute(node, "transA", 0):
        return False
    shared = len(node.inputs[1].uses()) != 1
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and (constant(bias) is None or len(bias.uses()) != 1):
        return False
    return not shared and output_channel_axis(node, weight) is not None


def scalable_consumer(node: ir.Node) -> bool:
    weight = constant(node.inputs[1])
    if weight is None or len(node.inputs[1].uses()) != 1 or scaled_gemm(node):
        return False
    if node.op_type == "MatMul":
        return weight.ndim == 2
    if node.op_type == "Gemm":
        return not attribute(node, "transA", 0)
    return True


def is_depthwise(node: ir.Node) -> bool:
    weight = constant(node.inputs[1])
    return attribute(node, "group", 1) == weight.shape[0] and weight.shape[1] == 1


def _clip_top(node: ir.Node) -> float | None:
    """c of a Clip(0, c) with constant bounds, else None."""
    low, high = clip_bounds(node)
    return high if low == 0.0 and high is not None and high > 0 else None


def _scaled(weight: np.ndarray, axis: int, scales: np.ndarray) -> np.ndarray:
    shape = [1] * weight.ndim
    shape[axis] = -1
    return weight.astype(np.float64) * scales.reshape(shape)


def _input_scaled(node: ir.Node, weight: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """The consumer's weights with input channel k multiplied by factors[k]."""
    wide = weight.astype(np.float64)
    if node.op_type == "MatMul" or (node.op_type == "Gemm" and not attribute(node, "transB", 0)):
        return wide * factors[:, None]
    if node.op_type == "Gemm":
        return wide * factors[None, :]
    groups = attribute(node, "group", 1)
    per_group = weight.shape[1]
    grouped = wide.reshape(groups, weight.shape[0] // groups, per_group, -1)
    grouped = grouped * factors.reshape(groups, 1, per_group, 1)
    return grouped.reshape(weight.shape)


def _set_weight(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    old = node.inputs[index]
    value = set_initializer(graph, f"{old.name}_equalized", array.astype(constant(old).dtype))
    node.replace_input_with(index, value)
    if not old.uses() and old.name in graph.initializers:
        del graph.initializers[old.name]
