"""Convolutions as linear maps: read from nodes, composed, summed, exactly.

A re-parameterized branch is a chain of linear maps of its input, and each map is a
convolution: Conv itself; BatchNormalization, a per-channel Mul/Add/Sub/Div by a constant and
Identity are channel-wise 1x1 convolutions; AveragePool is a channel-wise k x k convolution with
weights 1/k²; the bare input is the identity kernel. So a branch is y_b = W_b * x + b_b and a sum
of branches of one input is

    Σ_b (W_b * x + b_b) = (Σ_b W_b') * x + Σ_b b_b

where W_b' is W_b zero-padded to the largest kernel at the offset that keeps every tap on the
same input pixel: with pads p_b and dilation d, offset o_b = (P − p_b) / d for the merged pad P.
Two maps in a chain compose into one convolution exactly when one of them is 1x1 with stride 1
and no padding (and, when the second one pads, the first adds no bias: a padded border would see
the bias, not zero). What has no exact single convolution raises Refused with the reason.
Weights are float64 here; onnxq.passes.fuse_branches writes the result back at the model's type.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from onnxq.passes.graph_utils import attribute, constant


class Refused(Exception):
    """A branch or block cannot be merged exactly; the message says why."""


@dataclass(frozen=True)
class LinearMap:
    """y = W * x + b as a convolution over `rank` spatial dimensions.

    `weight` is (C_out, C_in / groups, *kernel); when `channelwise` it is (C, *kernel) instead and
    the map reads channel c only for output c, so it fits a convolution of any group count.
    """

    weight: np.ndarray
    bias: np.ndarray
    groups: int
    strides: tuple[int, ...]
    pads: tuple[int, ...]  # ONNX order: all begins, then all ends
    dilations: tuple[int, ...]
    channelwise: bool = False

    @classmethod
    def channel_affine(cls, scale: np.ndarray, shift: np.ndarray, rank: int) -> LinearMap:
        """y[c] = scale[c] · x[c] + shift[c]: a channel-wise 1x1 map."""
        ones = (1,) * rank
        return cls(scale.reshape(-1, *ones), shift, len(scale), ones, (0,) * 2 * rank, ones, True)

    @property
    def rank(self) -> int:
        return len(self.strides)

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[-self.rank :])

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def pointwise(self) -> bool:
        """1x1, stride 1, no padding: composes exactly with any neighbour."""
        return all(k == 1 for k in self.kernel) and all(s == 1 for s in self.strides) and not any(self.pads)

    def dense(self, groups: int) -> np.ndarray:
        """The weight as (C_out, C_out / groups, *kernel) for a convolution with `groups` groups."""
        if not self.channelwise:
            if groups != self.groups:
                raise Refused(f"different groups ({self.groups} and {groups})")
            return self.weight
        channels = self.out_channels
        per_group = channels // groups
        weight = np.zeros((channels, per_group, *self.kernel))
        weight[np.arange(channels), np.arange(channels) % per_group] = self.weight
        return weight


# ----------------------------------------------------------------------------- nodes as linear maps


def as_map(node: ir.Node, channels: int, rank: int) -> LinearMap:
    """The node as a LinearMap on a `channels`-channel input with `rank` spatial dimensions.

    Its constants are read, never changed: weights another node reads too (tied convs, or the
    ones and zeros of fresh BatchNorms that an exporter stored once for all of them) stay for
    that node."""
    if node.op_type == "Conv":
        return _conv_map(node, rank)
    if node.op_type == "AveragePool":
        return _average_pool_map(node, channels, rank)
    return LinearMap.channel_affine(*_channel_affine(node, channels, rank), rank)


def _conv_map(node: ir.Node, rank: int) -> LinearMap:
    weight = constant(node.inputs[1])
    if weight is None:
        raise Refused(f"Conv {node.name!r} has weights that are not constants")
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = constant(bias_value)
    if bias_value is not None and bias is None:
        raise Refused(f"Conv {node.name!r} has a bias that is not a constant")
    weight = weight.astype(np.float64)
    bias = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    return LinearMap(weight, bias, attribute(node, "group", 1), *_window(node, rank, weight.shape[2:]))


def _average_pool_map(node: ir.Node, channels: int, rank: int) -> LinearMap:
    kernel = tuple(attribute(node, "kernel_shape", ()))
    strides, pads, dilations = _window(node, rank, kernel)
    if attribute(node, "ceil_mode", 0):
        raise Refused(f"AveragePool {node.name!r} uses ceil_mode")
    if any(pads) and not attribute(node, "count_include_pad", 0):
        raise Refused(f"AveragePool {node.name!r} divides border windows by fewer pixels than a Conv")
    weight = np.full((channels, *kernel), 1.0 / np.prod(kernel))
    return LinearMap(weight, np.zeros(channels), channels, strides, pads, dilations, True)


def _window(node: ir.Node, rank: int, kernel) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    auto_pad = attribute(node, "auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        raise Refused(f"{node.op_type} {node.name!r} uses auto_pad={auto_pad}")
    strides = tuple(attribute(node, "strides", (1,) * rank))
    pads = tuple(attribute(node, "pads", (0,) * 2 * rank)) if auto_pad == "NOTSET" else (0,) * 2 * rank
    dilations = tuple(attribute(node, "dilations", (1,) * rank))
    if len(kernel) != rank:
        raise Refused(f"{node.op_type} {node.name!r} has {len(kernel)} spatial dimensions, not {rank}")
    return strides, pads, dilations


def _channel_affine(node: ir.Node, channels: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel of BatchNormalization or a Mul/Add/Sub/Div by a constant."""
    if node.op_type == "Identity":
        return np.ones(channels), np.zeros(channels)
    if node.op_type == "BatchNormalization":
        if attribute(node, "training_mode", 0):
            raise Refused(f"BatchNormalization {node.name!r} is in training mode")
        params = [constant(v) for v in node.inputs[1:5]]
        if any(p is None for p in params):
            raise Refused(f"BatchNormalization {node.name!r} has statistics that are not constants")
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + attribute(node, "epsilon", 1e-5))
        return scale, beta - mean * scale
    operand = next(array for array in map(constant, node.inputs) if array is not None)
    vector = per_channel(operand, channels, rank, f"{node.op_type} {node.name!r}")
    if node.op_type == "Mul":
        return vector, np.zeros(channels)
    if node.op_type == "Div":
        return 1.0 / vector, np.zeros(channels)
    sign = -1.0 if node.op_type == "Sub" else 1.0
    return np.ones(channels), sign * vector


def per_channel(array: np.ndarray, channels: int, rank: int, what: str) -> np.ndarray:
    """A constant that broadcasts along channels only (scalar, [C,1,1] or [1,C,1,1]) as a [C] vector."""
    if array.size == 1:
        return np.full(channels, float(array.reshape(-1)[0]))
    shape = array.shape[1:] if array.ndim == rank + 2 and array.shape[0] == 1 else array.shape
    if len(shape) != rank + 1 or shape[0] != channels or any(s != 1 for s in shape[1:]):
        raise Refused(f"{what} is not a per-channel constant (shape {list(array.shape)})")
    return array.reshape(-1).astype(np.float64)


# ----------------------------------------------------------------------------- composing maps


def compose(first: LinearMap, second: LinearMap) -> LinearMap:
    """The single convolution computing `second(first(x))`, when one exists exactly."""
    if second.pointwise:
        return _then_pointwise(first, second)
    if first.pointwise:
        if first.bias.any() and any(second.pads):
            raise Refused("a padded convolution after a biased one: the border would see the bias")
        return _pointwise_then(first, second)
    raise Refused("two consecutive spatial maps (neither is 1x1 with stride 1 and no padding)")


def _then_pointwise(first: LinearMap, second: LinearMap) -> LinearMap:
    """first, then a 1x1 map: mix first's output channels; the spatial taps are first's."""
    if second.channelwise:
        scale = second.weight.reshape(-1)
        weight = first.weight * scale.reshape(-1, *((1,) * (first.weight.ndim - 1)))
        return replace(first, weight=weight, bias=first.bias * scale + second.bias)
    groups = second.groups
    mixing = second.weight.reshape(second.out_channels, -1)  # (C_out, C_mid / groups)
    weight = _grouped_matmul(mixing, first.dense(groups), groups)
    bias = _grouped_matmul(mixing, first.bias[:, None], groups)[:, 0] + second.bias
    return LinearMap(weight, bias, groups, *_geometry(first))


def _pointwise_then(first: LinearMap, second: LinearMap) -> LinearMap:
    """A 1x1 map, then second: second's taps read first's mixed channels."""
    spatial = (None,) * second.rank
    if first.channelwise:
        scale, shift = first.weight.reshape(-1), first.bias
        if second.channelwise:
            flat = second.weight.reshape(second.out_channels, -1)
            bias = second.bias + shift * flat.sum(1)
            return replace(second, weight=second.weight * scale[(slice(None), *spatial)], bias=bias)
        channel = _input_channels(second.out_channels, second.weight.shape[1], second.groups)
        weight = second.weight * scale[channel][(..., *spatial)]
        shifted = second.weight * shift[channel][(..., *spatial)]
        bias = second.bias + shifted.reshape(second.out_channels, -1).sum(1)
        return replace(second, weight=weight, bias=bias)
    groups = first.groups
    outer = second.dense(groups)  # (C_out, C_mid / groups, *kernel)
    mixing = first.weight.reshape(first.out_channels, -1)  # (C_mid, C_in / groups)
    weight = _grouped_matmul(outer.swapaxes(0, 1), mixing, groups, outer_first=True)
    taps = outer.reshape(outer.shape[0], outer.shape[1], -1).sum(2)  # (C_out, C_mid / groups)
    bias = second.bias + _grouped_matmul(taps, first.bias[:, None], groups)[:, 0]
    return LinearMap(weight, bias, groups, *_geometry(second))


def _geometry(m: LinearMap) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    return m.strides, m.pads, m.dilations


def _input_channels(out_channels: int, in_per_group: int, groups: int) -> np.ndarray:
    """[C_out, C_in / groups] index of the global input channel each weight reads."""
    out_per_group = out_channels // groups
    group = np.arange(out_channels) // out_per_group
    return group[:, None] * in_per_group + np.arange(in_per_group)[None, :]


def _grouped_matmul(
    left: np.ndarray, right: np.ndarray, groups: int, *, outer_first: bool = False
) -> np.ndarray:
    """Per group g, contract left's group-local middle channels with right's rows of group g.

    left is (C_out, C_mid / groups) and right (C_mid, ...): the result is (C_out, ...).
    With `outer_first`, left is a spatial weight given as (C_mid / groups, C_out, *kernel) and
    right the 1x1 mixing (C_mid, C_in / groups): the result is (C_out, C_in / groups, *kernel).
    """
    if outer_first:
        out_per_group = left.shape[1] // groups
        mid_per_group = left.shape[0]
    else:
        out_per_group = left.shape[0] // groups
        mid_per_group = left.shape[1]
    parts = []
    for g in range(groups):
        mix = right[g * mid_per_group : (g + 1) * mid_per_group]
        if outer_first:
            taps = left[:, g * out_per_group : (g + 1) * out_per_group]
            parts.append(np.einsum("mo...,mi->oi...", taps, mix))
        else:
            rows = left[g * out_per_group : (g + 1) * out_per_group]
            parts.append(np.tensordot(rows, mix, axes=(1, 0)))
    return np.concatenate(parts, axis=0)


# ----------------------------------------------------------------------------- summing branches


def sum_maps(maps: list[LinearMap]) -> LinearMap:
    """One convolution computing the sum of `maps` applied to the same input."""
    rank = maps[0].rank
    spatial = [m for m in maps if any(k > 1 for k in m.kernel)]
    strides = {m.strides for m in maps}
    if len(strides) > 1:
        raise Refused(f"different strides {sorted(strides)}")
    dilations = {m.dilations for m in spatial} or {maps[0].dilations}
    if len(dilations) > 1:
        raise Refused(f"different dilations {sorted(dilations)}")
    (dilation,) = dilations
    group_counts = {m.groups for m in maps if not m.channelwise}
    if len(group_counts) > 1:
        raise Refused(f"different groups {sorted(group_counts)}")
    groups = group_counts.pop() if group_counts else maps[0].out_channels

    starts, begin, end, kernel = [], [], [], []
    for axis in range(rank):
        start = max(m.pads[axis] for m in maps)
        starts.append(start)
        offsets = []
        for m in maps:
            shift, remainder = divmod(start - m.pads[axis], dilation[axis])
            if remainder:
                raise Refused("padding would move the border (offsets are not whole taps)")
            offsets.append(shift)
        size = max(o + m.kernel[axis] for o, m in zip(offsets, maps, strict=True))
        extents = {m.pads[axis] + m.pads[axis + rank] - (m.kernel[axis] - 1) * dilation[axis] for m in maps}
        if len(extents) > 1:
            raise Refused("padding would change the border (branches cover different output sizes)")
        stop = extents.pop() - start + (size - 1) * dilation[axis]
        if stop < 0:
            raise Refused("padding would change the border (negative end padding)")
        begin.append(offsets)
        end.append(stop)
        kernel.append(size)

    out_channels = maps[0].out_channels
    dense = [m.dense(groups) for m in maps]
    weight = np.zeros((out_channels, dense[0].shape[1], *kernel))
    for index, w in enumerate(dense):
        window = tuple(
            slice(begin[axis][index], begin[axis][index] + w.shape[2 + axis]) for axis in range(rank)
        )
        weight[(slice(None), slice(None), *window)] += w
    bias = np.sum([m.bias for m in maps], axis=0)
    pads = (*starts, *end)
    return LinearMap(weight, bias, groups, maps[0].strides, pads, dilation)
