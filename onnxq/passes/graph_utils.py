"""Small helpers over onnx_ir shared by the passes: constants, attributes, node removal."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir


def opset_version(model: onnx.ModelProto) -> int:
    """The model's default-domain opset (0 where it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies of an If, Loop or Scan node (none for other nodes)."""
    graphs = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            graphs.append(attribute.g)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attribute.graphs)
    return graphs


def rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Nodes (of this graph and the subgraphs that read it by name) read `new` instead of `old`."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        for subgraph in subgraphs(node):
            rename_uses(subgraph, old, new)


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's array if it is an initializer or a Constant node's output, else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def attribute(node: ir.Node, name: str, default):
    """An attribute as a Python value, or `default` when absent."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def clip_bounds(clip: ir.Node) -> tuple[float | None, float | None]:
    """A Clip's min and max, from its inputs (opset 11+) or attributes (before); None where
    absent or not a one-value constant."""
    if "min" in clip.attributes or "max" in clip.attributes:
        return attribute(clip, "min", None), attribute(clip, "max", None)
    bounds = []
    for index in (1, 2):
        array = constant(clip.inputs[index]) if len(clip.inputs) > index else None
        bounds.append(None if array is None or array.size != 1 else float(array.reshape(())))
    return bounds[0], bounds[1]


def scaled_gemm(node: ir.Node) -> bool:
    """A Gemm with alpha or beta other than 1: its weights and bias are not W and b as stored."""
    return node.op_type == "Gemm" and (
        attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0
    )


def output_channel_axis(node: ir.Node, weight: np.ndarray) -> int | None:
    """The weight axis indexing output channels (None: grouped ConvTranspose has no single one)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if attribute(node, "group", 1) == 1 else None
    if node.op_type == "Gemm":
        return 0 if attribute(node, "transB", 0) else 1
    return weight.ndim - 1  # MatMul: one output per column


def set_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register a new initializer named `name` (made unique if taken) holding `array`."""
    unique, index = name, 1
    while unique in graph.initializers:
        unique, index = f"{name}_{index}", index + 1
    value = ir.Value(name=unique, const_value=ir.tensor(np.array(array, order="C"), name=unique))
    value.shape = ir.Shape(array.shape)
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    return value


def bypass(graph: ir.Graph, node: ir.Node, keep: ir.Value) -> None:
    """Remove a single-output node whose output equals `keep`; consumers read `keep` instead.

    When the output is a graph output, `keep` takes over its name so the interface is unchanged.
    """
    output = node.outputs[0]
    was_output = output.is_graph_output()
    ir.convenience.replace_all_uses_with(output, keep, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if was_output:
        keep.name = output.name


def drop_unused_initializers(graph: ir.Graph) -> None:
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            del graph.initializers[name]


def single_consumer(value: ir.Value) -> ir.Node | None:
    """The only node reading `value`, when it is read by exactly one node and is no graph output."""
    consumers = value.consumers()
    if len(consumers) != 1 or value.is_graph_output() or len(value.uses()) != 1:
        return None
    return consumers[0]


def constants_to_initializers(graph: ir.Graph) -> int:
    """Turn Constant nodes holding a tensor into initializers, and let readers of an Identity of
    an initializer read the initializer, so weights are found in one place (where onnxsim, which
    folds both, failed or was skipped)."""
    moved = 0
    for node in list(graph):
        if node.domain != "" or node.op_type not in ("Constant", "Identity"):
            continue
        output = node.outputs[0]
        if output.is_graph_output():
            continue
        if node.op_type == "Constant" and "value" in node.attributes:
            array = node.attributes["value"].value.numpy()
            replacement = set_initializer(graph, output.name or "constant", array)
        elif node.op_type == "Identity" and node.inputs[0] is not None and node.inputs[0].is_initializer():
            replacement = node.inputs[0]
        else:
            continue
        ir.convenience.replace_all_uses_with(output, replacement)
        graph.remove(node, safe=True)
        moved += 1
    return moved


def name_nodes(graph: ir.Graph) -> None:
    """Give every unnamed node a name from its op and first output, unique in the graph."""
    taken = {node.name for node in graph if node.name}
    for node in graph:
        if not node.name:
            base = f"{node.op_type}_{node.outputs[0].name}" if node.outputs else node.op_type
            name, index = base, 1
            while name in taken:
                name, index = f"{base}_{index}", index + 1
            node.name = name
            taken.add(name)


def computed_values(graph: ir.Graph) -> dict[str, ir.Value]:
    """The graph's inputs and every node's outputs, by name (initializers apart)."""
    return {v.name: v for v in graph.inputs} | {v.name: v for n in graph for v in n.outputs}
