"""Variants of the tunable graph run from their cut (onnxq.branching) give what whole runs give."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.branching import compare_variants
from onnxq.calib.simulate import cut_simulation, float_frontier, tunable_model
from onnxq.fidelity import compare_outputs
from onnxq.io import session, to_ir
from onnxq.quant.plan import plan_quantization
from onnxq.sensitivity import quantized_feeds

from .conftest import export


def _residual_cnn():
    """Two residual blocks and a head: tensors that cross the cuts, and a skip around them."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.first = nn.Conv2d(channels, channels, 3, padding=1)
            self.second = nn.Conv2d(channels, channels, 3, padding=1)

        def forward(self, x):
            return torch.relu(x + self.second(torch.relu(self.first(x))))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.blocks = nn.Sequential(Block(8), Block(8))
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            x = self.blocks(torch.relu(self.stem(x)))
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    return export(Net(), torch.randn(1, 3, 8, 8))


def _setting():
    return _setting_and_model()[:4]


def _setting_and_model():
    model = _residual_cnn()
    data = np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)
    config = onnxq.QuantConfig(fidelity_fallback=False, speed_check=False)
    quantized = onnxq.quantize(model, data, config).model
    plan = plan_quantization(to_ir(model).graph, config)
    tunable, float_feed, _ = tunable_model(model, plan)
    feeds = quantized_feeds(quantized, plan)
    batches = [{"input": data[i : i + 1]} for i in range(3)]
    return tunable, float_feed, feeds, batches, model


def _whole_runs(tunable, base, variant, batches, reference):
    runner = session(tunable, arena=False)
    runs = (
        (want, runner.run(["logits"], {**batch, **base, **variant}))
        for batch, want in zip(batches, reference, strict=True)
    )
    return compare_outputs(["logits"], runs)


def test_each_variant_run_from_its_cut_matches_whole_runs():
    tunable, float_feed, feeds, batches = _setting()
    assert len(feeds) >= 6  # weights and activations of several layers: cuts all along the graph
    runner = session(tunable, arena=False)
    reference = [runner.run(["logits"], {**batch, **float_feed}) for batch in batches]
    variants = {name: feed for name, feed in feeds.items()}
    compared = compare_variants(tunable, float_feed, variants, batches, ["logits"])
    for name, feed in variants.items():
        (want,) = _whole_runs(tunable, float_feed, feed, batches, reference)
        (got,) = compared[name]
        assert got.runs == len(batches)
        assert np.isfinite(got.sqnr_db) and got.sqnr_db == pytest.approx(want.sqnr_db, abs=1e-3), name
        assert got.cosine == pytest.approx(want.cosine, abs=1e-9), name


def test_variants_run_on_in_the_float_model_once_their_parameters_are_read():
    """The fallback's form (one layer's quantizers at a time over the float feed), each branch
    finished in the float model: what whole runs of the tunable graph give."""
    tunable, float_feed, feeds, batches, model = _setting_and_model()
    runner = session(tunable, arena=False)
    reference = [runner.run(["logits"], {**batch, **float_feed}) for batch in batches]
    variants = {"none": {}, **feeds}
    compared = compare_variants(tunable, float_feed, variants, batches, ["logits"], float_model=model)
    assert compared["none"][0].sqnr_db > 100  # the float model and the tunable one at float agree
    for name, feed in feeds.items():
        (want,) = _whole_runs(tunable, float_feed, feed, batches, reference)
        # the float model's kernels round differently: 0.003 dB at 73 dB of weight noise
        assert compared[name][0].sqnr_db == pytest.approx(want.sqnr_db, abs=0.01), name


def test_a_float_model_whose_nodes_are_not_the_tunable_graphs_is_not_used():
    """A float model that is not the one the tunable graph was made from (here one node more)
    would start each tail at the wrong node: the branches stay in the tunable graph."""
    tunable, float_feed, feeds, batches, model = _setting_and_model()
    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.node.insert(0, helper.make_node("Identity", ["input"], ["unused"], name="extra"))
    runner = session(tunable, arena=False)
    reference = [runner.run(["logits"], {**batch, **float_feed}) for batch in batches]
    compared = compare_variants(tunable, float_feed, feeds, batches, ["logits"], float_model=other)
    for name, feed in feeds.items():
        (want,) = _whole_runs(tunable, float_feed, feed, batches, reference)
        assert compared[name][0].sqnr_db == pytest.approx(want.sqnr_db, abs=1e-3), name


def test_a_cut_crossed_by_a_fake_quantizer_output_maps_to_float_names_or_to_none():
    x, y = np.zeros(1), np.ones(1)
    assert float_frontier({"a::fq": x, "b": y}) == {"a": x, "b": y}
    assert float_frontier({"a": x, "a::fq": y}) is None  # a graph output read quantized later on
    assert float_frontier({"a::fq_div": x}) is None  # inside a fake quantizer


def test_variants_over_a_quantized_base_against_a_given_reference():
    """The range choice's form: every quantizer on in the base, one switched, float reference."""
    tunable, float_feed, feeds, batches = _setting()
    runner = session(tunable, arena=False)
    reference = [runner.run(["logits"], {**batch, **float_feed}) for batch in batches]
    base = {**float_feed, **{k: v for feed in feeds.values() for k, v in feed.items()}}
    variants = {"": {}, **{name: float_feed_of(feed, float_feed) for name, feed in feeds.items()}}
    compared = compare_variants(tunable, base, variants, batches, ["logits"], reference)
    for name, feed in variants.items():
        (want,) = _whole_runs(tunable, base, feed, batches, reference)
        assert compared[name][0].sqnr_db == pytest.approx(want.sqnr_db, abs=1e-3), name
    switched_off = [compared[name][0].sqnr_db for name in feeds]
    assert max(switched_off) > compared[""][0].sqnr_db  # a quantizer switched back to float helps


def test_a_variant_that_changes_nothing_gets_the_base_outputs():
    tunable, float_feed, _, batches = _setting()
    compared = compare_variants(
        tunable, float_feed, {"none": {}, "unread": {"nowhere": np.zeros(1)}}, batches, ["logits"]
    )
    assert compared["none"][0].sqnr_db == float("inf") and compared["unread"][0].sqnr_db == float("inf")


def float_feed_of(feed: dict, float_feed: dict) -> dict:
    """The same parameters at their float values: the quantizer (or weights) switched off."""
    return {name: float_feed[name] for name in feed}


def test_a_graph_cut_before_chosen_nodes_runs_in_that_many_segments_as_one_run():
    tunable, float_feed, _, batches = _setting()
    nodes = len(tunable.graph.node)
    cuts = {nodes // 4, nodes // 2, nodes - 1}
    sim = cut_simulation(tunable, float_feed, cuts)
    assert [segment.begin for segment in sim.segments] == [0, *sorted(cuts)]
    whole = session(tunable, arena=False)
    for batch in batches:
        walked = sim.run(sim.segments, dict(batch), float_feed)["logits"]
        np.testing.assert_allclose(
            walked, whole.run(["logits"], {**batch, **float_feed})[0], rtol=1e-5, atol=1e-6
        )


SUBGRAPH_INPUTS = (("x", [1, 4]), ("p", []), ("q", []))


def test_a_parameter_read_only_inside_a_subgraph_is_cut_for():
    """An If whose branch reads a parameter and a tensor of the graph by name: the cuts see it."""
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["a", "q"], ["shifted"])],
        "then",
        [],
        [helper.make_tensor_value_info("shifted", TensorProto.FLOAT, [1, 4])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["same"])],
        "else",
        [],
        [helper.make_tensor_value_info("same", TensorProto.FLOAT, [1, 4])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "p"], ["a"], name="scale"),
            helper.make_node("If", ["always"], ["y"], then_branch=then_branch, else_branch=else_branch),
        ],
        "subgraphs",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in SUBGRAPH_INPUTS],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(True), "always")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    base = {"p": np.array(1.0, np.float32), "q": np.array(0.0, np.float32)}
    x = np.arange(1, 5, dtype=np.float32).reshape(1, 4)
    variants = {"p": {"p": np.array(1.5, np.float32)}, "q": {"q": np.array(0.5, np.float32)}}
    compared = compare_variants(model, base, variants, [{"x": x}], ["y"])
    for key, shifted in (("p", 1.5 * x), ("q", x + 0.5)):
        signal, noise = float(np.square(x).sum()), float(np.square(shifted - x).sum())
        assert compared[key][0].sqnr_db == pytest.approx(10 * np.log10(signal / noise)), key
