"""Outputs picked by indices (a detector's top-k boxes) are reported, and what they pick from is
judged in their place: near-tied candidates swap places under noise far below any real change."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq import fidelity, selections
from onnxq.evaluate import evaluate

CANDIDATES, TOP = 64, 8


def _top_boxes(score_gain: np.ndarray, values: bool = True) -> onnx.ModelProto:
    """Scores (the input times `score_gain`) and boxes made from the input; the TOP best scores
    (TopK values, unless not `values`, and int64 indices) and their boxes (GatherElements), as
    detector exports end."""
    nodes = [
        helper.make_node("Mul", ["x", "gain"], ["scores"]),
        helper.make_node("Unsqueeze", ["x", "last"], ["column"]),
        helper.make_node("Mul", ["column", "anchors"], ["boxes"]),
        helper.make_node("TopK", ["scores", "k"], ["top_scores", "indices"], axis=1),
        helper.make_node("Unsqueeze", ["indices", "last"], ["index_column"]),
        helper.make_node("Shape", ["boxes"], ["boxes_shape"]),
        helper.make_node("Gather", ["boxes_shape", "first"], ["batch"]),
        helper.make_node("Concat", ["batch", "top_four"], ["picked_shape"], axis=0),
        helper.make_node("Expand", ["index_column", "picked_shape"], ["box_indices"]),
        helper.make_node("GatherElements", ["boxes", "box_indices"], ["picked_boxes"], axis=1),
    ]
    anchors = np.linspace(1.0, 2.0, 4 * CANDIDATES, dtype=np.float32).reshape(1, CANDIDATES, 4)
    constants = {
        "gain": score_gain.astype(np.float32),
        "last": np.array([2], np.int64),
        "anchors": anchors,
        "k": np.array([TOP], np.int64),
        "first": np.array([0], np.int64),
        "top_four": np.array([TOP, 4], np.int64),
    }
    graph = helper.make_graph(
        nodes,
        "top_boxes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", CANDIDATES])],
        [
            helper.make_tensor_value_info("picked_boxes", TensorProto.FLOAT, ["n", TOP, 4]),
            helper.make_tensor_value_info("top_scores", TensorProto.FLOAT, ["n", TOP]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, ["n", TOP]),
        ],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    if not values:
        graph.output.remove(graph.output[1])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _near_ties(count: int, seed: int = 0) -> np.ndarray:
    """Scores within 1e-4 of each other: most of them tie to within a noise of 1e-4 relative."""
    return (0.5 + 1e-4 * np.random.default_rng(seed).random((count, CANDIDATES))).astype(np.float32)


def test_outputs_picked_by_indices_and_what_they_pick_from_are_found():
    found = selections.find(_top_boxes(np.ones(CANDIDATES)))
    assert found.picked == {"picked_boxes": "TopK", "indices": "TopK"}  # not TopK's values
    # the shape arithmetic the indices pass through is int64, and the anchors a constant
    assert found.candidates == {"boxes": "picked_boxes", "scores": "picked_boxes"}


def test_an_arg_max_over_integer_ids_picks_exactly_and_is_no_selection():
    """CLIP's text encoder picks its end token's features by ArgMax over the int64 token ids:
    the same index in both models, so its output is judged as it is."""
    graph = helper.make_graph(
        [
            helper.make_node("ArgMax", ["ids"], ["end"], axis=1, keepdims=0),
            helper.make_node("Relu", ["features"], ["hidden"]),
            helper.make_node("Gather", ["hidden", "end"], ["picked"], axis=1),
        ],
        "end_token",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 6, 4]),
        ],
        [helper.make_tensor_value_info("picked", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert selections.find(model) == selections.Selections()


def test_a_model_without_index_outputs_has_no_selections(small_model):
    assert selections.find(small_model) == selections.Selections()
    model, names = selections.judged_model(small_model)
    assert model is small_model and names == [o.name for o in small_model.graph.output]


def test_noise_that_swaps_near_ties_is_judged_on_the_candidates_not_the_picked_boxes():
    """A 1e-4 relative noise on the scores reorders the top 8 of near-tied candidates: the picked
    boxes, compared position by position, fall far below the warning, while the scores and
    boxes they are picked from stay within the noise. Only the latter are judged."""
    noise = 1 + 1e-4 * np.random.default_rng(1).standard_normal(CANDIDATES)
    samples = [{"x": _near_ties(16)}]
    report = fidelity.measure(_top_boxes(np.ones(CANDIDATES)), _top_boxes(noise), samples, 8)
    by_name = {o.name: o for o in report.outputs}
    picked = by_name["picked_boxes"]
    assert picked.picked_by == "TopK" and not picked.judged
    assert picked.sqnr_db < fidelity.WARN_SQNR_DB[8]  # the swaps the check must not judge
    assert by_name["scores"].picks_for == "picked_boxes" and by_name["boxes"].picks_for == "picked_boxes"
    assert by_name["boxes"].sqnr_db == float("inf")  # the boxes do not depend on the noise
    assert by_name["scores"].agreement is None  # its best candidate is no class: near-ties flip it
    judged = [o for o in report.outputs if o.judged]
    assert report.min_sqnr == min(o.sqnr_db for o in judged) > 70.0
    assert not report.poor and not report.warnings()
    assert str(picked).startswith("output 'picked_boxes' (picked by TopK indices")
    assert str(by_name["scores"]).startswith("tensor 'scores' (what output 'picked_boxes' is picked from)")


def test_eval_reports_the_lowest_judged_tensor_not_the_picked_boxes(tmp_path):
    noise = 1 + 1e-4 * np.random.default_rng(1).standard_normal(CANDIDATES)
    onnx.save(_top_boxes(np.ones(CANDIDATES), values=False), tmp_path / "float.onnx")
    onnx.save(_top_boxes(noise, values=False), tmp_path / "noisy.onnx")
    _, noisy = evaluate(tmp_path / "float.onnx", [tmp_path / "noisy.onnx"], {"x": _near_ties(16)})
    assert noisy.sqnr_db > 70.0
    assert noisy.lowest_output.startswith("scores (what output picked_boxes is picked from")


def _peak_head(gain: np.ndarray | None = None, pool: bool = True) -> onnx.ModelProto:
    """A CenterNet-style decode: a heat map (Sigmoid of the input times `gain`, per element), its
    local peaks kept by Equal(MaxPool(map), map) (with `pool` off, Equal(map, a constant)
    instead), flattened, and the top TOP of them by TopK."""
    compared = "pooled" if pool else "level"
    nodes = [
        helper.make_node("Mul", ["x", "gain"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["heat"]),
        helper.make_node("MaxPool", ["heat"], ["pooled"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Equal", [compared, "heat"], ["peak"]),
        helper.make_node("Cast", ["peak"], ["keep"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["heat", "keep"], ["peaks"]),
        helper.make_node("Reshape", ["peaks", "flat"], ["flat_peaks"]),
        helper.make_node("TopK", ["flat_peaks", "k"], ["top_scores", "indices"], axis=1),
    ]
    constants = {
        "gain": (np.ones((1, 1, 8, 8)) if gain is None else gain).astype(np.float32),
        "level": np.array(0.5, np.float32),
        "flat": np.array([0, -1], np.int64),
        "k": np.array([TOP], np.int64),
    }
    graph = helper.make_graph(
        nodes,
        "peak_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [
            helper.make_tensor_value_info("top_scores", TensorProto.FLOAT, ["n", TOP]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, ["n", TOP]),
            helper.make_tensor_value_info("flat_peaks", TensorProto.FLOAT, ["n", 64]),
        ],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def test_outputs_behind_a_heat_maps_peak_mask_are_judged_on_the_heat_map():
    """Equal(MaxPool(map), map) keeps a heat map's local peaks; in a near-flat neighbourhood the
    peak moves under noise far below any visible change, like TopK's near-ties. What the mask
    keeps is reported, not judged; the heat map and its pooled form are judged in its place. An
    Equal of anything else picks nothing (Swin's window mask may sit upstream of everything)."""
    found = selections.find(_peak_head())
    peaks = selections.PEAK_MASK
    assert found.picked == {"top_scores": peaks, "indices": peaks, "flat_peaks": peaks}
    assert found.candidates == {"heat": "top_scores", "pooled": "top_scores"}
    assert selections.find(_peak_head(pool=False)).picked == {"indices": "TopK"}
    noise = 1 + 1e-4 * np.random.default_rng(1).standard_normal((1, 1, 8, 8))
    samples = [{"x": _near_ties(16).reshape(16, 1, 8, 8)}]
    report = fidelity.measure(_peak_head(), _peak_head(noise), samples, 8)
    by_name = {o.name: o for o in report.outputs}
    assert not any(by_name[name].judged for name in ("top_scores", "indices", "flat_peaks"))
    assert by_name["flat_peaks"].sqnr_db < fidelity.WARN_SQNR_DB[8]  # the peaks moved
    assert by_name["heat"].picks_for == "top_scores" and by_name["heat"].sqnr_db > 70.0
    assert report.min_sqnr > 70.0 and not report.warnings()
    assert str(by_name["top_scores"]).startswith("output 'top_scores' (picked by MaxPool peaks, where")


torch = pytest.importorskip("torch")


class _AnchorHead(torch.nn.Module):
    """SSD-style: conv features, per-anchor class scores and box offsets decoded in the graph
    (Exp of sizes), class Softmax, and the top 20 boxes picked by TopK and GatherElements."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.loc, self.cls = nn.Conv2d(16, 4, 3, 1, 1), nn.Conv2d(16, 4, 3, 1, 1)
        centres = (torch.arange(8) + 0.5) / 8
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        self.register_buffer("anchors", torch.stack([cx, cy], -1).reshape(-1, 2))

    def forward(self, x):
        f = self.body(x)
        loc = self.loc(f).flatten(2).transpose(1, 2)
        cls = self.cls(f).flatten(2).transpose(1, 2)
        centres = self.anchors + 0.1 * loc[..., :2]
        sizes = 0.2 * torch.exp(0.2 * loc[..., 2:])
        boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], -1)
        scores = torch.softmax(cls, -1)[..., 1:].amax(-1)
        top, index = scores.topk(20, 1)
        return boxes.gather(1, index.unsqueeze(-1).expand(-1, -1, 4)), top


def test_a_head_with_top_k_post_process_quantizes_judged_by_its_candidates():
    """The exported head at W8A8: the picked boxes are reported, not judged; the decoded boxes and
    scores they are picked from are, and keep the float model's values closely."""
    from tests.conftest import export

    torch.manual_seed(0)
    images = np.random.default_rng(0).normal(size=(24, 3, 32, 32)).astype(np.float32)
    model = export(_AnchorHead(), torch.from_numpy(images[:2]), outputs=("boxes", "scores"))
    found = selections.find(model)
    assert list(found.picked) == ["boxes"] and len(found.candidates) == 2

    result = onnxq.quantize(model, images, onnxq.QuantConfig(speed_check=False))
    assert any(node.op_type == "QuantizeLinear" for node in result.model.graph.node)
    outputs = {o.name: o for o in result.fidelity.outputs}
    assert outputs["boxes"].picked_by == "TopK"
    candidates = [o for o in result.fidelity.outputs if o.picks_for == "boxes"]
    assert {o.name for o in candidates} == set(found.candidates)
    assert result.fidelity.min_sqnr == min(o.sqnr_db for o in result.fidelity.outputs if o.judged)
    # 61.7 dB with full-range 8-bit weights, 60.3 with 7-bit ones forced (the no-VNNI form); the
    # picked boxes, position by position, 11.2 and 11.1 dB: without the candidates it would warn
    assert min(o.sqnr_db for o in candidates) >= 50.0
    assert not result.fidelity.poor
