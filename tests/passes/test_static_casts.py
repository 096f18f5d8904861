"""CastLike of a known element type becomes Cast, so that constant folding reaches it: torch's
dynamo exporter without its optimizer writes bias-free Convs' zero biases that way."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.io import session
from onnxq.passes.static_casts import static_casts
from onnxq.prepare import fuse

torch = pytest.importorskip("torch")
nn = torch.nn


def _unoptimised_export(tmp_path) -> onnx.ModelProto:
    """Conv (no bias) → BatchNorm → ReLU twice, by the dynamo exporter with optimize=False."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            )  # fmt: skip

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    net = Net()
    for norm in (net.body[1], net.body[4]):  # statistics that make folding matter
        norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2)
    path = tmp_path / "net.onnx"
    torch.onnx.export(net.eval(), (torch.zeros(1, 3, 16, 16),), str(path), dynamo=True, optimize=False)
    return onnx.load(path)


def test_an_unoptimised_dynamo_export_folds_its_batchnorms(tmp_path):
    model = _unoptimised_export(tmp_path)
    assert sum(node.op_type == "CastLike" for node in model.graph.node) == 2
    cast, note = static_casts(model)
    assert note == "wrote 2 CastLike nodes whose target type is known as Cast"
    assert not any(node.op_type == "CastLike" for node in cast.graph.node)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    name = model.graph.input[0].name
    (want,) = session(model).run(None, {name: x})
    (got,) = session(cast).run(None, {name: x})
    # onnxruntime now folds BatchNorm into the Conv, with float32 rounding of its own
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    fused = fuse(model, sample={name: x})
    assert len(fused.folded.folded) == 2  # none before: the Convs' biases were run-time values
    assert not any(node.op_type == "BatchNormalization" for node in fused.model.graph.node)
    (folded,) = session(fused.model).run(None, {name: x})
    np.testing.assert_allclose(folded, want, rtol=1e-4, atol=1e-5)


def test_a_cast_like_of_unknown_type_and_a_model_without_one_stay_as_they_were(small_model):
    assert static_casts(small_model) == (small_model, None)
    graph = helper.make_graph(
        [helper.make_node("CastLike", ["x", "like"], ["y"])],
        "unknown",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]), onnx.ValueInfoProto(name="like")],
        [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)],
        [numpy_helper.from_array(np.zeros(1, np.float32), "unused")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert static_casts(model) == (model, None)
