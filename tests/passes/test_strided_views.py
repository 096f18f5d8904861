"""A strided view of a whole tensor in its own order (torch's dynamo exporter writing `as_strided`
as a Gather through a computed index grid) becomes the tensor itself; any other view stays, and
the graph computes what it computed."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.io import session
from onnxq.passes.infer_types import typed_ir
from onnxq.passes.strided_views import drop_whole_strided_views
from onnxq.prepare import fuse
from onnxq.quant.plan import plan_quantization
from tests.conftest import export

torch = pytest.importorskip("torch")
nn = torch.nn

from onnxq.refine.blocks import partition  # noqa: E402
from onnxq.refine.mirror import Mirror  # noqa: E402
from onnxq.refine.sample_axes import mixed_sample_tensors  # noqa: E402


class _PooledResidualNet(nn.Module):
    """Residual blocks with in-place ReLUs, then torchvision's AdaptiveAvgPool2d and flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = self.relu(self.stem(x))
        for conv in self.blocks:
            y = self.relu(conv(y) + y)
        return self.head(torch.flatten(self.pool(y), 1))


def _dynamo_export(tmp_path, module: nn.Module | None = None) -> onnx.ModelProto:
    """Exported from a channels-last example, as an image read HWC and permuted is: the exporter
    then writes the pooled tensor's view back to row-major order as as_strided."""
    torch.manual_seed(0)
    module = (module or _PooledResidualNet()).eval()
    path = tmp_path / "pooled.onnx"
    example = torch.zeros(2, 12, 12, 3).permute(0, 3, 1, 2)
    batch = {"x": {0: torch.export.Dim("batch", min=1, max=64)}}
    torch.onnx.export(module, (example,), str(path), dynamo=True, dynamic_shapes=batch, external_data=False)
    return onnx.load(path)


def test_a_dynamo_exports_as_strided_view_becomes_the_pooled_tensor(tmp_path):
    model = _dynamo_export(tmp_path)
    ops = [node.op_type for node in model.graph.node]
    assert "Gather" in ops and "Shape" in ops  # the exporter's form, read from the input's batch
    result = fuse(model)
    assert any("strided views" in note for note in result.notes)
    fused_ops = [node.op_type for node in result.model.graph.node]
    assert "Gather" not in fused_ops and "Shape" not in fused_ops
    name = model.graph.input[0].name
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 12, 12)).astype(np.float32)
        (want,) = session(model).run(None, {name: x})
        (got,) = session(result.model).run(None, {name: x})
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unit", ["layer", "block"])
def test_refinement_cuts_a_dynamo_export_as_it_cuts_the_torchscript_export(tmp_path, unit):
    """Before, the input's Shape was alive up to the head: the whole network was one unit."""
    torch.manual_seed(0)
    module = _PooledResidualNet().eval()
    cuts = []
    for model in (_dynamo_export(tmp_path, module), export(module, torch.zeros(1, 3, 12, 12))):
        fused = fuse(model).model
        plan = plan_quantization(onnxq.io.to_ir(fused).graph, onnxq.QuantConfig(weight_bits=4))
        mirror = Mirror(fused)
        samples = {fused.graph.input[0].name: torch.randn(4, 3, 12, 12)}
        uncuttable = mixed_sample_tensors(mirror, samples)  # what refinement keeps cuts off
        cuts.append([len(u.layers) for u in partition(mirror, set(plan.layers), unit, uncuttable)])
    assert cuts[0] == cuts[1]
    assert len(cuts[0]) > 1


def _view_model(shape: tuple[int, ...], index: np.ndarray) -> onnx.ModelProto:
    """y = Gather(Reshape(Relu(x), [-1]), index): a strided view of a computed tensor."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Reshape", ["r", "flat_shape"], ["flat"]),
        helper.make_node("Gather", ["flat", "index"], ["g"], axis=0),
        helper.make_node("Neg", ["g"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "view",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.array([-1], np.int64), "flat_shape"),
            numpy_helper.from_array(index.astype(np.int64), "index"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
    offset=st.integers(0, 2),
    permute=st.booleans(),
)
def test_only_whole_views_in_row_major_order_are_dropped(shape, offset, permute):
    """Index grids offset, permuted or of another shape stay; the output is the same either way."""
    numel = int(np.prod(shape))
    positions = np.arange(numel).reshape(shape)
    index = positions.transpose(tuple(reversed(range(len(shape))))) if permute else positions
    index = np.minimum(index + offset, numel - 1)
    model = _view_model(shape, index)
    ir_model = typed_ir(model)
    dropped = drop_whole_strided_views(ir_model.graph)
    rewritten = ir.to_proto(ir_model)
    whole = np.array_equal(index, positions)
    assert dropped == int(whole)
    assert ("Gather" in [node.op_type for node in rewritten.graph.node]) != whole
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    (want,) = session(model).run(None, {"x": x})
    (got,) = session(rewritten).run(None, {"x": x})
    np.testing.assert_array_equal(got, want)


def test_a_size_one_range_broadcast_along_an_axis_adds_nothing_to_its_steps():
    """Range(0, 1, 1) + zeros(4) reads x[0] four times: the range's step along its one index
    must not count, or the grid would look like x's own order and the Gather would be dropped."""
    nodes = [
        helper.make_node("Range", ["zero", "one", "one"], ["single"]),
        helper.make_node("Add", ["single", "zeros"], ["index"]),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Reshape", ["r", "flat_shape"], ["flat"]),
        helper.make_node("Gather", ["flat", "index"], ["g"], axis=0),
        helper.make_node("Neg", ["g"], ["y"]),
    ]
    constants = {
        "zero": np.array(0, np.int64),
        "one": np.array(1, np.int64),
        "zeros": np.zeros(4, np.int64),
        "flat_shape": np.array([-1], np.int64),
    }
    graph = helper.make_graph(
        nodes,
        "repeated",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ir_model = typed_ir(model)
    assert drop_whole_strided_views(ir_model.graph) == 0
    x = np.arange(4, dtype=np.float32) + 1
    (got,) = session(ir.to_proto(ir_model)).run(None, {"x": x})
    np.testing.assert_array_equal(got, -np.ones(4, np.float32))
