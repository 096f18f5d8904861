"""The numpy reference agrees with onnxruntime's QuantizeLinear/DequantizeLinear bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from onnxq.io import session
from onnxq.quant import primitives as P


def qdq_model(scale: np.ndarray, zero_point: np.ndarray, shape, axis: int | None) -> onnx.ModelProto:
    attrs = {"axis": axis} if axis is not None else {}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
    ]
    qtype = helper.np_dtype_to_tensor_dtype(zero_point.dtype)
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [
            helper.make_tensor_value_info("q", qtype, shape),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, shape),
        ],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero_point, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(
    x=arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 8)), elements=finite),
    low=finite,
    high=finite,
)
def test_per_tensor_uint8_matches_onnxruntime(x, low, high):
    target = P.IntRange.unsigned(8)
    scale, zero_point = P.affine_params(low, high, target)
    q_ort, y_ort = session(qdq_model(scale, zero_point, x.shape, None), optimize=False).run(None, {"x": x})
    q_ref = P.quantize(x, scale, zero_point, target)
    np.testing.assert_array_equal(q_ref, q_ort)
    np.testing.assert_array_equal(P.dequantize(q_ref, scale, zero_point), y_ort)


@settings(max_examples=40, deadline=None)
@given(w=arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 5), st.just(3)), elements=finite))
def test_per_channel_int8_weights_match_onnxruntime(w):
    target = P.IntRange.signed(8)
    scale = P.symmetric_scale(P.weight_absmax(w, axis=0), target)
    zero_point = np.zeros(scale.shape, np.int8)
    q_ort, y_ort = session(qdq_model(scale, zero_point, w.shape, 0), optimize=False).run(None, {"x": w})
    q_ref = P.quantize(w, scale, zero_point, target, axis=0)
    np.testing.assert_array_equal(q_ref, q_ort)
    np.testing.assert_array_equal(P.dequantize(q_ref, scale, zero_point, axis=0), y_ort)
    assert np.abs(q_ref).max(initial=0) <= 127


@given(low=finite, high=finite)
def test_zero_is_exactly_representable(low, high):
    target = P.IntRange.unsigned(8)
    scale, zero_point = P.affine_params(low, high, target)
    zero = P.quantize(np.zeros(1, np.float32), scale, zero_point, target)
    assert P.dequantize(zero, scale, zero_point)[0] == 0.0


def test_reduced_range_keeps_weights_within_63():
    target = P.IntRange.signed(7)
    w = np.linspace(-5, 5, 101, dtype=np.float32).reshape(1, -1)
    scale = P.symmetric_scale(P.weight_absmax(w, axis=0), target)
    q = P.quantize(w, scale, np.zeros(1, np.int8), target, axis=0)
    assert q.min() == -63 and q.max() == 63
