"""The opset upgrade computes what the original computes: Resize-10 and Upsample keep their
asymmetric coordinates, and an upgrade that changes the outputs stops with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import onnxq
from onnxq.errors import OnnxqError
from onnxq.io import session
from onnxq.passes import opset_upgrade
from onnxq.passes.opset_upgrade import upgrade_opset
from tests.conftest import export


def _resizing(op: str, opset: int, mode: str, scales: list[float]) -> onnx.ModelProto:
    """One Resize-10 or Upsample-9 with constant scales over a 1×2×5×7 input."""
    node = helper.make_node(op, ["x", "scales"], ["y"], mode=mode)
    graph = helper.make_graph(
        [node],
        "resizing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, *scales])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def _outputs(model: onnx.ModelProto, sample: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model, optimize=False).run(None, sample)


@settings(max_examples=25, deadline=None)
@given(
    op=st.sampled_from([("Resize", 10), ("Upsample", 9)]),
    mode=st.sampled_from(["nearest", "linear"]),
    grow=st.booleans(),
    scales=st.tuples(st.floats(1.0, 3.0), st.floats(1.0, 3.0)),
    seed=st.integers(0, 2**16),
)
def test_an_upgraded_resize_computes_what_resize_10_and_upsample_compute(op, mode, grow, scales, seed):
    """Enlarging (both ops) or shrinking (Resize-10) by any constant scales, to opset 13 and 21."""
    if not grow and op[0] == "Upsample":
        grow = True  # Upsample only enlarges
    scales = [s if grow else 1.0 / s for s in scales]
    model = _resizing(*op, mode, scales)
    sample = {"x": np.random.default_rng(seed).standard_normal((1, 2, 5, 7)).astype(np.float32)}
    for target in (13, 21):
        upgraded = upgrade_opset(model, target, sample)
        np.testing.assert_array_equal(_outputs(upgraded, sample)[0], _outputs(model, sample)[0])


def test_nearest_resizing_that_shrinks_one_axis_and_enlarges_another_is_refused():
    model = _resizing("Resize", 10, "nearest", [0.5, 2.0])
    with pytest.raises(OnnxqError, match="shrinks some axes and enlarges others"):
        upgrade_opset(model, 13)


def test_an_upgrade_that_changes_the_outputs_stops_with_the_reason(monkeypatch):
    """The converter's own output (half-pixel coordinates) is caught by the check on the sample."""
    monkeypatch.setattr(opset_upgrade, "_keep_asymmetric_resizing", lambda graph: None)
    model = _resizing("Resize", 10, "linear", [2.0, 1.5])
    sample = {"x": np.random.default_rng(0).standard_normal((1, 2, 5, 7)).astype(np.float32)}
    with pytest.raises(OnnxqError, match=r"upgrading the model from opset 10 to 13 .* changed its outputs"):
        upgrade_opset(model, 13, sample)


def _segmenter():
    """A small FCN: strided convs, bilinear up-sampling to the input's size, as torchvision's."""
    import torch
    from torch import nn

    class Segmenter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encode = nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1)
            )
            self.classify = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            logits = self.classify(torch.relu(self.encode(x)))
            return nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    torch.manual_seed(0)
    return Segmenter(), torch.zeros(1, 3, 32, 32)


def test_a_segmenter_exported_at_opset_10_is_quantized_against_its_own_outputs():
    """torch writes the bilinear up-sampling as Resize-10 with scales computed from shapes; the
    quantized model must stay close to the exported model, not to the converter's version of it
    (half-pixel coordinates: 10-15 dB from the original on an FCN)."""
    module, example = _segmenter()
    model = export(module, example, opset=10, outputs=("out",))
    assert any(node.op_type == "Resize" for node in model.graph.node)
    rng = np.random.default_rng(0)
    calibration = rng.uniform(-1, 1, (32, 3, 32, 32)).astype(np.float32)
    result = onnxq.quantize(model, calibration, onnxq.QuantConfig(speed_check=False))
    test = {"input": rng.uniform(-1, 1, (4, 3, 32, 32)).astype(np.float32)}
    expected, actual = _outputs(model, test)[0], _outputs(result.model, test)[0]
    sqnr = 10 * np.log10(np.sum(expected**2) / np.sum((expected - actual) ** 2))
    assert sqnr > 30


def test_a_sample_the_original_cannot_run_is_left_to_the_stage_that_needs_it():
    """No upgrade error for a model that fails on the sample itself (a 3-channel sample where
    the input takes 2): the calibration reports that failure as the model's own."""
    model = _resizing("Resize", 10, "linear", [2.0, 2.0])
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "channels"
    wrong = {"x": np.zeros((1, 3, 5), np.float32)}
    upgraded = upgrade_opset(model, 13, wrong)
    assert any(node.op_type == "Resize" for node in upgraded.graph.node)


def _scaled_conv(opset: int, scale: float, bias: list[float], ir_version: int = 3) -> onnx.ModelProto:
    """ImageScaler → Conv → LeakyRelu, as onnxmltools wrote Tiny YOLOv2 from CoreML (opset 7 or 8,
    IR version 3: the weights are graph inputs too)."""
    weight = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.2
    nodes = [
        helper.make_node("ImageScaler", ["image"], ["scaled"], scale=scale, bias=bias),
        helper.make_node("Conv", ["scaled", "weight"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("LeakyRelu", ["conv"], ["grid"], alpha=0.1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_yolo_stem",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8]),
            helper.make_tensor_value_info("weight", TensorProto.FLOAT, [4, 3, 3, 3]),
        ],
        [helper.make_tensor_value_info("grid", TensorProto.FLOAT, [1, 4, 8, 8])],
        [onnx.numpy_helper.from_array(weight, "weight")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


@settings(max_examples=15, deadline=None)
@given(
    opset=st.sampled_from([7, 8, 9]),
    scale=st.floats(1e-3, 2.0),
    bias=st.lists(st.floats(-2.0, 2.0), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_an_image_scaler_the_converter_cannot_read_is_upgraded_as_a_mul_and_an_add(opset, scale, bias, seed):
    """onnx's version converter has no schema for the experimental ImageScaler; the upgraded
    model computes what onnxruntime computes for the original."""
    model = _scaled_conv(opset, scale, bias)
    sample = {"image": np.random.default_rng(seed).uniform(0, 255, (1, 3, 8, 8)).astype(np.float32)}
    upgraded = upgrade_opset(model, 13, sample)
    assert "ImageScaler" not in {node.op_type for node in upgraded.graph.node}
    np.testing.assert_allclose(
        _outputs(upgraded, sample)[0], _outputs(model, sample)[0], rtol=1e-5, atol=1e-5
    )


def test_a_model_starting_with_an_image_scaler_quantizes():
    model = _scaled_conv(8, 1 / 255, [-0.5, -0.4, -0.3])
    data = np.random.default_rng(0).uniform(0, 255, (16, 3, 8, 8)).astype(np.float32)
    result = onnxq.quantize(model, data, onnxq.QuantConfig(speed_check=False, fidelity_fallback=False))
    assert result.quantized_nodes == 1
    sample = {"image": data[:1]}
    want, got = _outputs(model, sample)[0], _outputs(result.model, sample)[0]
    assert 10 * np.log10(np.square(want).sum() / np.square(got - want).sum()) > 30
