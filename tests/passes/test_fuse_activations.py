"""Hard-swish and hard-sigmoid written op by op become one node: onnxruntime computes the same."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import onnxq
from onnxq.io import session, to_ir, to_proto
from onnxq.passes.fuse_activations import fuse_activations, needs_opset
from tests.conftest import export


def _op_by_op(opset: int = 17, shared: bool = False):
    """Paddle-style x·relu6(x + 3)/6 after a conv, an SE gate relu6(y + 3)/6, torch's Hardswish;
    `shared`: the relu6 output is also read elsewhere, so nothing of the first may fuse."""
    import torch
    from torch import nn

    class Activations(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.gate = nn.Conv2d(8, 8, 1)
            self.hardswish = nn.Hardswish()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            relu6 = torch.clamp(y + 3.0, 0.0, 6.0)
            y2 = y * relu6 / 6.0
            gate = torch.clamp(self.gate(y2.mean((2, 3), keepdim=True)) + 3.0, 0.0, 6.0) / 6.0
            out = self.hardswish(y2 * gate)
            return out + relu6 if shared else out

    torch.manual_seed(0)
    return export(Activations(), torch.zeros(1, 3, 8, 8), opset=opset)


def _ops(model) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _outputs(model, x: np.ndarray) -> np.ndarray:
    return session(model, optimize=False).run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def paddle_style():
    return _op_by_op()


@pytest.fixture(scope="module")
def fused(paddle_style):
    graph_model = to_ir(paddle_style)
    count = fuse_activations(graph_model.graph, opset=17)
    return count, to_proto(graph_model)


def test_op_by_op_activations_become_one_node_each(paddle_style, fused):
    count, model = fused
    ops = _ops(model)
    assert count == 2  # the hard-swish and the gate; torch's own HardSwish was one node already
    assert ops.count("HardSwish") == 2 and ops.count("HardSigmoid") == 1
    assert "Clip" not in ops and "Div" not in ops
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32) * 3
    want, got = _outputs(paddle_style, x), _outputs(model, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@settings(max_examples=25, deadline=None)
@given(arrays(np.float32, (1, 3, 8, 8), elements=st.floats(-12, 12, width=32)))
def test_the_fused_model_computes_what_the_ops_did_for_any_input(paddle_style, fused, x):
    """Values around the kinks at ±3 included: HardSwish is exactly x·Clip(x + 3, 0, 6)/6."""
    want, got = _outputs(paddle_style, x), _outputs(fused[1], x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(float(np.abs(want).max()), 1.0))


def test_a_step_read_elsewhere_keeps_its_ops():
    model = _op_by_op(shared=True)
    graph_model = to_ir(model)
    assert fuse_activations(graph_model.graph, opset=17) == 1  # the gate only
    ops = [node.op_type for node in graph_model.graph]
    assert ops.count("Clip") == 1 and ops.count("HardSigmoid") == 1


def test_below_opset_14_only_hard_sigmoid_fuses_and_the_pipeline_raises_the_opset():
    """torch writes Hardswish as x·HardSigmoid(x) at opset 13; HardSwish needs opset 14."""
    model = _op_by_op(opset=13)
    graph_model = to_ir(model)
    assert needs_opset(graph_model.graph, 13) == 14
    assert fuse_activations(graph_model.graph, opset=13) == 1
    assert "HardSwish" not in [node.op_type for node in graph_model.graph]

    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32) * 3
    result = onnxq.fuse(model, sample={"input": x[:1]})
    ops = _ops(result.model)
    opset = next(o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == 14 and ops.count("HardSwish") == 2 and "Clip" not in ops
    assert any("HardSwish" in note for note in result.notes)
    want, got = _outputs(model, x), _outputs(result.model, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_other_constants_are_not_taken_for_a_hard_swish():
    """x·Clip(x + 3, 0, 6)/5 is not a hard-swish: left as it is."""
    from onnx import TensorProto, helper, numpy_helper

    constants = [
        numpy_helper.from_array(np.float32(v), n)
        for n, v in (("three", 3), ("zero", 0), ("six", 6), ("five", 5))
    ]
    nodes = [
        helper.make_node("Add", ["x", "three"], ["a"]),
        helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
        helper.make_node("Mul", ["x", "c"], ["m"]),
        helper.make_node("Div", ["m", "five"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    graph_model = to_ir(model)
    assert fuse_activations(graph_model.graph, opset=17) == 0
