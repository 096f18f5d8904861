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

FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
)
SHELL_BYTES = 1024  # float initializers above this size go into the inference copy without data


def typed_ir(model: onnx.ModelProto) -> ir.Model:
    """The IR of `model` with every value typed by inference; its weights are `model`'s own
    tensors, not copies, so `model` must not change while the IR is in use."""
    shell, hollow = _weightless(model)
    typed = ir.from_proto(_inferred(shell))
    initializers = typed.graph.initializers
    for tensor in hollow:
        initializers[tensor.name].const_value = ir.TensorProtoTensor(tensor)
    return typed


def typed_structure(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model's graph with value_info filled in, for reading types only: its large float
    initializers hold no data, so it cannot be run."""
    return _inferred(_weightless(model)[0])


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with value_info filled in by onnx shape inference (unchanged if that fails)."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError):
        return model  # ops shape inference does not know, or a graph it rejects


def _weightless(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """A copy of `model` whose large float initializers have shape and type but no data, and
    those initializers of `model` (the main graph's; subgraphs are copied whole)."""
    shell = onnx.ModelProto()
    _copy_fields(model, shell, skip="graph")
    _copy_fields(model.graph, shell.graph, skip="initializer")
    hollow = []
    for tensor in model.graph.initializer:
        if tensor.data_type in FLOAT_TYPES and tensor.ByteSize() > SHELL_BYTES:
            shell.graph.initializer.add(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type)
            hollow.append(tensor)
        else:
            shell.graph.initializer.append(tensor)
    return shell, hollow


def _copy_fields(source, target, *, skip: str) -> None:
    """Every field set on the protobuf message `source` but `skip`, copied into `target`."""
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        field = getattr(target, descriptor.name)
        if hasattr(field, "extend"):  # repeated
            field.extend(value)
        elif hasattr(field, "CopyFrom"):  # a message
            field.CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)
