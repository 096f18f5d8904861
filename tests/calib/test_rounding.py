"""GPTQ rounding: the input correlations against a numpy reference, the rounding against nearest
rounding, and the saved model's integers against what the search simulated."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import onnxq
from onnxq.calib import patches, rounding
from onnxq.calib.rounding import factor, gptq_round, input_correlation, refusal, supports, too_few_rows
from onnxq.config import Granularity, QuantConfig, RangeRule
from onnxq.io import session
from onnxq.quant import primitives as P
from onnxq.quant.weights import WeightLayout, quantize_weight

CONV_LAYOUT = WeightLayout(out_axis=0, in_axis=1)


def _patches(x: np.ndarray, kernel: tuple[int, int], stride: int, pad: int, dilation: int, groups: int):
    """Every output position's input patch per group, by loops: (groups, positions, d)."""
    samples, channels, height, width = x.shape
    kh, kw = kernel
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out_h = (height + 2 * pad - dilation * (kh - 1) - 1) // stride + 1
    out_w = (width + 2 * pad - dilation * (kw - 1) - 1) // stride + 1
    per_group = channels // groups
    result = []
    for g in range(groups):
        rows = []
        for n in range(samples):
            for i in range(out_h):
                for j in range(out_w):
                    top, left = i * stride, j * stride
                    window = padded[
                        n,
                        g * per_group : (g + 1) * per_group,
                        top : top + dilation * (kh - 1) + 1 : dilation,
                        left : left + dilation * (kw - 1) + 1 : dilation,
                    ]
                    rows.append(window.reshape(-1))
        result.append(np.array(rows))
    return np.stack(result)


@settings(max_examples=20, deadline=None)
@given(
    stride=st.integers(1, 2),
    pad=st.integers(0, 2),
    dilation=st.integers(1, 2),
    groups=st.sampled_from([1, 2, 4]),
    kernel=st.sampled_from([(1, 1), (3, 3), (1, 3)]),
    seed=st.integers(0, 2**16),
)
def test_conv_input_correlation_is_the_patches_gram_matrix(stride, pad, dilation, groups, kernel, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, 4, 7, 6)).astype(np.float32)
    weight = rng.normal(size=(8, 4 // groups, *kernel)).astype(np.float32)
    node = helper.make_node(
        "Conv",
        ["x", "w"],
        ["y"],
        strides=[stride] * 2,
        pads=[pad] * 4,
        dilations=[dilation] * 2,
        group=groups,
    )
    patches = _patches(x, kernel, stride, pad, dilation, groups)
    expected = patches.transpose(0, 2, 1) @ patches
    measured = input_correlation(node, weight, [x[:2], x[2:]])  # batches add up
    np.testing.assert_allclose(measured.gram, expected, rtol=1e-5, atol=5e-5)  # float32 products
    assert measured.rows == patches.shape[1]


@pytest.mark.parametrize("op, trans_b", [("MatMul", 0), ("Gemm", 0), ("Gemm", 1)])
def test_matmul_input_correlation_is_the_rows_gram_matrix(op, trans_b):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6)).astype(np.float32)  # a token axis before the features
    weight = rng.normal(size=(3, 6) if trans_b else (6, 3)).astype(np.float32)
    node = helper.make_node(op, ["x", "w"], ["y"], **({"transB": trans_b} if op == "Gemm" else {}))
    assert supports(node, weight)
    rows = x.reshape(-1, 6).astype(np.float64)
    measured = input_correlation(node, weight, [x])
    np.testing.assert_allclose(measured.gram[0], rows.T @ rows, rtol=1e-5, atol=1e-5)  # float32 products
    assert measured.rows == 10


def test_inputs_whose_squares_pass_float32_give_the_float64_gram_matrix():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(8, 6)) * 1e20).astype(np.float32)  # onnx's light VGG-19 reaches 1e21
    weight = rng.normal(size=(6, 3)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    rows = x.astype(np.float64)
    measured = input_correlation(node, weight, [x[:4], x[4:]])
    np.testing.assert_allclose(measured.gram[0], rows.T @ rows, rtol=1e-6)


def test_convtranspose_and_transposed_inputs_keep_nearest_rounding():
    weight = np.zeros((4, 4, 3, 3), np.float32)
    assert not supports(helper.make_node("ConvTranspose", ["x", "w"], ["y"]), weight)
    assert not supports(helper.make_node("Gemm", ["x", "w"], ["y"], transA=1), weight[:, :, 0, 0])


def test_a_correlation_too_large_to_factor_is_refused_with_its_size():
    """A VGG-style classifier's first Gemm reads 25088 inputs: H alone would take 4.7 GiB."""
    wide = np.zeros((8, 25088), np.float32)
    reason = refusal(helper.make_node("Gemm", ["x", "w"], ["y"], transB=1), wide)
    assert reason is not None and "(1×25088×25088)" in reason and "4.7 GiB" in reason
    resnet50_conv = np.zeros((512, 512, 3, 3), np.float32)  # d = 4608: 162 MiB
    assert refusal(helper.make_node("Conv", ["x", "w"], ["y"]), resnet50_conv) is None
    assert "not supported" in refusal(helper.make_node("ConvTranspose", ["x", "w"], ["y"]), wide[None, None])


def test_large_maps_are_subsampled_to_an_estimate_of_the_same_correlation(monkeypatch):
    rng = np.random.default_rng(3)
    smooth = rng.normal(size=(3, 4, 6, 6)).repeat(4, axis=2).repeat(4, axis=3)  # neighbours correlate
    x = (smooth + 0.3 * rng.normal(size=smooth.shape)).astype(np.float32)
    weight = rng.normal(size=(8, 4, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4)
    full = input_correlation(node, weight, [x]).gram / (3 * 24 * 24)
    monkeypatch.setattr(patches, "MAX_POSITIONS", 256)
    measured = input_correlation(node, weight, [x[:2], x[2:]])
    assert measured.rows == 3 * 256
    sampled = measured.gram
    np.testing.assert_array_equal(sampled, input_correlation(node, weight, [x[:2], x[2:]]).gram)  # seeded
    assert not np.allclose(sampled / (3 * 256), full)  # a subset was read, not every patch
    assert np.linalg.norm(sampled / (3 * 256) - full) < 0.15 * np.linalg.norm(full)


def test_layers_gptq_cannot_factor_keep_nearest_rounding_and_the_notes_say_so(
    small_model, calibration_data, monkeypatch
):
    common = dict(weight_bits=3, calibration="minmax", bias_correction=False, equalize=False)
    nearest = onnxq.quantize(small_model, calibration_data, QuantConfig(**common, weight_rounding="nearest"))
    monkeypatch.setattr(rounding, "MAX_CORRELATION_BYTES", 0)
    refused = onnxq.quantize(small_model, calibration_data, QuantConfig(**common, weight_rounding="gptq"))
    before, after = _weights(nearest.model), _weights(refused.model)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert any("GPTQ left" in note and "GiB" in note for note in refused.notes)


def _correlated(rng: np.random.Generator, samples: int, depth: int) -> np.ndarray:
    return (rng.normal(size=(samples, depth)) @ rng.normal(size=(depth, depth))).astype(np.float32)


@settings(max_examples=25, deadline=None)
@given(
    bits=st.integers(2, 8),
    granularity=st.sampled_from(["tensor", "channel", "group:2", "block:8"]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gptq_lowers_the_output_error_and_keeps_the_scales(bits, granularity, symmetric, seed):
    rng = np.random.default_rng(seed)
    x = _correlated(rng, 512, 24)
    weight = rng.normal(size=(6, 24)).astype(np.float32)  # Gemm with transB: (out, in)
    node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    layout = WeightLayout(out_axis=0, in_axis=1)
    target = P.IntRange.signed(bits) if symmetric else P.IntRange.unsigned(bits)
    nearest = quantize_weight(weight, layout, Granularity.parse(granularity), RangeRule("minmax"), target)
    rounded = gptq_round(weight, nearest, factor(input_correlation(node, weight, [x]).gram), node, layout)

    def error(quantized) -> float:
        return float(np.sum(((weight - quantized.dequantize()).astype(np.float64) @ x.T) ** 2))

    assert error(rounded) <= error(nearest) * 1.0001
    assert rounded.integers.dtype == nearest.integers.dtype
    assert target.qmin <= rounded.integers.min() and rounded.integers.max() <= target.qmax
    np.testing.assert_array_equal(rounded.scale, nearest.scale)
    np.testing.assert_array_equal(rounded.zero_point, nearest.zero_point)
    assert rounded.axis == nearest.axis and rounded.block_size == nearest.block_size


def test_a_correlation_from_fewer_rows_than_four_per_input_is_refused():
    """A classifier's Dense after pooling reads one row per sample: 39 rows cannot estimate the
    correlations of 512 inputs."""
    rng = np.random.default_rng(4)
    weight = rng.normal(size=(512, 10)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    pooled = input_correlation(node, weight, [rng.normal(size=(39, 512)).astype(np.float32)])
    reason = too_few_rows(pooled)
    assert reason is not None and "39 input rows for its 512 inputs" in reason
    assert (
        too_few_rows(input_correlation(node, weight, [rng.normal(size=(2048, 512)).astype(np.float32)]))
        is None
    )


def test_gptq_from_too_few_rows_loses_to_nearest_rounding_on_new_inputs():
    """Why the refusal: fitted on fewer rows than inputs, GPTQ wins on those rows and loses on
    rows it never saw; from 4 rows per input on, it wins on both."""
    rng = np.random.default_rng(5)
    depth = 64
    mixing = rng.normal(size=(depth, depth)) / np.sqrt(depth) + np.eye(depth)
    weight = rng.normal(size=(8, depth)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    layout = WeightLayout(out_axis=0, in_axis=1)
    nearest = quantize_weight(
        weight, layout, Granularity.parse("channel"), RangeRule("minmax"), P.IntRange.signed(3)
    )
    unseen = rng.normal(size=(4096, depth)) @ mixing

    def error(quantized, x) -> float:
        return float(np.sum(((weight - quantized.dequantize()).astype(np.float64) @ x.T) ** 2))

    for rows, wins_on_unseen in ((depth // 2, False), (rounding.MIN_ROWS_PER_INPUT * depth, True)):
        seen = (rng.normal(size=(rows, depth)) @ mixing).astype(np.float32)
        correlation = input_correlation(node, weight, [seen])
        assert (too_few_rows(correlation) is None) == wins_on_unseen
        rounded = gptq_round(weight, nearest, factor(correlation.gram), node, layout)
        assert error(rounded, seen) < error(nearest, seen)
        assert (error(rounded, unseen) < error(nearest, unseen)) == wins_on_unseen


def test_uncorrelated_inputs_give_nearest_rounding():
    """With H diagonal no error has anywhere to go: GPTQ is nearest rounding."""
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"])
    nearest = quantize_weight(
        weight, CONV_LAYOUT, Granularity.parse("channel"), RangeRule("minmax"), P.IntRange.signed(4)
    )
    diagonal = np.diag(rng.uniform(0.5, 2.0, 27))[None]
    rounded = gptq_round(weight, nearest, factor(diagonal), node, CONV_LAYOUT)
    np.testing.assert_array_equal(rounded.integers, nearest.integers)


def test_depthwise_groups_are_rounded_each_against_its_own_inputs():
    """Each depthwise filter reads one channel: a channel's statistics must not move another's."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 4, 6, 6)).astype(np.float32)
    x[:, 1] *= 50.0  # one loud channel
    weight = rng.normal(size=(4, 1, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4, group=4)
    correlation = input_correlation(node, weight, [x]).gram
    assert correlation.shape == (4, 9, 9)
    nearest = quantize_weight(
        weight, CONV_LAYOUT, Granularity.parse("channel"), RangeRule("minmax"), P.IntRange.signed(3)
    )
    alone = gptq_round(weight[2:3], _channel(nearest, 2), factor(correlation[2:3]), _conv(1), CONV_LAYOUT)
    together = gptq_round(weight, nearest, factor(correlation), node, CONV_LAYOUT)
    np.testing.assert_array_equal(together.integers[2:3], alone.integers)


def _channel(quantized, index: int):
    from dataclasses import replace

    return replace(
        quantized,
        integers=quantized.integers[index : index + 1],
        scale=quantized.scale[index : index + 1],
        zero_point=quantized.zero_point[index : index + 1],
    )


def _conv(groups: int) -> onnx.NodeProto:
    return helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4, group=groups)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Stored weight integers by name (int32 biases left out)."""
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return {name: v for name, v in stored.items() if name.endswith("_quantized") and v.dtype != np.int32}


@pytest.mark.parametrize("calibration", ["minmax", "mse"])
def test_gptq_model_is_closer_to_float_and_stores_its_own_integers(
    small_model, calibration_data, calibration
):
    # the same float layers for both roundings (equalization would rescale them first)
    common = dict(
        weight_bits=3, activation_bits=8, calibration=calibration, bias_correction=False, equalize=False
    )
    nearest = onnxq.quantize(small_model, calibration_data, QuantConfig(**common, weight_rounding="nearest"))
    rounded = onnxq.quantize(small_model, calibration_data, QuantConfig(**common, weight_rounding="gptq"))
    reference = session(small_model, optimize=False).run(None, {"input": calibration_data})[0]

    def error(model) -> float:
        return float(
            np.mean(
                (session(model, optimize=False).run(None, {"input": calibration_data})[0] - reference) ** 2
            )
        )

    assert error(rounded.model) < error(nearest.model)
    before, after = _weights(nearest.model), _weights(rounded.model)
    assert before.keys() == after.keys()
    assert any(not np.array_equal(before[name], after[name]) for name in before)
    for name, values in after.items():  # symmetric min-max: nearest rounding reaches the width's ends
        assert np.abs(values.astype(np.int64)).max() <= np.abs(before[name].astype(np.int64)).max()


def test_auto_rounding_is_gptq_and_with_refinement_below_4_bits_or_with_8_bit_activations():
    assert QuantConfig().rounds_by_gptq  # 8 bits: in the observation pass (test_streamed_gptq)
    assert not QuantConfig(refine=True).rounds_by_gptq
    assert QuantConfig(weight_bits=4).rounds_by_gptq
    assert QuantConfig(weight_bits=4, weight_rounding="nearest").rounds_by_gptq is False
    assert QuantConfig(weight_rounding="gptq").rounds_by_gptq
    assert not QuantConfig(weight_bits=4, activation_bits=4, refine=True).rounds_by_gptq  # from nearest
    assert QuantConfig(weight_bits=4, refine=True).rounds_by_gptq  # W4A8: from GPTQ's integers
    assert QuantConfig(weight_bits=2, refine=True).rounds_by_gptq  # AdaRound from GPTQ's integers


def test_weight_rounding_is_checked():
    with pytest.raises(onnxq.OnnxqError, match="weight rounding"):
        QuantConfig(weight_rounding="stochastic")
