"""A quantized model is never kept slower than its float model when a lighter plan runs faster."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxq
from onnxq import speed
from onnxq.passes.infer_types import typed_ir
from onnxq.quant.plan import plan_quantization
from tests.conftest import export


def hardswish_cnn() -> onnx.ModelProto:
    """Conv → HardSwish → Conv → ReLU → Conv → pooled Linear head (a MobileNetV3-like stem)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Hardswish(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    return export(module, torch.zeros(1, 3, 8, 8))


def test_float_neighbours_keeps_only_the_layer_before_the_hardswish_float():
    model = hardswish_cnn()
    graph = typed_ir(model).graph
    full = plan_quantization(graph, onnxq.QuantConfig())
    lighter = plan_quantization(typed_ir(model).graph, onnxq.QuantConfig(), float_neighbours=True)
    dropped = set(full.layers) - set(lighter.layers)
    assert len(dropped) == 1
    (name,) = dropped
    assert "HardSwish" in lighter.float_nodes[name] or "HardSigmoid" in lighter.float_nodes[name]
    assert len(lighter.weights) == len(full.weights) - 1


def test_a_lighter_plan_that_runs_faster_is_kept_and_named(monkeypatch):
    model = hardswish_cnn()
    data = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    # float, all-integer (, lighter: float speed, in noise), then float and the lighter timed again
    timings = iter([[1.0, 2.0], [1.0, 2.0, 1.05], [1.0, 0.99]])
    monkeypatch.setattr(speed, "compare", lambda models, feed: next(timings))
    result = onnxq.quantize(model, data, onnxq.QuantConfig())
    kept = "speed: kept the model with the layer that feeds an op without integer kernels kept float"
    assert any(note.startswith(kept) for note in result.notes)
    kept_float = [name for name, why in result.float_nodes.items() if "float is faster" in why]
    assert len(kept_float) == 1
    float_convs = [n for n in result.model.graph.node if n.name == kept_float[0]]
    weights = {t.name for t in result.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert float_convs and float_convs[0].input[1] in weights  # float weights, no DequantizeLinear


def test_a_lighter_plan_that_does_not_help_is_dropped(monkeypatch):
    """Every plan within the noise margin of float: timed again, the model runs at float speed
    and stays quantized, without a lighter plan."""
    model = hardswish_cnn()
    data = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    timings = iter([[1.0, 1.08], [1.0, 1.08, 1.05], [1.0, 0.97]])  # the last: timed again
    monkeypatch.setattr(speed, "compare", lambda models, feed: next(timings))
    result = onnxq.quantize(model, data, onnxq.QuantConfig())
    assert any(note.startswith("speed: timed again: float 1.00 ms") for note in result.notes)
    assert not any(note.startswith("warning") and "slower" in note for note in result.notes)
    assert not any("float is faster" in why for why in result.float_nodes.values())
    assert result.quantized_nodes > 0


def test_a_model_slower_than_float_within_the_noise_and_again_when_timed_again_is_left_float(monkeypatch):
    """A plan a hair slower than float could be noise; timed a second time, alone with float, it
    is slower again: never slower than float means nothing quantized, and the warning gives both."""
    model = hardswish_cnn()
    data = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    timed = []

    def timings(models, feed):
        timed.append(len(models))
        return [[1.0, 1.08], [1.0, 1.08, 1.05], [1.0, 1.12]][len(timed) - 1]

    monkeypatch.setattr(speed, "compare", timings)
    result = onnxq.quantize(model, data, onnxq.QuantConfig())
    assert timed == [2, 3, 2]  # float and the model; with the lighter plan; float and the model again
    assert result.quantized_nodes == 0
    assert not {n.op_type for n in result.model.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    warning = next(note for note in result.notes if note.startswith("warning: nothing is quantized"))
    assert "1.08× and 1.12× float" in warning


@pytest.mark.parametrize("lighter_ms", [1.9, 1.5], ids=["fastest-not-clearly-faster", "lighter-plan-fastest"])
def test_a_model_every_plan_of_which_runs_clearly_slower_is_left_float(monkeypatch, lighter_ms):
    """A small MobileNetV3-style classifier on a CPU whose int8 kernels gain nothing: the Q/DQ
    pairs only cost. Never slower than float means nothing quantized, said as a warning, also
    where the lighter plan (its HardSwish neighbours float) was the one picked before falling back."""
    model = hardswish_cnn()
    data = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    timings = iter([[1.0, 2.0], [1.0, 2.0, lighter_ms]])  # every plan over 1.11× float
    monkeypatch.setattr(speed, "compare", lambda models, feed: next(timings))
    result = onnxq.quantize(model, data, onnxq.QuantConfig())
    assert result.quantized_nodes == 0
    ops = {n.op_type for n in result.model.graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    assert any(
        note.startswith("warning: nothing is quantized: every quantized plan ran slower")
        for note in result.notes
    )
    assert not any(note.startswith("warning: the quantized model runs") for note in result.notes)
    feed = {"input": data[:4]}
    want = onnxq.io.session(model).run(None, feed)[0]
    np.testing.assert_allclose(onnxq.io.session(result.model).run(None, feed)[0], want, rtol=1e-4, atol=1e-5)


def test_a_model_left_with_nothing_quantized_says_so_not_that_it_runs_slower(monkeypatch):
    """Every layer feeds a Tanh: the lighter plan keeps all float and is the float model, which
    timing noise may put a hair behind float; the note must say nothing is quantized."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3), nn.Tanh())
    model = export(module, torch.zeros(1, 6))
    data = np.random.default_rng(0).standard_normal((16, 6)).astype(np.float32)
    timings = iter([[1.0, 2.0], [1.0, 2.0, 1.05]])  # float, all-integer, all float (noise)
    monkeypatch.setattr(speed, "compare", lambda models, feed: next(timings))
    result = onnxq.quantize(model, data, onnxq.QuantConfig())
    assert result.quantized_nodes == 0
    assert {n.op_type for n in result.model.graph.node} == {"Gemm", "Tanh"}
    assert any(note.startswith("warning: nothing is quantized") for note in result.notes)
    assert not any("slower than float on this CPU (" in note for note in result.notes)


def test_compare_times_every_model():
    model = hardswish_cnn()
    feed = {"input": np.zeros((1, 3, 8, 8), np.float32)}
    times = speed.compare([model, model], feed)
    assert len(times) == 2 and all(t > 0 for t in times)


def test_timed_sessions_spin_as_deployed_and_calibration_sessions_do_not(monkeypatch):
    """Latency is measured with onnxruntime's default busy-waiting threads, as users run models;
    calibration's sessions turn them off (they steal the cores from the numpy work between runs)."""
    from onnxq import io

    made = []

    def recording(model, **options):
        made.append(io.session(model, **options))
        return made[-1]

    monkeypatch.setattr(speed, "session", recording)
    speed.compare([hardswish_cnn()], {"input": np.zeros((1, 3, 8, 8), np.float32)}, rounds=1)
    assert _spins(made[0])
    assert not _spins(io.session(hardswish_cnn()))


def _spins(runner) -> bool:
    try:
        return runner.get_session_options().get_session_config_entry(SPINNING) != "0"
    except Exception:  # onnxruntime raises when the entry was never set: its default, spinning
        return True


SPINNING = "session.intra_op.allow_spinning"


def test_latency_comes_from_the_quieter_rounds_paired():
    """Load that compresses the ratio (the QDQ model 1.5× float on a quiet machine, 1.1× under
    load) and a burst in one quiet round's second block: the figures are the quiet rounds'
    float median and their median paired ratio."""
    quiet = [[1.0, 1.5], [1.1, 1.65], [1.0, 4.0], [0.9, 1.35]]  # the third: a burst in one block
    busy = [[2.8, 3.08], [3.0, 3.3], [2.9, 3.19], [3.1, 3.41]]
    rounds = np.asarray([row for pair in zip(quiet, busy, strict=True) for row in pair]) / 1e3
    float_ms, quantized_ms = speed.quiet_paired_ms(rounds)
    assert float_ms == pytest.approx(1.0)
    assert quantized_ms / float_ms == pytest.approx(1.5)


def test_runs_while_other_sessions_settle_are_not_timed(monkeypatch):
    """A fake clock: each model's first runs in a block are slow (another session's threads still
    spin), later ones fast; the figures are the fast runs of each."""
    clock = {"now": 0.0, "block_runs": 0, "last": None}
    fast = {0: 0.004, 1: 0.002}

    def fake_run(runner, feed):
        if clock["last"] is not runner:
            clock["last"], clock["block_runs"] = runner, 0
        clock["block_runs"] += 1
        clock["now"] += 0.03 if clock["block_runs"] <= 4 else fast[runner]

    for name, value in (("ROUNDS", 4), ("SETTLE_SECONDS", 0.1), ("BLOCK_SECONDS", 0.3)):
        monkeypatch.setattr(speed, name, value)  # the module's own, not the suite's brief ones
    monkeypatch.setattr(speed, "session", lambda model, **options: model)
    monkeypatch.setattr(speed, "run", fake_run)
    monkeypatch.setattr(speed, "clock", lambda: clock["now"])
    assert speed.compare([0, 1], {}) == pytest.approx([4.0, 2.0])


def test_no_speed_check_times_nothing(monkeypatch):
    def refuse(models, feed):
        raise AssertionError("timed with speed_check off")

    monkeypatch.setattr(speed, "compare", refuse)
    data = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    result = onnxq.quantize(hardswish_cnn(), data, onnxq.QuantConfig(speed_check=False))
    assert not any(note.startswith(("speed", "warning: the quantized model runs")) for note in result.notes)


def test_below_8_bits_nothing_is_timed_or_kept_float_for_speed(monkeypatch):
    """onnxruntime runs 4-bit Q/DQ in float: the widths asked for stay, and the notes say why."""

    def refuse(models, feed):
        raise AssertionError("timed below 8 bits")

    monkeypatch.setattr(speed, "compare", refuse)
    data = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    config = onnxq.QuantConfig(weight_bits=4, fidelity_fallback=False)
    result = onnxq.quantize(hardswish_cnn(), data, config)
    assert any(note.startswith("speed: not compared with float") for note in result.notes)
    assert not any("float is faster" in why for why in result.float_nodes.values())
    dequantized = {n.output[0] for n in result.model.graph.node if n.op_type == "DequantizeLinear"}
    layers = [n for n in result.model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == 4 and all(n.input[1] in dequantized for n in layers)


def test_a_fidelity_fallback_that_makes_the_model_slower_than_float_is_taken_back(monkeypatch):
    """The model ran at float speed before the fallback; with its float layers it runs slower:
    never slower than float wins over the fallback's fidelity."""
    from onnxq import fidelity
    from tests.test_fidelity import deep_cnn

    monkeypatch.setattr(fidelity, "WARN_SQNR_DB", {8: 99.0, 0: 99.0})  # the fallback always runs
    calls = []

    def timings(models, feed):  # float and the model; then float and the model after the fallback
        calls.append(len(models))
        return [1.0, 0.9] if len(calls) == 1 else [1.0, 1.5]

    monkeypatch.setattr(speed, "compare", timings)
    data = np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)
    result = onnxq.quantize(deep_cnn(), data, onnxq.QuantConfig())
    assert calls == [2, 2]
    assert any(
        note.startswith("fidelity: the layers kept float made the model slower") for note in result.notes
    )
    assert not any(note.startswith("fidelity: ") and "lift" in note for note in result.notes)
    assert not any("kept float for fidelity" in why for why in result.float_nodes.values())


@pytest.mark.parametrize(("after_ms", "kept"), [(0.42, True), (0.6, False)], ids=["level", "clearly-slower"])
def test_where_the_model_was_already_slower_the_fallback_stays_unless_clearly_slower(
    monkeypatch, after_ms, kept
):
    """A sub-millisecond model stays quantized though slower than float; the fallback's float
    layers then stay unless they make it clearly slower than it was without them."""
    from onnxq import fidelity
    from tests.test_fidelity import deep_cnn

    monkeypatch.setattr(fidelity, "WARN_SQNR_DB", {8: 99.0, 0: 99.0})  # the fallback always runs
    result = quantize_timed(monkeypatch, deep_cnn(), [[0.3, 0.4], [0.3, after_ms, 0.4]])
    fallback_nodes = [name for name, why in result.float_nodes.items() if "kept float for fidelity" in why]
    assert bool(fallback_nodes) == kept
    slower = next(note for note in result.notes if note.startswith("warning: the quantized model runs"))
    assert f"{(after_ms if kept else 0.4) / 0.3:.2f}× slower" in slower


def test_a_model_left_float_for_speed_spends_nothing_on_a_fallback_it_does_not_need(monkeypatch):
    """Speed is timed before the fallback: where every plan is clearly slower than float and the
    outputs keep their fidelity, no layer is ranked and nothing is timed again."""
    from onnxq import sensitivity
    from onnxq.passes import equalize

    monkeypatch.setattr(
        sensitivity, "layer_costs", _refuse("the fallback ranked layers of a model left float")
    )
    # the HardSwish's channels lie within INTEGER_SPREAD, where the move is left for its integer
    # kernels: made here all the same, so that there is a Mul for the saved model to leave out
    monkeypatch.setattr(equalize, "INTEGER_SPREAD", 1.0)
    # the last two timings: the retry without the move, slower still
    timings = [[1.0, 2.0], [1.0, 2.0, 1.9], [1.0, 1.5], [1.0, 1.5, 1.45]]
    result = quantize_timed(monkeypatch, deep_hardswish_cnn(), timings)
    assert result.quantized_nodes == 0
    assert result.notes[-1].endswith("quantized again without those moves: still slower, left float")
    # saved: the float model as prepared before equalization, whose Mul after the conv that
    # feeds the HardSwish served only its quantizer; equal to float within float32 rounding
    assert any(note.startswith("equalized the channels of 1 tensor") for note in result.notes)
    assert "Mul" not in {node.op_type for node in result.model.graph.node}
    assert result.fidelity.min_sqnr > 100
    assert any("(the fastest 1.90× float at batch 1)" in note for note in result.notes)


def test_a_lighter_plan_that_runs_no_integer_kernel_is_not_timed(monkeypatch):
    """A lighter plan whose quantized nodes all run as float ops between Q/DQ pairs buys no
    speed, only noise: it is not a candidate, so a clearly slower model is left float."""
    from onnxq.runtime_kernels import Kernels
    from onnxq.tune import speed_choice

    monkeypatch.setattr(speed_choice, "count_kernels", lambda model: Kernels(0, 20, 4))
    # float, the model; a second timing would end the iterator
    result = quantize_timed(monkeypatch, deep_hardswish_cnn(), [[1.0, 2.0]])
    assert result.quantized_nodes == 0
    lighter = "the model with the layer that feeds an op without integer kernels kept float"
    assert f"speed: {lighter} runs no integer kernel" in "\n".join(result.notes)
    assert any(note.startswith("warning: nothing is quantized") for note in result.notes)


def test_a_model_every_plan_of_which_is_clearly_slower_is_timed_again_after_a_fallback(monkeypatch):
    """The fallback runs where the outputs fall short, since its float layers can make a model
    faster; still clearly slower with them, the model is left float and the warning gives both."""
    from onnxq import fidelity

    monkeypatch.setattr(fidelity, "WARN_SQNR_DB", {8: 99.0, 0: 99.0})  # the fallback always runs
    result = quantize_timed(monkeypatch, deep_hardswish_cnn(), [[1.0, 1.24], [1.0, 1.24, 1.2], [1.0, 1.18]])
    assert result.quantized_nodes == 0
    warning = next(note for note in result.notes if note.startswith("warning: nothing is quantized"))
    assert "1.24× and 1.18× float" in warning


def test_a_model_far_slower_than_float_is_left_float_without_a_fallback(monkeypatch):
    """Beyond 1.25× float no fallback of a tenth of the layers is tried: nothing is ranked,
    nothing timed again, even where the outputs fall short."""
    from onnxq import fidelity, sensitivity

    why = "the fallback ranked layers of a model far slower than float"
    monkeypatch.setattr(fidelity, "WARN_SQNR_DB", {8: 99.0, 0: 99.0})  # the outputs fall short
    monkeypatch.setattr(sensitivity, "layer_costs", _refuse(why))
    result = quantize_timed(monkeypatch, deep_hardswish_cnn(), [[1.0, 1.3], [1.0, 1.3, 1.26]])
    assert result.quantized_nodes == 0
    assert any("(the fastest 1.26× float at batch 1)" in note for note in result.notes)


def deep_hardswish_cnn() -> onnx.ModelProto:
    """Twenty 3×3 convs, the tenth followed by HardSwish and the rest by ReLU."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()]
    for index in range(19):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.Hardswish() if index == 8 else nn.ReLU()]
    return export(nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 8 * 8, 10)), torch.zeros(1, 3, 8, 8))


def test_the_fidelity_fallback_on_a_lighter_plan_keeps_its_float_neighbours_float(monkeypatch):
    """Speed picked the lighter plan (the conv before the HardSwish float); the fallback's plans
    are built around it, so that conv stays float whatever the fallback keeps."""
    from onnxq import fidelity

    monkeypatch.setattr(fidelity, "WARN_SQNR_DB", {8: 99.0, 0: 99.0})  # the fallback always runs
    result = quantize_timed(monkeypatch, deep_hardswish_cnn(), [[1.0, 2.0], [1.0, 2.0, 0.95], [1.0, 0.97]])
    assert any(
        note.startswith("speed: kept the model with the layer that feeds an op") for note in result.notes
    )
    assert any(note.startswith("fidelity: ") and "lift" in note for note in result.notes)
    assert "no integer kernel" in result.float_nodes["/18/Conv"]  # the tenth conv, before the HardSwish
    assert any("kept float for fidelity" in why for why in result.float_nodes.values())


def test_a_model_slower_than_float_within_the_noise_keeps_a_fallback_that_makes_it_faster(monkeypatch):
    """The fallback's float layers can make a model faster (PP-OCRv4's detector: its 640×640
    stem convs, slow in int8, kept float): a plan a hair behind float is timed again after the
    fallback, with its float layers, and kept where that runs at float speed."""
    from onnxq import fidelity
    from tests.test_fidelity import deep_cnn

    monkeypatch.setattr(fidelity, "WARN_SQNR_DB", {8: 99.0, 0: 99.0})  # the fallback always runs
    # no lighter plan: no op lacks an integer kernel
    result = quantize_timed(monkeypatch, deep_cnn(), [[1.0, 1.08], [1.0, 0.72]])
    assert result.quantized_nodes > 0
    assert any("kept float for fidelity" in why for why in result.float_nodes.values())
    again = "speed: timed again: float 1.00 ms, the model and the fidelity fallback's float layers 0.72 ms"
    assert again in result.notes
    assert not any(note.startswith("warning") and "slower" in note for note in result.notes)


def quantize_timed(monkeypatch, model: onnx.ModelProto, timings: list[list[float]]):
    """`model` quantized at the defaults on random 8×8 images, speed.compare answering `timings`
    in turn (one answer too few ends the iterator: a timing the test did not expect fails)."""
    answers = iter(timings)
    monkeypatch.setattr(speed, "compare", lambda models, feed: next(answers))
    data = np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)
    return onnxq.quantize(model, data, onnxq.QuantConfig())


def _refuse(why: str):
    """A stand-in that fails the test with `why` when called."""

    def refuse(*args, **kwargs):
        raise AssertionError(why)

    return refuse
