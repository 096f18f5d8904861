"""Models saved by an onnxruntime session: FusedConv unfused exactly, NCHWc refused."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.errors import OnnxqError
from onnxq.io import session
from onnxq.passes.contrib import MICROSOFT, standard_ops


def _saved_by_onnxruntime(model: onnx.ModelProto, tmp_path) -> onnx.ModelProto:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(tmp_path / "optimized.onnx")


def _fused_conv(activation: str, params: list[float], residual: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    inputs = ["x", "w", "b"] + (["z"] if residual else [])
    node = helper.make_node(
        "FusedConv", inputs, ["y"], domain=MICROSOFT, pads=[1, 1, 1, 1], activation=activation
    )
    if params:
        node.attribute.append(helper.make_attribute("activation_params", params))
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])]
    if residual:
        graph_inputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 6, 6]))
    graph = helper.make_graph(
        [node],
        "g",
        graph_inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [weight, bias],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MICROSOFT, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


@pytest.mark.parametrize(
    ("activation", "params", "residual"),
    [
        ("Relu", [], False),
        ("Clip", [0.0, 6.0], True),
        ("LeakyRelu", [0.1], True),
        ("HardSigmoid", [0.2, 0.5], False),
    ],
)
def test_a_fused_conv_is_written_out_as_what_it_computes(activation, params, residual):
    model = _fused_conv(activation, params, residual)
    unfused, note = standard_ops(model)
    assert "unfused 1" in note
    assert not any(node.domain == MICROSOFT for node in unfused.graph.node)
    onnx.checker.check_model(unfused)
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    if residual:
        feed["z"] = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    want = session(model, optimize=False).run(None, feed)[0]
    np.testing.assert_allclose(
        session(unfused, optimize=False).run(None, feed)[0], want, rtol=1e-5, atol=1e-5
    )


def test_a_model_saved_by_an_onnxruntime_session_quantizes(tmp_path, small_model, calibration_data):
    optimized = _saved_by_onnxruntime(small_model, tmp_path)
    assert any(node.op_type == "FusedConv" for node in optimized.graph.node)
    result = onnxq.quantize(optimized, calibration_data, onnxq.QuantConfig(speed_check=False))
    assert any(note.startswith("unfused") for note in result.notes)
    direct = onnxq.quantize(small_model, calibration_data, onnxq.QuantConfig(speed_check=False))
    assert result.quantized_nodes == direct.quantized_nodes
    assert result.fidelity.min_sqnr > 25.0


def test_nchwc_layout_ops_are_refused_with_the_reason():
    model = _fused_conv("Relu", [], False)
    model.graph.node[0].domain = "com.microsoft.nchwc"
    model.graph.node[0].op_type = "Conv"
    with pytest.raises(OnnxqError, match="NCHWc layout ops"):
        standard_ops(model)
