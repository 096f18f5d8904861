"""Channel moves across a float op, which change nothing an integer kernel computes.

An outlet is a Conv whose output only float ops read: its channels take s in the Conv's weights
and bias, and a Mul by 1/s after the DequantizeLinear gives the float ops what they read before.
An inlet is a Mul by ones per channel put before a depthwise Conv that a float activation
writes, for onnxq.passes.equalize to set like any Mul/Div scaler. Beside a HardSwish that would
run on integer kernels a move's float Mul takes those kernels away (beside_integer_hardswish).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxq.passes.channel_moves import (
    SCALERS,
    Pair,
    constant_operand,
    is_depthwise,
    scalable_consumer,
    scalable_producer,
    scale_layer_output,
)
from onnxq.passes.graph_utils import (
    bypass,
    constant,
    drop_unused_initializers,
    set_initializer,
    single_consumer,
)

# Ops with no integer kernel that may read a rescaled Conv output (an outlet): the Mul that
# undoes the scale sits between two float ops and breaks no integer chain.
FLOAT_READERS = ("Add", "Mul", "Div", "HardSwish", "HardSigmoid")
# Readers that quantize what they read at 8 bits: a HardSwish read by one has a quantized output
QUANTIZING_READERS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "GlobalAveragePool", "AveragePool", "Concat")
# Float activations a depthwise conv may read through an inlet (insert_inlets): not homogeneous,
# so no layer before them can take a channel's scale.
INLET_SOURCES = ("HardSwish", "HardSigmoid", "Sigmoid", "Mul", "Add", "Div")
INLET_SUFFIX = "_inlet"


def find_outlets(graph: ir.Graph) -> list[ir.Node]:
    """Convs whose output only float ops read (HardSwish, or one written op by op, x·Clip(x+3)/6).

    Their output is quantized per tensor only for the Conv's own integer kernel and dequantized
    straight into float ops, so its channels can be scaled apart freely: the Conv's weights and
    bias take s (per output channel: their quantization does not change) and a Mul by 1/s after
    the DequantizeLinear undoes it. The activation quantizer then sees channels of one range, in
    effect one scale per channel. Folding the Mul into a per-channel DequantizeLinear instead
    would save the Mul but not the time: onnxruntime ran PP-PicoDet 2.5× slower that way (167
    against 66 ms at batch 1)."""
    found = []
    for node in graph:
        if node.op_type != "Conv" or node.domain != "" or not scalable_producer(node):
            continue
        output = node.outputs[0]
        readers = output.consumers()
        if output.is_graph_output() or not readers:
            continue
        if all(r.domain == "" and r.op_type in FLOAT_READERS and _float_reader(r, output) for r in readers):
            found.append(node)
    return found


def _integer_hardswish(node: ir.Node | None, integer_chains: frozenset[str]) -> bool:
    """A HardSwish onnxq will write for integer kernels (`integer_chains` holds it at 8 bits):
    one whose output a layer or a pool reads, so that it is quantized (a Mul by a constant after
    it, PP-LCNetV3's learnable affine, keeps it float)."""
    if node is None or node.op_type != "HardSwish" or node.op_type not in integer_chains:
        return False
    readers = list(node.outputs[0].consumers())
    readers += [
        r for inlet in readers if inlet.name.endswith(INLET_SUFFIX) for r in inlet.outputs[0].consumers()
    ]
    return any(_quantizing(reader) for reader in readers)


def _quantizing(reader: ir.Node) -> bool:
    """A reader whose input is quantized at 8 bits; not a Conv that writes a graph output, which
    stays float (quant.prune.keep_float_convs_without_output_pair)."""
    if reader.op_type == "Conv" and any(output.is_graph_output() for output in reader.outputs):
        return False
    return reader.op_type in QUANTIZING_READERS


def beside_integer_hardswish(producer: ir.Node, pair: Pair | None, integer_chains: frozenset[str]) -> bool:
    """An outlet read only by such HardSwishes, or an inlet behind one: a move there puts a
    float Mul beside it, which takes its integer kernels away."""
    if pair is None:
        readers = producer.outputs[0].consumers()
        return bool(readers) and all(_integer_hardswish(reader, integer_chains) for reader in readers)
    return producer.name.endswith(INLET_SUFFIX) and _integer_hardswish(
        producer.inputs[0].producer(), integer_chains
    )


def _float_reader(node: ir.Node, value: ir.Value) -> bool:
    """Add/Mul/Div whose other operand is a constant or is computed from `value` alone."""
    if node.op_type in ("HardSwish", "HardSigmoid"):
        return True
    others = [v for v in node.inputs if v is not value]
    return all(v is None or constant(v) is not None or _derived_from(v, value) for v in others)


def _derived_from(value: ir.Value, source: ir.Value, depth: int = 3) -> bool:
    """Whether `value` is computed from `source` and constants alone, within `depth` ops."""
    producer = value.producer()
    if producer is None or depth == 0:
        return False
    return all(
        v is source or constant(v) is not None or _derived_from(v, source, depth - 1)
        for v in producer.inputs
        if v is not None
    )


def rescale_output(graph: ir.Graph, producer: ir.Node, scales: np.ndarray) -> None:
    """Scale the Conv's output channels by `scales` and undo it with a Mul right after it."""
    scale_layer_output(graph, producer, scales)
    spatial = [1] * (constant(producer.inputs[1]).ndim - 2)
    inverse = (1.0 / scales).reshape(-1, *spatial).astype(np.float32)
    _multiply_channels(graph, producer.outputs[0], inverse, f"{producer.name}_unscale", "unscaled")


def _multiply_channels(
    graph: ir.Graph, value: ir.Value, factors: np.ndarray, name: str, suffix: str
) -> ir.Node:
    """A Mul of `value` by a per-channel constant, right after its producer, read by all that
    read `value` before."""
    constant_value = set_initializer(graph, name, factors)
    product = ir.Value(name=f"{value.name}_{suffix}", shape=value.shape, type=value.type)
    mul = ir.Node("", "Mul", inputs=[value, constant_value], outputs=[product], name=name)
    for user, index in list(value.uses()):
        if user is not mul:
            user.replace_input_with(index, product)
    graph.insert_after(value.producer(), mul)
    return mul


def insert_inlets(
    graph: ir.Graph, per_channel: Callable[[ir.Node], bool], integer_chains: frozenset[str] = frozenset()
) -> list[ir.Node]:
    """A Mul by ones per channel before each per-channel depthwise Conv whose input only it reads
    and a float activation (INLET_SOURCES) writes: a scaler the pass can then set like any other,
    where no layer, homogeneous activation or constant Mul/Div sits in between to take the scale
    (PP-PicoDet's HardSwish between a stem 340× narrower in some channels and the depthwise conv
    that multiplies them by 72). None behind an op in `integer_chains`: a SiLU (Sigmoid·Mul) the
    plan runs on integer kernels at 8 bits would run float between a DequantizeLinear and a
    QuantizeLinear on the network's widest tensors instead (an EfficientNet-B0 at 224×224 ran
    1.51× its float model with its 16 inlets, 0.94× without). Returns the Muls inserted."""
    inserted = []
    for node in list(graph):
        if (
            node.op_type != "Conv"
            or node.domain != ""
            or not scalable_consumer(node)
            or not is_depthwise(node)
        ):
            continue
        value = node.inputs[0]
        source = value.producer() if value is not None else None
        if source is None or source.domain != "" or source.op_type not in INLET_SOURCES:
            continue
        if source.op_type in integer_chains and source.op_type != "HardSwish":
            continue  # a HardSwish's inlet stays where its channels lie far apart (equalize.INTEGER_SPREAD)
        if single_consumer(value) is not node or not per_channel(node):
            continue
        if source.op_type in SCALERS and constant_operand(source) is not None:
            continue  # a scaler already
        ones = np.ones((constant(node.inputs[1]).shape[0], 1, 1), np.float32)
        inserted.append(_multiply_channels(graph, value, ones, f"{node.name}{INLET_SUFFIX}", "inlet"))
    return inserted


def remove_idle_inlets(graph: ir.Graph, inlets: list[ir.Node]) -> int:
    """Take out the inlets whose scales stayed 1 (their channels already within the headroom);
    returns how many."""
    removed = 0
    for mul in inlets:
        scale = constant(mul.inputs[1])
        if scale is not None and np.all(scale == 1.0):
            bypass(graph, mul, mul.inputs[0])
            removed += 1
    drop_unused_initializers(graph)
    return removed
