"""Compute a float16 model in float32, keeping its float16 inputs and outputs.

Models are often shipped in half precision (`model.half()` before export, or converted for GPUs).
onnxruntime's CPU kernels, its integer kernels and every quantizer scale are float32, so the
passes and calibration work on a float32 graph: every float16 constant, Cast and tensor type
becomes float32, a Cast after each float16 input and before each float16 output keeps the file's
interface unchanged. The quantized model is then a drop-in replacement: it takes and returns
float16 as the original did, and computes in float32 between its Q/DQ pairs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxq.passes.graph_utils import rename_uses

HALF = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def is_half_precision(model: onnx.ModelProto) -> bool:
    """Whether any initializer, Constant or graph input/output of the main graph is float16."""
    graph = model.graph
    return (
        any(t.data_type in HALF for t in graph.initializer)
        or any(_elem_type(v) in HALF for v in (*graph.input, *graph.output))
        or any(a.t.data_type in HALF for n in graph.node for a in n.attribute if a.HasField("t"))
    )


def compute_in_float32(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """A copy of `model` that computes in float32, with a note; the model itself when not half."""
    if not is_half_precision(model):
        return model, None
    result = onnx.ModelProto()
    result.CopyFrom(model)
    _widen_graph(result.graph, main=True)
    inputs, outputs = _cast_interface(result.graph)
    note = "the model computes in float16: quantized in float32"
    if inputs or outputs:
        note += f", with Casts keeping its float16 {_interface(inputs, outputs)}"
    return result, note


def _widen_graph(graph: onnx.GraphProto, *, main: bool = False) -> None:
    """Every float16 type, constant and Cast target of `graph` and its subgraphs to float32.

    The main graph's inputs and outputs stay half (Casts bridge them) except inputs that are
    initializers too (older exporters list weights as inputs); a subgraph's interface widens."""
    initializers = {t.name for t in graph.initializer}
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type in HALF:
            graph.initializer[index].CopyFrom(_widen_tensor(tensor))
    interface = [v for v in graph.input if v.name in initializers] if main else [*graph.input, *graph.output]
    for value in (*graph.value_info, *interface):
        _widen_type(value)
    for node in graph.node:
        for attr in node.attribute:
            _widen_attribute(node, attr)


def _widen_attribute(node: onnx.NodeProto, attr: onnx.AttributeProto) -> None:
    if attr.HasField("t") and attr.t.data_type in HALF:
        attr.t.CopyFrom(_widen_tensor(attr.t))
    if attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT and attr.i in HALF:
        attr.i = TensorProto.FLOAT
    if attr.HasField("g"):
        _widen_graph(attr.g)
    for subgraph in attr.graphs:
        _widen_graph(subgraph)


def _widen_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    array = numpy_helper.to_array(tensor).astype(np.float32)
    widened = numpy_helper.from_array(array, tensor.name)
    widened.doc_string = tensor.doc_string
    return widened


def _widen_type(value: onnx.ValueInfoProto) -> None:
    if _elem_type(value) in HALF:
        value.type.tensor_type.elem_type = TensorProto.FLOAT


def _elem_type(value: onnx.ValueInfoProto) -> int:
    return value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else 0


def _cast_interface(graph: onnx.GraphProto) -> tuple[list[str], list[str]]:
    """A Cast to float32 after each half input and a Cast back before each half output."""
    inputs = [v for v in graph.input if _elem_type(v) in HALF]
    outputs = [v for v in graph.output if _elem_type(v) in HALF]
    casts_in = []
    for value in inputs:
        widened = f"{value.name}_float32"
        rename_uses(graph, value.name, widened)
        casts_in.append(
            helper.make_node("Cast", [value.name], [widened], name=f"{widened}_Cast", to=TensorProto.FLOAT)
        )
    casts_out = []
    for value in outputs:
        widened = f"{value.name}_float32"
        _rename_producer_and_uses(graph, value.name, widened)
        casts_out.append(
            helper.make_node("Cast", [widened], [value.name], name=f"{value.name}_Cast", to=_elem_type(value))
        )
    nodes = [*casts_in, *graph.node, *casts_out]
    del graph.node[:]
    graph.node.extend(nodes)
    return [v.name for v in inputs], [v.name for v in outputs]


def _rename_producer_and_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
    rename_uses(graph, old, new)
    for value in graph.value_info:
        if value.name == old:
            value.name = new


def _interface(inputs: list[str], outputs: list[str]) -> str:
    parts = []
    if inputs:
        parts.append("input" + ("s " if len(inputs) > 1 else " ") + ", ".join(map(repr, inputs)))
    if outputs:
        parts.append("output" + ("s " if len(outputs) > 1 else " ") + ", ".join(map(repr, outputs)))
    return " and ".join(parts)
