"""Float models whose activations reach far beyond what float32 squares hold (onnx's light
Inception v1 and VGG-19 test models, whose constant weights take them to 1e20 and more): the
searches score their errors in float64 and quantize them, and where the float model itself
overflows on the calibration data, or the quantized one does where it does not, the one-line
error says which, instead of "internal error" alone. Before, W8A8 mse stopped with an error naming
the activation and W4A8 mse with "internal error: the quantized model produces NaN or infinite
values": the squared output errors overflowed float32 and every candidate scored infinite."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.errors import OnnxqError
from onnxq.io import session
from onnxq.validate import validate

WIDTH = 16


def _exploding_model(spread: float = 3e3) -> onnx.ModelProto:
    """Six Gemm+Relu layers, each multiplying its input's size by about 4·`spread`: at 3e3 the
    fifth Gemm's output reaches about 1e20 and the last about 1e24, finite in float; at 8.4e5
    the last one passes float32's largest value on some samples."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "x"
    for index in range(6):
        weight = (rng.standard_normal((WIDTH, WIDTH)) * spread).astype(np.float32)
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


def _data(count: int = 64) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((count, WIDTH)).astype(np.float32)


@pytest.mark.parametrize(("weight_bits", "floor"), [(8, 20.0), (4, 15.0)])
def test_searched_ranges_of_activations_beyond_float32_squares_quantize(weight_bits, floor):
    model = _exploding_model()
    config = onnxq.QuantConfig(weight_bits=weight_bits, calibration="mse", speed_check=False)
    result = onnxq.quantize(model, _data(), config)
    assert result.fidelity.min_sqnr > floor  # measured 27.2 and 21.7 dB on the held-back samples
    held = np.random.default_rng(1).standard_normal((16, WIDTH)).astype(np.float32)
    assert np.isfinite(session(result.model).run(None, {"x": held})[0]).all()


def test_a_float_model_that_overflows_on_its_calibration_data_is_refused_naming_the_output():
    with pytest.raises(
        OnnxqError, match=r"float model itself produces infinite or NaN values at output 'r5'"
    ):
        onnxq.quantize(_exploding_model(8.4e5), _data(), onnxq.QuantConfig(speed_check=False))


def _scaled(factor: float) -> onnx.ModelProto:
    """y = x · factor, as a stand-in for a float and a quantized model of one interface."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "factor"], ["y"])],
        "scaled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", WIDTH])],
        [numpy_helper.from_array(np.asarray(factor, np.float32), "factor")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_validate_tells_the_float_models_overflow_from_the_quantized_ones():
    sample = {"x": np.full((2, WIDTH), 1e30, np.float32)}
    overflowing, finite = _scaled(1e10), _scaled(2.0)
    validate(finite, sample, reference=overflowing)  # finite outputs pass whatever the reference
    with pytest.raises(OnnxqError, match=r"float model itself produces infinite or NaN values at output 'y'"):
        validate(overflowing, sample, reference=overflowing)
    with pytest.raises(OnnxqError, match=r"where the float model's outputs stay finite \(up to 2e\+30"):
        validate(overflowing, sample, reference=finite)
