"""Copies of a model without its weights' data: for what needs the graph but not the weights.

- Shape inference (onnxq.passes.infer_types) reads a float initializer's dims, never its values.
- onnxruntime reads weights given in an external-data file by mapping the file, where a model
  given as bytes costs it two copies of them: on a 226 MB Keypoint R-CNN a session built from
  bytes held 474-493 MB after it was made (about 750 MB at its peak, the bytes aside), one built
  from a file 234 MB (371 MB at its peak). `weights_on_disk` writes such a file for the
  sessions of models whose weights dominate their memory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import onnx
from onnx import numpy_helper

FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
)
HOLLOW_BYTES = 1024  # float initializers above this size are copied without their data
ALIGNMENT = 64 << 10  # offsets in the weights file: onnxruntime maps a tensor only at aligned offsets
WEIGHTS_FILE = "weights.bin"


def hollow_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """A copy of `model` whose float initializers above HOLLOW_BYTES have dims and type but no
    data, and those initializers of `model` (the main graph's; subgraphs are copied whole)."""
    shell = onnx.ModelProto()
    _copy_fields(model, shell, skip="graph")
    _copy_fields(model.graph, shell.graph, skip="initializer")
    hollow = []
    for tensor in model.graph.initializer:
        if _hollowed(tensor):
            shell.graph.initializer.add(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type)
            hollow.append(tensor)
        else:
            shell.graph.initializer.append(tensor)
    return shell, hollow


def float_weight_bytes(model: onnx.ModelProto) -> int:
    """What the main graph's large float initializers take (those hollow_copy leaves out)."""
    return sum(tensor.ByteSize() for tensor in model.graph.initializer if _hollowed(tensor))


def _hollowed(tensor: onnx.TensorProto) -> bool:
    return tensor.data_type in FLOAT_TYPES and tensor.ByteSize() > HOLLOW_BYTES


@contextlib.contextmanager
def weights_on_disk(model: onnx.ModelProto, outputs: Sequence[str] = ()) -> Iterator[str]:
    """The path of a temporary copy of `model` whose large float weights lie in an external-data
    file beside it, also returning the float tensors `outputs`; both files are removed on exit
    (a session that mapped the weights keeps them: the file goes once it is unmapped)."""
    shell, hollow = hollow_copy(model)
    folder = tempfile.mkdtemp(prefix="onnxq-weights-")
    try:
        by_name = {tensor.name: tensor for tensor in shell.graph.initializer}
        with open(os.path.join(folder, WEIGHTS_FILE), "wb") as data:
            for tensor in hollow:
                data.seek(-data.tell() % ALIGNMENT, os.SEEK_CUR)
                offset = data.tell()
                length = data.write(_tensor_bytes(tensor))
                _point_to(by_name[tensor.name], offset, length)
        add_float_outputs(shell, outputs)
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as file:
            file.write(shell.SerializeToString())
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def add_float_outputs(model: onnx.ModelProto, names: Sequence[str]) -> int:
    """Graph outputs for the float tensors `names` that are not outputs yet; how many were added
    (they are the last outputs)."""
    present = {output.name for output in model.graph.output}
    added = [name for name in dict.fromkeys(names) if name not in present]
    for name in added:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return len(added)


def _tensor_bytes(tensor: onnx.TensorProto) -> bytes:
    """The tensor's data as raw little-endian bytes (raw_data, or the typed field converted)."""
    return tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()


def _point_to(tensor: onnx.TensorProto, offset: int, length: int) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


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
