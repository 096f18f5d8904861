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

With `clip_levels` (4-bit activations and narrower, onnxq.pipeline.CLIPPED_EQUALIZATION_BITS)
a channel's range m[k] is where it is best clipped at the quantizer's few steps
(ChannelRangeObserver), not its maximum: MobileNetV2's ReLU6 channels reach 6 on a few values
while most of them sit near 0, and lined up by maxima every channel was clipped as coarsely as
the widest one. The quantized model is then exactly the exported ReLU6 outputs quantized with a
range per channel: where s[k]·x > c both saturate at the tensor's range R ≤ c. The float
equalized model clips channel k at c / s[k], at or above R / s[k] where its quantizer clips it,
so values there differ from the exported model's where no quantized model tells them apart: on
MobileNetV2's held-out calibration images its logits are 36.9 dB from the export's (38.8 dB
lined up by maxima, whose moves clip new images' values above the calibrated maxima).

How far each channel moves: a depthwise consumer reads each channel with its own weights (one
scale per output channel = per input channel), so channels are equalized fully,
s[k] = M / m[k]. A dense consumer mixes channels in each output channel's weights, where a
scaled-down input channel loses weight resolution; the move would be split as SmoothQuant
does, s[k] = (M / m[k]) ** DENSE_STRENGTH, but on held-out calibration images no split helped
enough: MobileNetV2 W6A6 mse KL 0.139 with dense pairs left alone, 0.143 at 0.5, 0.280 at 1;
ResNet-20 (dense pairs only) W4A4 0.043 → 0.040 at 0.5 but W2A4 0.196 → 0.220, and on the
evaluation split ResNet-56 W4A4 lost 1.5 points. Nor at 4-bit activations with dense inputs
lined up by clipping points as well: MobileNetV2 W4A4 mse held-out KL 1.27 with dense pairs left
alone, 1.37 / 1.41 / 1.14 / 1.67 / 1.29 at 0.125 / 0.2 / 0.25 / 0.3 / 0.5, no trend but noise,
ResNet-20 W2A4 0.112 → 0.132 at 0.25, MobileNetV2 W6A6 (by maxima) 0.090 → 0.117 at 0.25.
So DENSE_STRENGTH is 0: dense pairs are left alone. Channels that never leave 0 keep s = 1,
and no channel moves more than MAX_SCALE.

Across a float op, two more moves need no homogeneous activation, because no activation sees
the scale. An outlet (find_outlets) is a Conv whose output only float ops read (HardSwish,
Add/Mul/Div by constants or by values computed from it): its output is quantized per tensor
only for the Conv's integer kernel, so its channels take s in the Conv's weights and bias and a
Mul by 1/s after the DequantizeLinear gives the float ops what they read before. A scaler is a
Mul or Div by a constant whose output a depthwise Conv reads: s goes into the constant, 1/s
into the Conv's weights; where a float activation writes a depthwise Conv's input, an inlet
(insert_inlets), a Mul by ones per channel, is put between them to be that scaler, and taken out
again where no channel moves. A SiLU at 8 bits is no float activation: onnxruntime runs it on
integer kernels, which an inlet after it would take away. None of these changes anything an
integer kernel computes but the activation's rounding, so they are made at every width
(QuantConfig.rescales_float_sides), up to FLOAT_SIDE_MAX_SCALE.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.calib.data import Batch
from onnxq.calib.observers import ChannelMaxObserver, ChannelRangeObserver
from onnxq.calib.runner import collect_observers
from onnxq.io import to_ir, to_proto
from onnxq.passes.fold_bn import ChannelStatistics
from onnxq.passes.graph_utils import (
    attribute,
    bypass,
    clip_bounds,
    constant,
    drop_unused_initializers,
    output_channel_axis,
    scaled_gemm,
    set_initializer,
    single_consumer,
)
from onnxq.progress import Silent

PRODUCERS = ("Conv", "Gemm", "MatMul")
CONSUMERS = ("Conv", "Gemm", "MatMul")
HOMOGENEOUS = ("Relu", "LeakyRelu")
# A Mul or Div by a constant, the last op of an activation exported op by op (paddle2onnx's
# hard-swish x·Clip(x + 3, 0, 6) / 6): s folds exactly into the constant, whatever came before.
SCALERS = ("Mul", "Div")
# Ops with no integer kernel that may read a rescaled Conv output (an outlet): the Mul that
# undoes the scale sits between two float ops and breaks no integer chain.
FLOAT_READERS = ("Add", "Mul", "Div", "HardSwish", "HardSigmoid")
# Readers that quantize what they read at 8 bits: a HardSwish read by one has a quantized output
QUANTIZING_READERS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "GlobalAveragePool", "AveragePool", "Concat")
# Float activations a depthwise conv may read through an inlet (insert_inlets): not homogeneous,
# so no layer before them can take a channel's scale.
INLET_SOURCES = ("HardSwish", "HardSigmoid", "Sigmoid", "Mul", "Add", "Div")
DENSE_STRENGTH = 0.0  # dense consumers: the share of the range moved into their weights (0: none)
MAX_SCALE = 32.0  # no channel scaled by more (a channel nearly always 0 would take any s)
# Across a float boundary (outlets, Mul/Div scalers) nothing but the activation's quantizer sees
# the scale, so a channel may move further: PP-PicoDet's stem keeps channels 340× narrower than
# its widest, which its depthwise conv then multiplies by 72 (BatchNorm variance 0.0007).
FLOAT_SIDE_MAX_SCALE = 1024.0
# Channels across a float op are lined up to half the widest: room for new inputs wider than the
# calibration samples. Chosen on held-out calibration samples (tools/choose_float_side.py: worst
# output SQNR, mean over PP-PicoDet, PP-OCRv4 det and MobileNetV3 at W8A8: 13.6 dB lined up
# fully, 14.0 at half, 13.2 at a quarter, 9.5 without the moves).
FLOAT_SIDE_HEADROOM = 2.0
# Beside a HardSwish that runs on integer kernels at 8 bits (onnxq.passes.integer_hardswish),
# channels whose ranges lie within this factor of each other are not moved: the move's float Mul
# would take the kernels away. Chosen on held-out calibration samples (worst output SQNR, second
# half of each zoo calibration file; every move made: MobileNetV3 14.6, PP-LCNet 54.4, PP-PicoDet
# 14.6 dB): at 16 13.8 / 53.8 / 15.2, at 64 13.8 / 53.3 / 14.4, with no move 13.8 / 52.7 / 2.3
# (PP-PicoDet's stem channels 340× apart). 64 leaves the most HardSwishes integer short of that.
INTEGER_SPREAD = 64.0
INLET_SUFFIX = "_inlet"


@dataclass
class Equalized:
    """The equalized model, the BatchNorm statistics of the tensors it rescaled, what it did."""

    model: onnx.ModelProto
    statistics: dict[str, ChannelStatistics]
    pairs: int = 0
    widest_spread: float = 1.0  # the largest channel range ratio found before equalizing
    notes: list[str] = field(default_factory=list)
    # moves made beside a HardSwish that would otherwise run on integer kernels: each takes them
    # away (their channels were more than `integer_spread` apart)
    beside_integer: int = 0


def equalize_channels(
    model: onnx.ModelProto,
    batches: Iterable[Batch],
    statistics: dict[str, ChannelStatistics] | None = None,
    per_channel: Callable[[ir.Node], bool] = lambda node: True,
    *,
    layer_pairs: bool = True,
    integer_chains: frozenset[str] = frozenset(),
    clip_levels: Callable[[ir.Node], int | None] = lambda node: None,
    integer_spread: float | None = None,
) -> Equalized:
    """Every pair find_pairs finds whose two layers have `per_channel` weight scales, and every
    outlet (find_outlets), rescaled by its channel ranges on `batches` (float model).
    `layer_pairs` False leaves the pairs through Relu/Clip alone and makes only the moves across
    a float op (Mul/Div scalers, outlets), which change nothing an integer kernel computes.
    `integer_chains`: the elementwise ops the plan will run on integer kernels (a SiLU at 8
    bits); no inlet goes behind them (insert_inlets).
    `statistics` (tensor → BatchNorm's, from folding) follow the producers' outputs they describe.
    `clip_levels`: the steps of the quantizer a depthwise consumer reads through, where its
    input's channels line up by where each would best be clipped at that many steps
    (ChannelRangeObserver); None: by their maxima.
    `integer_spread`: beside a HardSwish that integer kernels could run, channels this close
    are left for them (None: INTEGER_SPREAD; math.inf: every such move is left, the integer
    kernels come first)."""
    statistics = dict(statistics or {})
    integer_spread = INTEGER_SPREAD if integer_spread is None else integer_spread
    graph_model = to_ir(model)
    inlets = insert_inlets(graph_model.graph, per_channel, integer_chains)
    nodes = {node.name: node for node in graph_model.graph}
    pairs = [
        pair
        for pair in find_pairs(graph_model.graph)
        if per_channel(nodes[pair.producer])
        and per_channel(nodes[pair.consumer])
        and (pair.depthwise or DENSE_STRENGTH > 0)
        and (layer_pairs or pair.constant_input is not None)
    ]
    paired = {pair.producer for pair in pairs} | {pair.tensor for pair in pairs}
    outlets = [
        node.name
        for node in find_outlets(graph_model.graph)
        if node.name not in paired and node.outputs[0].name not in paired and per_channel(node)
    ]
    if not pairs and not outlets:
        return Equalized(model, statistics)  # no inlet either: each would be a scaler pair
    axes = {pair.tensor: channel_axis(pair) for pair in pairs}
    axes |= {nodes[name].outputs[0].name: 1 for name in outlets}
    observed = to_proto(graph_model) if inlets else model  # the inlets' outputs exist only here
    levels = {pair.tensor: clip_levels(nodes[pair.consumer]) for pair in pairs if _clipped_pair(pair)}

    def observer(tensor: str) -> ChannelMaxObserver | ChannelRangeObserver:
        if levels.get(tensor) is None:
            return ChannelMaxObserver(axes[tensor])
        return ChannelRangeObserver(axes[tensor], levels[tensor])

    observers, _ = collect_observers(observed, list(axes), batches, observer, Silent())
    spread, applied, rescaled, left_idle, clipped, beside_integer = 1.0, 0, 0, 0, 0, 0
    moves = [(pair.producer, pair.tensor, pair) for pair in pairs]
    moves += [(name, nodes[name].outputs[0].name, None) for name in outlets]
    for producer, tensor, pair in moves:
        maxima, spans = observers[tensor].maxima, observers[tensor].spans()
        if maxima is None or not np.all(np.isfinite(maxima)):
            continue
        scales = channel_scales(pair, spans)
        spread = max(spread, _spread(maxima))
        integer = _beside_integer_hardswish(nodes[producer], pair, integer_chains)
        if integer and _spread(maxima) <= integer_spread:
            left_idle += pair is not None  # an inlet: taken out below with the idle ones
            continue  # left for the HardSwish's integer kernels
        if pair is None and np.all(scales == 1.0):
            continue  # an outlet whose channels need no move: no Mul to run
        beside_integer += integer and bool(np.any(scales != 1.0))
        produced = nodes[producer].outputs[0].name
        if produced in statistics:
            statistics[produced] = statistics[produced].affine(scales, np.zeros_like(scales))
        if pair is None:
            rescale_output(graph_model.graph, nodes[producer], scales)
        else:
            apply_scales(graph_model.graph, pair, scales)
        if pair is None or pair.constant_input is not None:
            rescaled += 1
        else:
            applied += 1
            clipped = max(clipped, levels.get(tensor) or 0)
    rescaled -= remove_idle_inlets(graph_model.graph, inlets) - left_idle
    if not applied + rescaled:  # every channel was left as it was: no second copy of the weights
        return Equalized(model, statistics, 0, spread)
    result = to_proto(graph_model)
    result.ir_version = model.ir_version
    notes = _notes(applied, rescaled, spread, clipped)
    return Equalized(result, statistics, applied + rescaled, spread, notes, beside_integer)


def _notes(applied: int, rescaled: int, spread: float, clipped: int = 0) -> list[str]:
    """`clipped`: the most quantizer steps a layer pair's channels were lined up for by their
    clipping points (0: every pair by maxima)."""
    notes = []
    if applied:
        bits = (clipped + 1).bit_length() - 1  # clipped = 2**bits - 1 steps
        how = f"; lined up by where each channel is best clipped at {bits} bits" if clipped else ""
        notes.append(
            f"equalized the channels of {applied} tensor{'s' * (applied != 1)} between layer pairs "
            f"(cross-layer equalization; channel ranges up to {spread:.0f}x apart before{how})"
        )
    if rescaled:
        notes.append(
            f"equalized the channels of {rescaled} tensor{'s' * (rescaled != 1)} across a float op "
            "(a conv output only float ops read, undone by a Mul after its dequantization; a "
            "depthwise conv's input behind a Mul/Div by a constant, or behind a float activation "
            "through a Mul inserted for it), so one scale serves them all"
        )
    return notes


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
        if node.op_type in PRODUCERS and _scalable_producer(node):
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


def channel_scales(pair: Pair | None, maxima: np.ndarray) -> np.ndarray:
    """s per channel from the consumer input's per-channel ranges of |x| on calibration data,
    their maxima or clipping points (pair None: an outlet's output)."""
    maxima = np.asarray(maxima, np.float64)
    widest = float(maxima.max()) if maxima.size else 0.0
    if widest <= 0 or not np.isfinite(widest):
        return np.ones_like(maxima)
    ratio = np.where(maxima > 0, widest / np.where(maxima > 0, maxima, 1.0), 1.0)
    if pair is None or pair.constant_input is not None:
        return np.clip(ratio / FLOAT_SIDE_HEADROOM, 1.0, FLOAT_SIDE_MAX_SCALE)
    scales = ratio if pair.depthwise else ratio**DENSE_STRENGTH
    return np.clip(scales, 1.0, MAX_SCALE)


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
        _scale_layer_output(graph, producer, scales)


def _scale_layer_output(graph: ir.Graph, producer: ir.Node, scales: np.ndarray) -> None:
    """Scale a layer's weights and bias per output channel."""
    weight = constant(producer.inputs[1])
    axis = output_channel_axis(producer, weight)
    _set_weight(graph, producer, 1, _scaled(weight, axis, scales))
    if len(producer.inputs) > 2 and producer.inputs[2] is not None:
        bias = constant(producer.inputs[2])
        _set_weight(graph, producer, 2, (bias.astype(np.float64) * np.broadcast_to(scales, bias.shape)))


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
        if node.op_type != "Conv" or node.domain != "" or not _scalable_producer(node):
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


def _beside_integer_hardswish(producer: ir.Node, pair: Pair | None, integer_chains: frozenset[str]) -> bool:
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
    _scale_layer_output(graph, producer, scales)
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
            or not _scalable_consumer(node)
            or not _depthwise(node)
        ):
            continue
        value = node.inputs[0]
        source = value.producer() if value is not None else None
        if source is None or source.domain != "" or source.op_type not in INLET_SOURCES:
            continue
        if source.op_type in integer_chains and source.op_type != "HardSwish":
            continue  # a HardSwish's inlet stays where its channels are far apart (see INTEGER_SPREAD)
        if single_consumer(value) is not node or not per_channel(node):
            continue
        if source.op_type in SCALERS and _constant_operand(source) is not None:
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


def _clipped_pair(pair: Pair) -> bool:
    """A layer pair into a depthwise conv: each channel's range moves into weights with a scale
    per channel on both sides, so channels may line up by any range, clipped ones included."""
    return pair.depthwise and pair.constant_input is None


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


def _follow_scaler(node: ir.Node) -> tuple | None:
    """(activation, consumer, tensor, depthwise, clip, dense_rows, constant_input) from a Mul/Div
    by a scalar or per-channel constant whose output only a Conv reads as its data input."""
    index = _constant_operand(node)
    output = node.outputs[0]
    reader = single_consumer(output)
    if index is None or reader is None or reader.op_type != "Conv" or reader.domain != "":
        return None
    if len(reader.inputs) < 2 or reader.inputs[0] is not output or not _scalable_consumer(reader):
        return None
    weight = constant(reader.inputs[1])
    channels = attribute(reader, "group", 1) * weight.shape[1]
    value = constant(node.inputs[index])
    per_channel = (channels, *[1] * (weight.ndim - 2))
    leading = next((axis for axis, size in enumerate(value.shape) if size != 1), value.ndim)
    if value.size != 1 and (value.ndim > weight.ndim or value.shape[leading:] != per_channel):
        return None  # a constant that varies along another axis than the channels'
    return None, reader.name, output.name, _depthwise(reader), None, False, index


def _constant_operand(node: ir.Node) -> int | None:
    """The input of a Mul (either) or Div (the divisor) that is a float constant while the other
    is not, or None."""
    if len(node.inputs) != 2 or any(value is None for value in node.inputs):
        return None
    for index in (0, 1) if node.op_type == "Mul" else (1,):
        value = constant(node.inputs[index])
        if value is not None and value.dtype.kind == "f" and constant(node.inputs[1 - index]) is None:
            return index
    return None


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
