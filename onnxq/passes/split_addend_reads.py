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
import onnx_ir as ir

from onnxq.io import to_ir, to_proto

LAYER_READ_PREFIX = "onnxq_layer_read/"  # the Identities this pass adds (onnxq.quant.plan reads it)


def is_layer_read(node_name: str) -> bool:
    """Whether a node is one of the Identities split_addend_reads adds."""
    return node_name.startswith(LAYER_READ_PREFIX)


def split_addend_reads(model: onnx.ModelProto, layer_ops: Collection[str]) -> tuple[onnx.ModelProto, int]:
    """(model, how many tensors were split): every float tensor that Add nodes and weighted layers
    (`layer_ops` with a constant weight, reading it as their data input) read, and nothing else,
    reaches those layers through an Identity. The input model is not changed."""
    graph_model = to_ir(model)
    graph = graph_model.graph
    split = [
        value for node in list(graph) for value in node.outputs if _read_by_adds_and_layers(value, layer_ops)
    ]
    split += [value for value in graph.inputs if _read_by_adds_and_layers(value, layer_ops)]
    if not split:
        return model, 0
    for value in split:
        layer_reads = [(node, index) for node, index in value.uses() if _layer_read(node, index, layer_ops)]
        name = f"{LAYER_READ_PREFIX}{value.name}"
        copy = ir.node("Identity", [value], name=name)
        copy.outputs[0].name = name
        producer = value.producer()
        if producer is None:  # a graph input
            graph.insert_before(next(iter(graph)), copy)
        else:
            graph.insert_after(producer, copy)
        for node, index in layer_reads:
            node.replace_input_with(index, copy.outputs[0])
    return to_proto(graph_model), len(split)


def _read_by_adds_and_layers(value: ir.Value, layer_ops: Collection[str]) -> bool:
    """Read by at least one Add and one weighted layer, by nothing else, and no graph output."""
    uses = list(value.uses())
    if not uses or value.is_graph_output() or _is_constant(value):
        return False
    layers = [_layer_read(node, index, layer_ops) for node, index in uses]
    adds = [node.op_type == "Add" and node.domain == "" for node, _ in uses]
    return any(layers) and any(adds) and all(a or b for a, b in zip(layers, adds, strict=True))


def _layer_read(node: ir.Node, index: int, layer_ops: Collection[str]) -> bool:
    """Whether `node` is a weighted layer reading the value as its data input."""
    weighted = len(node.inputs) > 1 and _is_constant(node.inputs[1])
    return node.op_type in layer_ops and node.domain == "" and index == 0 and weighted


def _is_constant(value: ir.Value | None) -> bool:
    """An initializer or a Constant node's output (without decoding it, as constant() would)."""
    return value is not None and ir.convenience.get_const_tensor(value) is not None
