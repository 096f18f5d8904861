"""Cross-layer equalization moves channel ranges into per-channel weights and computes the same."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.calib.observers import ChannelMaxObserver, ChannelRangeObserver
from onnxq.io import session, to_ir, to_proto
from onnxq.passes import equalize
from onnxq.passes.channel_moves import apply_scales, find_pairs
from onnxq.passes.equalize import FLOAT_SIDE_MAX_SCALE, MAX_SCALE, channel_scales, equalize_channels
from onnxq.passes.float_side import find_outlets, insert_inlets, remove_idle_inlets
from onnxq.passes.fold_bn import ChannelStatistics
from tests.conftest import export


def uneven_mobile_block():
    """Expand → Relu → depthwise → ReLU6 → project → (nothing) → conv, a Linear → Relu → Linear
    head, channels whose ranges span two decades, and one output read twice (left alone)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.expand = nn.Conv2d(3, 8, 1)
            self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.project = nn.Conv2d(8, 6, 1)
            self.last = nn.Conv2d(6, 6, 3, padding=1)
            self.side = nn.Conv2d(6, 6, 1)
            self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 5)
            with torch.no_grad():
                for layer in (self.expand, self.depthwise, self.project, self.fc1):
                    spread = 10 ** torch.linspace(-1.0, 1.0, layer.weight.shape[0])
                    layer.weight.mul_(spread.reshape(-1, *[1] * (layer.weight.dim() - 1)))
                    layer.bias.mul_(spread)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.expand(x))
            y = torch.clamp(self.depthwise(y), 0.0, 6.0)
            y = self.last(self.project(y))
            y = self.side(y) * torch.sigmoid(y)  # y read twice: its channels cannot move
            return self.fc2(torch.relu(self.fc1(y.mean((2, 3)))))

    torch.manual_seed(0)
    return export(Block(), torch.zeros(1, 3, 8, 8))


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnxq.fuse(uneven_mobile_block()).model


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)


def outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return session(model, optimize=False).run(None, {"input": x})[0]


def test_pairs_are_the_chains_with_one_reader(model):
    pairs = find_pairs(to_ir(model).graph)
    kinds = sorted((p.depthwise, p.clip or 0.0, p.dense_rows, p.activation is not None) for p in pairs)
    # expand→Relu→depthwise, depthwise→Clip(0, 6)→project, project→last, fc1→Relu→fc2;
    # last's output is read by side and the Sigmoid: no pair
    assert kinds == [
        (False, 0.0, False, False),
        (False, 0.0, True, True),
        (False, 6.0, False, True),
        (True, 0.0, False, True),
    ]


def test_equalized_model_computes_the_same_and_channels_line_up(model, data):
    equalized = equalize_channels(model, [{"input": data}])
    assert equalized.pairs == 1 and equalized.widest_spread > 10  # dense consumers left alone
    np.testing.assert_allclose(outputs(equalized.model, data), outputs(model, data), rtol=1e-4, atol=1e-5)
    depthwise_input = next(p for p in find_pairs(to_ir(model).graph) if p.depthwise).tensor
    before, after = ChannelMaxObserver(1), ChannelMaxObserver(1)
    before.update(_tensor(model, depthwise_input, data))
    after.update(_tensor(equalized.model, depthwise_input, data))
    # a depthwise consumer: every channel as wide as the widest, unless that takes more than MAX_SCALE
    want = np.minimum(before.maxima.max(), MAX_SCALE * before.maxima)
    np.testing.assert_allclose(after.maxima, want, rtol=1e-4)
    assert np.sum(after.maxima < want.max() * 0.999) < np.sum(before.maxima < want.max() * 0.999)


def test_given_clip_levels_depthwise_inputs_line_up_by_their_clipping_points(model, data):
    """With a quantizer's steps given, a depthwise input's channels line up where each is best
    clipped at that width, not by maxima; dense pairs and the computation stay as they were."""
    equalized = equalize_channels(model, [{"input": data}], clip_levels=lambda node: 15)
    assert equalized.pairs == 1
    np.testing.assert_allclose(outputs(equalized.model, data), outputs(model, data), rtol=1e-4, atol=1e-5)
    depthwise_input = next(p for p in find_pairs(to_ir(model).graph) if p.depthwise).tensor
    before, after = ChannelRangeObserver(1, 15), ChannelRangeObserver(1, 15)
    before.update(_tensor(model, depthwise_input, data))
    after.update(_tensor(equalized.model, depthwise_input, data))
    spans = before.spans()
    want = np.minimum(spans.max(), MAX_SCALE * spans)
    np.testing.assert_allclose(after.spans(), want, rtol=1e-2)  # to a bin of each histogram
    # by maxima the same channels would not line up: the clipping points are no fixed share of them
    assert np.ptp(spans / before.maxima) > 0.05


def test_batchnorm_statistics_follow_the_rescaled_channels(model, data):
    pair = next(p for p in find_pairs(to_ir(model).graph) if p.depthwise)
    produced = next(n.output[0] for n in model.graph.node if n.name == pair.producer)
    before = ChannelStatistics(np.arange(1.0, 9.0), np.full(8, 4.0))
    observer = ChannelMaxObserver(1)
    observer.update(_tensor(model, pair.tensor, data))
    scales = channel_scales(pair, observer.maxima)
    after = equalize_channels(model, [{"input": data}], {produced: before}).statistics[produced]
    np.testing.assert_allclose(after.mean, before.mean * scales)
    np.testing.assert_allclose(after.var, before.var * scales**2)


def test_layers_without_per_channel_scales_are_left_alone(model, data):
    equalized = equalize_channels(model, [{"input": data}], per_channel=lambda node: False)
    assert equalized.pairs == 0 and equalized.model is model


@settings(max_examples=25, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 8]),
    kernel=st.sampled_from([1, 3]),
    activation=st.sampled_from(["Relu", "LeakyRelu", None]),
    seed=st.integers(0, 1000),
)
def test_any_positive_scales_leave_a_homogeneous_pair_exact(groups, kernel, activation, seed):
    rng = np.random.default_rng(seed)
    channels = 8
    model = _pair_model(rng, channels, groups, kernel, activation)
    graph_model = to_ir(model)
    (pair,) = find_pairs(graph_model.graph)
    apply_scales(graph_model.graph, pair, np.exp(rng.uniform(-3, 3, channels)))
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    want = outputs(model, x)
    np.testing.assert_allclose(
        outputs(to_proto(graph_model), x), want, rtol=1e-4, atol=1e-4 * np.abs(want).max()
    )


def test_narrow_channels_of_the_depthwise_input_get_more_levels(model, data):
    """What equalization is for, measured with a numpy 6-bit min-max quantizer (so the same on
    every CPU): the depthwise input's per-channel SQNR under one per-tensor scale. End to end on
    this block its effect is a few per cent of the output error, below what float kernels on
    different CPUs move (AVX2: 2.6e-4 → 2.3e-4; AVX-512: 3.29e-4 → 3.39e-4)."""
    tensor = next(p for p in find_pairs(to_ir(model).graph) if p.depthwise).tensor
    equalized = equalize_channels(model, [{"input": data}])

    def channel_sqnr(m: onnx.ModelProto) -> np.ndarray:
        x = _tensor(m, tensor, data).astype(np.float64)
        low, high = min(x.min(), 0.0), x.max()
        step = (high - low) / 63
        q = (np.clip(np.round((x - low) / step), 0, 63)) * step + low
        return 10 * np.log10(np.sum(x**2, axis=(0, 2, 3)) / np.sum((x - q) ** 2, axis=(0, 2, 3)))

    before, after = channel_sqnr(model), channel_sqnr(equalized.model)
    assert after.min() > before.min() + 10


def test_pipeline_equalizes_when_asked(tmp_path):
    model_path = tmp_path / "block.onnx"
    onnx.save(uneven_mobile_block(), model_path)
    calib = np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)

    def notes(equalize: bool) -> list[str]:
        config = onnxq.QuantConfig(activation_bits=6, equalize=equalize, speed_check=False)
        return onnxq.quantize(str(model_path), calib, config).notes

    assert any("equalized the channels of 1 tensor between" in note for note in notes(True))
    assert not any("equalized" in note for note in notes(False))


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
def test_the_pipeline_clips_channels_at_4_bit_activations_and_below(monkeypatch, bits):
    """The steps handed to equalization are the depthwise consumer's activation width's at 4
    bits and below, none (maxima) from 5 bits."""
    from onnxq import pipeline

    seen = {}

    def recording(*args, clip_levels, **kwargs):
        graph = to_ir(args[0]).graph
        seen.update({node.name: clip_levels(node) for node in graph if node.op_type == "Conv"})
        return equalize_channels(*args, clip_levels=clip_levels, **kwargs)

    monkeypatch.setattr(pipeline, "equalize_channels", recording)
    calib = np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)
    settings = dict(equalize=True, speed_check=False, fidelity_fallback=False)
    config = onnxq.QuantConfig(activation_bits=bits, **settings)
    model = uneven_mobile_block()
    notes = onnxq.quantize(model, calib, config).notes
    depthwise = next(p.consumer for p in find_pairs(to_ir(onnxq.fuse(model).model).graph) if p.depthwise)
    assert seen[depthwise] == (2**bits - 1 if bits <= 4 else None)
    said = [note for note in notes if note.startswith("equalized the channels of 1 tensor between")]
    assert len(said) == 1 and ("best clipped at" in said[0]) == (bits <= 4)


def test_equalization_runs_below_8_bit_activations_with_per_channel_weights():
    assert not onnxq.QuantConfig().equalizes
    assert onnxq.QuantConfig(activation_bits=6).equalizes
    assert onnxq.QuantConfig(weight_bits=4, activation_bits=4).equalizes
    assert not onnxq.QuantConfig(weight_bits=4, activation_bits=8).equalizes
    assert onnxq.QuantConfig(equalize=True).equalizes
    assert not onnxq.QuantConfig(activation_bits=6, equalize=False).equalizes
    assert not onnxq.QuantConfig(granularity="tensor", equalize=True).equalizes


@pytest.mark.parametrize(
    ("shape", "found"),
    [((), True), ((1,), True), ((8, 1, 1), True), ((1, 8, 1, 1), True), ((1, 1, 1, 6), False), ((8,), False)],
)
def test_a_scaler_is_a_mul_by_one_value_or_one_per_channel(shape, found):
    """A constant that varies along another axis than the channels (a (C,) vector broadcasts on
    the width) cannot carry a per-channel scale."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(rng.uniform(0.5, 2, shape).astype(np.float32), "c"),
        numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node("Mul", ["input", "c"], ["m"], name="scale"),
        helper.make_node("Conv", ["m", "w"], ["z"], group=8, pads=[1, 1, 1, 1], name="depthwise"),
    ]
    model = _graph_model(nodes, initializers, [None, 8, 6, 6])
    pairs = find_pairs(to_ir(model).graph)
    assert [p.constant_input for p in pairs] == ([1] if found else [])
    if found:
        x = rng.standard_normal((2, 8, 6, 6)).astype(np.float32)
        spread = (x * 10 ** rng.uniform(-2, 1, (1, 8, 1, 1))).astype(np.float32)
        equalized = equalize_channels(model, [{"input": spread}])
        assert equalized.pairs == 1
        np.testing.assert_allclose(
            session(equalized.model, optimize=False).run(None, {"input": x})[0],
            session(model, optimize=False).run(None, {"input": x})[0],
            rtol=1e-4,
            atol=1e-5,
        )


def test_moves_across_float_ops_run_at_every_width_unless_turned_off():
    assert onnxq.QuantConfig().rescales_float_sides
    assert onnxq.QuantConfig(weight_bits=4, activation_bits=4).rescales_float_sides
    assert not onnxq.QuantConfig(equalize=False).rescales_float_sides
    assert not onnxq.QuantConfig(granularity="tensor").rescales_float_sides


def hard_swish_block():
    """Stem conv → x·ReLU6(x + 3)/6 written op by op, as paddle2onnx writes hard-swish →
    depthwise conv → the same → 1×1 conv. The stem's channels span three decades and the
    depthwise conv multiplies the narrow ones back up, as a folded BatchNorm does in PP-PicoDet."""
    import torch

    return _uneven_block(lambda y: y * torch.clamp(y + 3, 0, 6) / 6)


def silu_block():
    """The same block with SiLU (x·sigmoid(x): Sigmoid and Mul) as in EfficientNet's MBConv."""
    import torch

    return _uneven_block(lambda y: y * torch.sigmoid(y))


def _uneven_block(activation):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.project = nn.Conv2d(8, 4, 1)
            with torch.no_grad():
                spread = 10 ** torch.linspace(-2.0, 1.0, 8)
                self.stem.weight.mul_(spread.reshape(-1, 1, 1, 1))
                self.stem.bias.mul_(spread)
                self.depthwise.weight.div_(spread.reshape(-1, 1, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = activation(self.stem(x))
            y = activation(self.depthwise(y))
            return self.project(y)

    torch.manual_seed(0)
    return export(Block(), torch.zeros(1, 3, 8, 8))


@pytest.fixture(scope="module")
def swish_model() -> onnx.ModelProto:
    return onnxq.fuse(hard_swish_block()).model


def test_outlets_are_convs_only_float_ops_read(swish_model):
    graph = to_ir(swish_model).graph
    convs = [node.name for node in graph if node.op_type == "Conv"]
    assert [node.name for node in find_outlets(graph)] == convs[:2]  # project's output is the output
    assert not [p for p in find_pairs(graph) if p.constant_input is not None]  # hard-swishes fused
    # a Mul by ones goes before the depthwise conv only (the 1×1 one is dense: left alone)
    inlets = insert_inlets(graph, lambda node: True)
    assert [mul.outputs[0].consumers()[0].name for mul in inlets] == [convs[1]]
    scalers = [p for p in find_pairs(graph) if p.constant_input is not None]
    assert [(p.producer, p.depthwise) for p in scalers] == [(inlets[0].name, True)]


def test_inlets_whose_channels_need_no_move_are_taken_out(swish_model):
    graph = to_ir(swish_model).graph
    inlets = insert_inlets(graph, lambda node: True)
    count = len(list(graph))
    assert remove_idle_inlets(graph, inlets) == 1
    assert len(list(graph)) == count - 1 and "Mul" not in [node.op_type for node in graph]


def test_no_inlet_goes_behind_a_silu_that_runs_on_integer_kernels():
    graph = to_ir(onnxq.fuse(silu_block()).model).graph
    depthwise = [node.name for node in graph if node.op_type == "Conv"][1]
    chained = onnxq.quant.plan.integer_chain_ops(onnxq.QuantConfig())
    assert insert_inlets(graph, lambda node: True, chained) == []
    inlets = insert_inlets(graph, lambda node: True)  # a float SiLU (below 8 bits) gets one
    assert [mul.outputs[0].consumers()[0].name for mul in inlets] == [depthwise]


@pytest.mark.parametrize(("bits", "integer_silu"), [((8, 8), True), ((8, 6), False), ((4, 8), False)])
def test_a_silu_stays_on_integer_kernels_at_8_bits_and_gets_an_inlet_below(tmp_path, bits, integer_silu):
    calib = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    weight_bits, activation_bits = bits
    config = onnxq.QuantConfig(
        weight_bits=weight_bits,
        activation_bits=activation_bits,
        first_last_8bit=False,
        speed_check=False,
        fidelity_fallback=False,
    )
    model = onnxq.quantize(silu_block(), calib, config).model
    produced_by = {out: node.op_type for node in model.graph.node for out in node.output}
    quantized = {produced_by.get(n.input[0]) for n in model.graph.node if n.op_type == "QuantizeLinear"}
    inlet = any(
        n.op_type == "Mul" and any(i in produced_by and produced_by[i] == "Mul" for i in n.input)
        for n in model.graph.node
    )
    assert ({"Sigmoid", "Mul"} <= quantized) == integer_silu  # QLinearSigmoid and QLinearMul
    assert inlet != integer_silu


def test_moves_across_float_ops_compute_the_same_and_line_up_the_quantized_tensors(swish_model, data):
    equalized = equalize_channels(swish_model, [{"input": data}], layer_pairs=False)
    # the stem's outlet and the inlet before the depthwise conv; the depthwise conv's own output
    # has channels within half the widest (its weights undo the stem's spread): no Mul for it
    assert equalized.pairs == 2
    assert sum(node.op_type == "Mul" for node in equalized.model.graph.node) == 2
    np.testing.assert_allclose(
        outputs(equalized.model, data), outputs(swish_model, data), rtol=1e-4, atol=1e-5
    )
    stem = next(n for n in equalized.model.graph.node if n.op_type == "Conv")
    before, after = ChannelMaxObserver(1), ChannelMaxObserver(1)
    before.update(_tensor(swish_model, stem.output[0], data))
    after.update(_tensor(equalized.model, stem.output[0], data))
    # every channel lined up to half the widest (FLOAT_SIDE_HEADROOM), none moved down
    want = before.maxima * np.clip(before.maxima.max() / before.maxima / 2, 1.0, FLOAT_SIDE_MAX_SCALE)
    np.testing.assert_allclose(after.maxima, want, rtol=1e-4)
    assert before.maxima.max() / before.maxima.min() > 100
    assert after.maxima.max() / after.maxima.min() <= 2.0001


def test_moves_across_float_ops_keep_more_of_float_at_8_bits(tmp_path):
    model_path = tmp_path / "swish.onnx"
    onnx.save(hard_swish_block(), model_path)
    calib = np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)
    x = np.random.default_rng(2).standard_normal((32, 3, 8, 8)).astype(np.float32)
    reference = outputs(onnx.load(model_path), x)

    def error(equalize: bool | None) -> tuple[float, list[str]]:
        config = onnxq.QuantConfig(equalize=equalize, speed_check=False, fidelity_fallback=False)
        result = onnxq.quantize(str(model_path), calib, config)
        got = session(result.model).run(None, {"input": x})[0]
        return float(np.mean((got - reference) ** 2)), result.notes

    plain, _ = error(False)
    default, notes = error(None)
    assert default < 0.1 * plain
    assert any("equalized the channels of 3 tensors across a float op" in note for note in notes)


def _tensor(model: onnx.ModelProto, name: str, x: np.ndarray) -> np.ndarray:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return session(probe, optimize=False).run([name], {"input": x})[0]


def _pair_model(rng, channels: int, groups: int, kernel: int, activation: str | None) -> onnx.ModelProto:
    first = (rng.standard_normal((channels, 4, 3, 3)) * 10 ** rng.uniform(-1, 1, (channels, 1, 1, 1))).astype(
        np.float32
    )
    second = rng.standard_normal((6 * groups, channels // groups, kernel, kernel)).astype(np.float32)
    initializers = [
        numpy_helper.from_array(first, "w1"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b1"),
        numpy_helper.from_array(second, "w2"),
    ]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["y"], pads=[1, 1, 1, 1], name="first")]
    if activation:
        nodes.append(helper.make_node(activation, ["y"], ["a"], name="act"))
    pad = kernel // 2
    nodes.append(
        helper.make_node(
            "Conv", ["a" if activation else "y", "w2"], ["z"], group=groups, pads=[pad] * 4, name="second"
        )
    )
    return _graph_model(nodes, initializers, [None, 4, 6, 6])


def _graph_model(nodes, initializers, input_shape: list) -> onnx.ModelProto:
    """Nodes reading "input" (float, `input_shape`) and writing "z", at opset 17."""
    graph = helper.make_graph(
        nodes,
        "equalize",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_model_whose_channels_need_no_move_comes_back_as_it_was(monkeypatch, swish_model, data):
    # a headroom wider than the stem's 1000x spread: every channel counts as lined up already
    monkeypatch.setattr(equalize, "FLOAT_SIDE_HEADROOM", 1e6)
    equalized = equalize_channels(swish_model, [{"input": data}], layer_pairs=False)
    assert equalized.pairs == 0 and not equalized.notes
    assert equalized.model is swish_model  # not a copy: a second copy of the weights for the whole run
