"""Fuse hard-swish and hard-sigmoid written op by op into the single ONNX ops.

Exporters without a HardSwish op of their own write it out: paddle2onnx as x·Clip(x + 3, 0, 6) / 6
(four elementwise passes after every conv of PP-LCNet, PP-PicoDet and PP-OCR), torch before
opset 14 as x·HardSigmoid(x). onnxruntime runs each pass over the whole tensor, outside the
blocked layout its convs use: on PP-PicoDet the four took about a third of the float model's
time, and the layout conversions around them another fifth (float 89.7 → 61.9 ms at batch 1
once fused). One node computes the same values to float rounding:
    Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6), or ·(1/6)  → HardSwish(x)
    Mul(x, HardSigmoid(x, α = 1/6, β = 1/2))           → HardSwish(x)
    Div(Clip(Add(x, 3), 0, 6), 6), or ·(1/6)           → HardSigmoid(x, α = 1/6, β = 1/2)
It also tells the planner what the tensor feeds: a conv output only HardSwish reads keeps no
range below -3 (quant.plan). HardSwish needs opset 14 (`needs_opset` says when a model below it
has one to fuse). A step whose output is read anywhere else is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.passes.graph_utils import (
    attribute,
    bypass,
    clip_bounds,
    constant,
    drop_unused_initializers,
    single_consumer,
)

SIXTH = 1.0 / 6.0
HARD_SWISH_OPSET = 14
TOLERANCE = 1e-6  # relative: float32 exports write 1/6 as 0.16666667


@dataclass
class Match:
    """An op-by-op activation: its input, its ops (the last writes its output), what it becomes."""

    x: ir.Value
    ops: list[ir.Node]  # first to last
    op_type: str  # HardSwish or HardSigmoid


def fuse_activations(graph: ir.Graph, opset: int) -> int:
    """Replace every op-by-op hard-swish (opset ≥ 14) and hard-sigmoid; returns how many."""
    fused = 0
    for node in list(graph):
        if node.graph is None:  # removed with an earlier match
            continue
        match = match_activation(node, hard_swish=opset >= HARD_SWISH_OPSET)
        if match is not None:
            _replace(graph, match)
            fused += 1
    if fused:
        drop_unused_initializers(graph)
    return fused


def needs_opset(graph: ir.Graph, opset: int) -> int | None:
    """HARD_SWISH_OPSET where the graph, below it, holds a hard-swish to fuse; else None."""
    if opset >= HARD_SWISH_OPSET:
        return None
    found = any(_match_hard_swish(node) is not None for node in graph)
    return HARD_SWISH_OPSET if found else None


def match_activation(node: ir.Node, hard_swish: bool = True) -> Match | None:
    """The op-by-op activation `node` ends, if any."""
    return (_match_hard_swish(node) if hard_swish else None) or _match_hard_sigmoid(node)


def _match_hard_swish(node: ir.Node) -> Match | None:
    """Mul(x, HardSigmoid(x, 1/6, 1/2)), or Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)."""
    if node.domain != "" or len(node.inputs) != 2:
        return None
    if node.op_type == "Mul":
        for gate_index in (0, 1):
            gate = node.inputs[gate_index].producer() if node.inputs[gate_index] is not None else None
            x = node.inputs[1 - gate_index]
            if _is_sixth_hard_sigmoid(gate, x) and single_consumer(gate.outputs[0]) is node:
                return Match(x, [gate, node], "HardSwish")
    if not _scales_by_sixth(node):
        return None
    product = node.inputs[0].producer()
    if product is None or product.op_type != "Mul" or product.domain != "" or len(product.inputs) != 2:
        return None
    if single_consumer(product.outputs[0]) is not node:
        return None
    for gate_index in (0, 1):
        clip = product.inputs[gate_index].producer() if product.inputs[gate_index] is not None else None
        x = product.inputs[1 - gate_index]
        if _relu6_input(clip) is x and single_consumer(clip.outputs[0]) is product:
            return Match(x, [clip.inputs[0].producer(), clip, product, node], "HardSwish")
    return None


def _match_hard_sigmoid(node: ir.Node) -> Match | None:
    """Div(Clip(Add(x, 3), 0, 6), 6) or Mul(…, 1/6)."""
    if not _scales_by_sixth(node):
        return None
    clip = node.inputs[0].producer()
    x = _relu6_input(clip)
    if x is None or single_consumer(clip.outputs[0]) is not node:
        return None
    return Match(x, [clip.inputs[0].producer(), clip, node], "HardSigmoid")


def _replace(graph: ir.Graph, match: Match) -> None:
    """One node for the match's ops, placed where the first was, writing the last one's output."""
    first, last = match.ops[0], match.ops[-1]
    name = f"{last.name}_{match.op_type}" if last.name else None
    attributes = []
    if match.op_type == "HardSigmoid":
        attributes = [ir.AttrFloat32("alpha", SIXTH), ir.AttrFloat32("beta", 0.5)]
    fused = ir.Node("", match.op_type, inputs=[match.x], attributes=attributes, name=name)
    output = last.outputs[0]
    fused.outputs[0].shape, fused.outputs[0].type = output.shape, output.type
    graph.insert_before(first, fused)
    bypass(graph, last, fused.outputs[0])
    for node in reversed(match.ops[:-1]):
        graph.remove(node, safe=True)


def _scales_by_sixth(node: ir.Node) -> bool:
    """Div(y, 6) or Mul(y, 1/6), the constant second."""
    if node.domain != "" or node.op_type not in ("Div", "Mul") or len(node.inputs) != 2:
        return False
    wanted = 6.0 if node.op_type == "Div" else SIXTH
    return node.inputs[0] is not None and _is_scalar(node.inputs[1], wanted)


def _relu6_input(clip: ir.Node | None) -> ir.Value | None:
    """x of Clip(Add(x, 3), 0, 6), the Add read only by the Clip; else None."""
    if (
        clip is None
        or clip.op_type != "Clip"
        or clip.domain != ""
        or not clip.inputs
        or clip.inputs[0] is None
    ):
        return None
    low, high = clip_bounds(clip)
    if low is None or high is None or abs(low) > TOLERANCE or abs(high - 6.0) > 6.0 * TOLERANCE:
        return None
    add = clip.inputs[0].producer()
    if add is None or add.op_type != "Add" or add.domain != "" or single_consumer(add.outputs[0]) is not clip:
        return None
    return _shifted_by_three(add)


def _shifted_by_three(add: ir.Node) -> ir.Value | None:
    """x of Add(x, 3) or Add(3, x)."""
    if len(add.inputs) != 2:
        return None
    for index in (0, 1):
        if add.inputs[index] is not None and _is_scalar(add.inputs[1 - index], 3.0):
            return add.inputs[index]
    return None


def _is_sixth_hard_sigmoid(node: ir.Node | None, x: ir.Value) -> bool:
    """HardSigmoid(x, α = 1/6, β = 1/2)."""
    if node is None or node.op_type != "HardSigmoid" or node.domain != "" or node.inputs[0] is not x:
        return False
    alpha, beta = attribute(node, "alpha", 0.2), attribute(node, "beta", 0.5)
    return abs(alpha - SIXTH) <= SIXTH * TOLERANCE * 10 and abs(beta - 0.5) <= TOLERANCE


def _is_scalar(value: ir.Value | None, wanted: float) -> bool:
    """A float constant holding one value, `wanted` to float32 rounding."""
    array = constant(value)
    if array is None or array.size != 1 or not np.issubdtype(array.dtype, np.floating):
        return False
    return abs(float(array.reshape(())) - wanted) <= TOLERANCE * max(1.0, abs(wanted))
