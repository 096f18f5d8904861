"""Units of refinement (onnxq/refine/blocks.py): where the graph is cut into blocks, layers
and windows, on residual networks, detector heads, token MLPs and graphs the mirror cannot run
whole."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import onnxq  # noqa: E402
from onnxq.prepare import fuse  # noqa: E402
from onnxq.quant.plan import plan_quantization  # noqa: E402
from onnxq.refine.blocks import partition  # noqa: E402
from onnxq.refine.mirror import Mirror  # noqa: E402
from tests.conftest import needs_shared  # noqa: E402
from tests.refine.common import FAST  # noqa: E402


def test_blocks_of_a_residual_network(small_model):
    model = fuse(small_model).model
    plan = plan_quantization(onnxq.io.to_ir(model).graph, onnxq.QuantConfig())
    mirror = Mirror(model)
    blocks = partition(mirror, set(plan.layers), "block")
    layers = partition(mirror, set(plan.layers), "layer")
    # stem conv | branch conv → depthwise → Add (one tensor crosses before and after) | head
    assert [len(b.layers) for b in blocks] == [1, 2, 1]
    assert [len(u.layers) for u in layers] == [1, 1, 1, 1]
    assert any(len(u.inputs) == 2 for u in layers)  # the skip connection crosses a layer cut
    assert len(partition(mirror, set(plan.layers), "window:2")) == 2
    assert sum(len(b.layers) for b in blocks) == len(plan.layers)


@pytest.mark.parametrize("depth", [3, 9])
def test_parallel_branches_stay_one_unit_up_to_a_limit_then_are_cut_where_several_cross(depth):
    """Two parallel branches of `depth` convs (a detector head's box and class branches), two
    tensors alive at every cut inside: 6 layers stay one unit (as a re-parameterized block's
    branches do), 18 (a detector's neck) are cut into groups of GROUP_LAYERS."""
    from onnxq.refine import blocks as partitioning
    from tests.conftest import export

    class TwoBranches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.box = torch.nn.Sequential(*[torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(depth)])
            self.cls = torch.nn.Sequential(*[torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(depth)])

        def forward(self, x):
            x = torch.relu(self.stem(x))
            return torch.cat([self.box(x), self.cls(x)], 1)

    torch.manual_seed(0)
    model = fuse(export(TwoBranches(), torch.zeros(1, 3, 8, 8))).model
    # at 8 bits the convs whose outputs keep no pair stay float
    config = onnxq.QuantConfig(weight_bits=4, first_last_8bit=False)
    plan = plan_quantization(onnxq.io.to_ir(model).graph, config)
    units = partition(Mirror(model), set(plan.layers), "block")
    head = units[1:]
    assert sum(len(u.layers) for u in units) == len(plan.layers) == 1 + 2 * depth
    if 2 * depth <= partitioning.MAX_UNCUT_LAYERS:
        assert [len(u.layers) for u in head] == [2 * depth]
    else:
        assert len(head) > 1
        assert all(len(u.layers) <= partitioning.GROUP_LAYERS for u in head)
        assert any(len(u.inputs) == 2 for u in head)  # the other branch's tensor crosses the cut


@pytest.mark.parametrize(
    ("name", "blocks"),
    [("resnet20_cifar10", 11), ("mobilenet_v2", 18), ("repvgg_cifar10", 11)],
)
def test_blocks_of_real_networks(name, blocks):
    from pathlib import Path

    local = Path(__file__).resolve().parents[2] / "models" / f"{name}.onnx"
    path = local if local.exists() else needs_shared("models", f"{name}.onnx")
    model = fuse(onnx.load(path), merge_branches=False).model
    plan = plan_quantization(onnxq.io.to_ir(model).graph, onnxq.QuantConfig())
    units = partition(Mirror(model), set(plan.layers), "block")
    assert len(units) == blocks
    assert all(len(u.inputs) == 1 for u in units)


@pytest.mark.parametrize("unit", ["layer", "block"])
def test_units_never_start_where_samples_are_folded_into_rows(unit):
    """A per-token MLP written as reshape(-1, features) holds [samples·tokens, features] between
    its layers: a unit starting there would be handed all samples' rows beside a batch of the
    others ("The size of tensor a (48) must match the size of tensor b (32)"). Its cuts are kept
    off those tensors, and every unit still learns."""
    import torch
    from torch import nn

    from onnxq.refine.sample_axes import mixed_sample_tensors
    from tests.conftest import export

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.mlp = nn.Conv1d(4, 8, 3, padding=1), nn.Sequential(nn.Linear(8, 16), nn.ReLU())
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            tokens = torch.relu(self.stem(x)).transpose(1, 2)  # [samples, tokens, 8]
            rows = self.head(self.mlp(tokens.reshape(-1, 8)))  # [samples·tokens, 3]
            return rows.reshape(x.shape[0], -1, 3).mean(1)

    torch.manual_seed(0)
    model = export(Tokens(), torch.zeros(1, 4, 6))
    data = np.random.default_rng(0).standard_normal((24, 4, 6)).astype(np.float32)
    folded = fuse(model).model
    mirror = Mirror(folded)
    mixed = mixed_sample_tensors(mirror, {"input": torch.from_numpy(data)})
    rows = {o for node in mirror.nodes if node.op_type in ("Gemm", "MatMul", "Relu") for o in node.outputs}
    assert mixed & rows
    config = onnxq.QuantConfig(weight_bits=4, refine_unit=unit, **{**FAST, "refine_iters": 5})
    result = onnxq.quantize(model, data, config)
    assert result.refinement is not None and not [u.skipped for u in result.refinement.units if u.skipped]
    assert result.fidelity.min_sqnr > 10


def test_units_never_start_where_a_shape_read_at_run_time_is_alive():
    """TorchScript writes `n, c, h, w = y.shape` as Shape where it is read: a shape of the first
    conv's output, used by a Reshape three layers later, crosses every layer cut between. Kept
    whole for a unit while its other inputs come a batch at a time, it stopped refinement with
    "shape '[48, 4, 8, 1024]' is invalid" on a YOLO-style head."""
    import torch
    from torch import nn

    from tests.conftest import export

    class Late(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(c, 4, 3, padding=1) for c in (3, 4, 4))
            self.head = nn.Linear(4 * 36, 3)

        def forward(self, x):
            y = torch.relu(self.convs[0](x))
            n, c, h, w = y.shape
            for conv in self.convs[1:]:
                y = torch.relu(conv(y))
            return self.head(y.reshape(n, c // 2, 2 * h * w).reshape(n, -1))

    torch.manual_seed(0)
    model = export(Late(), torch.zeros(1, 3, 6, 6))
    data = np.random.default_rng(0).standard_normal((24, 3, 6, 6)).astype(np.float32)
    config = onnxq.QuantConfig(weight_bits=4, refine_unit="layer", **{**FAST, "refine_iters": 5})
    result = onnxq.quantize(model, data, config)
    assert result.refinement is not None and not [u.skipped for u in result.refinement.units if u.skipped]
    assert result.fidelity.min_sqnr > 10


def test_layers_around_a_node_the_mirror_cannot_run_learn_in_units_of_their_own():
    """A Conv1d, an LSTM (onnxruntime runs it, without gradients) and a Linear: as one block the
    LSTM kept both layers from learning (0 of 1 units refined); the LSTM now sits in a unit of its
    own and the layers on either side learn."""
    import torch
    from torch import nn

    from tests.conftest import export

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.lstm, self.out = (
                nn.Conv1d(8, 16, 3, padding=1),
                nn.LSTM(16, 12, batch_first=True),
                nn.Linear(12, 5),
            )

        def forward(self, x):
            return self.out(self.lstm(torch.relu(self.conv(x)).transpose(1, 2))[0])

    torch.manual_seed(0)
    model = export(Tagger(), torch.zeros(1, 8, 10))
    data = np.random.default_rng(0).standard_normal((24, 8, 10)).astype(np.float32)
    result = onnxq.quantize(model, data, onnxq.QuantConfig(weight_bits=4, **{**FAST, "refine_iters": 5}))
    units = result.refinement.units
    assert [bool(u.skipped) for u in units] == [False, True, False]  # the LSTM's unit learns nothing
    assert all(u.iterations == 5 for u in (units[0], units[2]))


def test_a_node_the_mirror_cannot_run_on_shapes_alone_stops_no_learning():
    """A position embedding computed from the input's width (Range → Asin, which the op table
    lacks, so onnxruntime runs it) and added to the features: no gradient has to flow through it,
    so the unit holding it learns (before, it was skipped: "Asin runs in onnxruntime")."""
    import io

    import torch
    from torch import nn

    class Embedded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(c, 8, 3, padding=1) for c in (3, 8, 8))

        def forward(self, x):
            y = torch.relu(self.convs[0](x))
            width = torch.arange(y.shape[3], dtype=torch.float32) / y.shape[3]
            y = torch.relu(self.convs[1](y + torch.asin(width)))
            return self.convs[2](y)

    torch.manual_seed(0)
    buffer = io.BytesIO()
    free = {"input": {0: "batch", 2: "height", 3: "width"}}  # the width is read at run time
    torch.onnx.export(
        Embedded().eval(),
        (torch.zeros(1, 3, 8, 8),),
        buffer,
        input_names=["input"],
        dynamic_axes=free,
        opset_version=17,
        dynamo=False,
    )
    model = onnx.load_from_string(buffer.getvalue())
    assert any(node.op_type == "Asin" for node in model.graph.node)
    data = np.random.default_rng(0).standard_normal((24, 3, 8, 8)).astype(np.float32)
    config = onnxq.QuantConfig(weight_bits=4, refine_unit="layer", **{**FAST, "refine_iters": 5})
    result = onnxq.quantize(model, data, config)
    units = result.refinement.units
    assert units and not [u.skipped for u in units if u.skipped]
    assert all(u.iterations == 5 for u in units)
