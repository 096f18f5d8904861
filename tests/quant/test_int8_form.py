"""--int8-range auto on a CPU whose GEMM kernels saturate: unsigned 8-bit weights where a model
with them runs clearly faster than float, the 7-bit range elsewhere. The probes' answers and the timings
are forced, so both paths are tested on any x86 CPU."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxq
from onnxq.quant import int8_form, kernels


def _gemm_weights(model: onnx.ModelProto) -> list[tuple[np.ndarray, np.ndarray]]:
    """(integers, zero point) of every non-depthwise Conv/Gemm weight."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or node.input[1] not in producers:
            continue
        if any(a.name == "group" and a.i > 1 for a in node.attribute):
            continue
        dequantize = producers[node.input[1]]
        found.append((inits[dequantize.input[0]], inits[dequantize.input[2]]))
    return found


def _quantize(monkeypatch, small_model, calibration_data, float_ms: float, timed: list[float] | None):
    monkeypatch.setattr(kernels, "int8_kernels_saturate", lambda: True)
    monkeypatch.setattr(kernels, "full_range_kernels", lambda: frozenset({kernels.DEPTHWISE}))
    monkeypatch.setattr(int8_form, "_rough_ms", lambda model, feed: float_ms)

    def compare(models, feed, seconds):
        if timed is None:
            raise AssertionError("a model this small must not be timed")
        assert len(models) == 2 and all(m.graph.input for m in models)
        return timed

    monkeypatch.setattr(int8_form, "compare_latency", compare)
    config = onnxq.QuantConfig(calibration=onnxq.CalibrationMethod.MINMAX, fidelity_fallback=False)
    return onnxq.quantize(small_model, calibration_data[:16], config)


def test_unsigned_weights_where_they_run_clearly_faster_than_float(
    monkeypatch, small_model, calibration_data
):
    result = _quantize(monkeypatch, small_model, calibration_data, 10.0, [10.0, 8.5])
    weights = _gemm_weights(result.model)
    assert weights and all(q.dtype == np.uint8 and (zp == 128).all() for q, zp in weights)
    assert max(int(np.abs(q.astype(np.int16) - 128).max()) for q, _ in weights) == 127
    assert result.int8_weight_bits == 8
    assert "uint8" in result.weight_range


@pytest.mark.parametrize("unsigned_ms", [9.5, 11.0], ids=["within-the-margin", "slower"])
def test_seven_bit_weights_where_unsigned_ones_are_not_clearly_faster(
    monkeypatch, small_model, calibration_data, unsigned_ms
):
    result = _quantize(monkeypatch, small_model, calibration_data, 10.0, [10.0, unsigned_ms])
    weights = _gemm_weights(result.model)
    assert weights and all(q.dtype == np.int8 and not zp.any() for q, zp in weights)
    assert max(int(np.abs(q).max()) for q, _ in weights) == 63
    assert result.int8_weight_bits == 7


def test_a_tiny_model_keeps_seven_bit_weights_untimed(monkeypatch, small_model, calibration_data):
    result = _quantize(monkeypatch, small_model, calibration_data, int8_form.PROBE_MIN_MS / 2, None)
    assert result.int8_weight_bits == 7


@pytest.mark.parametrize("unsigned_ms", [9.0, 11.0])
def test_the_probe_decides_nothing_where_kernels_do_not_saturate(
    monkeypatch, small_model, calibration_data, unsigned_ms
):
    monkeypatch.setattr(kernels, "int8_kernels_saturate", lambda: False)
    monkeypatch.setattr(int8_form, "_rough_ms", lambda model, feed: 10.0)
    monkeypatch.setattr(int8_form, "compare_latency", lambda models, feed, seconds: [10.0, unsigned_ms])
    config = onnxq.QuantConfig(calibration=onnxq.CalibrationMethod.MINMAX, fidelity_fallback=False)
    result = onnxq.quantize(small_model, calibration_data[:16], config)
    assert all(q.dtype == np.int8 for q, _ in _gemm_weights(result.model))
    assert result.int8_weight_bits == 8


def test_the_probe_times_unsigned_weights_against_the_baseline_it_is_given(
    monkeypatch, small_model, calibration_data
):
    """The pipeline gives the float model as prepared before equalization: the probe is timed
    against it, and built from the model the plan was made on."""
    from onnxq.passes.infer_types import typed_ir
    from onnxq.quant.plan import plan_quantization

    monkeypatch.setattr(kernels, "int8_kernels_saturate", lambda: True)
    monkeypatch.setattr(int8_form, "_rough_ms", lambda model, feed: 10.0)
    timed = []
    monkeypatch.setattr(
        int8_form, "compare_latency", lambda models, feed, seconds: timed.append(models) or [10.0, 8.0]
    )
    baseline = onnx.ModelProto()
    baseline.CopyFrom(small_model)
    baseline.doc_string = "the baseline"
    config = onnxq.QuantConfig()
    plan = plan_quantization(typed_ir(small_model).graph, config)
    sample = {small_model.graph.input[0].name: calibration_data[:1]}
    choice, notes = int8_form.choose_int8_range(small_model, plan, sample, config, baseline=baseline)
    assert choice.unsigned and notes
    ((first, probe),) = timed
    assert first is baseline
    assert any(node.op_type == "QuantizeLinear" for node in probe.graph.node)
