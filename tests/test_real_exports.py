"""Graphs as detector exporters write them: shapes computed at run time, scalars crossing layers."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest

import onnxq
from onnxq.io import session


def yolo_style_head():
    """Two levels of box/score convs, reshaped by shapes read at run time (Shape → Gather →
    Unsqueeze → Concat → Reshape), concatenated, split, scores through a Sigmoid."""
    import torch
    from torch import nn

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.SiLU())
            self.down = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.SiLU())
            self.box = nn.ModuleList([nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)])
            self.cls = nn.ModuleList([nn.Conv2d(8, 3, 1), nn.Conv2d(8, 3, 1)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.stem(x)
            b = self.down(a)
            levels = []
            for i, f in enumerate((a, b)):
                n, _, h, w = f.shape
                levels.append(torch.cat([self.box[i](f), self.cls[i](f)], 1).view(n, 7, h * w))
            box, score = torch.cat(levels, 2).split([4, 3], 1)
            return torch.cat([box * 2.0, score.sigmoid()], 1)

    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.onnx.export(
        Head().eval(),
        (torch.zeros(1, 3, 32, 32),),
        buffer,
        input_names=["images"],
        output_names=["out"],
        dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}, "out": {0: "n", 2: "anchors"}},
        opset_version=12,
        dynamo=False,
    )
    return onnx.load_from_string(buffer.getvalue())


@pytest.fixture(scope="module")
def head() -> onnx.ModelProto:
    return yolo_style_head()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((20, 3, 32, 32)).astype(np.float32)


def test_the_export_computes_shapes_at_run_time(head):
    ops = {n.op_type for n in head.graph.node}
    assert {"Shape", "Gather", "Concat", "Reshape"} <= ops


@pytest.mark.parametrize(
    ("method", "w_bits"),
    [("percentile", 8), ("mse", 8), ("mse", 4), ("pd", 4), ("minmax", 2)],
)
def test_shape_arithmetic_stays_integer_and_the_model_runs(head, images, method, w_bits):
    config = onnxq.QuantConfig(
        weight_bits=w_bits, calibration=onnxq.CalibrationMethod(method), batch_size=8, max_samples=20
    )
    result = onnxq.quantize(head, images, config)
    quantized = [n for n in result.model.graph.node if n.op_type == "QuantizeLinear"]
    produced_by = {o: n.op_type for n in result.model.graph.node for o in n.output}
    assert quantized and all(produced_by.get(q.input[0]) not in ("Shape", "Gather") for q in quantized)
    assert not any("shape" in reason for reason in result.float_nodes.values())
    expected = session(head).run(None, {"images": images})[0]
    got = session(result.model).run(None, {"images": images})[0]
    assert got.shape == expected.shape
    cosine = np.vdot(expected, got) / (np.linalg.norm(expected) * np.linalg.norm(got))
    assert cosine > (0.99 if w_bits == 8 else 0.9)
