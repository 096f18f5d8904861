"""`--calib-method auto`: percentile or min-max activation ranges, whichever keeps the outputs
closer to float on the fidelity check's samples; searched ranges (mse) with 8-bit activations meet
the min-max ones the same way."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq

SAMPLES = 32  # under fidelity.MIN_CALIBRATION: the check runs on the last 16 calibration samples
SIDE = 48  # 32·3·48·48 values: the 99.999th percentile leaves out two of them


def one_conv(weight: np.ndarray | None = None, side: int = SIDE) -> onnx.ModelProto:
    """A 1×1 Conv from 3 channels to 4 (random weights unless given) on side×side inputs."""
    if weight is None:
        weight = np.random.default_rng(0).standard_normal((4, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        "one_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, side, side])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def data_with_spikes(sample: int) -> np.ndarray:
    """Gaussian inputs with two values of 1000 in one sample: percentile ranges clip them."""
    x = np.random.default_rng(1).standard_normal((SAMPLES, 3, SIDE, SIDE)).astype(np.float32)
    x[sample, 0, 0, :2] = 1000.0
    return x


def quantized(x: np.ndarray, method: str) -> onnxq.QuantResult:
    config = onnxq.QuantConfig(
        calibration=onnxq.CalibrationMethod(method), fidelity_fallback=False, speed_check=False
    )
    return onnxq.quantize(one_conv(), {"x": x}, config)


@pytest.mark.parametrize(
    ("spiked", "winner"),
    [
        (SAMPLES - 1, "min-max"),  # the spikes carry most of the checked outputs: clipping them costs most
        (0, "percentile"),  # the spikes only widen min-max steps for the checked samples, which lack them
    ],
)
def test_auto_keeps_whichever_ranges_keep_the_outputs_closer(spiked, winner):
    x = data_with_spikes(spiked)
    auto = quantized(x, "auto")
    scores = {
        label: quantized(x, method).fidelity.min_sqnr
        for label, method in (("percentile", "percentile"), ("min-max", "minmax"))
    }
    assert max(scores, key=scores.__getitem__) == winner
    assert auto.fidelity.min_sqnr == pytest.approx(scores[winner], abs=1e-6)
    assert any(note.startswith(f"activation ranges: {winner} ") for note in auto.notes)


def input_step(result: onnxq.QuantResult) -> float:
    """The step of the quantizer on the model's input `x`."""
    graph = result.model.graph
    node = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    scale = next(i for i in graph.initializer if i.name == node.input[1])
    return float(numpy_helper.to_array(scale))


SEARCH_SIDE = 96  # 32·3·96·96 values: the mse search clips one value of 1000 to about half


def channel_zero_conv() -> onnx.ModelProto:
    """A 1×1 Conv whose outputs read only input channel 0, where the spike is: the check sees
    the spike's share of the outputs, the search weighs it against every channel's rounding."""
    weight = np.zeros((4, 3, 1, 1), np.float32)
    weight[:, 0, 0, 0] = [1.0, -0.5, 0.25, 2.0]
    return one_conv(weight, SEARCH_SIDE)


def searched(sample: int, activation_bits: int = 8) -> onnxq.QuantResult:
    """The mse search on Gaussian inputs with one value of 1000 in channel 0 of `sample`."""
    x = np.random.default_rng(1).standard_normal((SAMPLES, 3, SEARCH_SIDE, SEARCH_SIDE)).astype(np.float32)
    x[sample, 0, 0, 0] = 1000.0
    config = onnxq.QuantConfig(
        calibration=onnxq.CalibrationMethod.MSE,
        activation_bits=activation_bits,
        fidelity_fallback=False,
        speed_check=False,
    )
    return onnxq.quantize(channel_zero_conv(), {"x": x}, config)


def min_max_step(bits: int = 8) -> float:
    return 1000.0 / (2**bits - 1)  # the spike sets the min-max range of x


def test_searched_ranges_give_way_to_min_max_ones_where_those_keep_the_outputs_closer(monkeypatch):
    # the spike sits in a checked sample: the mse search clips it, min-max keeps it
    result = searched(SAMPLES - 1)
    assert input_step(result) > min_max_step()
    monkeypatch.setattr(onnxq.calibrate, "compares_extremes", lambda config: False)
    alone = searched(SAMPLES - 1)
    assert input_step(alone) < 0.6 * min_max_step()
    assert result.fidelity.min_sqnr > alone.fidelity.min_sqnr + 2.0


def test_searched_ranges_stand_where_they_keep_the_outputs_closer():
    # the spike sits in an unchecked sample: widening x's steps for it costs the checked ones
    assert input_step(searched(0)) < 0.6 * min_max_step()


def test_below_8_bit_activations_the_search_meets_no_min_max_ranges():
    result = searched(SAMPLES - 1, activation_bits=4)
    assert input_step(result) < 0.6 * min_max_step(4)
    assert not any(note.startswith("activation ranges:") for note in result.notes)


def two_branches() -> onnx.ModelProto:
    """Two inputs, each read by its own Conv whose output is a graph output."""
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((4, 3, 1, 1)).astype(np.float32) for _ in range(2)]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x1", "w1"], ["y1"], name="conv1"),
            helper.make_node("Conv", ["x2", "w2"], ["y2"], name="conv2"),
        ],
        "two_branches",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", 3, SIDE, SIDE]) for x in ("x1", "x2")],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["n", 4, SIDE, SIDE]) for y in ("y1", "y2")],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights, 1)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_auto_gives_each_activation_the_rule_that_serves_the_outputs_best():
    # x1 has a spike in a sample the switches are chosen on and one in a sample that confirms
    # them (the check's samples 16-19 and 20-23): min-max serves it; x2's spikes are in an
    # unchecked sample: percentile serves it. Neither rule for the whole model keeps both close.
    x1 = data_with_spikes(0)
    x1[0] = x1[1]
    x1[17, 0, 0, 0] = x1[21, 0, 0, 0] = 1000.0
    data = {"x1": x1, "x2": data_with_spikes(0)}
    model = two_branches()

    def lowest(method: str) -> onnxq.QuantResult:
        config = onnxq.QuantConfig(
            calibration=onnxq.CalibrationMethod(method), fidelity_fallback=False, speed_check=False
        )
        return onnxq.quantize(model, data, config)

    auto = lowest("auto")
    whole_model = max(lowest(m).fidelity.min_sqnr for m in ("percentile", "minmax"))
    assert auto.fidelity.min_sqnr > whole_model + 3.0
    switched = "activation ranges: 1 switched to the other rule's ranges"
    assert any(note.startswith(switched) for note in auto.notes)


def test_a_switch_that_helps_only_the_samples_it_was_chosen_on_is_not_taken():
    # x1's one spike is in a sample the switch is chosen on (16-19), none in those that confirm it
    x1 = data_with_spikes(0)
    x1[0] = x1[1]
    x1[17, 0, 0, 0] = 1000.0
    config = onnxq.QuantConfig(fidelity_fallback=False, speed_check=False)
    auto = onnxq.quantize(two_branches(), {"x1": x1, "x2": data_with_spikes(0)}, config)
    assert not any("switched to the other rule's ranges" in note for note in auto.notes)


def test_the_scan_reach_is_a_count_and_a_cut_short_scan_says_so(monkeypatch):
    """A slow machine scans the same activations as a fast one (MOST_SCANNED); only the safety
    cap, here reached at once, stops it early, and the notes then say the plan hangs on speed."""
    from onnxq import range_choice

    x1 = data_with_spikes(0)
    x1[0] = x1[1]
    x1[17, 0, 0, 0] = x1[21, 0, 0, 0] = 1000.0
    data = {"x1": x1, "x2": data_with_spikes(0)}
    config = onnxq.QuantConfig(fidelity_fallback=False, speed_check=False)
    clock = iter(range(0, 10**6, 50))  # every reading of the clock 50 s after the last
    monkeypatch.setattr(range_choice.time, "perf_counter", lambda: float(next(clock)))
    slow = onnxq.quantize(two_branches(), data, config)
    assert any(note.startswith("activation ranges: 1 switched") for note in slow.notes)
    monkeypatch.setattr(range_choice, "SAFETY_SECONDS", 0.0)
    cut = onnxq.quantize(two_branches(), data, config)
    assert any("the scan stopped after 0 s at 0 of" in note for note in cut.notes)


def test_the_safety_cap_also_stops_the_taking_after_the_scan(monkeypatch):
    """A model whose scan used up the cap tries no switch after it: each trial is a full run of
    the model (Keypoint R-CNN: 111 s of them after a 188 s scan), and the notes say so."""
    from types import SimpleNamespace

    from onnxq import range_choice

    x1 = data_with_spikes(0)
    x1[0] = x1[1]
    x1[17, 0, 0, 0] = x1[21, 0, 0, 0] = 1000.0
    data = {"x1": x1, "x2": data_with_spikes(0)}
    config = onnxq.QuantConfig(fidelity_fallback=False, speed_check=False)
    readings = iter([0.0, 0.0])  # the deadline is set, the scan's one chunk starts; then past it
    monkeypatch.setattr(range_choice, "time", SimpleNamespace(perf_counter=lambda: next(readings, 1e9)))
    cut = onnxq.quantize(two_branches(), data, config)
    assert any("the search stopped after 180 s at 0 of 1 switches tried" in note for note in cut.notes)
    assert not any("switched to the other rule's ranges" in note for note in cut.notes)
