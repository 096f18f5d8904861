"""GPTQ for 8-bit weights in the observation pass: the stored integers against GPTQ run by hand
on the float model's layer inputs, the budget, and the default."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxq
from onnxq.calib import streamed_gptq
from onnxq.calib.rounding import factor, gptq_round, input_correlation
from onnxq.calib.runner import with_outputs
from onnxq.config import Granularity, QuantConfig, RangeRule
from onnxq.io import session
from onnxq.quant import primitives as P
from onnxq.quant.weights import WeightLayout, quantize_weight

CONV = WeightLayout(out_axis=0, in_axis=1)
COMMON = dict(equalize=False, speed_check=False, fidelity_fallback=False)  # the float layers as exported


def _stored(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Conv"]


def test_8_bit_weights_are_gptq_rounded_against_the_float_models_layer_inputs(small_model, calibration_data):
    """Each stored conv weight is what GPTQ gives from H = Σ x xᵀ of that conv's input in the float
    model, at the scales nearest rounding uses."""
    result = onnxq.quantize(small_model, calibration_data, QuantConfig(weight_range="full", **COMMON))
    assert any("on float inputs" in note for note in result.notes)
    float_model = onnxq.fuse(small_model).model
    weights = _stored(float_model)
    convs = _convs(float_model)
    inputs = [node.input[0] for node in convs]
    feed = {float_model.graph.input[0].name: calibration_data}
    values = session(with_outputs(float_model, inputs), optimize=False).run(inputs, feed)
    stored = _stored(result.model)
    moved = 0
    for node, x in zip(convs, values, strict=True):
        weight = weights[node.input[1]]
        nearest = quantize_weight(
            weight, CONV, Granularity.parse("channel"), RangeRule("minmax"), P.IntRange.signed(8)
        )
        expected = gptq_round(weight, nearest, factor(input_correlation(node, weight, [x]).gram), node, CONV)
        got = stored[f"{node.input[1]}_quantized"]
        np.testing.assert_array_equal(got, expected.integers)
        moved += int(np.sum(got != nearest.integers))
    assert moved > 0  # GPTQ changed some integers: the test compares more than nearest rounding


def test_reduced_8_bit_range_is_kept(small_model, calibration_data):
    """On CPUs without VNNI 8-bit weights of saturating kernels keep within [-63, 63] (the
    depthwise conv's keep [-127, 127]): GPTQ rounds inside whichever range nearest rounding had."""
    reduced = dict(weight_range="reduced", **COMMON)
    nearest = onnxq.quantize(small_model, calibration_data, QuantConfig(weight_rounding="nearest", **reduced))
    rounded = onnxq.quantize(small_model, calibration_data, QuantConfig(**reduced))
    before, after = _stored(nearest.model), _stored(rounded.model)
    names = [f"{node.input[1]}_quantized" for node in _convs(onnxq.fuse(small_model).model)]
    assert any(not np.array_equal(before[name], after[name]) for name in names)
    widths = {name: int(np.abs(before[name].astype(np.int64)).max()) for name in names}
    assert 63 in widths.values()
    for name in names:  # symmetric min-max: nearest rounding reaches the range's ends
        assert np.abs(after[name].astype(np.int64)).max() <= widths[name]


def test_layers_past_the_correlation_budget_keep_nearest_rounding(small_model, calibration_data, monkeypatch):
    nearest = onnxq.quantize(small_model, calibration_data, QuantConfig(weight_rounding="nearest", **COMMON))
    monkeypatch.setattr(streamed_gptq, "MAX_TOTAL_BYTES", 0)
    refused = onnxq.quantize(small_model, calibration_data, QuantConfig(**COMMON))
    before, after = _stored(nearest.model), _stored(refused.model)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert any("GPTQ left" in note and "MiB budget" in note for note in refused.notes)


@pytest.mark.parametrize(
    "config, streamed",
    [
        (QuantConfig(), True),
        (QuantConfig(calibration="minmax"), True),
        (QuantConfig(weight_rounding="nearest"), False),
        (QuantConfig(calibration="mse"), False),  # the sweep rounds on quantized inputs
        (QuantConfig(bias_correction=True), False),
        (QuantConfig(weight_bits=4), False),
    ],
)
def test_the_observation_pass_rounds_only_where_no_sweep_runs(
    small_model, calibration_data, config, streamed
):
    notes = onnxq.quantize(small_model, calibration_data, config).notes
    assert any("on float inputs" in note for note in notes) == streamed


@pytest.mark.parametrize(("rounding", "swept"), [("auto", False), ("gptq", True)])
def test_the_8_bit_mse_sweep_rounds_by_gptq_only_when_asked(small_model, calibration_data, rounding, swept):
    """auto at 8 bits rounds in the observation pass only: GPTQ in the mse sweep cost YOLOX's
    boxes 5 dB, and no held-out run chose it there."""
    config = QuantConfig(calibration="mse", weight_rounding=rounding, **COMMON)
    notes = onnxq.quantize(small_model, calibration_data, config).notes
    assert any(note.startswith("GPTQ chose") for note in notes) == swept
    assert not any("on float inputs" in note for note in notes)
