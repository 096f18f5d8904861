"""HardSwish between quantized tensors runs on onnxruntime's integer kernels and computes the same."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.io import to_ir, to_proto
from onnxq.passes.integer_hardswish import hardswish_on_integers
from tests.conftest import export
from tests.passes.test_equalize import hard_swish_block

SHAPE = [1, 4, 5, 5]


def qdq_hardswish(scale: float, zero_point: int, out_scale: float, out_zero_point: int, dtype=np.uint8):
    """float → Q → DQ → HardSwish → Q → DQ: what insert_qdq writes around a HardSwish."""
    constants = [
        numpy_helper.from_array(np.array(scale, np.float32), "s"),
        numpy_helper.from_array(np.array(zero_point, dtype), "z"),
        numpy_helper.from_array(np.array(out_scale, np.float32), "s_out"),
        numpy_helper.from_array(np.array(out_zero_point, dtype), "z_out"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "s", "z"], ["x"], name="quantize"),
        helper.make_node("DequantizeLinear", ["x", "s", "z"], ["x_float"], name="dequantize"),
        helper.make_node("HardSwish", ["x_float"], ["y_float"], name="hardswish"),
        helper.make_node("QuantizeLinear", ["y_float", "s_out", "z_out"], ["y"], name="quantize_out"),
        helper.make_node("DequantizeLinear", ["y", "s_out", "z_out"], ["output"], name="dequantize_out"),
    ]
    graph = helper.make_graph(
        nodes,
        "hardswish",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, SHAPE)],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


def rewritten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    graph_model = to_ir(model)
    count = hardswish_on_integers(graph_model.graph)
    result = to_proto(graph_model)
    result.ir_version = model.ir_version
    return result, count


def run(model: onnx.ModelProto, x: np.ndarray, optimized_path=None) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    runner = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return runner.run(None, {"input": x})[0]


def optimized_ops(path) -> list[str]:
    return [node.op_type for node in onnx.load(path).graph.node]


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(0.005, 0.1),
    zero_point=st.integers(60, 200),
    seed=st.integers(0, 2**16),
)
def test_the_integer_form_is_within_one_step_of_the_numpy_hardswish(
    tmp_path_factory, scale, zero_point, seed
):
    """Every value of the quantized input, through QLinearAdd and QLinearMul: at most one output
    step from the numpy HardSwish of the same dequantized input, quantized (h's rounding is at most
    |x|/510, half a step where the output's range covers the input's)."""
    x = np.random.default_rng(seed).normal(0, 80 * scale, SHAPE).astype(np.float32)
    high = (255 - zero_point) * scale
    out_scale = (max(high, 0.0) + 0.375) / 255
    model = qdq_hardswish(scale, zero_point, out_scale, 13)
    integer, count = rewritten(model)
    assert count == 1
    path = tmp_path_factory.mktemp("hardswish") / "optimized.onnx"
    y = run(integer, x, path)
    assert [op for op in optimized_ops(path) if op not in ("QuantizeLinear", "DequantizeLinear")] == [
        "QLinearAdd",
        "QLinearMul",
    ]
    q = np.clip(np.round(x / scale) + zero_point, 0, 255)
    x_float = (q - zero_point) * scale
    reference = x_float * np.clip(x_float / 6 + 0.5, 0, 1)
    reference = (np.clip(np.round(reference / out_scale) + 13, 0, 255) - 13) * out_scale
    assert np.abs(y - reference).max() <= out_scale * 1.001


def test_int8_zero_points_are_left_float():
    """onnxruntime fuses the integer form only with uint8 activations: int8 ones keep their HardSwish."""
    model = qdq_hardswish(0.05, 0, 0.03, -115, dtype=np.int8)
    same, count = rewritten(model)
    assert count == 0 and "HardSwish" in [node.op_type for node in same.graph.node]


def close_channels_block():
    """Conv → HardSwish → depthwise conv → HardSwish → pool → Linear at torch's initialisation:
    channels within a few times of each other, as MobileNetV3's and PP-LCNet's are."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    block = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Hardswish(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    return export(block, torch.zeros(1, 3, 8, 8))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((24, 3, 8, 8)).astype(np.float32)


def hardswish_count(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "HardSwish" for node in model.graph.node)


@pytest.mark.parametrize(("bits", "integer"), [((8, 8), True), ((4, 8), False), ((8, 6), False)])
def test_hardswish_runs_on_integers_at_8_bits_only(images, tmp_path, bits, integer):
    model = close_channels_block()
    config = onnxq.QuantConfig(weight_bits=bits[0], activation_bits=bits[1], speed_check=False)
    result = onnxq.quantize(model, images, config)
    assert hardswish_count(result.model) == (0 if integer else 2)
    path = tmp_path / "optimized.onnx"
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(path)
    onnxruntime.InferenceSession(
        result.model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    assert ("QLinearMul" in optimized_ops(path)) == integer
    assert result.fidelity.min_sqnr > 20.0
    said = [note for note in result.notes if note.startswith("HardSwish on integer kernels")]
    assert said == (
        ["HardSwish on integer kernels: 2 nodes, each written as a QLinearAdd and a QLinearMul"]
        if integer
        else []
    )


def test_channels_far_apart_keep_their_equalization_and_a_float_hardswish(images):
    """PP-PicoDet's case: the stem's channels three decades apart, which a depthwise conv
    multiplies back up. There the float-side moves are worth more than the integer kernels
    (held-out worst SQNR 14.6 dB with them, 2.3 without), so the HardSwishes beside them stay float."""
    model = onnxq.fuse(hard_swish_block()).model
    result = onnxq.quantize(model, images, onnxq.QuantConfig(speed_check=False))
    assert any("equalized the channels" in note for note in result.notes)
    assert hardswish_count(result.model) >= 1
