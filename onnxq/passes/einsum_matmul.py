"""Einsum of an activation and a constant that is a matrix product written as MatMul.

Keras' EinsumDense (its MultiHeadAttention's projections, TF's BERT and ViT) reaches ONNX as
Einsum with a constant weight, e.g. "abc,cde->abde" (features to heads) or "abcd,cde->abe" (heads
back to features). onnxq quantizes MatMul, not Einsum, so those projections stayed float. Where
the activation's last letters are the contracted ones, the output is the activation's other
letters followed by the weight's, and no letter repeats within an operand, the Einsum is
    Reshape(MatMul(Reshape(x, [..., C]), W as a C × O matrix), [..., *O])
with the Reshapes left out where one letter is contracted and one kept.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def einsum_to_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """`model` with every such Einsum written as MatMul, and a note; the model itself when none is."""
    graph = model.graph
    if not any(node.op_type == "Einsum" and not node.domain for node in graph.node):
        return model, None
    weights = {tensor.name: tensor for tensor in graph.initializer}
    result = onnx.ModelProto()
    result.CopyFrom(model)
    nodes, added, written = [], [], 0
    for node in result.graph.node:
        plan = _matrix_product(node, weights)
        if plan is None:
            nodes.append(node)
            continue
        new_nodes, constants = _as_matmul(node, *plan)
        nodes += new_nodes
        added += constants
        written += 1
    if not written:
        return model, None
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    result.graph.initializer.extend(added)
    return result, f"wrote {written} Einsum nodes with a constant weight as MatMul"


def _matrix_product(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]):
    """(prefix letters, contracted letters, kept letters, the weight as a C × O matrix) where the
    Einsum is a matrix product of its activation and a constant weight, else None."""
    if node.op_type != "Einsum" or node.domain or len(node.input) != 2 or node.input[1] not in weights:
        return None
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    equation = attributes.get("equation", b"").decode().replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    operands, output = equation.split("->")
    parts = operands.split(",")
    if len(parts) != 2:
        return None
    x, w = parts
    if any(len(set(labels)) != len(labels) for labels in (x, w, output)):
        return None
    contracted = [c for c in x if c in w and c not in output]
    kept = [c for c in w if c not in x]
    prefix = [c for c in x if c not in contracted]
    if not contracted or x != "".join(prefix + contracted) or output != "".join(prefix + kept):
        return None
    if set(w) != set(contracted) | set(kept) or any(c in w for c in prefix):
        return None
    weight = numpy_helper.to_array(weights[node.input[1]])
    if weight.ndim != len(w):
        return None
    order = [w.index(c) for c in contracted + kept]
    sizes = [weight.shape[w.index(c)] for c in kept]
    matrix = np.ascontiguousarray(weight.transpose(order)).reshape(-1, int(np.prod(sizes, dtype=np.int64)))
    return len(prefix), len(contracted), sizes, matrix


def _as_matmul(node: onnx.NodeProto, prefix: int, contracted: int, kept: list[int], matrix: np.ndarray):
    """The MatMul (with the Reshapes around it that the letters need) and its constants."""
    base = node.name or node.output[0]
    weight = numpy_helper.from_array(matrix, f"{base}_matrix")
    nodes, constants, source = [], [weight], node.input[0]
    if contracted > 1:  # the contracted letters as one axis; 0 keeps a prefix axis as it is
        source = _reshape(source, f"{base}_flat", [0] * prefix + [matrix.shape[0]], nodes, constants)
    product = node.output[0] if len(kept) == 1 else f"{base}_product"
    nodes.append(helper.make_node("MatMul", [source, weight.name], [product], name=f"{base}_MatMul"))
    if len(kept) != 1:
        _reshape(product, node.output[0], [0] * prefix + kept, nodes, constants)
    return nodes, constants


def _reshape(source: str, target: str, dims: list[int], nodes: list, constants: list) -> str:
    shape = numpy_helper.from_array(np.array(dims, np.int64), f"{target}_shape")
    constants.append(shape)
    nodes.append(helper.make_node("Reshape", [source, shape.name], [target], name=f"{target}_Reshape"))
    return target
