"""Lend a batch axis to inputs exported without one, and take it back before saving.

torchvision's detectors (SSD, RetinaNet, FCOS, Faster R-CNN) export their image input as
[3, H, W]: one image per run, no batch axis. Every stage of onnxq cuts data along a leading batch
axis, so while such a model is quantized each of those inputs is given one of size 1: the graph
input becomes [1, 3, H, W] and a Squeeze hands the model what it read before. To the pipeline the
model is then an ordinary fixed-batch model. The saved model has the Squeeze taken out again and
its inputs as exported, so it is a drop-in replacement for the float file.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.passes.graph_utils import opset_version, rename_uses

SUFFIX = "/onnxq_unbatched"  # the Squeeze's output: what the model read as the input before
BATCHED_SUFFIX = "/onnxq_batched"  # the saved model's Unsqueeze, where the Squeeze was merged away
AXES = "onnxq_batch_axis"  # the Squeeze's or Unsqueeze's axes (opset 13 on)


def add_batch_axis(model: onnx.ModelProto, names: Collection[str]) -> onnx.ModelProto:
    """A copy of `model` whose inputs `names` take a leading batch axis of size 1."""
    if not names:
        return model
    result = _copy(model)
    graph = result.graph
    squeezes = []
    for value in graph.input:
        if value.name not in names:
            continue
        inner = value.name + SUFFIX
        rename_uses(graph, value.name, inner)
        _rename_outputs(graph, value.name, inner)
        value.type.tensor_type.shape.dim.insert(0, onnx.TensorShapeProto.Dimension(dim_value=1))
        squeezes.append(_squeeze(graph, value.name, inner, opset_version(result)))
    nodes = [*squeezes, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return result


def remove_batch_axis(model: onnx.ModelProto, names: Collection[str]) -> onnx.ModelProto:
    """A copy of `model` with the batch axes add_batch_axis lent to `names` taken away: the lent
    Squeeze removed where it is still there, an Unsqueeze in its place where the passes merged it
    into what the model did with the input (a detector that makes a batch of its one image)."""
    if not names:
        return model
    result = _copy(model)
    graph = result.graph
    added = []
    for name in names:
        inner = name + SUFFIX
        squeeze = next((node for node in graph.node if inner in node.output), None)
        if squeeze is not None and squeeze.input[0] == name and _readers(graph, name) == 1:
            graph.node.remove(squeeze)
            rename_uses(graph, inner, name)
            _rename_outputs(graph, inner, name)
        else:  # the model reads the batch of one: make it from the input as exported
            batched = name + BATCHED_SUFFIX
            rename_uses(graph, name, batched)
            _rename_outputs(graph, name, batched)
            added.append(_unsqueeze(graph, name, batched, opset_version(result)))
        value = next(v for v in graph.input if v.name == name)
        del value.type.tensor_type.shape.dim[0]
        kept = [v for v in graph.value_info if v.name != inner]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    nodes = [*added, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(AXES in node.input for node in graph.node):
        kept_initializers = [t for t in graph.initializer if t.name != AXES]
        del graph.initializer[:]
        graph.initializer.extend(kept_initializers)
    return result


def _readers(graph: onnx.GraphProto, name: str) -> int:
    return sum(name == read for node in graph.node for read in node.input)


def _unsqueeze(graph: onnx.GraphProto, outer: str, batched: str, opset: int) -> onnx.NodeProto:
    name = f"{outer}/onnxq_batch_of_one"
    if opset < 13:
        return helper.make_node("Unsqueeze", [outer], [batched], name=name, axes=[0])
    _add_axes(graph)
    return helper.make_node("Unsqueeze", [outer, AXES], [batched], name=name)


def _squeeze(graph: onnx.GraphProto, outer: str, inner: str, opset: int) -> onnx.NodeProto:
    name = f"{outer}/onnxq_lent_batch_axis"
    if opset < 13:  # axes an attribute before opset 13
        return helper.make_node("Squeeze", [outer], [inner], name=name, axes=[0])
    _add_axes(graph)
    return helper.make_node("Squeeze", [outer, AXES], [inner], name=name)


def _add_axes(graph: onnx.GraphProto) -> None:
    if not any(t.name == AXES for t in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), AXES))


def _rename_outputs(graph: onnx.GraphProto, old: str, new: str) -> None:
    """An input the graph also returns as it is: the output follows the tensor the model reads."""
    for value in graph.output:
        if value.name == old:
            value.name = new


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    result = onnx.ModelProto()
    result.CopyFrom(model)
    return result
