"""End to end: the QDQ model matches the numpy reference and runs on onnxruntime's integer kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import onnxq
from onnxq.evaluate import kernel_summary
from onnxq.io import session
from onnxq.quant import primitives as P
from tests.conftest import needs_shared


def optimized_ops(model: onnx.ModelProto, tmp_path) -> Counter:
    path = os.path.join(tmp_path, "optimized.onnx")
    session(model, optimized_path=path)
    return Counter(n.op_type for n in onnx.load(path).graph.node)


@pytest.fixture(scope="module")
def quantized(small_model, calibration_data):
    return onnxq.quantize(
        small_model, calibration_data, onnxq.QuantConfig(calibration=onnxq.CalibrationMethod.MINMAX)
    )


def test_onnxruntime_fuses_every_layer_into_integer_kernels(quantized, tmp_path):
    ops = optimized_ops(quantized.model, tmp_path)
    assert ops["QLinearConv"] == 3
    assert ops["QLinearAdd"] == 1
    assert ops["QGemm"] == 1
    assert ops["QLinearGlobalAveragePool"] == 1
    assert not {"Conv", "Gemm", "FusedConv", "Relu", "Clip", "MaxPool"} & {op for op in ops if ops[op]}
    assert kernel_summary(quantized.model).startswith("integer")


@pytest.mark.parametrize("saturating", [False, True], ids=["vnni", "no-vnni"])
def test_weights_and_biases_match_the_numpy_reference(monkeypatch, small_model, calibration_data, saturating):
    """Both kernel paths: the probes' answers are forced, so the test holds on any x86 CPU. The
    depthwise conv keeps the full range on both (its kernel does not saturate)."""
    import onnxq.quant.kernels as kernels

    monkeypatch.setattr(kernels, "int8_kernels_saturate", lambda: saturating)
    monkeypatch.setattr(kernels, "full_range_kernels", lambda: frozenset({kernels.DEPTHWISE}))
    config = onnxq.QuantConfig(calibration=onnxq.CalibrationMethod.MINMAX, weight_rounding="nearest")
    quantized = onnxq.quantize(small_model, calibration_data, config)  # GPTQ: tests/calib
    assert quantized.int8_weight_bits == (7 if saturating else 8)
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.model.graph.initializer}
    nodes = {o: n for n in quantized.model.graph.node for o in n.output}
    convs = [n for n in quantized.model.graph.node if n.op_type == "Conv"]
    float_inits = {t.name: numpy_helper.to_array(t) for t in small_model.graph.initializer}
    for conv in convs:
        depthwise = any(a.name == "group" and a.i > 1 for a in conv.attribute)
        target = P.IntRange.signed(8 if depthwise else quantized.int8_weight_bits)
        w_dq = nodes[conv.input[1]]
        q, scale, zp = (inits[name] for name in w_dq.input)
        assert q.dtype == np.int8 and scale.shape == (q.shape[0],) and not zp.any()
        original = float_inits.get(w_dq.input[0].removesuffix("_quantized"))
        if original is not None:  # the stem's weight is renamed by folding; the others keep their name
            expected = P.symmetric_scale(P.weight_absmax(original, 0), target)
            np.testing.assert_array_equal(scale, expected)
            np.testing.assert_array_equal(q, P.quantize(original, expected, zp, target, axis=0))
        b_q, b_scale, _ = (inits[name] for name in nodes[conv.input[2]].input)
        x_scale = inits[nodes[conv.input[0]].input[1]]
        assert b_q.dtype == np.int32
        np.testing.assert_allclose(b_scale, x_scale * scale, rtol=1e-6)


def test_integer_kernels_compute_what_the_qdq_graph_says(quantized, calibration_data):
    reference = session(quantized.model, optimize=False).run(None, {"input": calibration_data})[0]
    deployed = session(quantized.model).run(None, {"input": calibration_data})[0]
    assert np.abs(reference - deployed).max() <= 0.05 * np.abs(reference).max()


def test_quantized_model_stays_close_to_float(small_model, quantized, calibration_data):
    expected = session(small_model).run(None, {"input": calibration_data})[0]
    got = session(quantized.model).run(None, {"input": calibration_data})[0]
    assert (expected.argmax(1) == got.argmax(1)).mean() >= 0.9
    assert np.abs(expected - got).max() <= 0.1 * np.abs(expected).max()


def test_batchnorm_export_gives_the_same_quantized_model(small_model_bn, quantized, calibration_data):
    config = onnxq.QuantConfig(calibration=onnxq.CalibrationMethod.MINMAX)
    from_bn = onnxq.quantize(small_model_bn, calibration_data, config)
    a = session(quantized.model).run(None, {"input": calibration_data})[0]
    b = session(from_bn.model).run(None, {"input": calibration_data})[0]
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95


def test_metadata_records_the_config_and_weight_range(quantized):
    meta = {p.key: p.value for p in quantized.model.metadata_props}
    assert json.loads(meta["onnxq.config"])["calibration"] == "minmax"
    assert "weight range" in meta["onnxq.weight_range"] or "int8 range" in meta["onnxq.weight_range"]


@pytest.mark.parametrize(
    "depthwise_saturates", [False, True], ids=["depthwise-exact", "depthwise-saturating"]
)
def test_saturating_kernels_get_seven_bit_weights(
    monkeypatch, small_model, calibration_data, depthwise_saturates
):
    """Where the GEMM kernels saturate, their layers' weights keep within [-63, 63]; the depthwise
    conv keeps [-127, 127] unless its own kernel's probe saturates too. Both probes are forced."""
    import onnxq.quant.kernels as kernels

    monkeypatch.setattr(kernels, "int8_kernels_saturate", lambda: True)
    exact = frozenset() if depthwise_saturates else frozenset({kernels.DEPTHWISE})
    monkeypatch.setattr(kernels, "full_range_kernels", lambda: exact)
    result = onnxq.quantize(small_model, calibration_data[:8])
    assert result.int8_weight_bits == 7
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    nodes = {o: n for n in result.model.graph.node for o in n.output}
    layers = [n for n in result.model.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in nodes]
    largest = {}
    for layer in layers:
        group = next((a.i for a in layer.attribute if a.name == "group"), 1)
        largest[group > 1] = max(
            largest.get(group > 1, 0), np.abs(inits[nodes[layer.input[1]].input[0]]).max()
        )
    assert largest == {False: 63, True: 63 if depthwise_saturates else 127}


def test_depthwise_weights_at_full_range_run_exactly_where_gemm_kernels_saturate(
    monkeypatch, small_model, calibration_data
):
    """The exemption holds on this CPU's kernels: the fused model computes what the QDQ graph says."""
    import onnxq.quant.kernels as kernels

    monkeypatch.setattr(kernels, "int8_kernels_saturate", lambda: True)
    result = onnxq.quantize(small_model, calibration_data, _minmax(onnxq.WeightRange.AUTO))
    if kernels.DEPTHWISE not in kernels.full_range_kernels():
        pytest.skip("this CPU's depthwise int8 kernel saturates: its weights take 7 bits too")
    reference = session(result.model, optimize=False).run(None, {"input": calibration_data})[0]
    deployed = session(result.model).run(None, {"input": calibration_data})[0]
    assert np.abs(reference - deployed).max() <= 0.005 * np.abs(reference).max()


def test_saturation_probes_answer_on_this_cpu():
    from onnxq.quant import kernels

    assert isinstance(kernels.int8_kernels_saturate(), bool)
    assert kernels.full_range_kernels() <= {kernels.DEPTHWISE, kernels.TRANSPOSE}


def _minmax(weight_range: onnxq.WeightRange) -> onnxq.QuantConfig:
    """Min-max ranges and every layer quantized: no timing or fidelity decision moves the plan."""
    return onnxq.QuantConfig(
        calibration=onnxq.CalibrationMethod.MINMAX,
        weight_range=weight_range,
        fidelity_fallback=False,
        speed_check=False,
    )


@pytest.fixture(scope="module")
def unsigned(small_model, calibration_data):
    return onnxq.quantize(small_model, calibration_data, _minmax(onnxq.WeightRange.UNSIGNED))


def test_unsigned_weights_hold_the_full_signed_range_around_128(unsigned, small_model, calibration_data):
    """The integers of full-range int8 weights plus 128, with zero point 128: the same values."""
    signed = onnxq.quantize(small_model, calibration_data, _minmax(onnxq.WeightRange.FULL))

    def weights(model: onnx.ModelProto) -> dict[str, list[np.ndarray]]:
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        nodes = {o: n for n in model.graph.node for o in n.output}
        layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in nodes]
        return {n.name: [inits[name] for name in nodes[n.input[1]].input] for n in layers}

    expected, got = weights(signed.model), weights(unsigned.model)
    assert unsigned.int8_weight_bits == 8 and got.keys() == expected.keys() and got
    for name, (q, scale, zero_point) in got.items():
        q_signed, scale_signed, _ = expected[name]
        assert q.dtype == np.uint8 and (zero_point == 128).all() and zero_point.dtype == np.uint8
        np.testing.assert_array_equal(q.astype(np.int16) - 128, q_signed)
        np.testing.assert_array_equal(scale, scale_signed)


def test_unsigned_weights_run_exactly_on_the_integer_kernels(unsigned, calibration_data, tmp_path):
    """u8×u8 kernels never saturate: the fused model computes what the QDQ graph says on any x86
    CPU, full-range weights included, and every layer still runs on integer kernels."""
    reference = session(unsigned.model, optimize=False).run(None, {"input": calibration_data})[0]
    deployed = session(unsigned.model).run(None, {"input": calibration_data})[0]
    assert np.abs(reference - deployed).max() <= 0.005 * np.abs(reference).max()
    ops = optimized_ops(unsigned.model, tmp_path)
    assert ops["QLinearConv"] == 3 and not ops["Conv"]


def test_resnet20_from_shared_keeps_its_accuracy():
    model = needs_shared("models", "resnet20_cifar10.onnx")
    data = np.load(needs_shared("data", "cifar10", "train-1017.npz"))["x"][:256]
    test = np.load(needs_shared("data", "cifar10", "test-1017.npz"))
    pre = onnxq.Preprocess.preset("cifar10")
    result = onnxq.quantize(model, data, onnxq.QuantConfig(max_samples=256), preprocess=pre)
    from onnxq.calib.data import batches, model_inputs

    x = next(batches(test["x"][:300], model_inputs(result.model), preprocess=pre, batch_size=300))["input"]
    expected = session(onnxq.load_model(model)).run(None, {"input": x})[0].argmax(1)
    got = session(result.model).run(None, {"input": x})[0].argmax(1)
    assert (expected == got).mean() >= 0.97


@pytest.mark.parametrize("k", [1.0, 4.0])
def test_scaleclip_sets_the_input_scale_from_k_times_mean_absolute_value(small_model, calibration_data, k):
    """The graph input's Q/DQ against numpy: range [max(min, −α), min(max, α)], α = K·mean|x|."""
    config = onnxq.QuantConfig(
        calibration=onnxq.CalibrationMethod.SCALECLIP,
        activation_scaleclip=k,
        speed_check=False,
        fidelity_fallback=False,
    )
    result = onnxq.quantize(small_model, calibration_data, config)
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    quantizers = [n for n in result.model.graph.node if n.op_type == "QuantizeLinear"]
    first = next(n for n in quantizers if n.input[0] == "input")
    scale, zero = inits[first.input[1]], inits[first.input[2]]
    calibrated = calibration_data[: result.samples].astype(np.float64)
    alpha = k * np.abs(calibrated).mean()
    low, high = max(calibrated.min(), -alpha), min(calibrated.max(), alpha)
    expected = P.affine_params(low, high, P.IntRange.unsigned(8))
    np.testing.assert_allclose(scale, expected[0], rtol=1e-5)
    assert int(zero) == int(expected[1])


def test_the_python_config_takes_the_same_words_as_the_cli():
    from onnxq.config import CalibrationMethod, Granularity, RangeRule, WeightRange
    from onnxq.errors import OnnxqError

    config = onnxq.QuantConfig(
        calibration="mse", granularity="group:8", weight_range="unsigned", weight_rule="scaleclip:2"
    )
    assert config.calibration is CalibrationMethod.MSE and config.calibration.searched
    assert config.granularity == Granularity.parse("group:8")
    assert config.weight_range is WeightRange.UNSIGNED
    assert config.weight_rule == RangeRule("scaleclip", 2.0)
    with pytest.raises(OnnxqError, match="calibration must be one of auto, minmax"):
        onnxq.QuantConfig(calibration="msee")
    with pytest.raises(OnnxqError, match="activation error must be readers or own, got 'reader'"):
        onnxq.QuantConfig(activation_error="reader")


def test_a_model_the_onnx_checker_refuses_but_onnxruntime_runs_quantizes(small_model, calibration_data):
    """A graph input declared without a shape: onnxruntime runs it, the checker refuses it, and
    the quantized model (the same input) must not be called an internal error for that."""
    model = onnx.ModelProto()
    model.CopyFrom(small_model)
    model.graph.input[0].type.tensor_type.ClearField("shape")
    result = onnxq.quantize(model, calibration_data, onnxq.QuantConfig(speed_check=False))
    assert any(note.startswith("the input model fails the onnx checker") for note in result.notes)
    assert result.quantized_nodes > 0
    session(result.model).run(None, {"input": calibration_data[:2]})


class _Recorded:
    """A Progress that keeps what the pipeline reports, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def stage(self, name: str, total: int | None = None) -> None:
        self.events.append(("stage", name))

    def advance(self, completed: int) -> None:
        pass

    def note(self, message: str) -> None:
        self.events.append(("note", message))

    def status(self, message: str) -> None:
        self.events.append(("status", message))


def test_the_fidelity_stage_says_which_step_it_is_on(small_model, calibration_data):
    """The check can take a minute on a detector: the live line names the step under way."""
    progress = _Recorded()
    onnxq.quantize(small_model, calibration_data, onnxq.QuantConfig(speed_check=False), progress=progress)
    after = progress.events[progress.events.index(("stage", "check fidelity")) :]
    statuses = [message for kind, message in after if kind == "status"]
    steps = [message.split(":")[0] for message in statuses]
    assert steps == ["activation ranges", "fallback", "activation ranges"]


def test_an_old_opset_export_is_raised_for_per_channel_scales_and_says_so(calibration_data):
    """An opset-9 export (as old model zoos hold) has no per-axis QuantizeLinear: onnxq raises it
    to 13 before anything else, and the notes say from where."""
    import torch

    from tests.conftest import export, small_cnn

    model = export(small_cnn(), torch.zeros(1, 3, 16, 16), opset=9)
    result = onnxq.quantize(model, calibration_data, onnxq.QuantConfig(speed_check=False))
    assert "opset raised from 9 to 13 (per-channel Q/DQ)" in result.notes
    assert next(o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert result.fidelity.min_sqnr > 20


def test_an_8_bit_run_never_imports_torch(tmp_path, small_model_path, calibration_data):
    """torch serves refinement and distribution correction only: a W8A8 run (onnxsim included,
    which tries `import torch` for an integration of its own) leaves it unimported, and torch
    still imports afterwards where it is installed."""
    np.save(tmp_path / "calib.npy", calibration_data)
    script = (
        "import importlib.util, sys, onnxq\n"
        f"onnxq.quantize_file({str(small_model_path)!r}, {str(tmp_path / 'q.onnx')!r}, "
        f"calibration={str(tmp_path / 'calib.npy')!r})\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
        "if importlib.util.find_spec('torch'):\n"
        "    import torch\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "q.onnx").is_file()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    tiny=st.lists(st.booleans(), min_size=6, max_size=6),
    input_scale=st.floats(1e-3, 1.0),
)
def test_a_bias_too_large_for_int32_at_its_scale_gets_room(seed, tiny, input_scale):
    """Channels whose bias would saturate int32 at s_in·s_w get the least scale that holds it;
    the others keep their integers and scales exactly."""
    from onnxq.passes.insert_qdq import BIAS_RANGE, room_for_bias
    from onnxq.quant.weights import QuantizedWeight

    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    weight[np.array(tiny)] *= 1e-9  # a BatchNorm's γ near 0, folded
    weight[5] = 0.0  # an empty channel without a bias keeps its zero scale
    bias = rng.uniform(-4, 4, 6).astype(np.float32)
    bias[5] = 0.0
    scale = (np.abs(weight).reshape(6, -1).max(1) / 127).astype(np.float32)
    target = P.IntRange(-127, 127, np.int8)
    integers = P.quantize(weight, np.where(scale > 0, scale, 1), np.zeros(6, np.int8), target, axis=0)
    quantized = QuantizedWeight(integers, scale, np.zeros(6, np.int8), 0, None, target)
    with np.errstate(divide="raise", invalid="raise"):  # the empty channel: no 0/0
        roomy = room_for_bias(quantized, bias, input_scale)
    assert np.all(np.abs(bias) <= BIAS_RANGE.qmax * (np.float32(input_scale) * roomy.scale))
    fits = np.abs(bias) <= BIAS_RANGE.qmax * (np.float64(input_scale) * scale)
    np.testing.assert_array_equal(roomy.scale[fits], scale[fits])
    np.testing.assert_array_equal(roomy.integers[fits], integers[fits])
    step = P.broadcast(roomy.scale, 4, 0)
    assert np.all(np.abs(roomy.dequantize() - weight) <= step * (1 + 1e-6))  # two roundings at most


def test_a_channel_of_almost_zero_weights_keeps_its_bias():
    """A channel of a conv whose weights are almost zero outputs its bias; stored at s_in·s_w it
    saturated int32 and the channel's constant was lost in the quantized model."""
    import torch

    from tests.conftest import export

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1))
    with torch.no_grad():
        net[0].weight[0] *= 1e-9
        net[0].bias[0] = 0.8  # channel 0: the constant 0.8 after the Relu
    model = export(net, torch.zeros(1, 3, 8, 8))
    data = np.random.default_rng(0).uniform(-1, 1, (16, 3, 8, 8)).astype(np.float32)
    config = onnxq.QuantConfig(first_last_8bit=False, speed_check=False, fidelity_fallback=False)
    result = onnxq.quantize(model, data, config)
    expected = session(model).run(None, {"input": data})[0]
    got = session(result.model).run(None, {"input": data})[0]
    sqnr = 10 * np.log10(np.sum(expected**2) / np.sum((got - expected) ** 2))
    assert sqnr > 30, sqnr
