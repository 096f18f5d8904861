"""Merge re-parameterized branches (RepVGG, MobileOne, ACNet, DBB) into one Conv, exactly.

A re-parameterizable block sums, with Add (or Sum) nodes in any order and nesting, branches that
all read the same tensor x. Each branch is a chain of Conv, BatchNormalization, per-channel
Mul/Add/Sub/Div by a constant, Identity and AveragePool nodes: a chain of linear maps, which
onnxq.passes.linear_maps composes and sums into one convolution (the algebra is there). This
module finds the blocks in the graph and rewrites each into that Conv. It covers the parallel
k x k / 1x1 / identity / average-pool branches and the sequential 1x1 → k x k branch of DBB.

What cannot be merged exactly is refused and reported with the reason: a branch output read
elsewhere, different strides, dilations or groups, padding that would move the border, weights
shared with other nodes. The activation after the sum is left where it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from onnxq.passes.graph_utils import attribute, constant, drop_unused_initializers, set_initializer
from onnxq.passes.linear_maps import LinearMap, Refused, as_map, compose, per_channel, sum_maps

SUM_OPS = ("Add", "Sum")


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
        merged = sum_maps(maps)
    except Refused as why:
        report.refused[name] = str(why)
        return None
    absorbed, bias = [], merged.bias
    for value in constants:
        try:
            bias = bias + per_channel(constant(value), merged.out_channels, rank, "")
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
        result = compose(result, as_map(node, result.out_channels, rank))
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
