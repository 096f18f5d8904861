"""onnxsim, guarded: its chatter stays out of onnxq's output, and its result is checked on a sample the
model can run."""

from __future__ import annotations

import itertools
import os
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import onnxq
from onnxq.calib.data import DYNAMIC_SIZE, SAMPLE_ELEMENTS, SMALL_DYNAMIC_SIZE, InputSpec, random_sample
from onnxq.passes import simplify as simplify_pass
from onnxq.prepare import sample_and_outputs
from tests.conftest import export, small_cnn


def test_what_onnxsim_writes_to_standard_error_is_not_shown(monkeypatch, capfd):
    """onnxsim's C++ writes "WARNING: failed to run ..." straight to file descriptor 2 for every
    node it cannot fold (102 lines on a torchvision SSD export)."""
    import torch

    model = export(small_cnn(), torch.zeros(1, 3, 16, 16))
    onnxsim = simplify_pass._import_onnxsim()

    def chatty(given, **_):
        os.write(2, b'WARNING: failed to run "Reshape" op, skip...\n')
        return given, True

    monkeypatch.setattr(onnxsim, "simplify", chatty)
    sample = {"input": np.zeros((1, 3, 16, 16), np.float32)}
    simplified, note = simplify_pass.simplify(model, sample)
    print("after", file=sys.stderr)
    captured = capfd.readouterr()
    assert "failed to run" not in captured.err
    assert "after" in captured.err  # standard error works again afterwards
    assert simplified is model and note.startswith("simplified")


class Pyramid:
    """Five stride-2 convs and an FPN-style top-down step: the deepest map, up-sampled ×2, is
    concatenated with the one before it, which only lines up where the image is at least 32 pixels
    a side (a 2-pixel image leaves 1×1 maps whose ×2 is 2×2 against 1×1), as in a YOLO neck."""

    def __new__(cls):
        import torch
        from torch import nn

        class Module(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                widths = [3, 8, 8, 16, 16, 16]
                self.down = nn.ModuleList(nn.Conv2d(a, b, 3, 2, 1) for a, b in itertools.pairwise(widths))

            def forward(self, x):
                maps = []
                for conv in self.down:
                    x = torch.relu(conv(x))
                    maps.append(x)
                top = nn.functional.interpolate(maps[-1], scale_factor=2.0, mode="nearest")
                return torch.cat([top, maps[-2]], 1).mean((2, 3))

        return Module()


def test_a_model_with_dynamic_image_sides_is_simplified_on_a_sample_it_can_run():
    import torch

    model = export(Pyramid(), torch.zeros(1, 3, 64, 64), dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}})
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim] == ["n", "", "h", "w"]
    result = onnxq.fuse(model)  # no sample given: a random one, 224 pixels a side
    assert any(note.startswith("simplified") for note in result.notes)


def test_a_sample_the_model_cannot_run_keeps_the_model_as_it_is_with_the_reason():
    import torch

    model = export(small_cnn(), torch.zeros(1, 3, 16, 16))
    wrong = {"input": np.zeros((1, 5, 16, 16), np.float32)}  # five channels for a 3-channel conv
    simplified, note = simplify_pass.simplify(model, wrong)
    assert simplified is model
    assert note.startswith("kept the model as is: onnxsim's result could not be checked")


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.integers(1, 16)), min_size=1, max_size=5),
    st.integers(1, 4),
)
def test_a_random_sample_keeps_known_sizes_and_fills_unknown_ones(dims, batch):
    spec = InputSpec("x", np.dtype(np.float32), tuple(dims))
    shape = random_sample([spec], batch=batch)["x"].shape
    for axis, (want, got) in enumerate(zip(dims, shape, strict=True)):
        if want is not None:
            assert got == want
        elif axis == 0:
            assert got == batch
        else:
            assert got in (DYNAMIC_SIZE, SMALL_DYNAMIC_SIZE)
    assert np.prod(shape) <= max(SAMPLE_ELEMENTS, np.prod(_smallest(dims, batch)))


def _smallest(dims, batch):
    return [d if d is not None else (batch if i == 0 else SMALL_DYNAMIC_SIZE) for i, d in enumerate(dims)]


def test_the_reason_names_the_node_onnxruntime_failed_in():
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 48])
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="flatten_48")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 48])],
        [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sample = {"x": np.zeros((2, 3, 224, 16), np.float32)}  # what random_sample gives: not 48 values
    simplified, note = simplify_pass.simplify(model, sample)
    assert simplified is model
    assert note.endswith("(its Reshape node 'flatten_48' fails on the sample's sizes)")


def test_a_model_that_runs_only_at_small_unknown_sizes_is_simplified_on_one():
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [0, 96])  # 3 · h · 16 = 96: h = 2
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["flat"], name="flatten_96"),
            helper.make_node("Relu", ["flat"], ["y"], name="relu"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 96])],
        [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert sample_and_outputs(model)[0]["x"].shape == (2, 3, 2, 16)
    result = onnxq.fuse(model)
    assert not any(note.startswith("kept the model as is") for note in result.notes)
