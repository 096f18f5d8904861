"""Give the layers that read a residual sum a quantizer of their own.

A ResNet block's output is read twice: by the next block's first conv and by the next block's
Add (the shortcut). With one quantizer on it, activations narrower than --addend-bits round the
whole residual stream to their width at every block, and the error adds up along the network:
ResNet-56 at 4-bit activations lost most of its accuracy there (held-out KL to float 0.032 with
8-bit weights, 0.0060 once the shortcut read the sum at 8 bits; BENCHMARKS.md, split-sums).
Here the weighted layers read such a tensor through an Identity of their own: the plan gives
the Identity's output the layers' activation width and the tensor itself, now read only by Add
and these Identities, the addend width. Every weighted layer still reads A-bit activations;
onnxruntime drops the Identity and runs DequantizeLinear → QuantizeLinear between the two.
"""

from __future__ import annotations

from collections.abc import Collection

import onnx
from onnx import helper

LAYER_READ_PREFIX = "onnxq_layer_read/"  # the Identities this pass adds (onnxq.quant.plan reads it)


def is_layer_read(node_name: str) -> bool:
    """Whether a node is one of the Identities split_addend_reads adds."""
    return node_name.startswith(LAYER_READ_PREFIX)


def split_addend_reads(model: onnx.ModelProto, layer_ops: Collection[str]) -> tuple[onnx.ModelProto, int]:
    """(model, how many tensors were split): every float tensor that Add nodes and weighted layers
    (`layer_ops` with a constant weight, reading it as their data input) read, and nothing else,
    reaches those layers through an Identity. The input model is not changed."""
    graph = model.graph
    constants = {i.name for i in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    outputs = {o.name for o in graph.output}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name:
                readers.setdefault(name, []).append((node, index))

    def layer_read(node: onnx.NodeProto, index: int) -> bool:
        weighted = len(node.input) > 1 and node.input[1] in constants
        return node.op_type in layer_ops and node.domain == "" and index == 0 and weighted

    def add(node: onnx.NodeProto) -> bool:
        return node.op_type == "Add" and node.domain == ""

    split = {
        name
        for name, reads in readers.items()
        if name not in outputs
        and name not in constants
        and any(add(node) for node, _ in reads)
        and any(layer_read(node, index) for node, index in reads)
        and all(layer_read(node, index) or add(node) for node, index in reads)
    }
    if not split:
        return model, 0
    result = onnx.ModelProto()
    result.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    added: set[str] = set()
    for original in model.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        for index, name in enumerate(node.input):
            if name in split and layer_read(node, index):
                copy = f"{LAYER_READ_PREFIX}{name}"
                if name not in added:
                    nodes.append(helper.make_node("Identity", [name], [copy], name=copy))
                    added.add(name)
                node.input[index] = copy
        nodes.append(node)
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    return result, len(split)
