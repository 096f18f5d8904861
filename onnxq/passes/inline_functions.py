"""Model-local functions inlined, so that every pass sees the layers inside them.

Exporters may wrap modules as ONNX functions (torch's `export_modules_as_functions`, onnxscript,
exporters that keep a model's structure): a residual block then reaches the passes as one opaque
node, and the layers inside it are neither folded nor quantized. On a ResNet-style export with its
blocks as functions, onnxq quantized the stem alone and kept it float for speed ("feeds Blk (no
integer kernel)"). onnx's inliner writes each call's nodes into the graph, under names unique per
call, and computes what the calls computed.
"""

from __future__ import annotations

import onnx
import onnx.inliner

from onnxq.passes.graph_utils import subgraphs


def inline_functions(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """`model` with its local functions' calls replaced by their nodes, and a note; the model
    itself when it has none."""
    if not model.functions:
        return model, None
    names = {(function.domain, function.name) for function in model.functions}
    calls = sum((node.domain, node.op_type) in names for node in _all_nodes(model.graph))
    inlined = onnx.inliner.inline_local_functions(model)
    return inlined, f"inlined {calls} calls of {len(names)} model-local functions"


def _all_nodes(graph: onnx.GraphProto):
    """The graph's nodes and those of its subgraphs (If, Loop, Scan bodies)."""
    for node in graph.node:
        yield node
        for body in subgraphs(node):
            yield from _all_nodes(body)
