"""Every width 2-8, granularity and range rule: the QDQ graph onnxq writes, run by onnxruntime,
matches the numpy reference exactly, and activations take at most 2^bits values."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from onnxq.config import Granularity, QuantConfig, RangeRule
from onnxq.io import session, to_ir, to_proto
from onnxq.passes.insert_qdq import activation_params, activation_quantizer, insert_qdq, required_opset
from onnxq.quant import primitives as P
from onnxq.quant.plan import plan_quantization
from onnxq.quant.weights import WeightLayout, group_ranges, quantize_weight

GRANULARITIES = ["tensor", "channel", "group:1", "group:3", "block:1", "block:2", "block:4"]
RULES = ["minmax", "percentile:99", "mse", "mae", "scaleclip", "scaleclip:1.5"]


def conv_model(weight: np.ndarray, opset: int = 17) -> onnx.ModelProto:
    """x → Conv(weight) → y, with the input shape the weight needs."""
    channels = weight.shape[1]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, channels, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, weight.shape[0], 5, 5])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def quantize_conv(weight, config: QuantConfig, low: float = -1.0, high: float = 3.0):
    """Run onnxq's plan and Q/DQ writer on the one-Conv model; expose the dequantized tensors."""
    graph_model = to_ir(conv_model(weight))
    plan = plan_quantization(graph_model.graph, config)
    opset = max(required_opset(plan), 17)
    graph_model = to_ir(conv_model(weight, opset))
    plan = plan_quantization(graph_model.graph, config)
    params = activation_params(plan, {"x": (low, high)}, symmetric=config.activation_symmetric)
    insert_qdq(graph_model.graph, plan, params, symmetric_weights=config.symmetric_weights)
    graph = graph_model.graph
    for name in ("w_dequantized", "x_dequantized"):
        value = next(v for n in graph for v in n.outputs if v.name == name)
        graph.outputs.append(value)
    model = to_proto(graph_model)
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import), True)
    onnx.checker.check_model(model)
    return model, plan


weights = arrays(
    np.float32,
    st.tuples(st.integers(1, 6), st.integers(1, 7), st.sampled_from([1, 3]), st.sampled_from([1, 3])),
    elements=st.floats(-4, 4, width=32, allow_nan=False),
)


@settings(max_examples=60, deadline=None)
@given(
    weight=weights,
    bits=st.integers(2, 8),
    granularity=st.sampled_from(GRANULARITIES),
    rule=st.sampled_from(RULES),
    zero_point=st.sampled_from(["none", "all", "narrow"]),
)
def test_weights_in_onnxruntime_match_the_numpy_reference(weight, bits, granularity, rule, zero_point):
    config = QuantConfig(
        weight_bits=bits,
        granularity=Granularity.parse(granularity),
        weight_rule=RangeRule.parse(rule),
        weight_zero_point=zero_point,
        first_last_8bit=False,
    )
    model, _ = quantize_conv(weight, config)
    signed = zero_point == "none" or (zero_point == "narrow" and bits == 8)
    target = P.IntRange.signed(bits) if signed else P.IntRange.unsigned(bits)
    reference = quantize_weight(weight, WeightLayout(0, 1), config.granularity, config.weight_rule, target)
    assert reference.integers.min() >= target.qmin and reference.integers.max() <= target.qmax
    x = np.zeros((2, weight.shape[1], 5, 5), np.float32)
    _, dequantized, _ = session(model, optimize=False).run(None, {"x": x})
    np.testing.assert_array_equal(dequantized, reference.dequantize())
    stored = _stored_integers(model)
    np.testing.assert_array_equal(stored, reference.integers.astype(np.int64))


@settings(max_examples=40, deadline=None)
@given(
    weight=weights,
    bits=st.integers(2, 8),
    granularity=st.sampled_from(GRANULARITIES),
    rule=st.sampled_from(RULES),
    signed=st.booleans(),
    ratio=st.floats(0.05, 1.0),
)
def test_ranges_kept_for_a_weight_give_the_same_integers_at_any_ratio(
    weight, bits, granularity, rule, signed, ratio
):
    """The search quantizes one weight at many ratios from its group ranges, computed once."""
    layout, granularity, rule = WeightLayout(0, 1), Granularity.parse(granularity), RangeRule.parse(rule)
    target = P.IntRange.signed(bits) if signed else P.IntRange.unsigned(bits)
    kept = group_ranges(weight, layout, granularity, rule, target)
    ratios = np.full(len(kept.low), ratio)
    fresh = quantize_weight(weight, layout, granularity, rule, target, ratios)
    cached = quantize_weight(weight, layout, granularity, rule, target, ratios, kept)
    np.testing.assert_array_equal(cached.integers, fresh.integers)
    np.testing.assert_array_equal(cached.scale, fresh.scale)
    np.testing.assert_array_equal(cached.zero_point, fresh.zero_point)


def _stored_integers(model: onnx.ModelProto) -> np.ndarray:
    initializer = next(t for t in model.graph.initializer if t.name == "w_quantized")
    return numpy_helper.to_array(initializer).astype(np.int64)


@settings(max_examples=40, deadline=None)
@given(
    x=arrays(np.float32, (2, 3, 5, 5), elements=st.floats(-6, 6, width=32, allow_nan=False)),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    low=st.floats(-3, 0),
    high=st.floats(0.5, 4),
)
def test_activations_take_at_most_2_to_the_bits_values(x, bits, symmetric, low, high):
    config = QuantConfig(activation_bits=bits, activation_symmetric=symmetric, first_last_8bit=False)
    weight = np.ones((2, 3, 3, 3), np.float32)
    model, _ = quantize_conv(weight, config, low, high)
    _, _, dequantized = session(model, optimize=False).run(None, {"x": x})
    scale, zero_point, target = activation_quantizer(low, high, bits, symmetric)
    q = np.clip(np.rint(x / scale) + int(zero_point), target.qmin, target.qmax)
    np.testing.assert_array_equal(dequantized, ((q - int(zero_point)) * scale).astype(np.float32))
    assert len(np.unique(dequantized)) <= 2**bits


@pytest.mark.parametrize(
    ("bits", "granularity", "zero_point", "opset", "data_type"),
    [
        (4, "channel", "none", 21, TensorProto.INT4),
        (4, "channel", "auto", 21, TensorProto.UINT4),  # with 8-bit activations: a zero point
        (3, "channel", "auto", 21, TensorProto.UINT4),
        (2, "channel", "none", 21, TensorProto.INT4),  # a float output: onnxruntime may fuse the layer
        (2, "channel", "auto", 21, TensorProto.UINT4),
        (8, "block:2", "auto", 21, TensorProto.INT8),
        (6, "group:2", "none", 17, TensorProto.INT8),
        (6, "group:2", "auto", 17, TensorProto.UINT8),
    ],
)
def test_storage_type_and_opset_follow_the_width(bits, granularity, zero_point, opset, data_type):
    weight = np.random.default_rng(0).standard_normal((4, 4, 3, 3)).astype(np.float32)
    config = QuantConfig(
        weight_bits=bits,
        granularity=Granularity.parse(granularity),
        weight_zero_point=zero_point,
        first_last_8bit=False,
    )
    model, _ = quantize_conv(weight, config)
    stored = next(t for t in model.graph.initializer if t.name == "w_quantized")
    assert stored.data_type == data_type
    assert next(o.version for o in model.opset_import if o.domain == "") == opset


@pytest.mark.parametrize("zero_point", ["none", "auto"])
@pytest.mark.parametrize(
    ("a_bits", "first_last"),
    [(8, False), (8, True), (4, True), (4, False)],
    ids=["W2A8", "W2A8-first-last", "W2A4-first-last", "W2A4"],
)
def test_2bit_weights_run_on_onnxruntimes_default_level(
    small_model, calibration_data, a_bits, first_last, zero_point
):
    """Integer kernels reject INT2/UINT2: layers they may take keep 2-bit values in a 4-bit type."""
    import onnxq

    config = QuantConfig(
        weight_bits=2,
        activation_bits=a_bits,
        first_last_8bit=not first_last,
        calibration=onnxq.CalibrationMethod.MINMAX,
        weight_zero_point=zero_point,  # auto: 2-bit weights get one
    )
    symmetric = zero_point == "none"
    result = onnxq.quantize(small_model, calibration_data[:16], config)
    feed = {"input": calibration_data[:16]}
    deployed = session(result.model).run(None, feed)[0]
    reference = session(result.model, optimize=False).run(None, feed)[0]
    np.testing.assert_allclose(deployed, reference, atol=1e-4 * np.abs(reference).max())
    two_bit, four_bit = (
        (TensorProto.INT2, TensorProto.INT4) if symmetric else (TensorProto.UINT2, TensorProto.UINT4)
    )
    low, high = (-1, 1) if symmetric else (0, 3)
    stored = {
        t.name: (t.data_type, numpy_helper.to_array(t))
        for t in result.model.graph.initializer
        if t.data_type in (two_bit, four_bit)
    }
    assert stored and all(v.min() >= low and v.max() <= high for _, v in stored.values())
    types = {t for t, _ in stored.values()}
    assert (two_bit in types) == (a_bits == 4)  # outputs below 8 bits: nothing fuses


def test_packed_4bit_weights_take_an_eighth_of_their_float_bytes():
    weight = np.random.default_rng(0).standard_normal((64, 64, 3, 3)).astype(np.float32)
    model, _ = quantize_conv(weight, QuantConfig(weight_bits=4, first_last_8bit=False))
    stored = next(t for t in model.graph.initializer if t.name == "w_quantized")
    assert len(stored.raw_data) == weight.size // 2 == weight.nbytes // 8


def test_first_and_last_layers_stay_at_8_bits_unless_asked(small_model):
    graph = to_ir(small_model).graph
    plan = plan_quantization(graph, QuantConfig(weight_bits=4, activation_bits=4))
    bits = sorted(spec.bits for spec in plan.weights.values())
    assert bits == [4, 4, 8, 8]
    lowered = plan_quantization(to_ir(small_model).graph, QuantConfig(weight_bits=4, first_last_8bit=False))
    assert {spec.bits for spec in lowered.weights.values()} == {4}
    assert plan.activations["input"].bits == 8


def test_a_residual_branch_before_its_sum_keeps_addend_bits(small_model):
    """The depthwise output only Add reads keeps 8 bits at A4; the sum and the inputs of weighted
    layers take A bits; addend_bits=4 gives every activation 4 bits."""
    graph = to_ir(small_model).graph
    consumers = {v.name: {n.op_type for n in v.consumers()} for n in graph for v in n.outputs}
    plan = plan_quantization(graph, QuantConfig(weight_bits=4, activation_bits=4))
    addends = [name for name, ops in consumers.items() if ops == {"Add"} and name in plan.activations]
    assert plan.widened_addends == addends and len(addends) == 1
    assert plan.activations[addends[0]].bits == 8
    head = {"/GlobalAveragePool_output_0", "/Flatten_output_0"}  # the 8-bit last layer's input
    others = {spec.bits for name, spec in plan.activations.items() if name not in {*addends, *head, "input"}}
    assert others == {4}
    uniform = plan_quantization(to_ir(small_model).graph, QuantConfig(activation_bits=4, addend_bits=4))
    assert not uniform.widened_addends
    assert {spec.bits for name, spec in uniform.activations.items() if name in addends} == {4}


def test_override_file_sets_bits_per_layer(tmp_path, small_model):
    from onnxq.config import load_overrides

    path = tmp_path / "mixed.toml"
    path.write_text('[[layer]]\nop = "Gemm"\nw_bits = 2\n\n[[layer]]\nmatch = "*depthwise*"\nw_bits = 6\n')
    config = QuantConfig(weight_bits=4, overrides=load_overrides(path))
    plan = plan_quantization(to_ir(small_model).graph, config)
    by_op = {name: settings.weight_bits for name, settings in plan.layers.items()}
    assert [bits for name, bits in by_op.items() if "head" in name or "Gemm" in name] == [2]
    assert [bits for name, bits in by_op.items() if "depthwise" in name] == [6]


@pytest.mark.parametrize(
    ("text", "message"),
    [("[[layer]]\nw_bits = 9\n", "from 2 to 8"), ("[[layer]]\ncolour = 1\n", "unknown keys"), ("x", "TOML")],
)
def test_bad_override_files_are_refused(tmp_path, text, message):
    from onnxq.config import load_overrides
    from onnxq.errors import OnnxqError

    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(OnnxqError, match=message):
        QuantConfig(overrides=load_overrides(path))


def token_mixer_model() -> tuple[onnx.ModelProto, np.ndarray]:
    """Tokens [batch, 6, 32] through two bias-free Linear layers exported from torch: MatMuls
    with 3-D inputs and float outputs, as a transformer's projections are."""
    torch = pytest.importorskip("torch")
    from tests.conftest import export

    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(32, 64, bias=False), torch.nn.ReLU(), torch.nn.Linear(64, 16, bias=False)
    )
    data = np.random.default_rng(0).standard_normal((16, 6, 32)).astype(np.float32)
    return export(module, torch.zeros(1, 6, 32)), data


def wide_conv_model() -> tuple[onnx.ModelProto, np.ndarray]:
    """Bias-free Convs over 32 input channels (two blocks of 16) with quantized outputs, the
    pattern onnxruntime fuses into QLinearConv (with a float bias it leaves them alone)."""
    torch = pytest.importorskip("torch")
    from tests.conftest import export

    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(32, 32, 3, padding=1, bias=False),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1, bias=False),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 8, 1),
    )
    data = np.random.default_rng(0).standard_normal((16, 32, 8, 8)).astype(np.float32)
    return export(module, torch.zeros(1, 32, 8, 8)), data


@pytest.mark.parametrize(
    ("make", "w_bits", "container"),
    [
        (token_mixer_model, 8, TensorProto.INT16),
        (token_mixer_model, 4, TensorProto.UINT4),
        (wide_conv_model, 8, TensorProto.INT16),
        (wide_conv_model, 4, TensorProto.UINT4),
    ],
    ids=["MatMul-W8-INT16", "MatMul-W4-UINT4", "Conv-W8-INT16", "Conv-W4-UINT4"],
)
def test_blockwise_weights_run_on_onnxruntimes_default_level(make, w_bits, container):
    """onnxruntime fuses an 8-bit block-wise weight into MatMulIntegerToFloat (a MatMul with a
    quantized input and a float output) or QLinearConv (a Conv with a quantized output), which
    fail on block-wise scales: such weights are stored in INT16 and run as written; 4-bit ones
    stay in UINT4 (with a zero point, the default below 8 bits), which no integer kernel takes."""
    import onnxq

    model, data = make()
    config = QuantConfig(
        weight_bits=w_bits,
        granularity=Granularity.parse("block:16"),
        first_last_8bit=False,
        calibration=onnxq.CalibrationMethod.MINMAX,
        speed_check=False,
    )
    result = onnxq.quantize(model, data, config)
    feed = {"input": data}
    deployed = session(result.model).run(None, feed)[0]
    reference = session(result.model, optimize=False).run(None, feed)[0]
    np.testing.assert_allclose(deployed, reference, atol=1e-4 * np.abs(reference).max())
    blocked = [n for n in result.model.graph.node if n.op_type == "DequantizeLinear" and _block_size(n)]
    stored = {t.name: t.data_type for t in result.model.graph.initializer}
    assert len(blocked) >= 2 and all(stored[n.input[0]] == container for n in blocked)
    half = 2 ** (w_bits - 1)
    low, high = (0, 2**w_bits) if container == TensorProto.UINT4 else (-half, half)
    integers = [numpy_helper.to_array(t) for t in result.model.graph.initializer if t.data_type == container]
    assert integers and all(v.min() >= low and v.max() < high for v in integers)


def _block_size(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "block_size"), 0)


@pytest.mark.parametrize(
    ("w_bits", "a_bits", "asked", "expected"),
    [
        (8, 8, "auto", None),  # every weight 8-bit: weight_target keeps them symmetric
        (4, 8, "auto", None),  # 8-bit activations: a zero point below 8 bits
        (2, 4, "auto", None),  # weights below 4 bits: a zero point
        (3, 3, "auto", None),
        (4, 4, "auto", True),  # 4-bit and wider weights under narrower activations: symmetric
        (6, 6, "auto", True),
        (4, 4, "narrow", None),
        (4, 4, "all", False),
        (2, 4, "none", True),
    ],
)
def test_weight_zero_point_default_follows_the_widths(w_bits, a_bits, asked, expected):
    config = QuantConfig(weight_bits=w_bits, activation_bits=a_bits, weight_zero_point=asked)
    assert config.symmetric_weights is expected


def test_an_unknown_weight_zero_point_is_refused():
    from onnxq.errors import OnnxqError

    with pytest.raises(OnnxqError, match="weight zero point"):
        QuantConfig(weight_zero_point="some")
