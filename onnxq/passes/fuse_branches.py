"""Merge re-parameterized branches (RepVGG, MobileOne, ACNet, DBB) into one Conv, exactly.

A re-parameterizable block sums, with Add (or Sum) nodes in any order and nesting, branches that
all read the same tensor x. Each branch is a chain of linear maps of x, and each map is a
convolution: Conv itself; BatchNormalization, a per-channel Mul/Add/Sub/Div by a constant and
Identity are channel-wise 1x1 convolutions; AveragePool is a channel-wise k x k convolution with
weights 1/k²; the bare x is the identity kernel. So a branch is y_b = W_b * x + b_b and the block is

    Σ_b (W_b * x + b_b) = (Σ_b W_b') * x + Σ_b b_b

where W_b' is W_b zero-padded to the largest kernel at the offset that keeps every tap on the
same input pixel: with pads p_b and dilation d, offset o_b = (P − p_b) / d for the merged pad P.
Two maps in a chain compose into one convolution exactly when one of them is 1x1 with stride 1
and no padding (and, when the second one pads, the first adds no bias: a padded border would see
the bias, not zero). This covers the sequential 1x1 → k x k branch of DBB and its 1x1 → average
pool branch.

What cannot be merged exactly is refused and reported with the reason: a branch output read
elsewhere, different strides, dilations or groups, padding that would move the border, weights
shared with other nodes. The activation after the sum is left where it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from onnxq.passes.graph_utils import attribute, constant, drop_unused_initializers, set_initializer

SUM_OPS = ("Add", "Sum")
CHANNEL_OPS = ("BatchNormalization", "Mul", "Add", "Sub", "Div", "Identity")


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


@dataclass
class Branch:
    root: ir.Value
    nodes: list[ir.Node]  # from the root to the summed value
    leaf: ir.Value


@dataclass
class MergedBlock:
    output: str  # the summed tensor, now the merged Conv's output
    branches: list[str]
    parameters_before: int
    parameters_after: int
    conv: str  # the merged Conv node


@dataclass
class FuseReport:
    merged: list[MergedBlock] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def branches_merged(self) -> int:
        return sum(len(block.branches) for block in self.merged)


def fuse_branches(graph: ir.Graph) -> FuseReport:
    """Merge every re-parameterizable block of `graph` in place; returns what was merged and refused."""
    report = FuseReport()
    while True:
        # A merge touches only its own tree and branch nodes, so the other trees found before it
        # stay valid; a tree with several mergeable groups is merged one group per pass.
        merged = [block for top in _sum_trees(graph) if (block := _fuse_tree(graph, top, report))]
        report.merged += merged
        if not merged:
            break
    drop_unused_initializers(graph)
    return report


# ----------------------------------------------------------------------------- finding blocks


def _is_sum(node: ir.Node) -> bool:
    if node.op_type not in SUM_OPS or node.domain != "":
        return False
    return all(v is not None and constant(v) is None for v in node.inputs) or node.op_type == "Sum"


def _sum_trees(graph: ir.Graph) -> list[ir.Node]:
    """The top node of every tree of Adds: a sum whose result is not summed again alone."""
    return [n for n in graph if _is_sum(n) and _parent_sum(n) is None]


def _parent_sum(node: ir.Node) -> ir.Node | None:
    output = node.outputs[0]
    if output.is_graph_output() or len(output.uses()) != 1:
        return None
    consumer = output.consumers()[0]
    return consumer if _is_sum(consumer) else None


def _tree(top: ir.Node) -> tuple[list[ir.Node], list[ir.Value]]:
    """The sum nodes of the tree under `top` and the values they add (its leaves)."""
    nodes, leaves, pending = [], [], [top]
    while pending:
        node = pending.pop()
        nodes.append(node)
        for value in node.inputs:
            producer = value.producer()
            if producer is not None and _is_sum(producer) and _parent_sum(producer) is node:
                pending.append(producer)
            else:
                leaves.append(value)
    return nodes, leaves


def _trace(leaf: ir.Value) -> Branch:
    """Walk up from a summed value through single-use linear nodes; the root is where it stops."""
    nodes: list[ir.Node] = []
    value = leaf
    while len(value.uses()) == 1 and not value.is_graph_output() and not value.is_graph_input():
        node = value.producer()
        data = _linear_input(node) if node is not None else None
        if data is None:
            break
        nodes.append(node)
        value = data
    return Branch(value, nodes[::-1], leaf)


def _linear_input(node: ir.Node) -> ir.Value | None:
    """The data input of a node that is a linear map of it (Conv, BN, AveragePool, ...), else None."""
    if node.domain != "" or len(node.outputs) != 1:
        return None
    if node.op_type in ("Conv", "BatchNormalization", "AveragePool", "Identity"):
        return node.inputs[0]
    if node.op_type in ("Mul", "Add", "Sub", "Div") and len(node.inputs) == 2:
        constants = [constant(v) is not None for v in node.inputs]
        if constants == [False, True]:
            return node.inputs[0]
        if constants == [True, False] and node.op_type in ("Mul", "Add"):
            return node.inputs[1]
    return None


# ----------------------------------------------------------------------------- nodes as linear maps


def _as_map(node: ir.Node, channels: int, rank: int) -> LinearMap:
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
    per_channel = _per_channel(operand, channels, rank, f"{node.op_type} {node.name!r}")
    if node.op_type == "Mul":
        return per_channel, np.zeros(channels)
    if node.op_type == "Div":
        return 1.0 / per_channel, np.zeros(channels)
    sign = -1.0 if node.op_type == "Sub" else 1.0
    return np.ones(channels), sign * per_channel


def _per_channel(array: np.ndarray, channels: int, rank: int, what: str) -> np.ndarray:
    """A constant that broadcasts along channels only (scalar, [C,1,1] or [1,C,1,1]) as a [C] vector."""
    if array.size == 1:
        return np.full(channels, float(array.reshape(-1)[0]))
    shape = array.shape[1:] if array.ndim == rank + 2 and array.shape[0] == 1 else array.shape
    if len(shape) != rank + 1 or shape[0] != channels or any(s != 1 for s in shape[1:]):
        raise Refused(f"{what} is not a per-channel constant (shape {list(array.shape)})")
    return array.reshape(-1).astype(np.float64)


# ----------------------------------------------------------------------------- composing maps


def _compose(first: LinearMap, second: LinearMap) -> LinearMap:
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


def _sum_maps(maps: list[LinearMap]) -> LinearMap:
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


# ----------------------------------------------------------------------------- rewriting


def _fuse_tree(graph: ir.Graph, top: ir.Node, report: FuseReport) -> MergedBlock | None:
    """Merge the branches of one sum tree that share a root; None when nothing was merged."""
    sums, leaves = _tree(top)
    constants = [v for v in leaves if constant(v) is not None]
    branches = [_trace(v) for v in leaves if constant(v) is None]
    groups: dict[int, list[Branch]] = {}
    for branch in branches:
        groups.setdefault(id(branch.root), []).append(branch)
    for group in groups.values():
        if len(group) < 2 or not any(n.op_type == "Conv" for b in group for n in b.nodes):
            continue
        merged = _merge_group(graph, top, sums, group, constants, branches, report)
        if merged is not None:
            return merged
    _note_tapped_branches(branches, report, top)
    return None


def _merge_group(graph, top, sums, group, constants, branches, report) -> MergedBlock | None:
    name = top.outputs[0].name
    try:
        channels, rank = _input_layout(group)
    except Refused as why:
        report.refused[name] = str(why)
        return None
    maps, kept = [], []
    for branch in group:
        try:
            maps.append(_chain_map(branch, channels, rank))
            kept.append(branch)
        except Refused as why:
            report.refused[f"{name} <- {_describe(branch)}"] = str(why)
    if len(kept) < 2 or not any(n.op_type == "Conv" for b in kept for n in b.nodes):
        return None
    try:
        merged = _sum_maps(maps)
    except Refused as why:
        report.refused[name] = str(why)
        return None
    absorbed, bias = [], merged.bias
    for value in constants:
        try:
            bias = bias + _per_channel(constant(value), merged.out_channels, rank, "")
            absorbed.append(value)
        except Refused:
            pass
    conv = _insert_conv(graph, top, kept[0].root, replace(merged, bias=bias))
    remaining = [b.leaf for b in branches if b not in kept] + [v for v in constants if v not in absorbed]
    _replace_sum(graph, top, sums, [conv.outputs[0], *remaining])
    removed = [n for b in kept for n in reversed(b.nodes)]
    block = MergedBlock(
        name,
        [_describe(b) for b in kept],
        sum(_parameters(n) for n in removed),
        merged.weight.size + merged.bias.size,
        conv.name,
    )
    graph.remove(removed, safe=True)
    return block


def _input_layout(group: list[Branch]) -> tuple[int, int]:
    """(channels, spatial rank) of the branches' shared input.

    The channel count comes from the input's shape, or else from a branch that starts with a
    Conv (C_in = weight.shape[1] · group) or a BatchNormalization (its scale's length); the rank
    from any Conv's weight.
    """
    convs = [n for b in group for n in b.nodes if n.op_type == "Conv" and constant(n.inputs[1]) is not None]
    if not convs:
        raise Refused("no Conv with constant weights among the branches")
    rank = constant(convs[0].inputs[1]).ndim - 2
    shape = group[0].root.shape
    if shape is not None and len(shape) == rank + 2 and isinstance(shape[1], int):
        return shape[1], rank
    for first in (b.nodes[0] for b in group if b.nodes):
        parameter = constant(first.inputs[1]) if len(first.inputs) > 1 else None
        if parameter is not None and first.op_type == "Conv":
            return parameter.shape[1] * attribute(first, "group", 1), rank
        if parameter is not None and first.op_type == "BatchNormalization":
            return parameter.size, rank
    raise Refused("the branches' input channel count is unknown")


def _chain_map(branch: Branch, channels: int, rank: int) -> LinearMap:
    """The branch's nodes composed into one LinearMap, starting from the identity."""
    result = LinearMap.channel_affine(np.ones(channels), np.zeros(channels), rank)
    for node in branch.nodes:
        result = _compose(result, _as_map(node, result.out_channels, rank))
    return result


def _insert_conv(graph: ir.Graph, top: ir.Node, root: ir.Value, merged: LinearMap) -> ir.Node:
    dtype = root.dtype.numpy() if root.dtype is not None else np.float32
    base = top.name or top.outputs[0].name
    weight = set_initializer(graph, f"{base}.fused.weight", merged.weight.astype(dtype))
    bias_value = set_initializer(graph, f"{base}.fused.bias", merged.bias.astype(dtype))
    node = ir.node(
        "Conv",
        [root, weight, bias_value],
        attributes={
            "group": merged.groups,
            "kernel_shape": list(merged.kernel),
            "strides": list(merged.strides),
            "pads": list(merged.pads),
            "dilations": list(merged.dilations),
        },
        name=f"{base}.fused",
    )
    _copy_type(top.outputs[0], node.outputs[0])
    graph.insert_before(top, node)
    return node


def _replace_sum(graph: ir.Graph, top: ir.Node, sums: list[ir.Node], terms: list[ir.Value]) -> None:
    """Replace the sum tree under `top` by a left-to-right chain of Adds of `terms`."""
    result = terms[0]
    for index, term in enumerate(terms[1:]):
        add = ir.node("Add", [result, term], name=f"{top.name or 'sum'}.{index}")
        _copy_type(top.outputs[0], add.outputs[0])
        graph.insert_before(top, add)
        result = add.outputs[0]
    old = top.outputs[0]
    ir.convenience.replace_all_uses_with(old, result, replace_graph_outputs=True)
    graph.remove(sums, safe=True)
    result.name = old.name


def _copy_type(source: ir.Value, target: ir.Value) -> None:
    """Give `target` the type and shape `source` has, where known."""
    if source.type is not None and source.dtype is not None:
        target.type = source.type
    if source.shape is not None:
        target.shape = source.shape


def _note_tapped_branches(branches: list[Branch], report: FuseReport, top: ir.Node) -> None:
    """Say why a branch whose output is also read elsewhere was not merged with its siblings."""
    roots = {id(b.root) for b in branches}
    for branch in branches:
        producer = branch.leaf.producer()
        data = _linear_input(producer) if producer is not None and not branch.nodes else None
        if data is not None and len(branch.leaf.uses()) > 1 and id(_trace(data).root) in roots:
            report.refused[f"{top.outputs[0].name} <- {branch.leaf.name}"] = (
                f"branch output {branch.leaf.name!r} is read elsewhere"
            )


def _describe(branch: Branch) -> str:
    if not branch.nodes:
        return "identity"
    parts = []
    for node in branch.nodes:
        if node.op_type == "Conv":
            kernel = "x".join(str(k) for k in (constant(node.inputs[1]).shape[2:]))
            group = attribute(node, "group", 1)
            parts.append(f"{kernel} Conv" + (f"/g{group}" if group > 1 else ""))
        else:
            parts.append(node.op_type)
    return " -> ".join(parts)


def _parameters(node: ir.Node) -> int:
    return sum(constant(v).size for v in node.inputs[1:] if v is not None and constant(v) is not None)
