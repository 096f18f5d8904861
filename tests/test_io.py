"""Sessions: inner tensors returned without changing the model they were built from, and large
weights read from a temporary file with the results of bytes."""

from __future__ import annotations

import tempfile

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxq import hollow, io
from onnxq.calib.runner import with_outputs
from onnxq.io import session


def test_a_session_returns_inner_tensors_as_a_copy_with_them_would_and_leaves_the_model_alone(
    small_model, calibration_data
):
    before = small_model.SerializeToString()
    inner = [node.output[0] for node in small_model.graph.node if node.op_type == "Conv"]
    names = [*inner, small_model.graph.output[0].name, inner[0]]  # an output and a repeat too
    feed = {"input": calibration_data[:4]}
    got = session(small_model, outputs=names, optimize=False).run(names, feed)
    want = session(with_outputs(small_model, names), optimize=False).run(names, feed)
    assert small_model.SerializeToString() == before
    assert len(got) == len(names)
    for actual, expected in zip(got, want, strict=True):
        np.testing.assert_array_equal(actual, expected)


def _weights_in_typed_fields(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its initializers stored in float_data, as some exporters write them."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, tensor in enumerate(copy.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32:
            typed = onnx.helper.make_tensor(tensor.name, onnx.TensorProto.FLOAT, array.shape, array.ravel())
            copy.graph.initializer[index].CopyFrom(typed)
    return copy


@pytest.mark.parametrize("typed_fields", [False, True])
def test_a_session_that_reads_the_weights_from_a_file_computes_what_one_from_bytes_does(
    monkeypatch, tmp_path, small_model, calibration_data, typed_fields
):
    model = _weights_in_typed_fields(small_model) if typed_fields else small_model
    inner = [node.output[0] for node in model.graph.node if node.op_type == "Conv"]
    feed = {"input": calibration_data[:4]}
    from_bytes = session(model, outputs=inner).run(inner, feed)
    monkeypatch.setattr(io, "FILE_SESSION_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert hollow.float_weight_bytes(model) > 0
    from_file = session(model, outputs=inner).run(inner, feed)
    assert not list(tmp_path.iterdir())  # the temporary files are gone once the session is made
    for got, want in zip(from_file, from_bytes, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_session_falls_back_to_bytes_where_no_temporary_file_can_be_written(
    monkeypatch, small_model, calibration_data
):
    def refused(*args, **kwargs):
        raise OSError("No space left on device")

    feed = {"input": calibration_data[:2]}
    expected = session(small_model, optimize=False).run(None, feed)
    monkeypatch.setattr(io, "FILE_SESSION_BYTES", 0)
    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    fallen_back = session(small_model, optimize=False).run(None, feed)
    np.testing.assert_array_equal(fallen_back[0], expected[0])


def test_the_kernels_of_a_model_whose_session_reads_its_weights_from_a_file(monkeypatch):
    """onnxruntime writes the optimized model referring to the temporary weights file for the
    weights it leaves as they are (a Gemm's), and that file is gone by the time its nodes are
    counted: `onnxq eval` of a float model with 32 MiB of weights or more (a ResNet-18) stopped
    with an internal error (ValidationError: ... not regular file)."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxq.runtime_kernels import Kernels, count_kernels

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "weight")  # 16 KB: to the file
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "weight"], ["y"], transB=1)],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    expected = count_kernels(model)
    monkeypatch.setattr(io, "FILE_SESSION_BYTES", 0)
    assert count_kernels(model) == expected == Kernels(integer=0, floating=1, dequantizers=0)
