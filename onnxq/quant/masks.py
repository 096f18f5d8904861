"""Tensors no 8-bit range can hold: attention masks and what they are added to.

Transformers mask attention by adding -inf (or float32's lowest, or -1e9) to the scores before
the Softmax: Where(mask, 0, -inf), (1 − mask)·finfo.min, a causal ConstantOfShape(-inf). A range
spanning such values has an infinite or astronomically coarse step, so every real score rounds
to the same integer (or the scale is NaN). These tensors stay float; the Softmax after them
returns to a bounded range, and the MatMul before them is quantized as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxq.passes.graph_utils import attribute, constant

if TYPE_CHECKING:
    from onnxq.quant.plan import QuantPlan

UNBOUNDED = 1e9  # |values| from here on are masks, not activations
# their outputs are bounded again: a MaxPool over -inf padding takes the real values around it
BOUNDING_OPS = frozenset({"Softmax", "Sigmoid", "Tanh", "Erf", "MaxPool", "ReduceMax"})
# an infinite constant here bounds rather than fills: Max(x, -inf) is x (jax's softmax writes it)
BOUNDS_OPS = frozenset({"Max", "Min", "Clip"})
# a mask is the usual source; light Caffe2-style exports fill with ±1e9 sentinels as well
REASON = "reads or makes values of ±1e9 or beyond (a mask or a sentinel fill): no 8-bit range holds them"


def unbounded_tensors(graph: ir.Graph) -> set[str]:
    """Float tensors computed from a constant holding ±inf or values beyond ±UNBOUNDED that
    fills values (Where, Add, Mul, ConstantOfShape, Pad, ...), not one that bounds (Max, Clip)."""
    marked: set[str] = set()
    for node in graph:  # topological order
        if node.op_type in BOUNDING_OPS and node.domain == "":
            continue
        sources = [v for v in node.inputs if v is not None]
        filled = node.op_type not in BOUNDS_OPS and any(_huge(constant(v)) for v in sources)
        if filled or any(v.name in marked for v in sources) or _huge_fill(node):
            marked.update(v.name for v in node.outputs if _floating(v))
    return marked


def is_unbounded(low: float, high: float) -> bool:
    """An observed range that reaches a mask's values."""
    return not (abs(low) < UNBOUNDED and abs(high) < UNBOUNDED)


def _huge(array: np.ndarray | None) -> bool:
    if array is None or array.dtype.kind != "f" or not array.size:
        return False
    return bool(not np.isfinite(array).all() or np.abs(array).max() >= UNBOUNDED)


def _huge_fill(node: ir.Node) -> bool:
    """ConstantOfShape(value=-inf): a causal mask's fill."""
    if node.op_type != "ConstantOfShape":
        return False
    value = attribute(node, "value", None)
    return value is not None and _huge(value.numpy())


def _floating(value: ir.Value) -> bool:
    return value.dtype is None or value.dtype.is_floating_point()


def observed_unbounded(
    graph: ir.Graph, plan: QuantPlan, ranges: dict[str, tuple[float, float]]
) -> dict[str, str]:
    """Quantized nodes that read or make a tensor whose observed range reaches a mask's values
    (an additive mask given as a model input, which no constant reveals) → why they stay float."""
    tensors = {
        name
        for name, spec in plan.activations.items()
        if spec.observed in ranges and is_unbounded(*ranges[spec.observed])
    }
    tensors |= {name for name in plan.activations if plan.root(name) in tensors}
    quantized = set(plan.quantized_nodes)
    return {
        node.name: REASON
        for node in graph
        if node.name in quantized
        and any(v is not None and v.name in tensors for v in (*node.inputs, *node.outputs))
    }
