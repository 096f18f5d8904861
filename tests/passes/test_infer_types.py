"""Types inferred on the weightless copy are those inferred on the whole model, and the typed IR
reads its weights from the model it was given."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxq.hollow import HOLLOW_BYTES
from onnxq.io import session, to_proto
from onnxq.passes.infer_types import typed_ir, typed_structure
from tests.conftest import export


def _detector_like():
    """A conv body with a head that computes its Reshape target from the input's shape (int64
    arithmetic shape inference propagates), and weights far above HOLLOW_BYTES."""
    import torch
    from torch import nn

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 12, 1))
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.body(x)
            n, c, h, w = y.shape
            return self.fc(y.reshape(n, c // 4, 4, h * w).transpose(2, 3))

    torch.manual_seed(0)
    return export(Head(), torch.randn(1, 3, 8, 8))


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return _detector_like()


def _value_types(model: onnx.ModelProto) -> dict[str, bytes]:
    return {info.name: info.type.SerializeToString() for info in model.graph.value_info}


def test_the_weightless_copy_gets_the_types_the_whole_model_gets(model):
    whole = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    typed = typed_structure(model)
    assert _value_types(typed) == _value_types(whole)
    assert [o.SerializeToString() for o in typed.graph.output] == [
        o.SerializeToString() for o in whole.graph.output
    ]
    assert any(t.ByteSize() > HOLLOW_BYTES for t in model.graph.initializer)  # something was left out


def test_the_typed_ir_computes_what_the_model_computes_and_types_every_value(model):
    graph_model = typed_ir(model)
    untyped = [v.name for node in graph_model.graph for v in node.outputs if v.dtype is None]
    assert not untyped
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = session(model, optimize=False).run(None, {"input": x})[0]
    got = session(to_proto(graph_model), optimize=False).run(None, {"input": x})[0]
    np.testing.assert_array_equal(got, want)


def test_the_typed_ir_weights_are_the_models_own(model):
    graph_model = typed_ir(model)
    for tensor in model.graph.initializer:
        value = graph_model.graph.initializers[tensor.name].const_value
        np.testing.assert_array_equal(value.numpy(), onnx.numpy_helper.to_array(tensor))
        if tensor.ByteSize() > HOLLOW_BYTES:
            assert isinstance(value, ir.TensorProtoTensor)
            assert value.raw is tensor  # wrapped, not copied
