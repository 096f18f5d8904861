"""CastLike to a tensor of known element type written as Cast, so constant folding reaches it.

torch's dynamo exporter without its optimizer (`optimize=False`, the default of some releases)
writes every bias-free Conv's zero bias as CastLike(0, input) expanded to the channel count: the
CastLike reads the graph input for its type alone, so onnxsim cannot fold it, the bias stays a
run-time value, and BatchNormalization cannot fold into the Conv (a small CNN kept both of its
BatchNorms and quantized one of its three layers). Where inference knows the element type of
CastLike's second input, the node becomes Cast(to=that type), which computes the same values.
"""

from __future__ import annotations

import onnx
from onnx import helper

from onnxq.passes.infer_types import element_types


def static_casts(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """`model` with every CastLike whose target type is known written as Cast, and a note; the
    model itself when there is none."""
    if not any(node.op_type == "CastLike" and node.domain in ("", "ai.onnx") for node in model.graph.node):
        return model, None
    types = _element_types(model)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    written = 0
    for index, node in enumerate(result.graph.node):
        target = types.get(node.input[1]) if node.op_type == "CastLike" and len(node.input) == 2 else None
        if not target or node.domain not in ("", "ai.onnx"):
            continue
        cast = helper.make_node("Cast", [node.input[0]], list(node.output), name=node.name, to=target)
        cast.attribute.extend(a for a in node.attribute if a.name == "saturate")  # float8 targets
        result.graph.node[index].CopyFrom(cast)
        written += 1
    if not written:
        return model, None
    return result, f"wrote {written} CastLike nodes whose target type is known as Cast"


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name → element type, where the graph declares or inference finds one."""
    types = {name: kind for name, kind in element_types(model).items() if kind}
    types.update({tensor.name: tensor.data_type for tensor in model.graph.initializer})
    return types
