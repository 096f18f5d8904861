"""numpy reference for weight quantization: scale groups, range rules, and the ONNX form.

A weight is cut into scale groups by its granularity (the whole tensor, one output channel, G
consecutive output channels, or B input channels of one output channel), each group gets a
clipping range by its rule, and the result is written the way DequantizeLinear reads it:
a scalar scale, a per-axis vector (groups of channels repeat their scale), or a blocked scale
(`block_size`, opset 21) whose shape is the weight's with the input axis divided by B.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxq.layer_settings import Granularity, RangeRule
from onnxq.quant import primitives as P

COARSE_RATIOS = np.linspace(0.05, 1.0, 39)  # clipping ratio of the observed range, step 0.025
FINE_STEPS = np.linspace(-0.025, 0.025, 11)


@dataclass(frozen=True)
class WeightLayout:
    """Which weight axes index output and input channels (Conv: 0 and 1, MatMul: 1 and 0)."""

    out_axis: int
    in_axis: int


@dataclass(frozen=True)
class QuantizedWeight:
    """Integers and the DequantizeLinear parameters that turn them back into floats."""

    integers: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    block_size: int | None
    target: P.IntRange

    def dequantize(self) -> np.ndarray:
        """DequantizeLinear as the ONNX specification defines it, blocked scales included."""
        if not self.block_size:
            return P.dequantize(self.integers, self.scale, self.zero_point, self.axis)
        length = self.integers.shape[self.axis]

        def per_element(param: np.ndarray) -> np.ndarray:
            return np.repeat(param, self.block_size, axis=self.axis).take(range(length), axis=self.axis)

        return P.dequantize(self.integers, per_element(self.scale), per_element(self.zero_point))

    def element_params(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, zero point) of every element, in the weight's shape: what learned rounding
        divides by (it keeps each group's scale and chooses the integers anew)."""
        if not self.block_size:
            scale = P.broadcast(self.scale, self.integers.ndim, self.axis)
            zero = P.broadcast(self.zero_point, self.integers.ndim, self.axis)
        else:
            length = self.integers.shape[self.axis]
            scale, zero = (
                np.repeat(p, self.block_size, axis=self.axis).take(range(length), axis=self.axis)
                for p in (self.scale, self.zero_point)
            )
        shape = self.integers.shape
        return (
            np.broadcast_to(scale, shape).astype(np.float32),
            np.broadcast_to(zero, shape).astype(np.int64),
        )

    @property
    def per_output_channel_scale(self) -> np.ndarray | None:
        """One scale per output channel (or one for all), as a bias at s_in·s_w needs; else None."""
        return None if self.block_size else self.scale


@dataclass(frozen=True)
class GroupRanges:
    """Each scale group's range before any ratio, and each element's group: what every ratio
    the search tries for one weight shares (grouping the elements took a tenth of a ResNet-50
    weight search when redone per ratio)."""

    low: np.ndarray
    high: np.ndarray
    index: np.ndarray


def group_ranges(
    weight: np.ndarray, layout: WeightLayout, granularity: Granularity, rule: RangeRule, target: P.IntRange
) -> GroupRanges:
    rows, index = _group_rows(weight.astype(np.float32), layout, granularity)
    return GroupRanges(*_clip_ranges(rows, rule, target), index)


def quantize_weight(
    weight: np.ndarray,
    layout: WeightLayout,
    granularity: Granularity,
    rule: RangeRule,
    target: P.IntRange,
    ratios: np.ndarray | None = None,
    ranges: GroupRanges | None = None,
) -> QuantizedWeight:
    """Quantize a float weight: symmetric when `target` is signed, else with a zero point per group.

    `ratios` (one per scale group) shrinks each group's range further: the calibration search
    picks them by the error the layer's output shows. `ranges`: group_ranges of these
    arguments, where already known.
    """
    weight = weight.astype(np.float32)
    ranges = ranges or group_ranges(weight, layout, granularity, rule, target)
    low, high, index = ranges.low, ranges.high, ranges.index
    if ratios is not None:
        low, high = low * ratios, high * ratios
    scale, zero_point = _group_params(low, high, target)
    element_scale, element_zero = scale[index], zero_point[index]
    integers = np.clip(np.rint(weight / element_scale) + element_zero, target.qmin, target.qmax)
    integers = integers.astype(target.dtype)
    return _onnx_form(integers, element_scale, element_zero, layout, granularity, target)


# ----------------------------------------------------------------------------- scale groups


def group_membership(weight: np.ndarray, layout: WeightLayout, granularity: Granularity) -> np.ndarray:
    """(groups, output channels) boolean: which output channels each scale group touches.

    A per-channel loss summed through it gives each group's loss (a block group takes its
    channel's loss, so all blocks of a channel pick the same ratio).
    """
    _, index = _group_rows(weight, layout, granularity)
    channels = np.moveaxis(index, layout.out_axis, 0).reshape(weight.shape[layout.out_axis], -1)
    membership = np.zeros((int(index.max()) + 1, channels.shape[0]), bool)
    for channel, groups in enumerate(channels):
        membership[np.unique(groups), channel] = True
    return membership


def _group_rows(
    weight: np.ndarray, layout: WeightLayout, granularity: Granularity
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, index): one NaN-padded row of values per scale group, and each element's group."""
    out_channels = weight.shape[layout.out_axis]
    out_index = _along(np.arange(out_channels), layout.out_axis, weight.shape)
    if granularity.kind == "tensor":
        index = np.zeros(weight.shape, np.int64)
    elif granularity.kind == "channel":
        index = out_index
    elif granularity.kind == "group":
        index = out_index // granularity.size
    else:
        blocks = -(-weight.shape[layout.in_axis] // granularity.size)
        in_index = _along(np.arange(weight.shape[layout.in_axis]), layout.in_axis, weight.shape)
        index = out_index * blocks + in_index // granularity.size
    flat_index, flat = index.reshape(-1), weight.reshape(-1).astype(np.float64)
    order = np.argsort(flat_index, kind="stable")
    counts = np.bincount(flat_index)
    rows = np.full((len(counts), counts.max()), np.nan)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(flat.size) - np.repeat(starts, counts)
    rows[flat_index[order], position] = flat[order]
    return rows, index


def _along(values: np.ndarray, axis: int, shape: tuple[int, ...]) -> np.ndarray:
    view = [1] * len(shape)
    view[axis] = -1
    return np.broadcast_to(values.reshape(view), shape)


# ----------------------------------------------------------------------------- range rules


def _clip_ranges(rows: np.ndarray, rule: RangeRule, target: P.IntRange) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) per row: the range the group's scale must cover."""
    symmetric = target.signed_type
    low, high = np.nanmin(rows, axis=1), np.nanmax(rows, axis=1)
    if symmetric:
        high = np.maximum(np.abs(low), np.abs(high))
        low = -high
    if rule.kind in ("minmax", "output"):  # output: the search scales min-max by its ratios
        return low, high
    if rule.kind == "percentile":
        if symmetric:
            high = np.nanpercentile(np.abs(rows), rule.value, axis=1)
            return -high, high
        return np.nanpercentile(rows, 100 - rule.value, axis=1), np.nanpercentile(rows, rule.value, axis=1)
    if rule.kind == "scaleclip":
        factor = rule.clip_factor(target.bits)
        if not factor:
            return low, high
        alpha = factor * np.nanmean(np.abs(rows), axis=1)
        return np.maximum(low, -alpha), np.minimum(high, alpha)
    return _search_ratio(rows, low, high, target, squared=rule.kind == "mse")


def _search_ratio(rows, low, high, target, *, squared: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ratio r of the observed range minimising the rows' quantization error.

    A coarse grid over (0.05, 1], then a fine one around each row's best.
    """
    best = _best_ratio(rows, low, high, target, COARSE_RATIOS[None, :], squared)
    fine = np.clip(best[:, None] + FINE_STEPS[None, :], 0.01, 1.0)
    best = _best_ratio(rows, low, high, target, fine, squared)
    return low * best, high * best


def _best_ratio(rows, low, high, target, ratios: np.ndarray, squared: bool) -> np.ndarray:
    ratios = np.broadcast_to(ratios, (rows.shape[0], ratios.shape[1]))
    errors = np.empty(ratios.shape)
    for k in range(ratios.shape[1]):
        scale, zero_point = _group_params(low * ratios[:, k], high * ratios[:, k], target)
        q = np.clip(np.rint(rows / scale[:, None]) + zero_point[:, None], target.qmin, target.qmax)
        difference = (q - zero_point[:, None]) * scale[:, None] - rows
        errors[:, k] = np.nansum(difference**2 if squared else np.abs(difference), axis=1)
    return ratios[np.arange(rows.shape[0]), errors.argmin(axis=1)]


# ----------------------------------------------------------------------------- parameters


def _group_params(low: np.ndarray, high: np.ndarray, target: P.IntRange) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per group: symmetric for a signed target, else affine holding 0."""
    if target.signed_type:
        scale = P.symmetric_scale(np.maximum(np.abs(low), np.abs(high)), target)
        return scale, np.zeros(scale.shape, np.int64)
    low, high = np.minimum(low, 0.0), np.maximum(high, 0.0)
    scale = ((high - low) / (target.qmax - target.qmin)).astype(np.float32)
    degenerate = scale < np.finfo(np.float32).tiny
    scale = np.where(degenerate, np.float32(1.0), scale).astype(np.float32)
    zero_point = np.clip(np.rint(target.qmin - low / scale), target.qmin, target.qmax).astype(np.int64)
    return scale, np.where(degenerate, target.qmin, zero_point)


def _onnx_form(integers, element_scale, element_zero, layout, granularity, target) -> QuantizedWeight:
    """The scale and zero point in the shape DequantizeLinear expects for this granularity."""
    zero_type = target.dtype
    if granularity.kind == "tensor":
        return QuantizedWeight(
            integers,
            np.asarray(element_scale.reshape(-1)[0], np.float32),
            np.asarray(element_zero.reshape(-1)[0], zero_type),
            None,
            None,
            target,
        )
    if granularity.kind in ("channel", "group"):
        first = [0] * integers.ndim
        first[layout.out_axis] = slice(None)
        return QuantizedWeight(
            integers,
            np.ascontiguousarray(element_scale[tuple(first)], np.float32),
            np.ascontiguousarray(element_zero[tuple(first)]).astype(zero_type),
            layout.out_axis,
            None,
            target,
        )
    starts = [slice(None)] * integers.ndim
    starts[layout.in_axis] = slice(None, None, granularity.size)
    return QuantizedWeight(
        integers,
        np.ascontiguousarray(element_scale[tuple(starts)], np.float32),
        np.ascontiguousarray(element_zero[tuple(starts)]).astype(zero_type),
        layout.in_axis,
        granularity.size,
        target,
    )
