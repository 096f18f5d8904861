"""Element types (and shapes where known) for every tensor, from ONNX shape inference.

The plan quantizes float32 tensors only; it must be able to tell them from the int64 shape
arithmetic detector heads compute (Shape → Gather → Concat → Reshape), so every value needs
its type. Inference is lenient: a node it cannot type leaves its outputs untyped, never fails.

Inference runs on a copy of the model whose large float initializers keep their shape and type
but no data: onnx serializes, infers and parses back whatever it is given, so inferring on the
model itself cost two transient copies of the weights and left a third in the result (about
700 MB on a 226 MB Keypoint R-CNN, at every rebuild of the plan). The types come out the same:
inference reads a float initializer's dims, never its values (the int64 shape constants it
does read are kept whole). The IR `typed_ir` gives reads its weights from the model passed in.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from onnxq.hollow import hollow_copy


def typed_ir(model: onnx.ModelProto) -> ir.Model:
    """The IR of `model` with every value typed by inference; its weights are `model`'s own
    tensors, not copies, so `model` must not change while the IR is in use."""
    shell, hollow = hollow_copy(model)
    typed = ir.from_proto(_inferred(shell))
    initializers = typed.graph.initializers
    for tensor in hollow:
        initializers[tensor.name].const_value = ir.TensorProtoTensor(tensor)
    return typed


def typed_structure(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model's graph with value_info filled in, for reading types only: its large float
    initializers hold no data, so it cannot be run."""
    return _inferred(hollow_copy(model)[0])


def element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name → element type of the graph's inputs, values and outputs, as declared or
    inferred (0 where inference left one unknown); initializers are not listed."""
    graph = typed_structure(model).graph
    infos = [*graph.value_info, *graph.input, *graph.output]
    return {info.name: info.type.tensor_type.elem_type for info in infos}


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with value_info filled in by onnx shape inference (unchanged if that fails)."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError):
        return model  # ops shape inference does not know, or a graph it rejects
