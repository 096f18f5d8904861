"""Equalize activation channels between two layers, so that one per-tensor scale serves them all.

Activations are quantized per tensor, but a tensor's channels can span very different ranges
(a depthwise convolution's inputs in MobileNetV2: channel maxima 8 to 20 times apart): one
scale set by the widest channel leaves the narrow ones a few levels. Weights are quantized per
output channel, so a channel's range can move into the weights for free (Nagel et al. 2019,
cross-layer equalization; SmoothQuant migrates it the same way). For a producer layer P whose
output, through at most one positively homogeneous activation, is read only by a consumer
layer C as its data input, and any s > 0 per channel k:
    P's output channel k × s[k] (its weights and bias), C's input channel k weights ÷ s[k]
leaves C's output unchanged (Relu(s·x) = s·Relu(x), LeakyRelu likewise).

Clip(0, c) (ReLU6) is not homogeneous: s[k]·Clip(x, 0, c) = Clip(s[k]·x, 0, s[k]·c). The pass
keeps Clip(0, c) and only scales channels up (s ≥ 1) towards the widest channel M ≤ c, so the
two agree wherever x[k] ≤ c·m[k]/M, which covers every calibration value (m[k] its maximum),
and a quantizer whose range ends at or below c saturates both alike beyond it: the quantized
model is unchanged by the approximation. Only a float layer reading such a channel far above
anything calibration saw would tell them apart.

How far each channel moves: a depthwise consumer reads each channel with its own weights (one
scale per output channel = per input channel), so channels are equalized fully,
s[k] = M / m[k]. A dense consumer mixes channels in each output channel's weights, where a
scaled-down input channel loses weight resolution; the move would be split as SmoothQuant
does, s[k] = (M / m[k]) ** DENSE_STRENGTH, but on held-out calibration images no split helped
enough: MobileNetV2 W6A6 mse KL 0.139 with dense pairs left alone, 0.143 at 0.5, 0.280 at 1;
ResNet-20 (dense pairs only) W4A4 0.043 → 0.040 at 0.5 but W2A4 0.196 → 0.220, and on the
evaluation split ResNet-56 W4A4 lost 1.5 points. So DENSE_STRENGTH is 0: dense pairs are left
alone. Channels that never leave 0 keep s = 1, and no channel moves more than MAX_SCALE.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.calib.data import Batch
from onnxq.calib.observers import ChannelMaxObserver
from onnxq.calib.runner import collect_observers
from onnxq.io import to_ir, to_proto
from onnxq.passes.fold_bn import ChannelStatistics
from onnxq.passes.graph_utils import (
    attribute,
    constant,
    output_channel_axis,
    scaled_gemm,
    set_initializer,
    single_consumer,
)
from onnxq.progress import Silent

PRODUCERS = ("Conv", "Gemm", "MatMul")
CONSUMERS = ("Conv", "Gemm", "MatMul")
HOMOGENEOUS = ("Relu", "LeakyRelu")
DENSE_STRENGTH = 0.0  # dense consumers: the share of the range moved into their weights (0: none)
MAX_SCALE = 32.0  # no channel scaled by more (a channel nearly always 0 would take any s)


@dataclass
class Equalized:
    """The equalized model, the BatchNorm statistics of the tensors it rescaled, what it did."""

    model: onnx.ModelProto
    statistics: dict[str, ChannelStatistics]
    pairs: int = 0
    widest_spread: float = 1.0  # the largest channel range ratio found before equalizing
    notes: list[str] = field(default_factory=list)


def equalize_channels(
    model: onnx.ModelProto,
    batches: Iterable[Batch],
    statistics: dict[str, ChannelStatistics] | None = None,
    per_channel: Callable[[ir.Node], bool] = lambda node: True,
) -> Equalized:
    """Every pair find_pairs finds whose two layers have `per_channel` weight scales, rescaled by
    its channel maxima on `batches` (float model). `statistics` (tensor → BatchNorm's, from
    folding) follow the producers' outputs they describe."""
    statistics = dict(statistics or {})
    graph_model = to_ir(model)
    nodes = {node.name: node for node in graph_model.graph}
    pairs = [
        pair
        for pair in find_pairs(graph_model.graph)
        if per_channel(nodes[pair.producer])
        and per_channel(nodes[pair.consumer])
        and (pair.depthwise or DENSE_STRENGTH > 0)
    ]
    if not pairs:
        return Equalized(model, statistics)
    axes = {pair.tensor: channel_axis(pair) for pair in pairs}
    observers, _ = collect_observers(
        model, list(axes), batches, lambda t: ChannelMaxObserver(axes[t]), Silent()
    )
    spread, applied = 1.0, 0
    for pair in pairs:
        maxima = observers[pair.tensor].maxima
        if maxima is None or not np.all(np.isfinite(maxima)):
            continue
        applied += 1
        scales = channel_scales(pair, maxima)
        spread = max(spread, _spread(maxima))
        produced = nodes[pair.producer].outputs[0].name
        if produced in statistics:
            statistics[produced] = statistics[produced].affine(scales, np.zeros_like(scales))
        apply_scales(graph_model.graph, pair, scales)
    result = to_proto(graph_model)
    result.ir_version = model.ir_version
    count = f"{applied} tensor{'s' * (applied != 1)}"
    note = (
        f"equalized the channels of {count} between layer pairs (cross-layer equalization; "
        f"channel ranges up to {spread:.0f}x apart before)"
    )
    return Equalized(result, statistics, applied, spread, [note])


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


def find_pairs(graph: ir.Graph) -> list[Pair]:
    """Every producer → [activation] → consumer chain the pass can rescale exactly."""
    pairs = []
    for node in graph:
        if node.op_type not in PRODUCERS or node.domain != "" or not _scalable_producer(node):
            continue
        chain = _follow(node)
        if chain is not None:
            pairs.append(Pair(node.name, *chain))
    return pairs


def channel_axis(pair: Pair) -> int:
    """The axis of the pair's tensor that holds its channels."""
    return -1 if pair.dense_rows else 1


def channel_scales(pair: Pair, maxima: np.ndarray) -> np.ndarray:
    """s per channel from the consumer input's per-channel maxima of |x| on calibration data."""
    maxima = np.asarray(maxima, np.float64)
    widest = float(maxima.max()) if maxima.size else 0.0
    if widest <= 0 or not np.isfinite(widest):
        return np.ones_like(maxima)
    ratio = np.where(maxima > 0, widest / np.where(maxima > 0, maxima, 1.0), 1.0)
    scales = ratio if pair.depthwise else ratio**DENSE_STRENGTH
    return np.clip(scales, 1.0, MAX_SCALE)


def apply_scales(graph: ir.Graph, pair: Pair, scales: np.ndarray) -> None:
    """Scale the producer's output channels by `scales` and the consumer's inputs by 1/scales."""
    nodes = {node.name: node for node in graph}
    producer, consumer = nodes[pair.producer], nodes[pair.consumer]
    weight = constant(producer.inputs[1])
    axis = output_channel_axis(producer, weight)
    _set_weight(graph, producer, 1, _scaled(weight, axis, scales))
    if len(producer.inputs) > 2 and producer.inputs[2] is not None:
        bias = constant(producer.inputs[2])
        _set_weight(graph, producer, 2, (bias.astype(np.float64) * np.broadcast_to(scales, bias.shape)))
    weight = constant(consumer.inputs[1])
    _set_weight(graph, consumer, 1, _input_scaled(consumer, weight, 1.0 / scales))


def _spread(maxima: np.ndarray) -> float:
    """Widest over narrowest non-zero channel range."""
    live = maxima[maxima > 0]
    return float(live.max() / live.min()) if live.size else 1.0


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
    if len(reader.inputs) < 2 or reader.inputs[0] is not output or not _scalable_consumer(reader):
        return None
    if (reader.op_type == "Conv") != (producer.op_type == "Conv"):
        return None  # channels on axis 1 of a Conv's output, on the last axis of a Gemm/MatMul's
    depthwise = reader.op_type == "Conv" and _depthwise(reader)
    name = activation.name if activation is not None else None
    return name, reader.name, output.name, depthwise, clip, reader.op_type != "Conv"


def _scalable_producer(node: ir.Node) -> bool:
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


def _scalable_consumer(node: ir.Node) -> bool:
    weight = constant(node.inputs[1])
    if weight is None or len(node.inputs[1].uses()) != 1 or scaled_gemm(node):
        return False
    if node.op_type == "MatMul":
        return weight.ndim == 2
    if node.op_type == "Gemm":
        return not attribute(node, "transA", 0)
    return True


def _depthwise(node: ir.Node) -> bool:
    weight = constant(node.inputs[1])
    return attribute(node, "group", 1) == weight.shape[0] and weight.shape[1] == 1


def _clip_top(node: ir.Node) -> float | None:
    """c of a Clip(0, c) with constant bounds, else None."""
    low = constant(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    high = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if low is None or high is None or low.size != 1 or high.size != 1:
        return None
    low, high = float(low.ravel()[0]), float(high.ravel()[0])
    return high if low == 0.0 and high > 0 else None


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
    value = set_initializer(graph, f"{old.name}_equalized", array.astype(old.const_value.numpy().dtype))
    node.replace_input_with(index, value)
    if not old.uses() and old.name in graph.initializers:
        del graph.initializers[old.name]
