"""Pieces of a constant split into a sequence (SplitToSequence → SequenceAt) written as constants.

torch's dynamo exporter without its optimizer writes nn.MultiheadAttention's packed projection
as SplitToSequence(in_proj_weight) and picks q, k and v by SequenceAt. onnxsim folds no sequence
op, so those weights stayed run-time values and their MatMuls float (a DETR-style decoder's
cross-attention kept 4 of its projections float). Where the split tensor, its sizes and the
position are constants, each picked piece becomes an initializer; the split goes once nothing
reads it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def fold_constant_sequences(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """`model` with every SequenceAt of a constant SplitToSequence replaced by its piece, and a
    note; the model itself when there is none."""
    graph = model.graph
    if not any(node.op_type == "SequenceAt" for node in graph.node):
        return model, None
    constants = _constants(graph)
    producers = {output: node for node in graph.node for output in node.output}
    pieces: dict[str, np.ndarray] = {}
    for node in graph.node:
        split = producers.get(node.input[0]) if node.op_type == "SequenceAt" else None
        if split is not None and split.op_type == "SplitToSequence" and not node.domain and not split.domain:
            piece = _piece(split, node, constants)
            if piece is not None:
                pieces[node.output[0]] = piece
    if not pieces:
        return model, None
    result = onnx.ModelProto()
    result.CopyFrom(model)
    kept = [n for n in result.graph.node if n.op_type != "SequenceAt" or n.output[0] not in pieces]
    read = {name for node in kept for name in node.input} | {o.name for o in result.graph.output}
    kept = [node for node in kept if node.op_type != "SplitToSequence" or node.output[0] in read]
    del result.graph.node[:]
    result.graph.node.extend(kept)
    result.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in pieces.items())
    return result, f"wrote {len(pieces)} pieces of constant tensors split into sequences as constants"


def _piece(split: onnx.NodeProto, pick: onnx.NodeProto, constants: dict) -> np.ndarray | None:
    """SequenceAt(SplitToSequence(tensor, sizes), position) computed, where all three are known."""
    sized = len(split.input) > 1 and bool(split.input[1])
    position = _value(constants, pick.input[1])
    sizes = _value(constants, split.input[1]) if sized else None
    if position is None or (sized and sizes is None):
        return None
    tensor = _value(constants, split.input[0])
    if tensor is None:
        return None
    attributes = {a.name: helper.get_attribute_value(a) for a in split.attribute}
    axis = attributes.get("axis", 0) % tensor.ndim
    length = tensor.shape[axis]
    if sizes is None:  # pieces of 1, the axis dropped unless keepdims
        bounds = [(i, i + 1) for i in range(length)]
    elif sizes.ndim == 0:  # pieces of `sizes`, the last one shorter
        step = int(sizes)
        bounds = [(start, min(start + step, length)) for start in range(0, length, step)]
    else:
        ends = np.cumsum(sizes.astype(np.int64))
        bounds = list(zip([0, *ends[:-1].tolist()], ends.tolist(), strict=True))
    index = int(position)
    if not -len(bounds) <= index < len(bounds):
        return None
    start, stop = bounds[index]
    piece = np.take(tensor, np.arange(start, stop), axis=axis)
    if sizes is None and not attributes.get("keepdims", 1):
        piece = np.squeeze(piece, axis=axis)
    return np.ascontiguousarray(piece)


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto | onnx.AttributeProto]:
    """Initializers and Constant nodes' values by name, unconverted: only the few a split reads
    are turned into arrays (`_value`)."""
    values: dict[str, onnx.TensorProto | onnx.AttributeProto] = {t.name: t for t in graph.initializer}
    for node in graph.node:
        named = node.attribute[0].name if len(node.attribute) == 1 else None
        if node.op_type == "Constant" and not node.domain and named in ("value", "value_int", "value_ints"):
            values[node.output[0]] = node.attribute[0]
    return values


def _value(constants: dict[str, onnx.TensorProto | onnx.AttributeProto], name: str) -> np.ndarray | None:
    found = constants.get(name)
    if found is None:
        return None
    if isinstance(found, onnx.TensorProto):
        return numpy_helper.to_array(found)
    if found.name == "value":
        return numpy_helper.to_array(found.t)
    return np.array(helper.get_attribute_value(found), np.int64)
