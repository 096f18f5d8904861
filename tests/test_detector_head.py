"""A detector head as YOLOv8 writes it, for the plan's precision rules and the fallback's ranking:
SiLU written as x·σ(x), box and class logits concatenated, split, the boxes through a Softmax and
a small Conv (DFL), the classes through a Sigmoid."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.io import session, to_ir
from onnxq.quant.plan import plan_quantization
from onnxq.quant.range_floors import HARDSWISH_FLOOR, SILU_FLOOR
from tests.conftest import deployed_graph

CHANNELS = 8


def _conv(name: str, source: str, target: str, out: int, rng, scale: float = 0.5) -> tuple:
    weight = (rng.standard_normal((out, CHANNELS, 1, 1)) * scale).astype(np.float32)
    bias = rng.standard_normal(out).astype(np.float32)
    node = helper.make_node("Conv", [source, f"{name}.w", f"{name}.b"], [target], name=name)
    return node, [numpy_helper.from_array(weight, f"{name}.w"), numpy_helper.from_array(bias, f"{name}.b")]


def head_model(*, extra_output: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    stem = helper.make_node(
        "Conv", ["x", "stem.w", "stem.b"], ["a"], name="stem", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
    )
    inits = [
        numpy_helper.from_array((rng.standard_normal((CHANNELS, 3, 3, 3)) * 2).astype(np.float32), "stem.w"),
        numpy_helper.from_array(rng.standard_normal(CHANNELS).astype(np.float32), "stem.b"),
    ]
    nodes = [
        stem,
        helper.make_node("Sigmoid", ["a"], ["a_sig"], name="silu_sigmoid"),
        helper.make_node("Mul", ["a", "a_sig"], ["m"], name="silu_mul"),
    ]
    for name, target, out in (("box", "b", 4), ("cls", "c", 3)):
        node, weights = _conv(name, "m", target, out, rng)
        nodes.append(node)
        inits += weights
    nodes += [
        helper.make_node("Concat", ["b", "c"], ["cat"], name="cat", axis=1),
        helper.make_node("Split", ["cat", "split"], ["bb", "cc"], name="split", axis=1),
        helper.make_node("Softmax", ["bb"], ["sm"], name="softmax", axis=1),
        helper.make_node("Conv", ["sm", "dfl.w"], ["d"], name="dfl"),
        helper.make_node("Sigmoid", ["cc"], ["scores"], name="score_sigmoid"),
        helper.make_node("Concat", ["d", "scores"], ["out"], name="out_cat", axis=1),
    ]
    inits += [
        numpy_helper.from_array(np.array([4, 3], np.int64), "split"),
        numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1), "dfl.w"),
    ]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4, 6, 6])]
    if extra_output:  # a feature map both a layer and a float path to an output read
        nodes.append(helper.make_node("Relu", ["m"], ["feature"], name="feature_relu"))
        outputs.append(helper.make_tensor_value_info("feature", TensorProto.FLOAT, ["n", CHANNELS, 6, 6]))
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])], outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model)


def _plan(model: onnx.ModelProto):
    return plan_quantization(to_ir(model).graph, onnxq.QuantConfig())


def test_logits_whose_rounding_reaches_the_scores_through_float_ops_keep_no_pair():
    plan = _plan(head_model())
    assert {"b", "c", "cat", "bb", "cc"}.isdisjoint(plan.activations)
    assert {"x", "a", "m"} <= set(plan.activations)
    assert "cat" in plan.float_nodes


def test_convs_whose_outputs_keep_no_pair_stay_float_and_keep_the_pairs_a_quantized_node_writes():
    """onnxruntime would run box, cls and dfl as float Convs on dequantized weights: they stay
    float. Their input m is written by the quantized SiLU Mul (QLinearMul): it keeps its pair;
    dfl's input, a float Softmax's output, loses it."""
    plan = _plan(head_model())
    for name in ("box", "cls", "dfl"):
        assert name not in plan.layers and "dequantized weights" in plan.float_nodes[name]
    assert {"box.w", "cls.w", "dfl.w"}.isdisjoint(plan.weights)
    assert not plan.biases.keys() & {"box.b", "cls.b"}
    assert "m" in plan.activations and "sm" not in plan.activations
    assert "stem" in plan.layers  # a model keeps its integer layers


def test_no_conv_runs_in_float_on_dequantized_weights_in_onnxruntime(tmp_path):
    data = np.random.default_rng(2).standard_normal((16, 3, 6, 6)).astype(np.float32)
    config = onnxq.QuantConfig(fidelity_fallback=False, speed_check=False)
    result = onnxq.quantize(head_model(), data, config)
    graph = deployed_graph(result.model, tmp_path)
    producers = {o: n.op_type for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type in ("Conv", "FusedConv")]
    assert convs and all(producers.get(n.input[1]) != "DequantizeLinear" for n in convs)
    assert any(n.op_type == "QLinearConv" for n in graph.node)


def test_a_model_whose_only_layer_has_no_output_pair_keeps_its_weights():
    """A single conv: its weights are all the quantization does, so they stay quantized."""
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    graph = helper.make_graph(
        [conv],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert "conv" in _plan(onnx.shape_inference.infer_shapes(model)).layers


def test_a_tensor_a_layer_reads_keeps_its_pair_though_it_also_reaches_an_output():
    plan = _plan(head_model(extra_output=True))
    assert "m" in plan.activations and {"box", "cls"} <= set(plan.layers)


def test_only_a_silu_or_hardswish_reader_lets_the_range_stop_at_its_floor():
    plan = _plan(head_model())
    assert plan.activations["a"].floor == SILU_FLOOR  # read by Sigmoid and Mul(a, σ(a))
    assert plan.activations["m"].floor is None
    assert plan.activations["a"].bounded(-50.0, 10.0) == (SILU_FLOOR, 10.0)
    assert plan.activations["a"].bounded(-2.0, 10.0) == (-2.0, 10.0)


def test_a_hardswish_reader_floors_at_minus_three():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="conv"),
        helper.make_node("HardSwish", ["a"], ["h"], name="hswish"),
        helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2"),
    ]
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        nodes,
        "hswish",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [
            numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "w2"),
        ],
    )
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    assert _plan(model).activations["a"].floor == HARDSWISH_FLOOR


@settings(max_examples=50, deadline=None)
@given(st.floats(-1e4, SILU_FLOOR))
def test_silu_below_its_floor_is_within_three_thousandths_of_silu_at_the_floor(x):
    def silu(v: float) -> float:
        return v * 0.5 * (1.0 + np.tanh(v / 2))  # x·σ(x) without overflow

    assert abs(silu(x) - silu(SILU_FLOOR)) < 3e-3
    assert HARDSWISH_FLOOR * min(max(HARDSWISH_FLOOR + 3, 0), 6) / 6 == 0.0


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_the_quantized_pre_silu_tensor_stops_at_the_floor(method):
    from onnxq.calib.runner import with_outputs

    model = head_model()
    data = np.random.default_rng(1).standard_normal((24, 3, 6, 6)).astype(np.float32) * 3
    stem = session(with_outputs(model, ["a"]), optimize=False).run(["a"], {"x": data})[0]
    assert stem.min() < 4 * SILU_FLOOR  # the floor matters here
    config = onnxq.QuantConfig(
        calibration=onnxq.CalibrationMethod(method), fidelity_fallback=False, speed_check=False
    )
    result = onnxq.quantize(model, data, config)
    constants = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    scale, zero = float(constants["a_scale"]), int(constants["a_zero_point"])
    assert SILU_FLOOR - scale <= -zero * scale < 0  # within a step of the floor (zero point rounding)


def test_the_fallback_ranking_reproduces_the_qdq_model_when_every_quantizer_is_on():
    """The tunable graph fed every quantizer's parameters from the QDQ model computes what
    onnxruntime computes on the QDQ model (no fusions): the ranking measures the real thing."""
    from onnxq.calib.simulate import tunable_model
    from onnxq.sensitivity import quantized_feeds

    model = head_model()
    data = np.random.default_rng(1).standard_normal((24, 3, 6, 6)).astype(np.float32)
    config = onnxq.QuantConfig(fidelity_fallback=False, speed_check=False)
    result = onnxq.quantize(model, data, config)
    plan = _plan(model)
    tunable, feed, _ = tunable_model(model, plan)
    for item in quantized_feeds(result.model, plan).values():
        feed.update(item)
    got = session(tunable, optimize=False).run(["out"], {"x": data, **feed})[0]
    want = session(result.model, optimize=False).run(["out"], {"x": data})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("coarse", ["stem", "cls"])
def test_the_fallback_ranks_first_the_layer_whose_quantizers_cost_the_output_most(coarse):
    """One layer with 2-bit weights among 8-bit ones: its quantizers cost the output most."""
    from onnxq.config import LayerOverride
    from onnxq.sensitivity import layer_costs

    model = head_model()
    data = np.random.default_rng(1).standard_normal((24, 3, 6, 6)).astype(np.float32) * 3
    config = onnxq.QuantConfig(
        fidelity_fallback=False, speed_check=False, overrides=(LayerOverride(pattern=coarse, weight_bits=2),)
    )
    result = onnxq.quantize(model, data, config)
    plan = plan_quantization(to_ir(model).graph, config)
    layers = [("stem", "x", "a"), ("box", "m", "b"), ("cls", "m", "c"), ("dfl", "sm", "d")]
    ranked = layer_costs(model, result.model, plan, layers, [{"x": data[i : i + 1]} for i in range(4)], "out")
    assert ranked[0][0] == coarse and ranked[0][1] > 4 * ranked[1][1]
    assert all(cost >= 0 for _, cost in ranked)


def test_a_head_left_float_for_speed_quantizes_nothing_not_its_last_convs(monkeypatch):
    """Every plan clearly slower than float: nothing is quantized. With every other layer float,
    the head's box, cls and dfl convs would be the model's only layers and keep their weights,
    reading tensors calibration never observed (dfl reads the Softmax output): they stay float."""
    from onnxq import speed

    monkeypatch.setattr(speed, "compare", lambda models, feed: [1.0] + [2.0] * (len(models) - 1))
    data = np.random.default_rng(2).standard_normal((16, 3, 6, 6)).astype(np.float32)
    result = onnxq.quantize(head_model(), data, onnxq.QuantConfig(fidelity_fallback=False))
    assert result.quantized_nodes == 0
    assert not {n.op_type for n in result.model.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    feed = {"x": data[:4]}
    want = session(head_model()).run(None, feed)[0]
    np.testing.assert_allclose(session(result.model).run(None, feed)[0], want, rtol=1e-4, atol=1e-5)
