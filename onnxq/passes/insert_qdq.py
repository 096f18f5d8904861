"""Build the QuantizeLinear/DequantizeLinear nodes a plan asks for, with calibrated parameters.

Weights and biases are stored as integers behind a DequantizeLinear; activations get a
QuantizeLinear → DequantizeLinear pair right after the node that produces them, read by all
their consumers. Activations that share parameters reuse the same scale and zero-point
initializers, which is what lets onnxruntime drop the pair around shape-only ops.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.passes.graph_utils import bypass, constant, drop_unused_initializers, set_initializer
from onnxq.passes.integer_hardswish import hardswish_on_integers
from onnxq.quant import primitives as P
from onnxq.quant.kernels import FULL_RANGE, WeightRangeChoice
from onnxq.quant.plan import QuantPlan, WeightSpec
from onnxq.quant.weights import QuantizedWeight, quantize_weight

ActivationParams = dict[str, tuple[np.float32, np.integer, P.IntRange]]


@dataclass(frozen=True)
class QdqSummary:
    activations: int
    weights: int
    biases: int
    absorbed: int


def activation_params(
    plan: QuantPlan, ranges: dict[str, tuple[float, float]], *, symmetric: bool = False
) -> ActivationParams:
    """Scale, zero point and integer range for every activation that owns its parameters.

    Asymmetric: unsigned with a zero point (0 after a ReLU). Symmetric: signed with zero point 0,
    or unsigned with zero point 0 where the tensor is never negative.
    """
    params = {}
    for spec in plan.activations.values():
        if spec.shares is None:
            low, high = spec.bounded(*ranges[spec.observed])
            params[spec.tensor] = activation_quantizer(low, high, spec.bits, symmetric)
    return params


def activation_quantizer(
    low: float, high: float, bits: int, symmetric: bool
) -> tuple[np.float32, np.integer, P.IntRange]:
    """(scale, zero point, range) covering [low, high] at `bits`."""
    if not symmetric or low >= 0:
        target = P.IntRange.unsigned(bits)
        return (*P.affine_params(low, high, target), target)
    target = P.IntRange.signed(bits, narrow=False)
    scale = P.symmetric_scale(max(abs(low), abs(high)), P.IntRange.signed(bits))
    return np.float32(scale), target.dtype(0), target


def required_opset(plan: QuantPlan) -> int:
    """The opset whose QuantizeLinear/DequantizeLinear can hold every type and scale the plan uses.

    INT4/UINT4 and block_size need 21, INT2/UINT2 need 25; 8-bit per-axis needs 13.
    """
    widths = [spec.bits for spec in plan.weights.values()]  # activations always use 8-bit types
    if any(spec.bits <= 2 and not spec.container_bits for spec in plan.weights.values()):
        return 25
    if any(bits <= 4 for bits in widths) or any(s.granularity.kind == "block" for s in plan.weights.values()):
        return 21
    return 13


def insert_qdq(
    graph: ir.Graph,
    plan: QuantPlan,
    params: ActivationParams,
    *,
    symmetric_weights: bool | None = True,
    int8_range: WeightRangeChoice = FULL_RANGE,
    weight_ratios: dict[str, np.ndarray] | None = None,
    biases: dict[str, np.ndarray] | None = None,
    refined_weights: dict[str, QuantizedWeight] | None = None,
    integer_activations: bool = False,
) -> QdqSummary:
    """Rewrite `graph` in place into its QDQ form.

    `int8_range` says which 8-bit weights keep within [-63, 63] (for int8 kernels that saturate)
    and whether symmetric 8-bit weights are stored as uint8 around zero point 128 (the same
    values, for onnxruntime's u8×u8 kernels, which never saturate).
    `weight_ratios` (per weight, one per scale group) and `biases` (corrected float biases) are
    what calibration chose; weights without a ratio use their range rule as it is.
    `refined_weights` are integers and scales that GPTQ chose or rounding refinement learned;
    they are written as they are.
    `integer_activations` (every width 8 bits): HardSwishes between two quantized tensors are
    written so that onnxruntime runs them on integer kernels (onnxq.passes.integer_hardswish).
    """
    weight_ratios, biases, refined_weights = weight_ratios or {}, biases or {}, refined_weights or {}
    _remove_absorbed(graph, plan)
    values = _values_by_name(graph)
    for name, bias in biases.items():
        values[name].const_value = ir.tensor(bias.astype(np.float32), name=name)
    weight_scales = {}
    bias_of = {spec.weight: spec for spec in plan.biases.values()}
    for name, spec in plan.weights.items():
        target = weight_target(spec, symmetric_weights, int8_range)
        quantized = refined_weights.get(name) or planned_weight(
            constant(values[name]), spec, target, weight_ratios.get(name)
        )
        if name in bias_of:
            bias_spec = bias_of[name]
            input_scale = params[plan.root(bias_spec.activation)][0]
            quantized = room_for_bias(quantized, constant(values[bias_spec.name]), input_scale)
        if int8_range.unsigned:
            quantized = offset_to_unsigned(quantized)
        weight_scales[name] = _quantize_weight(graph, values[name], spec, quantized)
    for spec in plan.biases.values():
        weight_scale = weight_scales[spec.weight]
        if weight_scale is not None:
            activation_scale = params[plan.root(spec.activation)][0]
            _quantize_bias(graph, values[spec.name], activation_scale * weight_scale)
    shared: dict[str, tuple[ir.Value, ir.Value, P.IntRange]] = {}
    for spec in plan.activations.values():
        root = plan.root(spec.tensor)
        if root not in shared:
            scale, zero_point, target = params[root]
            shared[root] = (
                set_initializer(graph, f"{root}_scale", np.asarray(scale, np.float32)),
                set_initializer(graph, f"{root}_zero_point", _activation_container(zero_point, target)),
                target,
            )
        _quantize_activation(graph, values[spec.tensor], *shared[root])
    if integer_activations:
        hardswish_on_integers(graph)
    graph.sort()
    drop_unused_initializers(graph)
    return QdqSummary(len(plan.activations), len(plan.weights), len(plan.biases), len(plan.absorbed))


def _remove_absorbed(graph: ir.Graph, plan: QuantPlan) -> None:
    """Absorbed Relu/Clip nodes go; one whose output is a graph output stays for that output
    only, and will read the dequantized tensor, where it changes nothing: the quantizer's range
    starts at 0 and ends within the Clip's (onnxq.quant.plan)."""
    for node in [n for n in graph if n.name in plan.absorbed]:
        if node.outputs[0].is_graph_output():
            for user, index in list(node.outputs[0].uses()):
                user.replace_input_with(index, node.inputs[0])
        else:
            bypass(graph, node, node.inputs[0])


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        values.update({v.name: v for v in node.outputs})
    return values


def weight_target(
    spec: WeightSpec, symmetric: bool | None, int8_range: WeightRangeChoice = FULL_RANGE
) -> P.IntRange:
    """The integers a weight may take: `int8_range` narrows 8-bit ones where kernels saturate.

    `symmetric=None` (QuantConfig's default) keeps 8-bit weights symmetric, for onnxruntime's
    integer kernels, and gives narrower ones a zero point: no integer kernel runs them, and a
    skewed channel (a depthwise filter) then spends all of its few levels on its own range."""
    if symmetric is None:
        symmetric = spec.bits >= 8
    if not symmetric:
        return P.IntRange.unsigned(spec.bits)
    return P.IntRange.signed(7 if spec.bits == 8 and int8_range.reduces(spec.kernel) else spec.bits)


def offset_to_unsigned(quantized: QuantizedWeight) -> QuantizedWeight:
    """Symmetric 8-bit weights as uint8 around zero point 128: the same dequantized values.

    onnxruntime picks its kernel by the weight type: u8×s8 multiplies bytes in pairs summed in
    int16 (saturating without VNNI), u8×u8 widens to int16 first and stays exact.
    """
    target = quantized.target
    if not target.signed_type or target.qmax != 127:
        return quantized
    offset = P.IntRange(target.qmin + 128, target.qmax + 128, np.uint8)
    return dataclasses.replace(
        quantized,
        integers=(quantized.integers.astype(np.int16) + 128).astype(np.uint8),
        zero_point=(np.asarray(quantized.zero_point).astype(np.int16) + 128).astype(np.uint8),
        target=offset,
    )


def _container(values: np.ndarray, target: P.IntRange, at_least: int = 0) -> np.ndarray:
    """Integers in the ONNX type that stores `target` (INT2/INT4/INT8 or unsigned), or a wider one."""
    bits = max(target.container_bits, at_least)
    if bits == 32:
        return values.astype(np.int32)
    name = ("INT" if target.signed_type else "UINT") + str(bits)
    return values.astype(getattr(ir.DataType, name).numpy())


def _activation_container(zero_point: np.integer, target: P.IntRange) -> np.ndarray:
    """Activations are always stored in 8-bit types; narrower widths get a Clip (see below).

    onnxruntime's QDQ rewrites mishandle 4- and 2-bit activations (its Clip→QuantizeLinear
    rewrite rejects UINT4 zero points, and it fuses UINT4 inputs into QLinearConv, which then
    fails to load), while activations are never stored, so the container costs nothing.
    """
    return np.asarray(zero_point).astype(np.int8 if target.signed_type else np.uint8)


def _needs_clip(target: P.IntRange) -> bool:
    return (target.qmin, target.qmax) not in ((0, 255), (-128, 127))


def planned_weight(
    weight: np.ndarray, spec: WeightSpec, target: P.IntRange, ratios: np.ndarray | None
) -> QuantizedWeight:
    """The weight quantized as the plan and calibration say (nearest rounding)."""
    return quantize_weight(weight, spec.layout, spec.granularity, spec.rule, target, ratios)


def _quantize_weight(
    graph: ir.Graph, value: ir.Value, spec: WeightSpec, quantized: QuantizedWeight
) -> np.ndarray | None:
    """Store the weight as integers + DequantizeLinear; returns its per-output-channel scale if any."""
    target = quantized.target
    _dequantized_constant(
        graph,
        value,
        _container(quantized.integers, target, spec.container_bits),
        quantized.scale,
        _container(quantized.zero_point, target, spec.container_bits),
        quantized.axis,
        quantized.block_size,
    )
    return quantized.per_output_channel_scale


BIAS_RANGE = P.IntRange(-(2**31) + 1, 2**31 - 1, np.int32)


def bias_quantization(bias: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int32 values, scale) of a bias stored at scale s_in·s_w (a zero scale becomes 1)."""
    scale = np.broadcast_to(np.asarray(scale, np.float32), bias.shape).copy()
    scale[scale == 0] = 1.0
    return P.quantize(bias, scale, np.zeros(1, np.int32), BIAS_RANGE, axis=0), scale


def room_for_bias(quantized: QuantizedWeight, bias: np.ndarray, input_scale: float) -> QuantizedWeight:
    """The weight with each output channel's scale raised where its bias would not fit int32 at
    s_in·s_w, those channels' integers rounded again at the new scale.

    A channel whose weights are almost zero (BatchNorm folded with γ near 0, a pruned filter)
    still adds its bias: the layer outputs a constant there, which a following HardSwish or
    Relu passes on. At s_in·s_w that bias saturated int32 and came out as almost nothing: the
    W8A8 models of the zoo's EfficientNet-Lite0 (weights 1e-8, biases -3.7 to 0.7), PP-OCRv4
    detector and PP-PicoDet held 83, 9 and 119 saturated biases. The weights of such a channel
    lose nothing that matters at the coarser scale; onnxruntime's quantizer raises it likewise."""
    scale = quantized.per_output_channel_scale
    if scale is None or np.size(scale) not in (1, bias.size):
        return quantized
    least = np.abs(bias.astype(np.float64)).reshape(-1) / (float(input_scale) * BIAS_RANGE.qmax)
    if np.size(scale) == 1:
        least = least.max(initial=0.0)
    short = np.asarray(scale, np.float64) < least
    if not short.any():
        return quantized
    raised = np.where(short, np.float32(least * (1 + 1e-6)), scale).astype(np.float32)
    weight = quantized.dequantize()
    axis = quantized.axis
    divisor = np.where(short, raised, np.float32(1))  # a zero scale elsewhere stays untouched
    redone = P.quantize(weight, divisor, quantized.zero_point, quantized.target, axis)
    keep = P.broadcast(~short, weight.ndim, axis) if np.ndim(short) else np.asarray(~short)
    integers = np.where(keep, quantized.integers, redone).astype(quantized.integers.dtype)
    return dataclasses.replace(quantized, integers=integers, scale=raised.reshape(np.shape(scale)))


def _quantize_bias(graph: ir.Graph, value: ir.Value, scale: np.ndarray) -> None:
    integers, scale = bias_quantization(constant(value), scale)
    _dequantized_constant(graph, value, integers, scale, np.zeros(integers.shape, np.int32), 0, None)


def _dequantized_constant(
    graph: ir.Graph,
    value: ir.Value,
    integers: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    axis: int | None,
    block_size: int | None,
) -> None:
    """Replace a float initializer by integers + DequantizeLinear, for every reader."""
    name = value.name
    inputs = [
        set_initializer(graph, f"{name}_quantized", integers),
        set_initializer(graph, f"{name}_scale", scale),
        set_initializer(graph, f"{name}_zero_point", zero_point),
    ]
    attributes = {"axis": axis} if axis is not None and scale.ndim >= 1 else {}
    if block_size:
        attributes["block_size"] = block_size
    dequantize = ir.node("DequantizeLinear", inputs, attributes, name=f"{name}_DequantizeLinear")
    dequantize.outputs[0].name = f"{name}_dequantized"
    dequantize.outputs[0].dtype = ir.DataType.FLOAT
    dequantize.outputs[0].shape = ir.Shape(integers.shape)
    ir.convenience.replace_all_uses_with(value, dequantize.outputs[0])
    graph.insert_before(next(iter(graph)), dequantize)


def _quantize_activation(
    graph: ir.Graph, value: ir.Value, scale: ir.Value, zero_point: ir.Value, target: P.IntRange
) -> None:
    """QuantizeLinear → DequantizeLinear after `value`, read by all its consumers.

    Widths under 8 bits get a Clip first, to the range's float bounds, so the dequantized tensor
    takes at most 2^bits values.
    """
    uses = list(value.uses())
    name = value.name
    nodes = []
    source = value
    if _needs_clip(target):
        step, zero = float(scale.const_value.numpy()), int(zero_point.const_value.numpy().astype(np.int64))
        bounds = [
            set_initializer(graph, f"{name}_clip_{side}", np.asarray(np.float32(step) * np.float32(q - zero)))
            for side, q in (("min", target.qmin), ("max", target.qmax))
        ]
        clip = ir.node("Clip", [value, *bounds], name=f"{name}_Clip")
        clip.outputs[0].name = f"{name}_clipped"
        nodes.append(clip)
        source = clip.outputs[0]
    quantize = ir.node("QuantizeLinear", [source, scale, zero_point], name=f"{name}_QuantizeLinear")
    quantize.outputs[0].name = f"{name}_quantized"
    dequantize = ir.node(
        "DequantizeLinear",
        [quantize.outputs[0], scale, zero_point],
        name=f"{name}_DequantizeLinear",
    )
    dequantized = dequantize.outputs[0]
    dequantized.name = f"{name}_dequantized"
    # planned tensors are float; one behind an op shape inference cannot type has no dtype yet
    dequantized.dtype, dequantized.shape = value.dtype or ir.DataType.FLOAT, value.shape
    for user, index in uses:
        user.replace_input_with(index, dequantized)
    nodes += [quantize, dequantize]
    producer = value.producer()
    if producer is None:
        graph.insert_before(next(iter(graph)), nodes)
    else:
        graph.insert_after(producer, nodes)
