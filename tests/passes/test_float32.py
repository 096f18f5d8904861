"""Half-precision models compute in float32 with their float16 interface kept, and quantize."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxq.io import session
from onnxq.passes.float32 import compute_in_float32, is_half_precision
from onnxq.pipeline import quantize
from tests.conftest import export, small_cnn


def _half_model() -> onnx.ModelProto:
    import torch

    return export(small_cnn().half(), torch.zeros(1, 3, 16, 16, dtype=torch.float16), keep_bn=True)


def _types(values) -> list[int]:
    return [v.type.tensor_type.elem_type for v in values]


def test_a_half_model_computes_the_same_in_float32_behind_its_half_interface():
    model = _half_model()
    widened, note = compute_in_float32(model)
    assert "float16" in note
    assert is_half_precision(model)
    assert all(t.data_type == TensorProto.FLOAT for t in widened.graph.initializer)
    to_half = [
        n.output[0]
        for n in widened.graph.node
        if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16
    ]
    assert to_half == [o.name for o in model.graph.output]
    assert _types(widened.graph.input) == _types(model.graph.input) == [TensorProto.FLOAT16]
    assert _types(widened.graph.output) == _types(model.graph.output) == [TensorProto.FLOAT16]
    onnx.checker.check_model(widened, full_check=True)
    sample = {"input": np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float16)}
    half = session(model, optimize=False).run(None, sample)[0].astype(np.float32)
    full = session(widened, optimize=False).run(None, sample)[0]
    assert full.dtype == np.float16
    assert np.abs(full - half).max() <= 1e-2 * np.abs(half).max()


def test_a_float32_model_is_left_as_it_is(small_model):
    assert compute_in_float32(small_model) == (small_model, None)


def test_half_constants_inside_subgraphs_widen_too():
    """An If whose branches hold float16 Constants: the branches' outputs become float32 too."""

    def branch(name: str, value: float) -> onnx.GraphProto:
        constant = helper.make_node(
            "Constant", [], [f"{name}_c"], value=numpy_helper.from_array(np.full(2, value, np.float16))
        )
        output = helper.make_tensor_value_info(f"{name}_c", TensorProto.FLOAT16, [2])
        return helper.make_graph([constant], name, [], [output])

    nodes = [
        helper.make_node(
            "If", ["flag"], ["shift"], then_branch=branch("then", 1.5), else_branch=branch("else", -2.0)
        ),
        helper.make_node("Add", ["x", "shift"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    widened, _ = compute_in_float32(model)
    onnx.checker.check_model(widened, full_check=True)
    run = session(widened, optimize=False).run
    x = np.array([1.0, 2.0], np.float16)
    np.testing.assert_array_equal(run(None, {"x": x, "flag": np.array(True)})[0], x + np.float16(1.5))
    np.testing.assert_array_equal(run(None, {"x": x, "flag": np.array(False)})[0], x - np.float16(2.0))


def test_a_half_model_quantizes_into_a_drop_in_replacement():
    model = _half_model()
    data = np.random.default_rng(1).standard_normal((24, 3, 16, 16)).astype(np.float16)
    result = quantize(model, {"input": data})
    assert any("float16" in note for note in result.notes)
    assert result.quantized_nodes > 0
    assert _types(result.model.graph.input) == [TensorProto.FLOAT16]
    assert _types(result.model.graph.output) == [TensorProto.FLOAT16]
    sample = {"input": data[:8]}
    expected = session(model).run(None, sample)[0].astype(np.float64)
    got = session(result.model).run(None, sample)[0].astype(np.float64)
    sqnr = 10 * np.log10((expected**2).sum() / ((got - expected) ** 2).sum())
    assert sqnr > 25.0
