"""Model-local functions are inlined before any pass, so the layers inside them are quantized."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest

import onnxq
from onnxq.io import session
from onnxq.passes.inline_functions import inline_functions

torch = pytest.importorskip("torch")
nn = torch.nn


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.first, self.second = (
            nn.Conv2d(channels, channels, 3, 1, 1),
            nn.Conv2d(channels, channels, 3, 1, 1),
        )

    def forward(self, x):
        return torch.relu(x + self.second(torch.relu(self.first(x))))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(_Block(8), _Block(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _with_functions() -> onnx.ModelProto:
    """A ResNet-style net whose residual blocks the TorchScript exporter writes as ONNX functions."""
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.onnx.export(
        _Net().eval(),
        (torch.zeros(1, 3, 16, 16),),
        buffer,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=15,
        export_modules_as_functions={_Block},
        dynamo=False,
    )
    model = onnx.load_from_string(buffer.getvalue())
    assert model.functions and sum(node.op_type == "_Block" for node in model.graph.node) == 2
    return model


def test_inlined_functions_compute_what_their_calls_computed():
    model = _with_functions()
    inlined, note = inline_functions(model)
    assert not inlined.functions and note == "inlined 2 calls of 1 model-local functions"
    assert sum(node.op_type == "Conv" for node in inlined.graph.node) == 5
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    (want,) = session(model).run(None, {"input": x})
    (got,) = session(inlined).run(None, {"input": x})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_model_without_functions_comes_back_as_it_was(small_model):
    assert inline_functions(small_model) == (small_model, None)


def test_the_layers_inside_functions_are_quantized():
    """Before, the blocks reached the passes as opaque nodes: only the stem and head were quantized."""
    x = np.random.default_rng(1).standard_normal((32, 3, 16, 16)).astype(np.float32)
    config = onnxq.QuantConfig(speed_check=False, max_samples=32)
    result = onnxq.quantize(_with_functions(), {"input": x}, config)
    weights = [node.input[1] for node in result.model.graph.node if node.op_type in ("Conv", "Gemm")]
    assert len(weights) == 6
    producers = {output: node.op_type for node in result.model.graph.node for output in node.output}
    assert all(producers.get(weight) == "DequantizeLinear" for weight in weights)
    assert any("inlined 2 calls" in note for note in result.notes)
