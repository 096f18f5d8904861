"""The fidelity check: held-back samples, the numbers against numpy, warnings and --min-sqnr."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import onnxq
from onnxq import class_scores, fidelity
from onnxq.cli import main
from onnxq.io import session


@given(sizes=st.lists(st.integers(1, 20), min_size=1, max_size=30))
def test_hold_back_keeps_the_last_batches_or_nothing(sizes):
    stream = [{"x": np.full((n, 1), i, np.float32)} for i, n in enumerate(sizes)]
    held = fidelity.HoldBack()
    passed = list(held.split(iter(stream)))
    if sum(sizes) < fidelity.MIN_CALIBRATION:
        assert not held.held_back and len(passed) == len(stream)
    else:
        assert held.held_back and passed + held.batches == stream
        assert sum(len(b["x"]) for b in held.batches) >= fidelity.HELD_BACK
        assert sum(len(b["x"]) for b in held.batches[1:]) < fidelity.HELD_BACK


def test_output_numbers_match_numpy(small_model, calibration_data):
    result = onnxq.quantize(small_model, calibration_data, onnxq.QuantConfig(weight_bits=4))
    batches = [{"input": calibration_data[i : i + 8]} for i in range(0, 48, 8)]
    report = fidelity.measure(small_model, result.model, batches, lowest_bits=4)
    want = session(small_model).run(None, {"input": calibration_data})[0].astype(np.float64)
    got = session(result.model).run(None, {"input": calibration_data})[0].astype(np.float64)
    (output,) = report.outputs
    assert report.samples == 48
    np.testing.assert_allclose(output.sqnr_db, 10 * np.log10((want**2).sum() / ((want - got) ** 2).sum()))
    cosine = (want * got).sum() / np.sqrt((want**2).sum() * (got**2).sum())
    np.testing.assert_allclose(output.cosine, cosine, rtol=1e-9)
    assert output.agreement == (want.argmax(1) == got.argmax(1)).mean()


def test_8bit_model_passes_quietly(small_model, calibration_data):
    data = np.concatenate([calibration_data] * 2)  # 96 samples: 16 are held back
    result = onnxq.quantize(small_model, data, onnxq.QuantConfig())
    assert result.fidelity.held_back and result.fidelity.samples == 16
    assert not result.fidelity.poor and result.fidelity.min_sqnr > 25
    assert not any(note.startswith("warning: the quantized model departs") for note in result.notes)


def test_poor_model_warns_and_names_the_layers_that_lose_most(small_model, calibration_data):
    config = onnxq.QuantConfig(
        weight_bits=2,
        activation_bits=2,
        first_last_8bit=False,
        weight_rounding="nearest",
        equalize=False,
        weight_zero_point="none",
    )  # with GPTQ, equalization or a zero point (11.4 dB), the W2A2 model is good enough not to warn
    result = onnxq.quantize(small_model, calibration_data, config)
    assert result.fidelity.poor
    warnings = [note for note in result.notes if "departs" in note or "loses most" in note]
    layers = {node.name for node in small_model.graph.node}
    assert warnings[0].startswith("warning: the quantized model departs")
    named = [line.split("loses most: ")[1].split(" (")[0] for line in warnings[1:]]
    assert named and set(named) <= layers
    assert fidelity.REFINE_HINT in result.notes  # below 8 bits without --refine


@given(sqnr=st.floats(0.0, 60.0), agreement=st.floats(0.0, 1.0))
def test_the_warning_names_what_set_it_off(sqnr, agreement):
    """A classifier at 25 dB whose top-1 agreement fell to 81 % (a timm SKResNet-18 export) was
    warned about with its SQNR alone, the figure that had not set it off."""
    output = fidelity.OutputFidelity("logits", sqnr, 0.99, agreement)
    report = fidelity.Fidelity(16, True, [output], threshold_db=20.0)
    lines = report.warnings()
    assert bool(lines) == (sqnr < 20.0 or agreement < fidelity.WARN_AGREEMENT)
    if lines:
        assert f"SQNR {sqnr:.1f} dB" in lines[0]
        assert ("top-1 agreement" in lines[0]) == (agreement < fidelity.WARN_AGREEMENT)


@pytest.mark.parametrize("suggest_refine", [True, False])
def test_the_warning_suggests_refine_only_where_asked(suggest_refine):
    """At 8 bits nothing is suggested: --calib-method mse, suggested before, lowered the lowest
    output SQNR of 6 of the 7 zoo models that quantize."""
    report = fidelity.Fidelity(
        16, True, [fidelity.OutputFidelity("logits", 5.0, 0.9, 0.5)], threshold_db=20.0
    )
    lines = report.warnings(suggest_refine=suggest_refine)
    assert lines[0].startswith("warning: the quantized model departs")
    assert (fidelity.REFINE_HINT in lines) == suggest_refine
    assert not any("--calib-method" in line for line in lines)


@pytest.mark.parametrize(
    ("sqnr", "agree", "samples", "warned"),
    [
        (46.0, 16, 16, False),
        (46.0, 14, 16, False),
        (46.0, 13, 16, True),
        (25.4, 13, 16, True),
        (46.0, 899, 1000, False),
        (46.0, 880, 1000, True),
        (46.0, 4400, 5000, True),  # 88 %: a binomial coefficient of 5000 overflows a float
        (46.0, 4500, 5000, False),
        (9.2, 14, 16, True),
    ],
)
def test_agreement_of_a_close_output_warns_only_below_90_percent_beyond_chance(sqnr, agree, samples, warned):
    """Two flips in the check's 16 samples (87.5 %) are what a model agreeing 90 % of the time
    shows half the time: at 46 dB (a near-tied random classifier) that warned and set off the
    fallback. Three (81 %, the SKResNet-18 export above at 25.4 dB) still warn, and so do two
    where the output is not close (a W2A2 model at 9.2 dB, over its 8 dB threshold)."""
    output = fidelity.OutputFidelity("logits", sqnr, 1.0, agree / samples, compared=samples)
    assert fidelity.Fidelity(samples, True, [output], threshold_db=8.0).poor == warned


@given(samples=st.integers(1, 400), data=st.data())
def test_the_agreement_test_is_the_binomial_tail(samples, data):
    """A close output (46 dB) is warned about exactly when a model agreeing 90 % of the time
    would agree this rarely or less in under a quarter of draws (the tail in exact integer
    arithmetic here, as a reference: 9^k / 10^n per outcome)."""
    agree = data.draw(st.integers(0, samples))
    tail = sum(math.comb(samples, k) * 9**k for k in range(agree + 1)) / 10**samples
    output = fidelity.OutputFidelity("logits", 46.0, 1.0, agree / samples, compared=samples)
    assume(abs(tail - fidelity.AGREEMENT_CHANCE) > 1e-9)
    assert output.disagrees == (tail < fidelity.AGREEMENT_CHANCE)


def test_min_sqnr_fails_the_run_and_writes_nothing(tmp_path, small_model_path, calibration_data):
    calib, out = tmp_path / "calib.npy", tmp_path / "out.onnx"
    np.save(calib, calibration_data)
    args = ["quantize", str(small_model_path), "-o", str(out), "--calib", str(calib), "--min-sqnr"]
    result = CliRunner().invoke(main, [*args, "90"])
    assert result.exit_code == 1 and "below --min-sqnr 90 dB" in result.output and not out.exists()
    result = CliRunner().invoke(main, [*args, "10"])
    assert result.exit_code == 0 and "fidelity on" in result.output
    onnx.checker.check_model(onnx.load(out))


def deep_cnn() -> onnx.ModelProto:
    """Twenty 3×3 convs with ReLU: enough layers for the fallback's budget (a tenth of them)."""
    import torch
    from torch import nn

    from tests.conftest import export

    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()]
    for _ in range(19):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
    return export(nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 8 * 8, 10)), torch.zeros(1, 3, 8, 8))


def test_fallback_keeps_the_layers_that_lose_most_float_while_it_helps(monkeypatch):
    monkeypatch.setattr(fidelity, "WARN_SQNR_DB", {8: 99.0, 0: 99.0})  # every model falls short
    model = deep_cnn()
    data = np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)
    plain = onnxq.quantize(model, data, onnxq.QuantConfig(fidelity_fallback=False, speed_check=False))
    result = onnxq.quantize(model, data, onnxq.QuantConfig(speed_check=False))  # timings may undo it
    floated = [name for name, why in result.float_nodes.items() if why.startswith("kept float for fidelity")]
    assert 0 < len(floated) <= 2  # a tenth of 21 layers
    assert any(note.startswith(f"fidelity: {len(floated)} layers kept float") for note in result.notes)
    assert result.fidelity.min_sqnr > plain.fidelity.min_sqnr
    kept = {n.name: n for n in result.model.graph.node}
    weights = {t.name for t in result.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert all(kept[name].input[1] in weights for name in floated)


def _scaled(scales: np.ndarray) -> onnx.ModelProto:
    """y = x · scales along axis 1: a stand-in for a head that concatenates parts."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["y"])],
        "scaled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", len(scales), 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", len(scales), 40])],
        [numpy_helper.from_array(scales.reshape(1, -1, 1).astype(np.float32), "s")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_an_output_of_boxes_and_scores_is_measured_per_part():
    """Box pixels (×100) beside scores (×0.01): the whole output's SQNR is the boxes', so the
    scores, which lost most, must be measured apart and set the lowest SQNR."""
    scales = np.array([100.0] * 4 + [0.01] * 3 + [0.02] * 3)
    errors = np.array([1e-3] * 4 + [0.3] * 6)
    x = np.random.default_rng(0).normal(size=(24, 10, 40)).astype(np.float32)
    report = fidelity.measure(
        _scaled(scales), _scaled(scales * (1 + errors)), [{"x": x[:8]}, {"x": x[8:]}], 8
    )
    want = x.astype(np.float64) * scales.reshape(1, -1, 1).astype(np.float32)
    got = x.astype(np.float64) * (scales * (1 + errors)).reshape(1, -1, 1).astype(np.float32)

    def sqnr(part):
        return 10 * np.log10((want[:, part] ** 2).sum() / ((want[:, part] - got[:, part]) ** 2).sum())

    assert [o.name for o in report.outputs] == ["y", "y[:, 0:4]", "y[:, 4:10]"]
    whole, boxes, scores = report.outputs
    np.testing.assert_allclose(
        [whole.sqnr_db, boxes.sqnr_db, scores.sqnr_db],
        [sqnr(slice(None)), sqnr(slice(0, 4)), sqnr(slice(4, 10))],
        rtol=1e-4,
    )
    assert report.min_sqnr == scores.sqnr_db and report.poor
    assert str(scores) == f"output 'y[:, 4:10]': SQNR {scores.sqnr_db:.1f} dB, cosine {scores.cosine:.4f}"


def test_an_output_of_one_magnitude_and_a_quiet_channel_is_not_split():
    """Channels within a factor of a few, and one channel that is nearly silent, are one part."""
    scales = np.array([1.0, 2.0, 0.5, 1.5, 1e-4, 1.0])
    x = np.random.default_rng(1).normal(size=(8, 6, 40)).astype(np.float32)
    report = fidelity.measure(_scaled(scales), _scaled(scales * 1.001), [{"x": x}], 8)
    assert [o.name for o in report.outputs] == ["y"]


def test_a_silent_last_channel_is_not_a_part():
    scales = np.array([1.0, 2.0, 0.5, 1.5, 1.0, 1e-4])
    x = np.random.default_rng(2).normal(size=(8, 6, 40)).astype(np.float32)
    report = fidelity.measure(_scaled(scales), _scaled(scales * (1 + np.r_[[1e-3] * 5, 1.0])), [{"x": x}], 8)
    assert [o.name for o in report.outputs] == ["y"]


def test_integer_outputs_are_compared_element_by_element_not_by_sqnr():
    """Class ids of a detector: 3 of 8 differ. No SQNR or top-1 agreement over ids."""
    want = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], np.int64)
    got = want.copy()
    got[0, :3] = 9
    (output,) = fidelity.compare_outputs(["classes"], [([want], [got])])
    assert output.equal == 5 / 8 and output.agreement is None
    assert output.sqnr_db == float("inf")  # never the lowest output SQNR
    assert str(output) == "output 'classes': equal to float's in 62.5 % of elements"


def test_outputs_whose_shape_differs_from_floats_are_counted_not_compared():
    """Boxes after NMS: the quantized model keeps 2 boxes where float kept 3 in one sample."""
    rng = np.random.default_rng(0)
    same = rng.standard_normal((2, 4))
    runs = [([same], [same + 0.01]), ([rng.standard_normal((3, 4))], [rng.standard_normal((2, 4))])]
    (output,) = fidelity.compare_outputs(["boxes"], runs)
    assert output.reshaped == 1 and output.runs == 2
    expected = 10 * np.log10((same**2).sum() / (0.01**2 * same.size))
    np.testing.assert_allclose(output.sqnr_db, expected, rtol=1e-6)
    assert str(output).endswith("shape differs from float's in 1 of 2 runs (not compared)")


def test_the_layer_report_covers_every_quantized_layer_in_order(small_model, calibration_data):
    config = onnxq.QuantConfig(layer_report=True, speed_check=False)
    result = onnxq.quantize(small_model, calibration_data, config)
    layers = [name for name, _, _ in result.fidelity.layers]
    order = [node.name for node in result.model.graph.node if node.name in set(layers)]
    assert layers == order and len(layers) >= 3
    first_input, first_output = result.fidelity.layers[0][1:]
    assert first_input == float("inf") and 15 < first_output < 80  # the graph input is exact
    assert not onnxq.quantize(
        small_model, calibration_data, onnxq.QuantConfig(speed_check=False)
    ).fidelity.layers


def test_cli_layer_report_prints_the_table_and_the_sizes(tmp_path, small_model_path, calibration_data):
    calib = tmp_path / "calib.npy"
    np.save(calib, calibration_data)
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(
        main, ["quantize", str(small_model_path), "-o", str(out), "--calib", str(calib), "--layer-report"]
    )
    assert result.exit_code == 0, result.output
    assert "per-layer error" in result.output and "fall dB" in result.output
    assert f"wrote {out} (" in result.output and "the float model" in result.output


def test_an_l2_normalised_embedding_is_no_set_of_class_scores():
    """A face or image encoder's unit-length embedding has no classes: no top-1 agreement (its
    argmax moving would read as a poor model); a saturated softmax, also of unit length, keeps it."""
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(16, 32))
    embedding /= np.linalg.norm(embedding, axis=1, keepdims=True)
    noisy = embedding + 0.01 * rng.normal(size=embedding.shape)
    (output,) = fidelity.compare_outputs(["embedding"], [([embedding], [noisy])])
    assert output.agreement is None and output.cosine > 0.99
    saturated = np.tile(np.array([[1.0 - 1e-6, 1e-6]]), (8, 1))
    (scores,) = fidelity.compare_outputs(["scores"], [([saturated], [saturated[:, ::-1]])])
    assert scores.agreement == 0.0


def test_rows_that_are_not_samples_are_not_class_scores():
    """A batch-1 detector returns [boxes, 4] per image: its rows are boxes, not samples."""
    from onnxq.fidelity import OutputComparison

    rng = np.random.default_rng(0)
    boxes = [rng.standard_normal((7, 4)).astype(np.float32) for _ in range(3)]
    per_image, unknown = OutputComparison(["boxes"]), OutputComparison(["boxes"])
    for value in boxes:
        per_image.add([value], [value + 0.01], samples=1)
        unknown.add([value], [value + 0.01])
    (result,) = per_image.results()
    assert result.agreement is None
    assert np.isfinite(result.sqnr_db)
    (taken_as_scores,) = unknown.results()
    assert taken_as_scores.agreement == 1.0


def test_the_tensors_a_picked_output_picks_from_are_listed_by_their_lowest():
    from onnxq.fidelity import Fidelity, OutputFidelity

    outputs = [
        OutputFidelity("boxes", float("inf"), 1.0, None, picked_by="NonMaxSuppression"),
        *(OutputFidelity(f"level{i}", 40.0 + i, 1.0, None, picks_for="boxes") for i in range(3)),
        OutputFidelity("scores", 30.0, 1.0, None),
    ]
    lines = Fidelity(16, True, outputs, 30.0).lines()
    assert len(lines) == 3
    assert "'level0'" in lines[1] and "lowest of 3" in lines[1]
    assert "'scores'" in lines[2]


def test_topk_values_are_no_class_scores():
    """TopK's values come sorted, so argmax always picks their first entry: no agreement is
    reported for them, in the check or in `onnxq eval`; class scores keep theirs, and so does a
    2-class classifier sure of one class on every sample, whose rows come sorted too."""
    from onnxq.evaluate import _class_scores

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 20))
    topk = -np.sort(-logits, axis=1)[:, :10]
    noisy = topk + 0.01 * rng.normal(size=topk.shape)
    (values,) = fidelity.compare_outputs(
        ["scores"], [([row[None]], [got[None]]) for row, got in zip(topk, noisy, strict=True)]
    )
    assert values.agreement is None and values.sqnr_db > 20
    (scores,) = fidelity.compare_outputs(["logits"], [([row[None]], [row[None]]) for row in logits])
    assert scores.agreement == 1.0
    sure = np.tile(np.array([[0.999, 0.001]]), (16, 1))
    (two,) = fidelity.compare_outputs(["probs"], [([row[None]], [row[None]]) for row in sure])
    assert two.agreement == 1.0
    assert not _class_scores(topk, len(topk)) and _class_scores(logits, len(logits))
    assert _class_scores(sure, len(sure))


@given(width=st.integers(2, 12), rows=st.integers(1, 20))
def test_sorted_rows_are_taken_for_topk_only_where_chance_would_rarely_sort_them(width, rows):
    values = -np.sort(-np.random.default_rng(width * 100 + rows).normal(size=(rows, width)), axis=1)
    chance = math.factorial(width) ** -rows
    expected = width >= class_scores.TOPK_WIDTH and chance <= class_scores.SORTED_BY_CHANCE
    assert class_scores.sorted_like_topk(values) == expected
    assert not class_scores.sorted_like_topk(values[:, ::-1]) or width < 2


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 100.0), st.floats(1e-4, 0.5)), min_size=2, max_size=6))
def test_each_samples_own_sqnr_is_reported_beside_the_pooled_one(samples):
    """A loud sample with little error and quiet ones with much: the pooled SQNR is the loud
    sample's, the per-sample figures are each sample's own (numpy reference)."""
    rng = np.random.default_rng(0)
    want = [rng.standard_normal((1, 10)) * level for level, _ in samples]
    got = [
        w + rng.standard_normal(w.shape) * np.abs(w).mean() * e
        for w, (_, e) in zip(want, samples, strict=True)
    ]
    comparison = fidelity.OutputComparison(["y"])
    for w, g in zip(want, got, strict=True):
        comparison.add([w], [g], samples=1)
    (output,) = comparison.results()
    own = [10 * np.log10((w**2).sum() / ((w - g) ** 2).sum()) for w, g in zip(want, got, strict=True)]
    np.testing.assert_allclose([output.sample_median_db, output.sample_lowest_db], [np.median(own), min(own)])
    assert f"lowest {min(own):.1f} dB" in str(output)


def test_a_batch_of_samples_is_scored_sample_by_sample_and_one_sample_alone_is_not():
    want = np.array([[1.0, 2.0], [10.0, 20.0]])
    got = want + np.array([[0.1, 0.0], [0.1, 0.0]])
    (batch,) = fidelity.compare_outputs(["y"], [([want], [got])])
    assert batch.sample_lowest_db is None  # runs said nothing of their samples
    comparison = fidelity.OutputComparison(["y"])
    comparison.add([want], [got], samples=2)
    (scored,) = comparison.results()
    np.testing.assert_allclose(scored.sample_lowest_db, 10 * np.log10(5 / 0.01))
    comparison = fidelity.OutputComparison(["y"])
    comparison.add([want[:1]], [got[:1]], samples=1)
    assert comparison.results()[0].sample_median_db is None  # one sample: the pooled figure says it


@pytest.mark.parametrize("held_back", [False, True])
def test_an_in_sample_check_says_its_figures_flatter_the_plan(held_back):
    """A plan chosen and checked on the same 16 images reported YOLOv8n's scores at 20.0 dB;
    its other 16 calibration images gave 8.4 dB."""
    report = fidelity.Fidelity(16, held_back, [fidelity.OutputFidelity("scores", 20.0, 0.99, None)], 20.0)
    assert (fidelity.IN_SAMPLE_CAUTION in report.lines()) is not held_back


def test_an_exact_in_sample_check_needs_no_caution():
    report = fidelity.Fidelity(16, False, [fidelity.OutputFidelity("y", float("inf"), 1.0, None)], 20.0)
    assert fidelity.IN_SAMPLE_CAUTION not in report.lines()
