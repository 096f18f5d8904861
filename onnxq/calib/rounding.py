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
from onnx import helper

from onnxq.calib.patches import Unfold
from onnxq.quant.weights import QuantizedWeight, WeightLayout

DAMPING = 0.01  # of H's mean diagonal, added to it: keeps the inverse stable (GPTQ's default)
BLOCK = 128  # columns rounded before the rest of the weight is updated in one product
# H in float64 over all groups; factoring it holds about three more of its size and takes d³ time.
# 256 MiB serves every conv up to d = 5792 (ResNet-50's 512·3·3 = 4608); a VGG-style Gemm reading
# 25088 inputs would need 4.7 GiB, and keeps nearest rounding instead.
MAX_CORRELATION_BYTES = 256 << 20
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
    group's channels, a Gemm/MatMul row; a Conv's come from onnxq.calib.patches). Each batch's
    product is taken in float32 (BLAS sums it in blocks) and added to a float64 total: widening
    every patch to float64 first cost more than the products. A product that overflows float32
    (inputs near 1e19 or more: onnx's light VGG-19) is taken again in float64."""

    def __init__(self, node: onnx.NodeProto, weight: np.ndarray):
        groups, self.depth = _correlation_shape(node, weight)
        self.unfold = Unfold(node, weight) if node.op_type == "Conv" else None
        self.total = np.zeros((groups, self.depth, self.depth))
        self.rows = 0

    def update(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, np.float32)
        # a Conv's patches, or a Gemm/MatMul's rows as (1, d, rows)
        parts = self.unfold(batch) if self.unfold else [batch.reshape(-1, self.depth).T[None]]
        for patches in parts:  # (groups, d, rows): every sample's patches side by side, one product
            with np.errstate(over="ignore", invalid="ignore"):
                product = patches @ patches.transpose(0, 2, 1)
            if not np.isfinite(product).all():  # inputs near 1e19 or more: squares past float32
                wide = patches.astype(np.float64)
                product = wide @ wide.transpose(0, 2, 1)
            self.total += product
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
