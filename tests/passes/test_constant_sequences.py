"""Pieces of constant tensors split into sequences become constants: torch's dynamo exporter
without its optimizer packs nn.MultiheadAttention's projections that way."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.io import session
from onnxq.passes.constant_sequences import fold_constant_sequences
from onnxq.prepare import fuse

torch = pytest.importorskip("torch")
nn = torch.nn


class _CrossAttention(nn.Module):
    """Learned queries attending to projected features (a DETR-style decoder's cross-attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Linear(6, 16)
        self.queries = nn.Parameter(torch.randn(1, 4, 16))
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        memory = self.project(x)
        attended, _ = self.attention(self.queries.expand(x.shape[0], -1, -1), memory, memory)
        return attended


def _unoptimised_export(tmp_path) -> onnx.ModelProto:
    torch.manual_seed(0)
    path = tmp_path / "attention.onnx"
    torch.onnx.export(
        _CrossAttention().eval(), (torch.zeros(2, 5, 6),), str(path), dynamo=True, optimize=False
    )
    return onnx.load(path)


def test_the_packed_projections_of_an_unoptimised_export_become_constants(tmp_path):
    model = _unoptimised_export(tmp_path)
    picks = sum(node.op_type == "SequenceAt" for node in model.graph.node)
    assert picks >= 3
    folded, note = fold_constant_sequences(model)
    assert note == f"wrote {picks} pieces of constant tensors split into sequences as constants"
    assert not any(node.op_type in ("SequenceAt", "SplitToSequence") for node in folded.graph.node)
    x = np.random.default_rng(0).standard_normal((2, 5, 6)).astype(np.float32)
    name = model.graph.input[0].name
    (want,) = session(model).run(None, {name: x})
    (got,) = session(folded).run(None, {name: x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    prepared = fuse(model, sample={name: x}).model  # every projection's weight now a constant
    constants = {t.name for t in prepared.graph.initializer}
    producers = {output: node for node in prepared.graph.node for output in node.output}

    def constant(name: str) -> bool:  # an initializer, or one read through Transpose
        node = producers.get(name)
        return name in constants or (
            node is not None and node.op_type == "Transpose" and node.input[0] in constants
        )

    # the input projection, the packed key-value projection and the output projection (the
    # queries' projection is folded whole: the queries are constants); the two attention
    # products read activations
    matmuls = [node for node in prepared.graph.node if node.op_type in ("MatMul", "Gemm")]
    assert sum(constant(node.input[1]) for node in matmuls) == 3 and len(matmuls) == 5


def test_splits_it_cannot_compute_stay(small_model):
    assert fold_constant_sequences(small_model) == (small_model, None)
    graph = helper.make_graph(
        [
            helper.make_node("SplitToSequence", ["x"], ["pieces"], axis=0),
            helper.make_node("SequenceAt", ["pieces", "one"], ["second"]),
        ],
        "run_time",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2])],
        [helper.make_tensor_value_info("second", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(np.array(1, np.int64), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert fold_constant_sequences(model) == (model, None)


@pytest.mark.parametrize(
    ("sizes", "keepdims", "position", "expected"),
    [
        (None, 1, 1, [[2.0, 3.0]]),
        (None, 0, -1, [4.0, 5.0]),
        (np.array(2, np.int64), 1, 1, [[4.0, 5.0]]),
        (np.array([1, 2], np.int64), 1, 1, [[2.0, 3.0], [4.0, 5.0]]),
    ],
)
def test_a_piece_matches_onnxruntime(sizes, keepdims, position, expected):
    """Each way SplitToSequence cuts (ones, a scalar size, listed sizes; keepdims) against
    onnxruntime running the same split."""
    inputs = ["table"] if sizes is None else ["table", "sizes"]
    graph = helper.make_graph(
        [
            helper.make_node("SplitToSequence", inputs, ["pieces"], axis=0, keepdims=keepdims),
            helper.make_node("SequenceAt", ["pieces", "position"], ["piece"]),
            helper.make_node("Add", ["piece", "x"], ["y"]),
        ],
        "split",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "table"),
            numpy_helper.from_array(np.array(position, np.int64), "position"),
            *([] if sizes is None else [numpy_helper.from_array(sizes, "sizes")]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    folded, note = fold_constant_sequences(model)
    assert note is not None
    zero = np.zeros(1, np.float32)
    (want,) = session(model).run(None, {"x": zero})
    (got,) = session(folded).run(None, {"x": zero})
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, np.array(expected, np.float32))
