"""A float model whose activations grow past what float32 error sums hold stops the search with
a one-line error naming the activation, not a NaN carried into the zero points (a ValueError from
int(NaN) before: onnx's light_inception_v1 test model, whose constant weights take its activations
to 1e20, at --w-bits 4 --calib-method mse)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.errors import OnnxqError

WIDTH = 16


def _exploding_model() -> onnx.ModelProto:
    """Six Gemm+Relu layers, each multiplying its input's size by about 1e4: the fifth Gemm's
    output reaches about 1e20, finite in float."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "x"
    for index in range(6):
        weight = (rng.standard_normal((WIDTH, WIDTH)) * 3e3).astype(np.float32)
        weights += [
            numpy_helper.from_array(weight, f"w{index}"),
            numpy_helper.from_array(np.zeros(WIDTH, np.float32), f"b{index}"),
        ]
        nodes += [
            helper.make_node("Gemm", [previous, f"w{index}", f"b{index}"], [f"h{index}"]),
            helper.make_node("Relu", [f"h{index}"], [f"r{index}"]),
        ]
        previous = f"r{index}"
    graph = helper.make_graph(
        nodes,
        "exploding",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["n", WIDTH])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_search_over_activations_beyond_float32s_sums_is_refused_with_the_tensor_named():
    data = np.random.default_rng(0).standard_normal((64, WIDTH)).astype(np.float32)
    config = onnxq.QuantConfig(calibration="mse", speed_check=False)
    with pytest.raises(OnnxqError, match=r"values at activation 'h\d' are infinite or NaN .* reach \d"):
        onnxq.quantize(_exploding_model(), data, config)
