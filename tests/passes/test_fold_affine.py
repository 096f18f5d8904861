"""Constant scales and shifts after a layer fold into it: onnxruntime computes the same outputs."""

from __future__ import annotations

import numpy as np
import pytest

from onnxq.io import session, to_ir, to_proto
from onnxq.passes.fold_affine import fold_affine
from tests.conftest import export


def affine_model():
    """Paddle-style: Conv without bias + Add(scalar); a per-channel Mul and Sub; Gemm / c."""
    import torch
    from torch import nn

    class Affine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.conv2 = nn.Conv2d(8, 8, 1)
            self.scale = nn.Parameter(torch.randn(1, 8, 1, 1))
            self.shift = nn.Parameter(torch.randn(8, 1, 1))
            self.head = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.conv(x) + 0.5)
            y = torch.relu(self.conv2(y) * self.scale - self.shift)
            return self.head(y.mean((2, 3))) / 3.0

    torch.manual_seed(0)
    return export(Affine(), torch.zeros(1, 3, 8, 8))


@pytest.fixture(scope="module")
def model():
    return affine_model()


def test_every_affine_op_folds_and_outputs_match(model):
    graph_model = to_ir(model)
    folded = fold_affine(graph_model.graph)
    ops = [n.op_type for n in graph_model.graph]
    assert len(folded) == 4 and not {"Mul", "Div", "Add", "Sub"} & set(ops)
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    want = session(model, optimize=False).run(None, {"input": x})[0]
    got = session(to_proto(graph_model), optimize=False).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_shift_before_the_layer_or_a_shared_output_is_left_alone():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    c = numpy_helper.from_array(np.float32(2.0), "c")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"]),
        helper.make_node("Sub", ["c", "y"], ["z"]),  # c − y: not an affine map of y's bias
        helper.make_node("Add", ["y", "c"], ["u"]),  # y is also read by Sub: no fold
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 2])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("z", "u")],
        [w, c],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    graph_model = to_ir(model)
    assert fold_affine(graph_model.graph) == []


def channels_last_model(transposed_twice: bool = False):
    """tf2onnx without its optimizer: Conv → Transpose to NHWC → a per-channel Mul and Add along
    the last axis (a Keras BatchNorm written out) → Relu → back to NCHW; with
    `transposed_twice`, the Mul reads the NHWC map through a second Transpose it does not own."""
    import torch
    from torch import nn

    class ChannelsLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 4, 1)
            self.gamma, self.beta = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x).permute(0, 2, 3, 1)
            if transposed_twice:
                return self.conv2(torch.relu(y * self.gamma).permute(0, 3, 1, 2)), y
            y = torch.relu(y * self.gamma + self.beta).permute(0, 3, 1, 2)
            return self.conv2(y)

    torch.manual_seed(0)
    outputs = ("logits", "features") if transposed_twice else ("logits",)
    return export(ChannelsLast(), torch.zeros(1, 3, 8, 8), outputs=outputs)


def test_a_channels_last_affine_behind_a_transpose_folds_and_outputs_match():
    model = channels_last_model()
    graph_model = to_ir(model)
    assert len(fold_affine(graph_model.graph)) == 2
    ops = [n.op_type for n in graph_model.graph]
    assert not {"Mul", "Add"} & set(ops) and ops.count("Transpose") == 2
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    want = session(model, optimize=False).run(None, {"input": x})[0]
    got = session(to_proto(graph_model), optimize=False).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_transpose_read_elsewhere_keeps_the_affine_after_it():
    graph_model = to_ir(channels_last_model(transposed_twice=True))
    assert fold_affine(graph_model.graph) == []
