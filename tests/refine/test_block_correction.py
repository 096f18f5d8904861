"""PD-Quant's distribution correction block by block: each unit's float inputs move towards the
BatchNorm statistics of the tensors inside it, and only the unit's float side sees them."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnxq  # noqa: E402
from onnxq.correct.matching import statistics_loss  # noqa: E402
from onnxq.refine import reconstruct as reconstruct_module  # noqa: E402
from onnxq.refine.block_correction import BlockCorrection, corrected_inputs, unit_statistics  # noqa: E402
from onnxq.refine.blocks import Unit  # noqa: E402
from onnxq.refine.mirror import Mirror  # noqa: E402
from tests.correct.test_correct import data, shifted  # noqa: E402, F401  (fixtures)
from tests.refine.common import FAST  # noqa: E402


def _second_half(mirror: Mirror) -> Unit:
    """The unit from the first Relu's output to the end: it holds the second folded conv."""
    relu = next(i for i, node in enumerate(mirror.nodes) if node.op_type == "Relu")
    return Unit(relu + 1, len(mirror.nodes), [mirror.nodes[relu].outputs[0]], list(mirror.graph_outputs))


@pytest.fixture
def unit_and_inputs(shifted, data):  # noqa: F811
    mirror = Mirror(shifted.model)
    mirror.requires_grad_(False)
    unit = _second_half(mirror)
    with torch.no_grad():
        env = mirror.run({mirror.graph_inputs[0]: torch.from_numpy(data)}, 0, unit.begin, quantized=False)
    return mirror, unit, {name: env[name] for name in unit.inputs}


def _loss(mirror, unit, values, statistics, per_sample: bool = False) -> float:
    with torch.no_grad():
        made = mirror.run(dict(values), unit.begin, unit.end, quantized=False, keep=statistics)
        return float(statistics_loss(made, statistics, per_sample))


def test_a_units_inputs_move_its_statistics_towards_batchnorm(shifted, unit_and_inputs):  # noqa: F811
    mirror, unit, values = unit_and_inputs
    inside = unit_statistics(mirror, unit, shifted.statistics)
    assert len(inside) == 1  # the second conv's; the first one lies before the unit
    kept = {name: value.clone() for name, value in values.items()}
    correction = BlockCorrection(shifted.statistics, steps=40, batch=16, lr=0.05)
    corrected, report = corrected_inputs(mirror, unit, values, 32, correction)
    before, after = _loss(mirror, unit, values, inside), _loss(mirror, unit, corrected, inside)
    assert after < 0.7 * before
    assert report.before == pytest.approx(before, rel=0.2) and report.after < report.before
    (name,) = unit.inputs
    assert corrected[name].shape == values[name].shape
    assert torch.equal(values[name], kept[name])  # the originals are not written over
    change = float(((corrected[name] - values[name]).pow(2).mean() / values[name].pow(2).mean()).sqrt())
    assert 0 < change < 0.5 and change == pytest.approx(report.change, rel=0.05)


def test_per_sample_statistics_follow_a_numpy_reference():
    rng = np.random.default_rng(0)
    value = rng.normal(0.3, 1.5, (5, 3, 4, 6)) * rng.uniform(0.2, 3.0, (5, 1, 1, 1))
    stats = onnxq.passes.fold_bn.ChannelStatistics(rng.normal(size=3), rng.uniform(0.5, 2.0, 3))
    means, stds = value.mean(axis=(2, 3)), np.sqrt(value.var(axis=(2, 3)) + 1e-8)  # [sample, channel]
    gap = ((means - stats.mean) ** 2).mean() + ((stds - np.sqrt(stats.var)) ** 2).mean()
    expected = gap / stats.var.mean()
    tensor = torch.from_numpy(value.astype(np.float32))
    per_sample = float(statistics_loss({"a": tensor}, {"a": stats}, per_sample=True))
    assert per_sample == pytest.approx(expected, rel=1e-4)
    assert float(statistics_loss({"a": tensor}, {"a": stats})) != pytest.approx(expected, rel=1e-2)
    flat = tensor.mean(dim=(2, 3))  # no positions: each sample has no statistics of its own
    assert float(statistics_loss({"a": flat}, {"a": stats}, per_sample=True)) == pytest.approx(
        float(statistics_loss({"a": flat}, {"a": stats}))
    )


def test_per_sample_correction_lowers_each_samples_gap(shifted, unit_and_inputs):  # noqa: F811
    mirror, unit, values = unit_and_inputs
    inside = unit_statistics(mirror, unit, shifted.statistics)
    correction = BlockCorrection(shifted.statistics, steps=40, batch=16, lr=0.05, per_sample=True)
    corrected, report = corrected_inputs(mirror, unit, values, 32, correction)
    before = _loss(mirror, unit, values, inside, per_sample=True)
    after = _loss(mirror, unit, corrected, inside, per_sample=True)
    assert after < 0.7 * before and report.before == pytest.approx(before, rel=0.2)


def test_closeness_holds_a_units_inputs_nearer_the_originals(shifted, unit_and_inputs):  # noqa: F811
    mirror, unit, values = unit_and_inputs
    moves = [
        corrected_inputs(mirror, unit, values, 32, BlockCorrection(shifted.statistics, closeness, 30, 0.05))[
            1
        ]
        for closeness in (0.0, 100.0)
    ]
    assert moves[1].change < moves[0].change


def test_a_unit_without_statistics_keeps_its_inputs(shifted, unit_and_inputs):  # noqa: F811
    mirror, unit, values = unit_and_inputs
    none_inside = {
        name: s
        for name, s in shifted.statistics.items()
        if name not in unit_statistics(mirror, unit, shifted.statistics)
    }
    corrected, report = corrected_inputs(mirror, unit, values, 32, BlockCorrection(none_inside))
    assert corrected is values and report.tensors == 0


def _recorded_corrections(monkeypatch) -> list[dict]:
    """What each call of block correction inside refinement is handed: the unit's inputs (as
    handed, copied), the mirror and the settings."""
    calls: list[dict] = []
    real = reconstruct_module.corrected_inputs

    def recording(mirror, unit, values, count, correction, seconds=None, overwrite=False):
        handed = {name: values[name].clone() for name in unit.inputs}
        calls.append(dict(values=handed, mirror=mirror, correction=correction))
        return real(mirror, unit, values, count, correction, seconds, overwrite)

    monkeypatch.setattr(reconstruct_module, "corrected_inputs", recording)
    return calls


def _blocks_config(**changes) -> onnxq.QuantConfig:
    settings = dict(
        FAST,
        weight_bits=4,
        activation_bits=4,
        refine_iters=5,
        distribution_correction=True,
        correction_at="blocks",
    )
    return onnxq.QuantConfig(**{**settings, **changes})


def test_only_the_units_float_side_is_corrected_and_the_next_unit_starts_uncorrected(
    small_model_bn, calibration_data, monkeypatch
):
    """Each unit is handed the float model's own tensors at its cut (not the corrected ones of
    the unit before), its float targets come from what correction returns, and the notes say so."""
    calls = _recorded_corrections(monkeypatch)
    config = _blocks_config(refine_unit="layer", correction_closeness=0.0)
    given = calibration_data.copy()
    result = onnxq.quantize(small_model_bn, calibration_data, config)
    np.testing.assert_array_equal(calibration_data, given)  # the caller's data is never corrected
    assert len(calls) >= 2
    lines = [n for n in result.notes if "distribution correction (blocks, each batch's statistics)" in n]
    assert len(lines) == 1 and "BatchNorm-statistics loss" in lines[0]
    assert not any(n.startswith("distribution correction (") for n in result.notes)  # not the inputs
    mirror = calls[0]["mirror"]
    feeds = {mirror.graph_inputs[0]: torch.from_numpy(calibration_data)}
    with torch.no_grad():
        for call in calls[1:]:
            names = list(call["values"])
            begin = max(i for i, node in enumerate(mirror.nodes) for o in node.outputs if o in names) + 1
            env = mirror.run(dict(feeds), 0, begin, quantized=False, keep=names)
            for name in names:
                np.testing.assert_allclose(
                    call["values"][name].numpy(), env[name].numpy(), rtol=1e-4, atol=1e-5
                )


@pytest.mark.parametrize("statistics", ["batch", "sample"])
def test_the_configs_statistics_reach_block_correction(
    small_model_bn, calibration_data, monkeypatch, statistics
):
    calls = _recorded_corrections(monkeypatch)
    result = onnxq.quantize(
        small_model_bn, calibration_data, _blocks_config(correction_statistics=statistics)
    )
    assert calls and {call["correction"].per_sample for call in calls} == {statistics == "sample"}
    assert any(f"(blocks, each {statistics}'s statistics)" in note for note in result.notes)


def test_correction_at_is_checked():
    with pytest.raises(onnxq.OnnxqError, match="inputs or blocks"):
        onnxq.QuantConfig(correction_at="layers")
    with pytest.raises(onnxq.OnnxqError, match="batch or sample"):
        onnxq.QuantConfig(correction_at="blocks", correction_statistics="pixel")
    with pytest.raises(onnxq.OnnxqError, match="--correction-at blocks"):
        onnxq.QuantConfig(correction_statistics="sample")


def test_block_correction_from_the_command_line(tmp_path, small_model_bn, calibration_data):
    import onnx
    from click.testing import CliRunner

    from onnxq.cli import main

    source, calib, target = tmp_path / "bn.onnx", tmp_path / "calib.npy", tmp_path / "q.onnx"
    onnx.save(small_model_bn, source)
    np.save(calib, calibration_data)
    args = ["quantize", str(source), "--calib", str(calib), "-o", str(target), "--no-speed-check"]
    refine = [
        "--w-bits",
        "4",
        "--a-bits",
        "4",
        "--refine",
        "--refine-iters",
        "3",
        "--distribution-correction",
    ]
    blocks = ["--correction-at", "blocks", "--correction-statistics", "sample"]
    result = CliRunner().invoke(main, [*args, *refine, *blocks])
    assert result.exit_code == 0, result.output
    assert (
        "distribution correction (blocks, each sample's statistics): BatchNorm-statistics loss"
        in result.output
    )
    assert onnx.load(target).graph.node
    refused = CliRunner().invoke(main, [*args, *refine, "--correction-at", "layers"])
    assert refused.exit_code != 0 and "layers" in refused.output
