"""GPTQ: a layer's weight integers chosen column by column against its inputs' correlations.

Rounding every weight to its nearest integer ignores that a layer's inputs are correlated: the
error one weight's rounding leaves can be cancelled by the weights that read correlated inputs.
GPTQ (Frantar et al. 2022, after Optimal Brain Quantization) rounds one input column at a time
and spreads what it left over the columns not yet rounded, weighted by the inverse of
H = Σ x xᵀ over the layer's inputs, which minimises ‖W X − Ŵ X‖² one column at a time.

Only the integers change: every scale and zero point stays what the range rule or the search
chose, so the model's form and size are the same. numpy (onnxruntime cuts the patches of 1-D
and 3-D Convs). Rows of a weight (output channels) are independent given H, so a per-channel
search can still mix ratios per channel. H must be estimated from enough rows
(`too_few_rows`): a layer read once per sample, or a detector's deepest convs on a few
calibration images, keeps nearest rounding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

from onnxq.calib.scratch import scratch
from onnxq.io import session
from onnxq.quant.weights import QuantizedWeight, WeightLayout

DAMPING = 0.01  # of H's mean diagonal, added to it: keeps the inverse stable (GPTQ's default)
BLOCK = 128  # columns rounded before the rest of the weight is updated in one product
UNFOLD_BYTES = 64 << 20  # largest patch tensor one onnxruntime run writes
# H in float64 over all groups; factoring it holds about three more of its size and takes d³ time.
# 256 MiB serves every conv up to d = 5792 (ResNet-50's 512·3·3 = 4608); a VGG-style Gemm reading
# 25088 inputs would need 4.7 GiB, and keeps nearest rounding instead.
MAX_CORRELATION_BYTES = 256 << 20
# Patches kept per sample: H is a mean over positions, and a random subset of a large map estimates
# it well at a fraction of the d² products. 16384 = 128², above every map of a 224-pixel classifier
# (MobileNetV2's largest is 112²), so only detector-sized inputs are subsampled. Fewer did not pay
# on held-out data (BENCHMARKS.md "GPTQ's patches per sample"): at least 1024 per sample, or 8 per
# input correlated, lowered the zoo's mean worst SQNR 19.09 → 18.99 dB and took MobileNetV2 27-28 s
# against 25-26 s, as indexing chosen positions costs more per patch than copying every window.
MAX_POSITIONS = 16384
# Patches a gathered map keeps per sample, per input H correlates, at least: a map with more is
# read on a regular sub-grid (every g-th row and column, g dividing both, at a random phase per
# sample, so every position is read as often). Neighbouring patches overlap and tell H little
# more than one of them: MobileNetV2's first depthwise convs read 12544 patches of 9 inputs per
# sample and took about 40 % of GPTQ's time. On held-out data 64 was as good as every position
# (BENCHMARKS.md "GPTQ's patches on a sub-grid"); 16 lost 1-4 dB on two zoo models. None: every
# position.
GRID_ROWS_PER_INPUT: int | None = 64
# Rows of input (patches, or Gemm/MatMul rows) H needs per input it correlates. From n rows of d
# inputs the sample H's smallest eigenvalues fall to about (1 − √(d/n))² of the true ones
# (Marchenko–Pastur); GPTQ pushes rounding errors into the directions H says are quiet, so with
# too few rows it pushes them into directions the calibration samples merely missed: magika's
# 512-input Dense on 39 samples went 14.3 → 11.1 dB at its output, and YOLOX's stride-32 convs
# (1728 inputs, 2704 rows) cost the boxes 3 dB. 4 rows per input keeps every eigenvalue above
# a quarter of its true size.
MIN_ROWS_PER_INPUT = 4


def supports(node: onnx.NodeProto, weight: np.ndarray) -> bool:
    """Conv of any kind, and Gemm/MatMul with a 2-D weight read as the second input."""
    if node.op_type == "Conv":
        return True
    if node.op_type == "Gemm":
        return not _attribute(node, "transA", 0) and weight.ndim == 2
    return node.op_type == "MatMul" and weight.ndim == 2


def refusal(node: onnx.NodeProto, weight: np.ndarray) -> str | None:
    """Why GPTQ cannot round this weight (the layer keeps nearest rounding), or None."""
    if not supports(node, weight):
        return f"{node.op_type} is not supported"
    groups, depth = _correlation_shape(node, weight)
    size = correlation_bytes(node, weight)
    if size > MAX_CORRELATION_BYTES:
        return f"its input correlation ({groups}×{depth}×{depth}) would take {size / 2**30:.1f} GiB"
    return None


def correlation_bytes(node: onnx.NodeProto, weight: np.ndarray) -> int:
    """What the layer's H takes in float64."""
    groups, depth = _correlation_shape(node, weight)
    return groups * depth * depth * 8


@dataclass(frozen=True)
class Correlation:
    """H = Σ x xᵀ per weight group, (groups, d, d) in float64, and the rows x it sums."""

    gram: np.ndarray
    rows: int


class CorrelationSum:
    """H accumulated batch by batch: x is what one output value reads (a Conv's patch across its
    group's channels, a Gemm/MatMul row). A Conv reads at most MAX_POSITIONS random patches per
    sample. Each batch's product is taken in float32 (BLAS sums it in blocks) and added to a
    float64 total: widening every patch to float64 first cost more than the products."""

    def __init__(self, node: onnx.NodeProto, weight: np.ndarray):
        groups, self.depth = _correlation_shape(node, weight)
        self.unfold = _Unfold(node, weight) if node.op_type == "Conv" else None
        self.total = np.zeros((groups, self.depth, self.depth))
        self.rows = 0

    def update(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, np.float32)
        # a Conv's patches, or a Gemm/MatMul's rows as (1, d, rows)
        parts = self.unfold(batch) if self.unfold else [batch.reshape(-1, self.depth).T[None]]
        for patches in parts:  # (groups, d, rows): every sample's patches side by side, one product
            self.total += patches @ patches.transpose(0, 2, 1)
            self.rows += patches.shape[2]

    def result(self) -> Correlation:
        return Correlation(self.total, self.rows)


def input_correlation(node: onnx.NodeProto, weight: np.ndarray, inputs: Iterable[np.ndarray]) -> Correlation:
    """H over batches of a layer's inputs (CorrelationSum)."""
    correlation = CorrelationSum(node, weight)
    for batch in inputs:
        correlation.update(batch)
    return correlation.result()


def too_few_rows(correlation: Correlation) -> str | None:
    """Why H is too poorly estimated for GPTQ (the layer keeps nearest rounding), or None."""
    depth = correlation.gram.shape[1]
    if correlation.rows >= MIN_ROWS_PER_INPUT * depth:
        return None
    return (
        f"{correlation.rows} input rows for its {depth} inputs estimate their correlations too "
        f"poorly (GPTQ needs {MIN_ROWS_PER_INPUT} per input: more calibration samples)"
    )


@dataclass(frozen=True)
class Factored:
    """H and what every GPTQ pass over it shares: the column order (act order: largest input
    energy first) and the upper Cholesky factor of the reordered, damped H⁻¹. One inverse per
    layer, not one per scale candidate (d³: 4608 columns take seconds)."""

    correlation: np.ndarray
    order: np.ndarray  # (groups, d)
    upper: np.ndarray  # (groups, d, d)


def factor(correlation: np.ndarray) -> Factored:
    hessian = _damped(correlation)
    order = np.argsort(-np.einsum("gii->gi", hessian), axis=1, kind="stable")
    hessian = np.take_along_axis(np.take_along_axis(hessian, order[:, :, None], 1), order[:, None, :], 2)
    inverse = np.linalg.inv(hessian)
    upper = np.linalg.cholesky((inverse + inverse.transpose(0, 2, 1)) / 2).transpose(0, 2, 1)
    return Factored(correlation, order, upper)


def gptq_round(
    weight: np.ndarray,
    quantized: QuantizedWeight,
    factored: Factored,
    node: onnx.NodeProto,
    layout: WeightLayout,
) -> QuantizedWeight:
    """The same scales with the integers GPTQ chooses (act order: the columns with the largest
    input energy first). GPTQ is greedy: a row it leaves with a larger error on these inputs
    than nearest rounding did (rare, at wide widths) keeps its nearest integers.

    Rounding towards the float layer's output on float inputs instead (W* = W C H⁻¹ with
    C = Σ x_f x_qᵀ, which would also undo the error earlier layers left) did worse on held-out
    calibration images: ResNet-20 W2A4 mse KL 0.229 against 0.196, MobileNetV2 W4A8 0.249
    against 0.221."""
    correlation = factored.correlation
    scale, zero = quantized.element_params()
    to_rows = _RowView(node, weight.shape, layout, correlation.shape[0])
    rows, scale, zero = (to_rows(a.astype(np.float64)) for a in (weight, scale, zero))
    target = quantized.target
    nearest = to_rows(quantized.integers.astype(np.float64))
    integers = _gptq(rows, scale, zero, factored, target.qmin, target.qmax)

    def error(candidate: np.ndarray) -> np.ndarray:  # (groups, rows): (w − ŵ) H (w − ŵ)ᵀ per row
        difference = rows - (candidate - zero) * scale
        return np.sum((difference @ correlation) * difference, axis=2)

    worse = error(integers) > error(nearest)
    integers[worse] = nearest[worse]
    return replace(quantized, integers=to_rows.back(integers).astype(quantized.integers.dtype))


def _damped(correlation: np.ndarray) -> np.ndarray:
    """H with DAMPING·mean(diag H) added to its diagonal (1 where an input is always 0)."""
    hessian = correlation.copy()
    diagonal = np.einsum("gii->gi", hessian).copy()
    diagonal[diagonal == 0] = 1.0  # inputs that are always 0: their weights cannot matter
    diagonal += DAMPING * diagonal.mean(axis=1, keepdims=True)
    index = np.arange(diagonal.shape[1])
    hessian[:, index, index] = diagonal
    return hessian


def _gptq(rows, scale, zero, factored: Factored, qmin: int, qmax: int) -> np.ndarray:
    """(groups, rows, d) integers for (groups, rows, d) weights; every group has its own H."""
    order, upper = factored.order, factored.upper
    rows, scale, zero = (np.take_along_axis(a, order[:, None, :], axis=2).copy() for a in (rows, scale, zero))
    safe = np.where(scale == 0, 1.0, scale)
    integers = np.zeros_like(rows)
    depth = rows.shape[2]
    for start in range(0, depth, BLOCK):
        stop = min(start + BLOCK, depth)
        errors = np.zeros((*rows.shape[:2], stop - start))
        for column in range(start, stop):
            values = rows[:, :, column]
            q = np.clip(np.rint(values / safe[:, :, column]) + zero[:, :, column], qmin, qmax)
            integers[:, :, column] = q
            lost = (values - (q - zero[:, :, column]) * scale[:, :, column]) / upper[:, None, column, column]
            rows[:, :, column:stop] -= lost[:, :, None] * upper[:, None, column, column:stop]
            errors[:, :, column - start] = lost
        rows[:, :, stop:] -= errors @ upper[:, start:stop, stop:]
    restore = np.argsort(order, axis=1)
    return np.take_along_axis(integers, restore[:, None, :], axis=2)


class _RowView:
    """A weight as (groups, output rows, d), the rows H weighs, and back."""

    def __init__(self, node: onnx.NodeProto, shape: tuple[int, ...], layout: WeightLayout, groups: int):
        self.shape, self.groups = shape, groups
        self.conv = node.op_type == "Conv"
        self.out_axis = layout.out_axis

    def __call__(self, values: np.ndarray) -> np.ndarray:
        if self.conv:  # (out, in/group, *kernel): a row is one output channel's patch weights
            return values.reshape(self.groups, self.shape[0] // self.groups, -1)
        return np.moveaxis(values, self.out_axis, 0)[None]

    def back(self, rows: np.ndarray) -> np.ndarray:
        if self.conv:
            return rows.reshape(self.shape)
        return np.moveaxis(rows[0], 0, self.out_axis)


class _Unfold:
    """A Conv's input cut into the patches its output values read, up to MAX_POSITIONS random
    ones per sample. A 2-D Conv's are gathered by numpy (onnxruntime's one-hot Conv below took
    most of GPTQ's time on MobileNetV2, and wrote every patch of a detector's map to keep a
    few); other ranks are cut by onnxruntime, a Conv with one-hot kernels and the layer's own
    strides, pads, dilations and auto_pad, one kernel position per output channel, and
    subsampled after."""

    def __init__(self, node: onnx.NodeProto, weight: np.ndarray):
        self.groups = _attribute(node, "group", 1)
        channels = weight.shape[1] * self.groups
        self.kernel = tuple(weight.shape[2:])
        positions = int(np.prod(self.kernel))
        self.depth = weight.shape[1] * positions
        self.keep = MAX_POSITIONS
        keep = {"strides", "pads", "dilations", "auto_pad"}
        self.attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in keep}
        self.pointwise = positions == 1 and _reads_in_place(self.attributes)  # patches: the input itself
        self.gathers = len(self.kernel) == 2 and not self.pointwise
        self.expansion = positions
        self.rng = np.random.default_rng(0)  # the same patches on every run: the same file
        if not self.gathers and not self.pointwise:
            self.runner = _unfolding_session(self.kernel, channels, self.attributes)

    def __call__(self, batch: np.ndarray):
        """(groups, d, rows) patch matrices, every sample's patches side by side, a few samples
        at a time. One product per group over all of them: a product per sample (tried first)
        left a d×d result per sample to sum, 20 times its input on MobileNetV2's 7×7 maps of 960
        channels, and took ten times as long there. The matrices are views of one reused buffer
        (onnxq.calib.scratch), or of the input itself (one sample of a pointwise conv): each is
        read before the next is made."""
        per_sample = max(1, batch[0].size * self.expansion * 4)
        step = max(1, UNFOLD_BYTES // per_sample)
        for start in range(0, len(batch), step):
            part = batch[start : start + step]
            if self.gathers:
                yield self._gathered(part)
                continue
            patches = part if self.pointwise else self.runner.run(None, {"x": part})[0]
            samples = patches.shape[0]
            patches = patches.reshape(samples, self.groups, self.depth, -1)
            if patches.shape[3] > self.keep:
                chosen = np.stack([self._positions(patches.shape[3]) for _ in range(samples)])
                patches = np.take_along_axis(patches, chosen[:, None, None, :], axis=3)
            yield _side_by_side(patches)

    def _positions(self, total: int) -> np.ndarray:
        """Sorted random output positions of one sample, `keep` of them, or all."""
        if total <= self.keep:
            return np.arange(total)
        return np.sort(self.rng.choice(total, self.keep, replace=False))

    def _gathered(self, part: np.ndarray) -> np.ndarray:
        """(groups, d, rows) patches of a 2-D Conv, d in the weight's order (input channel,
        kernel row, kernel column). A map with no more positions than are kept is copied from a
        strided view of every window at once (six times cheaper per patch than indexing), on a
        sub-grid where it has more than GRID_ROWS_PER_INPUT per input; a larger one is indexed
        at each sample's chosen positions."""
        (kh, kw), (sh, sw) = self.kernel, self.attributes.get("strides", [1, 1])
        dh, dw = self.attributes.get("dilations", [1, 1])
        top, left, bottom, right = _pads_2d(self.attributes, part.shape[2:], self.kernel)
        padded = np.pad(part, ((0, 0), (0, 0), (top, bottom), (left, right)))
        out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
        out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
        samples, channels = part.shape[:2]
        if out_h * out_w <= self.keep:
            span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
            windows = sliding_window_view(padded, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
            windows = windows[:, :, :out_h, :out_w]  # (samples, channels, out_h, out_w, kh, kw)
            step = self._grid_step(out_h, out_w)
            if step == 1:
                patches = scratch((channels, kh, kw, samples, out_h, out_w))
                np.copyto(patches, windows.transpose(1, 4, 5, 0, 2, 3))
                return patches.reshape(self.groups, self.depth, -1)
            patches = scratch((channels, kh, kw, samples, out_h // step, out_w // step))
            for index, phase in enumerate(self.rng.integers(step, size=(samples, 2))):
                grid = windows[index, :, phase[0] :: step, phase[1] :: step]
                np.copyto(patches[:, :, :, index], grid.transpose(0, 3, 4, 1, 2))
            return patches.reshape(self.groups, self.depth, -1)
        patches = scratch((self.groups, self.depth, samples, self.keep))
        for index, sample in enumerate(padded):
            rows, columns = np.divmod(self._positions(out_h * out_w), out_w)
            rows = rows * sh + (np.arange(kh) * dh)[:, None, None]  # (kh, 1, positions)
            columns = columns * sw + (np.arange(kw) * dw)[None, :, None]  # (1, kw, positions)
            patches[:, :, index] = sample[:, rows, columns].reshape(self.groups, self.depth, -1)
        return patches.reshape(self.groups, self.depth, -1)

    def _grid_step(self, height: int, width: int) -> int:
        """The largest g dividing both sides that leaves GRID_ROWS_PER_INPUT patches per input
        per sample (1: every position)."""
        if GRID_ROWS_PER_INPUT is None:
            return 1
        least = GRID_ROWS_PER_INPUT * self.depth
        steps = [g for g in range(2, 9) if height % g == 0 and width % g == 0]
        return max((g for g in steps if (height // g) * (width // g) >= least), default=1)


def _side_by_side(patches: np.ndarray) -> np.ndarray:
    """(samples, groups, d, positions) as (groups, d, samples·positions), on the reused buffer."""
    samples, groups, depth, positions = patches.shape
    if samples == 1:
        return patches[0]
    joined = scratch((groups, depth, samples, positions))
    np.copyto(joined, patches.transpose(1, 2, 0, 3))
    return joined.reshape(groups, depth, -1)


def _pads_2d(attributes: dict, spatial: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[int, ...]:
    """(top, left, bottom, right) a 2-D Conv pads its input with, auto_pad resolved as ONNX does."""
    auto_pad = attributes.get("auto_pad", b"NOTSET")  # onnx gives strings as bytes
    if auto_pad == b"NOTSET":
        top, left, bottom, right = attributes.get("pads", [0, 0, 0, 0])
        return top, left, bottom, right
    if auto_pad == b"VALID":
        return 0, 0, 0, 0
    strides, dilations = attributes.get("strides", [1, 1]), attributes.get("dilations", [1, 1])
    begins, ends = [], []
    for size, k, stride, dilation in zip(spatial, kernel, strides, dilations, strict=True):
        out = -(-size // stride)
        total = max(0, (out - 1) * stride + (k - 1) * dilation + 1 - size)
        small, large = total // 2, total - total // 2
        upper = auto_pad == b"SAME_UPPER"
        begins.append(small if upper else large)
        ends.append(large if upper else small)
    return begins[0], begins[1], ends[0], ends[1]


def _unfolding_session(kernel: tuple[int, ...], channels: int, attributes: dict):
    """onnxruntime's session of a Conv whose one-hot kernels copy each patch into channels."""
    positions = int(np.prod(kernel))
    one_hot = np.tile(
        np.eye(positions, dtype=np.float32).reshape(positions, 1, *kernel),
        (channels, 1) + (1,) * len(kernel),
    )
    conv = helper.make_node("Conv", ["x", "k"], ["patches"], group=channels, **attributes)
    graph = helper.make_graph(
        [conv],
        "unfold",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("patches", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(one_hot, "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return session(model, arena=False)


def _reads_in_place(attributes: dict) -> bool:
    """Whether a 1×1 kernel with these attributes reads every input position once, unpadded."""
    return (
        all(v == 1 for v in attributes.get("strides", [1]))
        and not any(attributes.get("pads", [0]))
        and attributes.get("auto_pad", b"NOTSET") in (b"NOTSET", b"VALID")  # onnx gives strings as bytes
    )


def _correlation_shape(node: onnx.NodeProto, weight: np.ndarray) -> tuple[int, int]:
    """(groups, d) of H: a Conv's group count and patch size, or a Gemm/MatMul's input depth."""
    if node.op_type == "Conv":
        return _attribute(node, "group", 1), weight[0].size
    return 1, weight.shape[0 if _reads_columns(node) else 1]


def _reads_columns(node: onnx.NodeProto) -> bool:
    """Whether the weight's first axis is the input depth (MatMul, Gemm without transB)."""
    return node.op_type == "MatMul" or not _attribute(node, "transB", 0)


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)
