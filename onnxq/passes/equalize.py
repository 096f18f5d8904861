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
from onnxq.passes.channel_moves import Pair, apply_scales, channel_axis, find_pairs
from onnxq.passes.float_side import (
    beside_integer_hardswish,
    find_outlets,
    insert_inlets,
    remove_idle_inlets,
    rescale_output,
)
from onnxq.passes.fold_bn import ChannelStatistics
from onnxq.progress import Silent

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
        integer = beside_integer_hardswish(nodes[producer], pair, integer_chains)
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


def _clipped_pair(pair: Pair) -> bool:
    """A layer pair into a depthwise conv: each channel's range moves into weights with a scale
    per channel on both sides, so channels may line up by any range, clipped ones included."""
    return pair.depthwise and pair.constant_input is None


def _spread(maxima: np.ndarray) -> float:
    """Widest over narrowest non-zero channel range."""
    live = maxima[maxima > 0]
    return float(live.max() / live.min()) if live.size else 1.0
