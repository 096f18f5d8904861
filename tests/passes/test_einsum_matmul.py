"""Einsum of an activation and a constant weight that is a matrix product becomes MatMul (Keras'
EinsumDense projections), so that onnxq quantizes it."""

from __future__ import annotations

import numpy as np
import pytest

import onnxq
from onnxq.io import session
from onnxq.passes.einsum_matmul import einsum_to_matmul
from tests.conftest import export

torch = pytest.importorskip("torch")
nn = torch.nn


class _EinsumAttentionProjections(nn.Module):
    """Features to heads ("abc,cde->abde"), heads back to features ("abcd,cde->abe"), a dense layer
    with its weight stored output-first ("abc,dc->abd"), and one whose output letters are
    reordered ("abc,cd->adb"), which is no plain matrix product."""

    def __init__(self) -> None:
        super().__init__()
        self.to_heads = nn.Parameter(torch.randn(8, 2, 4) / 3)
        self.from_heads = nn.Parameter(torch.randn(2, 4, 8) / 3)
        self.dense = nn.Parameter(torch.randn(6, 8) / 3)
        self.reordered = nn.Parameter(torch.randn(6, 5) / 3)

    def forward(self, x):
        heads = torch.relu(torch.einsum("abc,cde->abde", x, self.to_heads))
        y = torch.einsum("abcd,cde->abe", heads, self.from_heads)
        y = torch.relu(torch.einsum("abc,dc->abd", y, self.dense))
        return torch.einsum("abc,cd->adb", y, self.reordered)


def _model():
    torch.manual_seed(0)
    return export(_EinsumAttentionProjections(), torch.zeros(1, 7, 8), opset=17)


def test_matrix_product_einsums_become_matmuls_with_the_same_outputs():
    model = _model()
    written, note = einsum_to_matmul(model)
    assert note == "wrote 3 Einsum nodes with a constant weight as MatMul"
    ops = [node.op_type for node in written.graph.node]
    assert ops.count("Einsum") == 1 and ops.count("MatMul") == 3
    x = np.random.default_rng(0).standard_normal((3, 7, 8)).astype(np.float32)
    (want,) = session(model).run(None, {"input": x})
    (got,) = session(written).run(None, {"input": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_projections_are_quantized():
    x = np.random.default_rng(1).standard_normal((32, 7, 8)).astype(np.float32)
    result = onnxq.quantize(_model(), {"input": x}, onnxq.QuantConfig(speed_check=False, max_samples=32))
    producers = {output: node.op_type for node in result.model.graph.node for output in node.output}
    matmuls = [node for node in result.model.graph.node if node.op_type == "MatMul"]
    assert sum(producers.get(node.input[1]) == "DequantizeLinear" for node in matmuls) == 3


def test_a_model_without_einsum_comes_back_as_it_was(small_model):
    assert einsum_to_matmul(small_model) == (small_model, None)
