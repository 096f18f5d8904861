"""Decide what gets quantized how, before any range is known ("mark first, build later").

The plan names tensors only; calibration fills in ranges and insert_qdq builds the nodes.
Placement follows what onnxruntime's CPU provider fuses into integer kernels:
- Conv/ConvTranspose/Gemm/MatMul: activation inputs, constant weights (per output channel) and
  bias (int32, scale s_in·s_w), and the output → QLinearConv, QLinearMatMul, QGemm.
- Add, Concat, AveragePool, GlobalAveragePool: inputs and output → QLinearAdd, QLinearConcat, ...
- MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Slice, constant Pad, Split,
  DepthToSpace, nearest Resize: the outputs share the input's scale and zero point, so
  onnxruntime drops the Q/DQ pairs and runs them on integers as they are.
- Relu, and Clip with min 0, right after such a node are absorbed: the producer's output is
  quantized with the range observed after the activation and zero point at the bottom of the
  unsigned range, so QuantizeLinear itself clamps at 0 (and below the Clip's max), exactly.
Graph outputs stay float, so the logits lose no precision to a final QuantizeLinear; an
absorbed Relu/Clip output a layer reads too is the exception (_absorbed_activations).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.config import QuantConfig
from onnxq.layer_settings import Granularity, LayerSettings
from onnxq.passes.graph_utils import (
    attribute,
    clip_bounds,
    constant,
    output_channel_axis,
    scaled_gemm,
)
from onnxq.passes.split_addend_reads import is_layer_read
from onnxq.quant import kernels, masks
from onnxq.quant.prune import (
    drop_quantizers_that_do_not_pay,
    keep_float_convs_without_output_pair,
    keep_float_neighbours,
)
from onnxq.quant.range_floors import floor_flattened_ranges
from onnxq.quant.specs import (  # noqa: F401  (re-exported: the plan's records)
    ActivationSpec,
    BiasSpec,
    QuantPlan,
    Replan,
    WeightSpec,
)
from onnxq.quant.weights import WeightLayout
from onnxq.quant.widths import (
    assign_activation_bits,
    share_unwidened_layer_reads,
    widen_blockwise_int8_containers,
    widen_int2_containers,
)

# Quantized only where every input comes from a quantized node and every width is 8 bits:
# onnxruntime then runs them on its integer kernels (QLinearSigmoid and QLinearLeakyRelu, lookup
# tables; QLinearMul), and a SiLU (x·sigmoid(x)), a squeeze-excitation gate or a LeakyRelu stays
# in the integer chain; after a float op (HardSigmoid) a pair would only add a QuantizeLinear.
CHAINED_OPS = frozenset({"Sigmoid", "Mul", "LeakyRelu"})


# Run on integer kernels at 8 bits where a quantized tensor feeds it and its own output is
# quantized: onnxq writes it as a QLinearAdd and a QLinearMul (onnxq.passes.integer_hardswish).
INTEGER_FLOAT_OPS = frozenset({"HardSwish"})


def integer_chain_ops(config: QuantConfig) -> frozenset[str]:
    """The elementwise ops onnxruntime runs on integer kernels, all 8-bit only: the chained ops
    (quantized where every input comes from a quantized node) and HardSwish."""
    return CHAINED_OPS | INTEGER_FLOAT_OPS if config.lowest_bits >= 8 else frozenset()


OWN_SCALE_OPS = frozenset({"Add", "Concat", "AveragePool", "GlobalAveragePool", *CHAINED_OPS})
# data movement: the outputs take the input's scale, and onnxruntime runs the op on int8 (Split:
# MixNet's channel groups, each to its own kernel size, stay integer from one QuantizeLinear;
# DepthToSpace: a super-resolution model's pixel shuffle)
SHARED_SCALE_OPS = frozenset(
    {
        *("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Pad"),
        *("Split", "DepthToSpace"),
    }
)
ABSORBABLE_OPS = frozenset({"Relu", "Clip"})
# heavy float compute onnxq leaves alone; named in the "kept in float" lines so none goes unseen
UNQUANTIZED_COMPUTE_OPS = frozenset(
    {"LSTM", "GRU", "RNN", "Einsum", "ConvInteger", "MatMulInteger", "Attention", "LayerNormalization"}
)
FLOAT_OUTPUT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "AveragePool", "GlobalAveragePool"})
TYPE_CHANGING_OPS = frozenset(
    {
        *("Shape", "Size", "Cast", "CastLike", "ArgMax", "ArgMin", "NonZero", "TopK", "Range"),
        *("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor"),
        *("IsNaN", "IsInf", "QuantizeLinear", "ConstantOfShape", "EyeLike", "RandomNormalLike"),
    }
)


def plan_quantization(
    graph: ir.Graph,
    config: QuantConfig,
    *,
    keep_float: dict[str, str] | None = None,
    float_neighbours: bool = False,
) -> QuantPlan:
    """Walk the graph in order and mark every tensor, weight and bias to quantize.

    keep_float: layers (node name → why) left float, weights and all (the fidelity fallback).
    float_neighbours: layers whose output feeds an op with no integer kernel (HardSwish,
    HardSigmoid·Mul, Tanh, ...) stay float, weights and all: onnxruntime then fuses the layer and its
    activation into one float kernel, which can beat an integer layer wrapped in Q/DQ pairs.
    """
    plan = QuantPlan(kept_float=dict(keep_float or {}))
    alias = _absorbed_activations(graph, config, plan)
    compute = [n for n in graph if _role(n, config) == "compute"]
    edges = {id(compute[0]), id(compute[-1])} if compute else set()
    masked = masks.unbounded_tensors(graph)
    for node in graph:
        name = _node_name(node)
        if node.name in plan.absorbed:
            continue
        role = _role(node, config)
        if node.op_type in UNQUANTIZED_COMPUTE_OPS and node.domain == "":
            plan.float_nodes[name] = f"onnxq does not quantize {node.op_type}"
            continue
        if role is None or not is_float(node.outputs[0]):
            continue  # shape arithmetic is not a candidate: not worth a "kept in float" line
        if any(v is not None and v.name in masked for v in (*node.inputs, *node.outputs)):
            plan.float_nodes[name] = masks.REASON
            continue
        if name in plan.kept_float:
            plan.float_nodes[name] = plan.kept_float[name]
            continue
        if role == "compute":
            settings = config.layer_settings(name, node.op_type, edge=id(node) in edges)
            if settings.keep_float:
                plan.float_nodes[name] = "kept float by --overrides"
                continue
            reason = _plan_compute(node, settings, plan, alias)
        elif role == "own":
            reason = _plan_own_scale(node, plan, alias)
        else:
            reason = _plan_shared(node, plan, alias)
        if reason:
            plan.float_nodes[name] = reason
        else:
            plan.quantized_nodes.append(name)
    if float_neighbours:
        keep_float_neighbours(graph, plan)
    drop_quantizers_that_do_not_pay(graph, plan)
    keep_float_convs_without_output_pair(graph, plan)
    assign_activation_bits(graph, plan, config, alias)
    share_unwidened_layer_reads(graph, plan, alias)
    floor_flattened_ranges(graph, plan)
    widen_int2_containers(graph, plan)
    widen_blockwise_int8_containers(graph, plan)
    plan.unmatched_overrides = [
        f"{o.pattern}" + (f" (op {o.op_type})" if o.op_type else "")
        for o in config.overrides
        if not any(o.matches(_node_name(n), n.op_type) for n in compute)
    ]
    return plan


def _role(node: ir.Node, config: QuantConfig) -> str | None:
    if node.domain != "":
        return None
    if node.op_type in config.op_types:
        return "compute"
    if node.op_type == "Identity" and is_layer_read(node.name):
        return "own"  # the layers' own quantizer of a tensor an Add also reads
    if node.op_type in OWN_SCALE_OPS:
        # below 8 bits no integer kernel runs: a chained op's pair would only add noise (a 4-bit
        # sigmoid inside every SiLU)
        chained = node.op_type in CHAINED_OPS
        return None if chained and config.lowest_bits < 8 else "own"
    if node.op_type in SHARED_SCALE_OPS or _nearest_resize(node):
        return "shared"
    return None


def _nearest_resize(node: ir.Node) -> bool:
    """A nearest-neighbour Resize only copies values: onnxruntime runs it on int8 when its input and
    output share a scale (an FPN's up-sampling); a linear one it runs in float whatever the scales."""
    return node.op_type == "Resize" and attribute(node, "mode", "nearest") in ("nearest", b"nearest")


def _absorbed_activations(graph: ir.Graph, config: QuantConfig, plan: QuantPlan) -> dict[str, str]:
    """Relu/Clip(min 0) nodes folded into the quantizer of the node before them.

    One whose output is a graph output is folded too where a layer also reads it (a backbone
    handing every stage's features out): the output then reads the dequantized tensor the layer
    reads (onnxq.passes.insert_qdq), and its producer runs on integers, not beside a float op.

    Returns tensor aliases: the activation's output name → the producer's output name.
    """
    alias: dict[str, str] = {}
    for node in graph:
        if node.op_type not in ABSORBABLE_OPS or node.domain != "" or node.inputs[0] is None:
            continue
        source = node.inputs[0]
        producer = source.producer()
        if producer is None or _role(producer, config) not in ("compute", "own"):
            continue
        exposed = node.outputs[0].is_graph_output() and not _layer_reads(node.outputs[0], config)
        if source.is_graph_output() or len(source.uses()) != 1 or exposed:
            continue
        if node.op_type == "Clip" and not _clips_at_zero(node):
            continue
        node.name = _node_name(node)
        plan.absorbed[node.name] = source.name
        alias[node.outputs[0].name] = source.name
        plan.activations[source.name] = ActivationSpec(source.name, observed=node.outputs[0].name)
    return alias


def _layer_reads(value: ir.Value, config: QuantConfig) -> bool:
    """Whether a node onnxq quantizes the inputs of (a layer, Add, Concat, a pool) reads it."""
    return any(_role(consumer, config) in ("compute", "own") for consumer in value.consumers())


def _clips_at_zero(node: ir.Node) -> bool:
    return clip_bounds(node)[0] == 0.0


def _plan_compute(
    node: ir.Node, settings: LayerSettings, plan: QuantPlan, alias: dict[str, str]
) -> str | None:
    weight_value = node.inputs[1] if len(node.inputs) > 1 else None
    weight = constant(weight_value)
    if weight is None:  # attention's Q·Kᵀ and scores·V: onnxq quantizes constant weights only
        if node.inputs[0] is not None and constant(node.inputs[0]) is not None:
            return "its constant weights are its first input (W·x), which onnxq does not quantize"
        return "its weights are computed at run time, not constants (a product of two activations)"
    if weight.dtype != np.float32:
        return f"weights are {weight.dtype} constants, not float32"
    if weight_value.producer() is not None:
        return "weights come from a node, not an initializer"
    activation = node.inputs[0]
    if activation is None or activation.is_initializer():
        return "first input is a constant"
    if not is_float(activation):
        return "input is not a float32 tensor"
    layout = _weight_layout(node, weight)
    if layout is None and settings.granularity != Granularity.TENSOR:
        return "grouped ConvTranspose has no single output-channel axis"
    if settings.granularity.kind == "block" and node.op_type == "ConvTranspose":
        return "block-wise scales are not supported for ConvTranspose"
    if weight_value.name in plan.weights and plan.weights[weight_value.name].bits != settings.weight_bits:
        return "weights shared with a layer quantized at another width"
    _mark_input(activation, plan, alias)
    plan.layers[node.name] = settings
    spec = WeightSpec(
        weight_value.name,
        layout or WeightLayout(0, 1),
        settings.weight_bits,
        settings.granularity,
        settings.weight_rule,
        kernel=_kernel(node, weight),
    )
    plan.weights.setdefault(weight_value.name, spec)
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    per_channel = settings.granularity.kind in ("channel", "group")
    axis = layout.out_axis if per_channel and layout else None
    if (
        bias_value is not None
        and settings.granularity.kind != "block"
        and _bias_is_quantizable(node, bias_value, weight, axis)
    ):
        plan.biases[bias_value.name] = BiasSpec(
            bias_value.name, _resolve(activation.name, alias), weight_value.name
        )
    _mark_output(node, plan)
    return None


def _kernel(node: ir.Node, weight: np.ndarray) -> str:
    """Which kind of onnxruntime kernel runs the layer: a depthwise Conv (one input and one
    output channel per group) and ConvTranspose have their own; the rest run on the int8 GEMM."""
    if node.op_type == "ConvTranspose":
        return kernels.TRANSPOSE
    group = attribute(node, "group", 1)
    if node.op_type == "Conv" and group > 1 and weight.shape[0] == group and weight.shape[1] == 1:
        return kernels.DEPTHWISE
    return kernels.GEMM


def _weight_layout(node: ir.Node, weight: np.ndarray) -> WeightLayout | None:
    """The weight's output- and input-channel axes (None for grouped ConvTranspose)."""
    out_axis = output_channel_axis(node, weight)
    if out_axis is None:
        return None
    if node.op_type in ("Conv", "ConvTranspose"):
        return WeightLayout(out_axis, 1 - out_axis)
    return WeightLayout(out_axis, 1 - out_axis if weight.ndim == 2 else weight.ndim - 2)


def _bias_is_quantizable(node: ir.Node, bias: ir.Value, weight: np.ndarray, axis: int | None) -> bool:
    values = constant(bias)
    if values is None or bias.producer() is not None or len(bias.uses()) != 1 or values.ndim != 1:
        return False
    if scaled_gemm(node):
        return False
    channels = weight.shape[axis] if axis is not None else None
    return channels is None or values.size == channels


def is_float(value: ir.Value) -> bool:
    """Only float32 tensors are quantized: shape arithmetic (Shape → Gather → Concat) is int64.

    Types come from the graph (the pipeline runs shape inference before planning). An untyped
    value takes the type of its producer's first input, back to a typed value or a constant,
    except behind ops whose output type is their own (Shape, Cast, comparisons, ...).
    """
    for _ in range(10_000):
        if value.dtype is not None:
            return value.dtype == ir.DataType.FLOAT
        producer = value.producer()
        if producer is None or producer.op_type in TYPE_CHANGING_OPS:
            return False
        if producer.op_type in FLOAT_OUTPUT_OPS:
            return True
        if producer.op_type == "Constant":
            tensor = ir.convenience.get_const_tensor(value)
            return tensor is not None and tensor.dtype == ir.DataType.FLOAT
        value = next((v for v in producer.inputs if v is not None), None)
        if value is None:
            return False
    return False


def _plan_own_scale(node: ir.Node, plan: QuantPlan, alias: dict[str, str]) -> str | None:
    inputs = node.inputs[:1] if node.op_type.endswith("Pool") else node.inputs
    if any(v is None or constant(v) is not None for v in inputs):
        return "an input is a constant"
    if not all(is_float(v) for v in [*inputs, node.outputs[0]]):
        return "not a float32 tensor (shape arithmetic)"
    if node.op_type in CHAINED_OPS and not all(_from_quantized(v, plan) for v in inputs):
        return "an input comes from a float op"
    for value in inputs:
        _mark_input(value, plan, alias)
    _mark_output(node, plan)
    return None


def _from_quantized(value: ir.Value, plan: QuantPlan) -> bool:
    """Whether a quantized node produces the tensor (through an absorbed Relu/Clip)."""
    producer = value.producer()
    while producer is not None and producer.name in plan.absorbed:
        producer = producer.inputs[0].producer()
    return producer is not None and producer.name in plan.quantized_nodes


def _plan_shared(node: ir.Node, plan: QuantPlan, alias: dict[str, str]) -> str | None:
    source = node.inputs[0]
    if source is None or _resolve(source.name, alias) not in plan.activations:
        return "input is not quantized"
    if node.op_type == "Pad" and not _pads_with_zero(node):
        return "Pad is not constant-zero padding"
    if any(output.is_graph_output() for output in node.outputs):
        return "output is a graph output"
    if not all(is_float(output) for output in node.outputs):
        return "not a float32 tensor"
    root = plan.root(_resolve(source.name, alias))
    for output in node.outputs:
        target = plan.activations.get(output.name)
        observed = target.observed if target else output.name
        plan.activations[output.name] = ActivationSpec(output.name, observed=observed, shares=root)
    return None


def _pads_with_zero(node: ir.Node) -> bool:
    if attribute(node, "mode", "constant") not in ("constant", b"constant"):
        return False
    value = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    return value is None or float(np.asarray(value).ravel()[0]) == 0.0


def _mark_input(value: ir.Value, plan: QuantPlan, alias: dict[str, str]) -> None:
    name = _resolve(value.name, alias)
    if name not in plan.activations:
        plan.activations[name] = ActivationSpec(name, observed=name)


def _mark_output(node: ir.Node, plan: QuantPlan) -> None:
    output = node.outputs[0]
    if output.is_graph_output() or not output.uses() or output.name in plan.activations:
        return
    if not is_float(output):
        return
    plan.activations[output.name] = ActivationSpec(output.name, observed=output.name)


def _resolve(name: str, alias: dict[str, str]) -> str:
    return alias.get(name, name)


def _node_name(node: ir.Node) -> str:
    if not node.name:
        node.name = f"{node.op_type}_{node.outputs[0].name}"
    return node.name
