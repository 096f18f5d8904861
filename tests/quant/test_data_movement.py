"""Ops that only move values (a pixel shuffle, a nearest-neighbour up-sampling) take their input's
scale, so onnxruntime runs them on int8 between integer layers and nothing is rounded twice; a
linear up-sampling computes new values, which onnxruntime runs in float: it keeps its own pair."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxq
from onnxq.passes.infer_types import typed_ir
from onnxq.quant.plan import plan_quantization
from tests.conftest import deployed_graph, export

MOVES = {
    "pixel_shuffle": ("DepthToSpace", True),
    "nearest": ("Resize", True),
    "bilinear": ("Resize", False),
}


def _model(move: str) -> onnx.ModelProto:
    import torch
    from torch import nn

    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.head = nn.Conv2d(4 if move == "pixel_shuffle" else 16, 8, 3, padding=1)

        def forward(self, x):
            y = torch.relu(self.stem(x))
            if move == "pixel_shuffle":
                y = nn.functional.pixel_shuffle(y, 2)
            else:
                y = nn.functional.interpolate(y, scale_factor=2.0, mode=move)
            return torch.relu(self.head(y)).mean(dim=(2, 3))

    torch.manual_seed(0)
    return export(Up(), torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("move", MOVES)
def test_only_ops_that_copy_values_share_their_input_scale(move):
    op_type, shares = MOVES[move]
    graph = typed_ir(_model(move)).graph
    plan = plan_quantization(graph, onnxq.QuantConfig())
    (node,) = [n for n in graph if n.op_type == op_type]
    output = plan.activations.get(node.outputs[0].name)
    assert (output is not None and output.shares is not None) == shares
    assert (node.name in plan.quantized_nodes) == shares


@pytest.mark.parametrize("move", [m for m, (_, shares) in MOVES.items() if shares])
def test_onnxruntime_moves_int8_values_between_integer_layers(move, tmp_path):
    data = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    config = onnxq.QuantConfig(fidelity_fallback=False, speed_check=False)
    result = onnxq.quantize(_model(move), data, config)
    nodes = deployed_graph(result.model, tmp_path).node
    producers = {o: n.op_type for n in nodes for o in n.output}
    (moved,) = [n for n in nodes if n.op_type == MOVES[move][0]]
    assert producers[moved.input[0]] not in ("DequantizeLinear", "Relu")  # int8 in
    assert result.fidelity.min_sqnr > 30
