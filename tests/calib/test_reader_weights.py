"""A channel's weight in its readers' error is the energy a unit error in that channel puts into
their outputs: checked against onnxruntime running the reader on one-hot inputs."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxq.calib.reader_weights import reader_channel_weights
from onnxq.io import session

IR_VERSION, OPSET = 10, 17


def _reader_model(node: onnx.NodeProto, x_shape, weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "reader",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def _energy_per_channel(model: onnx.ModelProto, x_shape, channel_axis: int) -> np.ndarray:
    """Σ of squared outputs for a unit error at one position of each channel (away from edges)."""
    run = session(model)
    energies = []
    for channel in range(x_shape[channel_axis]):
        x = np.zeros(x_shape, np.float32)
        index = [s // 2 for s in x_shape]
        index[0], index[channel_axis] = 0, channel
        x[tuple(index)] = 1.0
        energies.append(float((run.run(None, {"x": x})[0].astype(np.float64) ** 2).sum()))
    return np.asarray(energies)


@settings(max_examples=20, deadline=None)
@given(
    groups=st.integers(1, 3),
    per_group_in=st.integers(1, 3),
    per_group_out=st.integers(1, 3),
    kernel=st.sampled_from([1, 3]),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv_readers_weigh_each_channel_by_its_output_energy(
    groups, per_group_in, per_group_out, kernel, transposed, seed
):
    rng = np.random.default_rng(seed)
    channels = groups * per_group_in
    x_shape = [1, channels, 7, 7]
    if transposed:
        weight = rng.normal(size=(channels, per_group_out, kernel, kernel))
        op = "ConvTranspose"
    else:
        weight = rng.normal(size=(groups * per_group_out, per_group_in, kernel, kernel))
        op = "Conv"
    node = helper.make_node(op, ["x", "w"], ["y"], group=groups, pads=[kernel // 2] * 4)
    found = reader_channel_weights([node], "x", tuple(x_shape), {"w": weight})
    energy = _energy_per_channel(_reader_model(node, x_shape, weight), x_shape, 1)
    np.testing.assert_allclose(found.weights, energy / energy.mean(), rtol=1e-5)
    assert found.inner == 49
    positions = np.arange(channels * 49)
    np.testing.assert_array_equal(found.at(positions), np.repeat(found.weights, 49).astype(np.float32))


def test_matmul_and_gemm_readers_weigh_the_last_or_second_axis():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(5, 4))
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"])
    found = reader_channel_weights([matmul], "x", (2, 3, 5), {"w": weight})
    energy = _energy_per_channel(_reader_model(matmul, [2, 3, 5], weight), [2, 3, 5], 2)
    np.testing.assert_allclose(found.weights, energy / energy.mean(), rtol=1e-5)
    assert found.inner == 1
    gemm = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    found = reader_channel_weights([gemm], "x", (2, 4), {"w": weight})
    energy = _energy_per_channel(_reader_model(gemm, [2, 4], weight), [2, 4], 1)
    np.testing.assert_allclose(found.weights, energy / energy.mean(), rtol=1e-5)


def test_two_readers_add_up_and_any_other_reader_leaves_the_error_plain():
    rng = np.random.default_rng(1)
    first, second = rng.normal(size=(4, 3, 1, 1)), rng.normal(size=(2, 3, 3, 3))
    conv_a = helper.make_node("Conv", ["x", "a"], ["ya"])
    conv_b = helper.make_node("Conv", ["x", "b"], ["yb"], pads=[1, 1, 1, 1])
    params = {"a": first, "b": second}
    both = reader_channel_weights([conv_a, conv_b], "x", (2, 3, 6, 6), params)
    summed = (first**2).sum(axis=(0, 2, 3)) + (second**2).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(both.weights, summed / summed.mean())
    pool = helper.make_node("MaxPool", ["x"], ["yp"], kernel_shape=[2, 2])
    assert reader_channel_weights([conv_a, pool], "x", (2, 3, 6, 6), params) is None
    as_weight = helper.make_node("MatMul", ["a", "x"], ["ym"])  # the tensor is not the data input
    assert reader_channel_weights([as_weight], "x", (2, 3, 6, 6), params) is None
    assert reader_channel_weights([], "x", (2, 3, 6, 6), params) is None
    zero = reader_channel_weights([conv_a], "x", (2, 3, 6, 6), {"a": np.zeros_like(first)})
    assert zero is None  # nothing reads it through a non-zero weight: plain error
