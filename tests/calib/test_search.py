"""Scale search in onnxruntime: the simulation is exact, choices lower the error they target."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import onnxq
from onnxq.calib.search import SearchSettings, search_parameters
from onnxq.calib.simulate import build_simulation, fake_quant_feed
from onnxq.calib.sweep import prediction_difference
from onnxq.config import CalibrationMethod, QuantConfig
from onnxq.io import session, to_ir
from onnxq.passes.insert_qdq import activation_quantizer
from onnxq.progress import Silent
from onnxq.quant import primitives as P
from onnxq.quant.plan import plan_quantization


def _prepared(model: onnx.ModelProto, config: QuantConfig):
    fused = onnxq.fuse(model).model
    return fused, plan_quantization(to_ir(fused).graph, config)


def _reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return session(model, optimize=False).run(None, {"input": x})[0]


def test_simulation_with_float_parameters_is_the_float_model(small_model, calibration_data):
    fused, plan = _prepared(small_model, QuantConfig(weight_bits=4, activation_bits=4))
    simulation = build_simulation(fused, plan)
    out = simulation.run(simulation.segments, {"input": calibration_data}, simulation.float_params)
    expected = _reference(fused, calibration_data)
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert len(simulation.segments) > len(plan.weights)  # cut at every weight and activation


@pytest.mark.parametrize(
    "method, rounding", [("mse", "nearest"), ("pd", "nearest"), ("mse", "gptq"), ("pd", "gptq")]
)
def test_simulated_choice_is_what_the_saved_model_computes(small_model, calibration_data, method, rounding):
    config = QuantConfig(
        weight_bits=4,
        activation_bits=4,
        calibration=CalibrationMethod(method),
        weight_rounding=rounding,
        equalize=False,  # the simulation below is built from the fused model as it stands
    )
    result = onnxq.quantize(small_model, calibration_data, config)
    fused, plan = _prepared(small_model, config)
    fused = onnx.version_converter.convert_version(fused, 21)
    plan = plan_quantization(to_ir(fused).graph, config)
    simulation = build_simulation(fused, plan)
    simulated = simulation.run(simulation.segments, {"input": calibration_data}, result.calibration.feed)
    deployed = _reference(result.model, calibration_data)
    scale = np.abs(deployed).max()
    assert np.abs(simulated["logits"] - deployed).max() <= 1e-3 * scale


@settings(max_examples=30, deadline=None)
@given(
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    low=st.floats(-4.0, 0.0),
    high=st.floats(0.1, 4.0),
    seed=st.integers(0, 2**16),
)
def test_fake_quantizer_matches_numpy_reference(bits, symmetric, low, high, seed):
    """The simulation's quantizer gives exactly QuantizeLinear → DequantizeLinear of the reference."""
    x = np.random.default_rng(seed).uniform(2 * low - 0.5, 2 * high + 0.5, (4, 3, 5, 5)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["input"], ["r"]), onnx.helper.make_node("Neg", ["r"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, None)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    plan = plan_quantization(to_ir(model).graph, QuantConfig())
    plan.activations.clear()
    from onnxq.quant.plan import ActivationSpec

    plan.activations["input"] = ActivationSpec("input", "input", bits=bits)
    simulation = build_simulation(model, plan)
    scale, zero, target = activation_quantizer(low, high, bits, symmetric)
    feed = {**simulation.float_params, **fake_quant_feed("input", scale, zero, target.qmin, target.qmax)}
    out = simulation.run(simulation.segments, {"input": x}, feed)["y"]
    expected = -np.maximum(P.dequantize(P.quantize(x, scale, zero, target), scale, zero), 0)
    np.testing.assert_array_equal(out, expected)


def _single_conv(depthwise: bool) -> onnx.ModelProto:
    import torch

    from tests.conftest import export

    torch.manual_seed(1)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8 if depthwise else 1)
    with torch.no_grad():
        conv.weight[:, :, 0, 0] *= 6  # an outlier tap per filter: min-max scales are too coarse
        conv.bias.normal_()
    return export(torch.nn.Sequential(conv), torch.zeros(1, 8, 8, 8))


def _layer_error(model, data, ratios, biases, plan) -> tuple[float, np.ndarray]:
    """Output MSE and per-channel mean error of the one-layer model with these choices."""
    from onnxq.passes.insert_qdq import weight_target
    from onnxq.quant.weights import quantize_weight

    ((name, spec),) = plan.weights.items()
    weight = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
    bias_name = next(iter(plan.biases))
    bias = biases.get(
        bias_name, onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == bias_name))
    )
    dequantized = quantize_weight(
        weight, spec.layout, spec.granularity, spec.rule, weight_target(spec, True), ratios.get(name)
    ).dequantize()
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    for tensor in edited.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(onnx.numpy_helper.from_array(dequantized, name))
        if tensor.name == bias_name:
            tensor.CopyFrom(onnx.numpy_helper.from_array(bias.astype(np.float32), bias_name))
    error = _reference(edited, data) - _reference(model, data)
    return float(np.mean(error**2)), error.mean(axis=(0, 2, 3))


@pytest.mark.parametrize("method", ["mse", "mae"])
def test_searched_weights_and_bias_correction_reduce_the_output_error(method):
    model = _single_conv(depthwise=True)
    config = QuantConfig(weight_bits=3, activation_bits=8, first_last_8bit=False)
    fused, plan = _prepared(model, config)
    # non-negative inputs (as after a ReLU): weight rounding errors shift the output's mean
    data = np.random.default_rng(0).uniform(0, 2, (64, 8, 8, 8)).astype(np.float32)
    simulation = build_simulation(fused, plan)
    feed = {"input": data}
    plain = search_parameters(
        simulation, plan, feed, SearchSettings("fixed", bias_correction=False), Silent()
    )
    searched = search_parameters(
        simulation, plan, feed, SearchSettings(method, bias_correction=False), Silent()
    )
    corrected = search_parameters(
        simulation, plan, feed, SearchSettings(method, bias_correction=True), Silent()
    )
    base, _ = _layer_error(fused, data, plain.weight_ratios, plain.biases, plan)
    better, shift = _layer_error(fused, data, searched.weight_ratios, searched.biases, plan)
    best, corrected_shift = _layer_error(fused, data, corrected.weight_ratios, corrected.biases, plan)
    assert better < base
    (ratios,) = searched.weight_ratios.values()
    assert ratios.shape == (8,) and (ratios < 1).any() and (ratios <= 1).all()
    assert np.abs(corrected_shift).max() < 0.2 * np.abs(shift).max() + 1e-4
    assert best <= better * 1.05


def test_same_seed_gives_byte_identical_models(small_model, calibration_data):
    config = QuantConfig(weight_bits=4, activation_bits=4, calibration=CalibrationMethod.PD, seed=3)
    first = onnxq.quantize(small_model, calibration_data, config).model.SerializeToString()
    second = onnxq.quantize(small_model, calibration_data, config).model.SerializeToString()
    assert first == second


def test_pd_reports_calibration_and_held_out_losses(small_model, calibration_data):
    config = QuantConfig(weight_bits=4, activation_bits=4, calibration=CalibrationMethod.PD, holdout=0.25)
    result = onnxq.quantize(small_model, calibration_data, config).calibration
    assert result.samples == 36 and result.held_out == 12
    assert set(result.pd_loss) == {"calibration", "held-out", "calibration before pd", "held-out before pd"}
    assert all(np.isfinite(v) and v >= 0 for v in result.pd_loss.values())


@pytest.mark.parametrize("pd_lambda", [0.0, 1e9])
def test_pd_skips_only_candidates_the_regulariser_rules_out(small_model, calibration_data, pd_lambda):
    """A candidate whose λ·regulariser alone exceeds the best loss cannot win (KL ≥ 0): with λ = 0
    none is skipped; with a huge λ only those that lower the item's own error still run."""
    config = QuantConfig(
        weight_bits=4, activation_bits=4, calibration=CalibrationMethod.PD, pd_lambda=pd_lambda
    )
    result = onnxq.quantize(small_model, calibration_data, config).calibration
    pruned, candidates = result.pd_pruned
    assert candidates > 0
    if pd_lambda:
        assert candidates // 2 < pruned <= candidates
    else:
        assert pruned == 0


@pytest.mark.parametrize("pd_lambda", [0.1, 1e3])
def test_pd_never_ends_worse_than_it_started(small_model, calibration_data, pd_lambda):
    """A large λ lets the regulariser pick candidates that raise the KL; the search then returns
    to its starting point, and says so."""
    config = QuantConfig(
        weight_bits=4, activation_bits=4, calibration=CalibrationMethod.PD, pd_lambda=pd_lambda
    )
    result = onnxq.quantize(small_model, calibration_data, config)
    losses = result.calibration.pd_loss
    assert losses["calibration"] <= losses["calibration before pd"]
    if result.calibration.pd_kept_start:
        assert losses["calibration"] == losses["calibration before pd"]
        assert any("kept the mse choice" in note for note in result.notes)


def test_pd_that_ends_worse_returns_to_its_start(monkeypatch, small_model, calibration_data):
    """A sweep that spoils the model (every weight zeroed) is undone: the file is the one a pd
    sweep that changed nothing writes."""
    from onnxq.calib.pd_search import PredictionSweep

    config = QuantConfig(weight_bits=4, activation_bits=4, calibration=CalibrationMethod.PD)
    monkeypatch.setattr(PredictionSweep, "prediction_difference", lambda *args: None)
    unchanged = onnxq.quantize(small_model, calibration_data, config)

    def spoil(sweep, *args):
        for name in sweep.plan.weights:
            sweep.params[name] = np.zeros_like(sweep.params[name])
            sweep.ratios[name] = np.full_like(sweep.ratios.get(name, np.ones(1)), 0.01)

    monkeypatch.setattr(PredictionSweep, "prediction_difference", spoil)
    restored = onnxq.quantize(small_model, calibration_data, config)
    assert restored.calibration.pd_kept_start
    assert any("kept the mse choice" in note for note in restored.notes)
    assert restored.model.SerializeToString() == unchanged.model.SerializeToString()


def test_time_budget_keeps_simple_ranges_and_says_so(small_model, calibration_data):
    config = QuantConfig(
        weight_bits=4, activation_bits=4, calibration=CalibrationMethod.MSE, time_budget=1e-6
    )
    result = onnxq.quantize(small_model, calibration_data, config)
    assert result.calibration.skipped
    assert any("time budget" in note for note in result.notes)
    session(result.model).run(None, {"input": calibration_data[:2]})


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), classes=st.integers(2, 12))
def test_prediction_difference_is_the_softmax_kl(seed, classes):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0, 3, (5, classes)), rng.normal(0, 3, (5, classes))
    p = np.exp(a) / np.exp(a).sum(1, keepdims=True)
    q = np.exp(b) / np.exp(b).sum(1, keepdims=True)
    expected = np.mean(np.sum(p * np.log(p / q), axis=1))
    assert prediction_difference(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert prediction_difference(a, a) == pytest.approx(0.0, abs=1e-12)


def test_output_weight_rule_beats_min_max_weights_with_fixed_activation_ranges():
    """--w-range output searches weights only; activations keep their statistics-based ranges."""
    from onnxq.config import RangeRule

    model = _single_conv(depthwise=False)
    data = np.random.default_rng(2).uniform(0, 2, (64, 8, 8, 8)).astype(np.float32)
    reference = _reference(model, data)
    errors = {}
    for rule in ("minmax", "output"):
        config = QuantConfig(
            weight_bits=3,
            weight_rule=RangeRule(rule),
            calibration=CalibrationMethod.MINMAX,
            first_last_8bit=False,
            bias_correction=False,
            weight_rounding="nearest",  # nearest's own error, not GPTQ's
        )
        result = onnxq.quantize(model, data, config)
        assert (result.calibration is None) == (rule == "minmax")
        errors[rule] = float(np.mean((_reference(result.model, data) - reference) ** 2))
    assert errors["output"] < errors["minmax"]


def test_bias_correction_defaults_follow_the_benchmark():
    assert QuantConfig(weight_bits=4).corrects_bias  # percentile ranges below 8 bits
    assert not QuantConfig().corrects_bias
    assert not QuantConfig(weight_bits=4, calibration=CalibrationMethod.MSE).corrects_bias
    assert QuantConfig(weight_bits=4, calibration=CalibrationMethod.PD, bias_correction=True).corrects_bias


@pytest.mark.parametrize("magnitude", [1.0, 1e6])
def test_half_precision_cache_costs_no_accuracy(small_model, calibration_data, magnitude):
    """The float16 cache rounds what the search sees by 2^-11 at most: its choices may land on a
    neighbouring grid point, but the model's error stays that of the float32 cache. Tensors beyond
    float16's range (inputs scaled by 10^6) stay float32 rather than overflow."""
    config = QuantConfig(weight_bits=4, activation_bits=4)
    fused, plan = _prepared(small_model, config)
    simulation = build_simulation(fused, plan)
    feed = {"input": calibration_data * np.float32(magnitude)}
    reference = simulation.run(simulation.segments, feed, simulation.float_params)["logits"]

    def output_error(half: bool) -> float:
        result = search_parameters(simulation, plan, feed, SearchSettings("mse", half_cache=half), Silent())
        assert all(np.isfinite(r).all() for r in result.ranges.values())
        logits = simulation.run(simulation.segments, feed, result.feed)["logits"]
        return float(np.mean((logits - reference) ** 2))

    assert output_error(half=True) <= 1.1 * output_error(half=False)


def test_batches_count_samples_whatever_order_the_frontier_is_in():
    """A tensor without a batch axis (kept per batch) first in the frontier must not be taken for
    the batch: its own length says nothing about the sample count (magika's one-hot input)."""
    from onnxq.calib.frontier import PerBatch, sized_batches

    shape = PerBatch(4)
    for samples in (4, 4, 2):
        shape.add(np.array([7]), samples)
    frontier = {"shape": shape, "x": np.zeros((10, 3), np.float32)}
    sizes = [
        (batch["x"].shape[0], samples, batch["shape"].tolist())
        for batch, samples in sized_batches(frontier, 4)
    ]
    assert sizes == [(4, 4, [7]), (4, 4, [7]), (2, 2, [7])]


def test_a_bias_shared_by_two_layers_stays_float_in_the_search():
    """Two Convs read one bias initializer: it cannot be int32 at two scales, so it stays float and
    the layer probes must hold it as a constant."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b"], ["h"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b"], ["y"], name="c2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "shared_bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = rng.standard_normal((16, 3, 6, 6)).astype(np.float32)
    result = onnxq.quantize(model, data, QuantConfig(weight_bits=4, calibration=CalibrationMethod.MSE))
    assert result.fidelity.min_sqnr > 10


def _conv_if_conv() -> onnx.ModelProto:
    """Conv → If → Conv, where one branch adds the graph's input, read by name from inside (the
    condition is computed from the data, so that simplification cannot fold the If away)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["a", "input"], ["skipped"])],
        "then",
        [],
        [helper.make_tensor_value_info("skipped", TensorProto.FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["same"])],
        "else",
        [],
        [helper.make_tensor_value_info("same", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["a"], name="first", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMax", ["input"], ["peak"], name="peak", keepdims=0),
        helper.make_node("Greater", ["peak", "floor"], ["always"], name="always"),
        helper.make_node(
            "If", ["always"], ["r"], name="choose", then_branch=then_branch, else_branch=else_branch
        ),
        helper.make_node("Conv", ["r", "w2"], ["logits"], name="second"),
    ]
    constants = {
        "w1": rng.standard_normal((3, 3, 3, 3)).astype(np.float32),
        "b1": rng.standard_normal(3).astype(np.float32),
        "w2": rng.standard_normal((2, 3, 1, 1)).astype(np.float32),
        "floor": np.array(-1e30, np.float32),
    }
    graph = helper.make_graph(
        nodes,
        "conv_if_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2, 6, 6])],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("method", ["mse", "pd"])
def test_a_subgraph_reading_a_tensor_by_name_survives_the_cuts(method):
    """The search cuts the graph into sessions: an If whose branch reads the graph's input by
    name, past the cuts at the first Conv, must find it carried across."""
    model = _conv_if_conv()
    data = np.random.default_rng(1).standard_normal((16, 3, 6, 6)).astype(np.float32)
    config = QuantConfig(calibration=CalibrationMethod(method), speed_check=False)
    result = onnxq.quantize(model, data, config)
    want = _reference(model, data)
    got = _reference(result.model, data)
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()


def test_a_subgraph_reads_the_quantized_tensor_in_the_simulation_as_in_the_qdq_model():
    """The If branch reads the quantized input in the QDQ model; the tunable graph fed the QDQ
    model's parameters must compute the same, or every choice is made on another model."""
    from onnxq.calib.simulate import tunable_model
    from onnxq.sensitivity import quantized_feeds

    model = _conv_if_conv()
    data = np.random.default_rng(1).standard_normal((16, 3, 6, 6)).astype(np.float32)
    config = QuantConfig(speed_check=False, fidelity_fallback=False)
    result = onnxq.quantize(model, data, config)
    fused, plan = _prepared(model, config)
    tunable, feed, _ = tunable_model(fused, plan)
    for item in quantized_feeds(result.model, plan).values():
        feed.update(item)
    simulated = session(tunable, optimize=False).run(["logits"], {"input": data, **feed})[0]
    deployed = _reference(result.model, data)
    np.testing.assert_allclose(simulated, deployed, rtol=1e-4, atol=1e-4 * np.abs(deployed).max())


@settings(max_examples=50, deadline=None)
@given(
    losses=st.lists(
        st.lists(st.sampled_from([0.0, 1.0, 2.5]), min_size=3, max_size=3), min_size=4, max_size=4
    ),
)
def test_tied_losses_keep_the_widest_ratio(losses):
    from onnxq.calib.sweep import widest_of_least

    losses = np.array(losses)  # (candidates, groups)
    ratios = np.array([[0.2], [0.9], [0.5], [1.0]]) * np.ones((1, 3))
    chosen = widest_of_least(losses, ratios)
    for group in range(3):
        least = losses[:, group] == losses[:, group].min()
        assert chosen[group] == ratios[least, group].max()


def _one_channel_off_model() -> onnx.ModelProto:
    """Conv → Relu → Conv; the first conv's channel 0 reads input channel 0 alone, with positive
    weights: it stays off while that input is negative."""
    import torch

    from tests.conftest import export

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 1))
    with torch.no_grad():
        net[0].weight.uniform_(-1.0, 1.0)
        net[0].weight[0] = 0.0
        net[0].weight[0, 0] = torch.rand(3, 3) + 0.5
        net[0].bias.zero_()
    return export(net, torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize("method", ["mse", "output"])
def test_a_channel_the_calibration_data_keeps_off_keeps_its_whole_range(method):
    """A channel whose Relu is off on every calibration sample ties every clipping candidate; it
    used to get the narrowest (5 % of its largest weight), and broke on inputs that fire it."""
    from onnxq.config import RangeRule

    model = _one_channel_off_model()
    rng = np.random.default_rng(0)
    calibration = rng.uniform(-1.0, 1.0, (32, 4, 8, 8)).astype(np.float32)
    calibration[:, 0] = -np.abs(calibration[:, 0])  # channel 0 of the first conv stays off
    unseen = rng.uniform(-1.0, 1.0, (16, 4, 8, 8)).astype(np.float32)
    unseen[:, 0] = np.abs(unseen[:, 0])  # and fires here
    expected = _reference(model, unseen)
    noise = {}
    for rule in ("minmax", method):
        config = QuantConfig(
            weight_bits=4,
            first_last_8bit=False,
            speed_check=False,
            fidelity_fallback=False,
            calibration=CalibrationMethod.MSE if rule == "mse" else CalibrationMethod.MINMAX,
            weight_rule=RangeRule("output" if rule == "output" else "minmax"),
        )
        result = onnxq.quantize(model, calibration, config)
        noise[rule] = np.mean((_reference(result.model, unseen) - expected) ** 2)
    first = next(r for r in result.calibration.weight_ratios.values() if r.shape == (4,))
    assert first[0] == 1.0, first
    if method == "output":  # the same activation ranges as min-max: the weights alone differ
        assert noise["output"] < 2 * noise["minmax"]


@pytest.mark.parametrize("seed", [0, 1])
def test_weighing_activation_errors_by_their_readers_lowers_the_readers_output_error(seed):
    """A channel the next conv barely reads may be clipped harder than its own error allows:
    scored by the readers, the input's range is narrower and the conv's output error lower."""
    torch = pytest.importorskip("torch")
    from tests.conftest import export

    conv = torch.nn.Conv2d(2, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight[:, 0] = 1.0
        conv.weight[:, 1] = 0.01  # channel 1 hardly reaches the output
    model = export(torch.nn.Sequential(conv), torch.zeros(1, 2, 8, 8))
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, (64, 2, 8, 8)).astype(np.float32)
    x[:, 1] *= rng.exponential(3.0, (64, 8, 8)).astype(np.float32)  # a long tail in channel 1
    weight = onnx.numpy_helper.to_array(model.graph.initializer[0]).reshape(4, 2)
    output_error, ranges = {}, {}
    for choice in ("own", "readers"):
        config = QuantConfig(
            weight_bits=8,
            activation_bits=4,
            first_last_8bit=False,
            speed_check=False,
            fidelity_fallback=False,
            calibration=CalibrationMethod.MSE,
            activation_error=choice,
        )
        low, high = ranges[choice] = onnxq.quantize(model, x, config).calibration.ranges["input"]
        scale, zero, target = activation_quantizer(low, high, 4, False)
        q = (np.clip(np.rint(x / scale) + zero, target.qmin, target.qmax) - zero) * scale
        output_error[choice] = np.mean(np.einsum("oc,nchw->nohw", weight, q - x) ** 2)
    assert ranges["readers"][1] < ranges["own"][1]
    assert output_error["readers"] < output_error["own"]
