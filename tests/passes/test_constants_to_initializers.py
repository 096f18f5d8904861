"""Weights written as Constant nodes, or read through Identity nodes, are found as initializers
where onnxsim (which folds both) failed or was skipped, and the graph computes what it computed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.errors import OnnxqError
from onnxq.io import session, to_ir, to_proto
from onnxq.passes.graph_utils import constants_to_initializers


def _conv_through(constant_weight: bool, identities: int) -> onnx.ModelProto:
    """x → Conv → Relu whose weight is an initializer or a Constant node, read through a chain of
    Identity nodes; the output declared without a shape (onnxsim refuses such a graph)."""
    weight = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    nodes, initializers, source = [], [], "weight"
    if constant_weight:
        nodes.append(helper.make_node("Constant", [], [source], value=numpy_helper.from_array(weight)))
    else:
        initializers.append(numpy_helper.from_array(weight, source))
    for index in range(identities):
        nodes.append(helper.make_node("Identity", [source], [f"weight_{index}"]))
        source = f"weight_{index}"
    nodes += [
        helper.make_node("Conv", ["x", source], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_through_identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(("constant_weight", "identities"), [(True, 0), (True, 2), (False, 1)])
def test_weights_read_through_identities_become_the_layers_initializer(constant_weight, identities):
    model = _conv_through(constant_weight, identities)
    graph_model = to_ir(model)
    moved = constants_to_initializers(graph_model.graph)
    folded = to_proto(graph_model)
    assert moved == int(constant_weight) + identities
    assert [node.op_type for node in folded.graph.node] == ["Conv", "Relu"]
    conv = folded.graph.node[0]
    assert conv.input[1] in {tensor.name for tensor in folded.graph.initializer}
    sample = {"x": np.random.default_rng(1).standard_normal((2, 3, 9, 9)).astype(np.float32)}
    np.testing.assert_array_equal(session(folded).run(None, sample)[0], session(model).run(None, sample)[0])


def test_a_conv_whose_weight_comes_through_an_identity_quantizes():
    """Before, onnxsim failed on the shapeless output and the Conv stayed float: "nothing to
    quantize"."""
    data = np.random.default_rng(2).standard_normal((32, 3, 9, 9)).astype(np.float32)
    result = onnxq.quantize(_conv_through(True, 1), data, onnxq.QuantConfig(speed_check=False))
    assert result.quantized_nodes == 1


def _single_layer(kind: str) -> tuple[onnx.ModelProto, np.ndarray]:
    """A grouped ConvTranspose, or a MatMul whose constant weight is its first input (W·x)."""
    rng = np.random.default_rng(3)
    if kind == "grouped_deconv":
        node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], group=2)
        weight, shape, output = rng.standard_normal((4, 3, 3, 3)), ["n", 4, 7, 7], ["n", 6, 15, 15]
    else:
        node = helper.make_node("MatMul", ["w", "x"], ["y"])
        weight, shape, output = rng.standard_normal((8, 16)), ["n", 16, 5], ["n", 8, 5]
    graph = helper.make_graph(
        [node],
        kind,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output)],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, rng.standard_normal((16, *shape[1:])).astype(np.float32)


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("grouped_deconv", r"ConvTranspose '.+' stays float: grouped ConvTranspose"),
        ("weight_first_matmul", r"MatMul '.+' stays float: its constant weights are its first input"),
    ],
)
def test_nothing_to_quantize_names_the_layer_and_why_it_stays_float(kind, why):
    """The error says why the one layer stays float, not that the model has no layer at all."""
    model, data = _single_layer(kind)
    with pytest.raises(OnnxqError, match=rf"nothing to quantize: {why}"):
        onnxq.quantize(model, data, onnxq.QuantConfig(speed_check=False))
