"""BatchNorm statistics kept through folding; distribution correction and data-free calibration."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

import onnxq  # noqa: E402
from onnxq.calib.runner import with_outputs  # noqa: E402
from onnxq.cli import main  # noqa: E402
from onnxq.correct.matching import (  # noqa: E402
    MatchSettings,
    _StatisticsRun,
    correct_distribution,
    statistics_loss,
    synthesize,
)
from onnxq.io import session  # noqa: E402
from onnxq.prepare import fuse  # noqa: E402
from tests.conftest import export  # noqa: E402

FAST = MatchSettings(steps=30, synthesis_steps=30, batch=16)


def scaled_bn_net():
    """Conv → BN → per-channel Mul → ReLU → Conv → BN: statistics must follow the folded Mul."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.register_buffer("scale", torch.linspace(0.5, 2.0, 8).reshape(1, 8, 1, 1))
            self.conv2, self.bn2 = nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)) * self.scale)
            return self.bn2(self.conv2(x)).mean(dim=(2, 3))

    torch.manual_seed(0)
    return Net()


def bn_matched_to(net, x: np.ndarray) -> None:
    """Set every BN's running statistics to its input's statistics on `x` (in order, as each
    depends on the ones before), so that the recorded statistics must equal what the folded
    model's tensors show on `x`."""
    net.eval()
    generator = torch.Generator().manual_seed(1)
    for bn in [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
        seen = []
        hook = bn.register_forward_hook(lambda m, i, o, seen=seen: seen.append(i[0].detach()))
        with torch.no_grad():
            net(torch.from_numpy(x))
        hook.remove()
        bn.running_mean.copy_(seen[0].mean(dim=(0, 2, 3)))
        bn.running_var.copy_(seen[0].var(dim=(0, 2, 3), unbiased=False))
        bn.weight.data.copy_(torch.randn(bn.num_features, generator=generator))
        bn.bias.data.copy_(torch.randn(bn.num_features, generator=generator))


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((32, 3, 12, 12)).astype(np.float32)


@pytest.fixture(scope="module")
def matched(data) -> onnx.ModelProto:
    net = scaled_bn_net()
    bn_matched_to(net, data)
    return export(net, torch.zeros(1, 3, 12, 12), keep_bn=True)


def test_statistics_survive_folding_exactly(matched, data):
    prepared = fuse(matched)
    assert not any(n.op_type == "BatchNormalization" for n in prepared.model.graph.node)
    assert len(prepared.statistics) == 2
    names = sorted(prepared.statistics)
    values = session(with_outputs(prepared.model, names), optimize=False).run(names, {"input": data})
    for name, value in zip(names, values, strict=True):
        stats = prepared.statistics[name]
        np.testing.assert_allclose(value.mean(axis=(0, 2, 3)), stats.mean, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(value.var(axis=(0, 2, 3)), stats.var, rtol=1e-3, atol=1e-4)


def test_a_batchnorm_left_in_the_graph_gives_its_output_statistics(data):
    """A pre-activation BatchNorm (after an Add, before ReLU and the next conv) cannot fold, and
    torch's dynamo exporter folds the rest away itself: the one left still says what its output
    should look like, exactly as the folded ones do, so correction and data-free calibration run."""
    from torch import nn

    class PreActivation(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.bn, self.head = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.conv(x)
            return self.head(torch.relu(self.bn(x))).mean(dim=(2, 3))

    torch.manual_seed(0)
    net = PreActivation()
    bn_matched_to(net, data)
    prepared = fuse(export(net, torch.zeros(1, 3, 12, 12), keep_bn=True))
    kept = [n for n in prepared.model.graph.node if n.op_type == "BatchNormalization"]
    assert len(kept) == 1 and list(prepared.statistics) == [kept[0].output[0]]
    name = kept[0].output[0]
    (value,) = session(with_outputs(prepared.model, [name]), optimize=False).run([name], {"input": data})
    stats = prepared.statistics[name]
    np.testing.assert_allclose(value.mean(axis=(0, 2, 3)), stats.mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(value.var(axis=(0, 2, 3)), stats.var, rtol=1e-3, atol=1e-4)


def test_statistics_are_never_written_into_the_model(matched):
    prepared = fuse(matched)
    sizes = sorted(int(np.prod(t.dims)) for t in prepared.model.graph.initializer)
    assert sizes == sorted([8 * 3 * 9, 8, 4 * 8 * 9, 4])  # two weights and two biases, nothing else


def test_the_loss_is_zero_where_the_statistics_match(matched, data):
    prepared = fuse(matched)
    run = _StatisticsRun(prepared.model, prepared.statistics)
    assert float(run.loss(torch.from_numpy(data))) < 1e-6


@pytest.fixture(scope="module")
def shifted(data):
    """The same net with BN statistics that the data does not show: correction has work to do."""
    net = scaled_bn_net()
    bn_matched_to(net, data)
    net.bn1.running_mean += 0.5
    net.bn1.running_var *= 2.0
    return fuse(export(net, torch.zeros(1, 3, 12, 12), keep_bn=True))


def test_distribution_correction_moves_statistics_towards_batchnorm(shifted, data):
    corrected, report = correct_distribution(shifted.model, shifted.statistics, {"input": data}, FAST)
    run = _StatisticsRun(shifted.model, shifted.statistics)
    before = float(run.loss(torch.from_numpy(data)))
    after = float(run.loss(torch.from_numpy(corrected["input"])))
    assert after < 0.7 * before
    assert report.after < report.before
    change = np.sqrt(np.mean((corrected["input"] - data) ** 2) / np.mean(data**2))
    assert 0 < change < 0.5  # nudged, not replaced
    assert corrected["input"].shape == data.shape and corrected["input"].dtype == data.dtype


def test_micro_batches_give_the_whole_batch_loss_and_gradient(shifted, data, monkeypatch):
    """A batch too big for the memory budget runs in pieces; the statistics stay the batch's."""
    from onnxq.correct import matching

    run = _StatisticsRun(shifted.model, shifted.statistics)
    whole = torch.from_numpy(data).requires_grad_(True)
    loss = run.backward(whole)
    budget = matching.BYTES_PER_ELEMENT * run.elements_per_sample * 5
    monkeypatch.setattr(matching, "MEMORY_BUDGET", budget)
    pieces = torch.from_numpy(data.copy()).requires_grad_(True)
    assert run.micro_batch(pieces) == 5 < len(data)
    assert run.backward(pieces) == pytest.approx(loss, rel=1e-5)
    assert run.loss(pieces.detach()) == pytest.approx(loss, rel=1e-5)
    scale = float(whole.grad.abs().max())
    np.testing.assert_allclose(pieces.grad.numpy(), whole.grad.numpy(), rtol=1e-3, atol=1e-5 * scale)


def test_closeness_keeps_inputs_nearer_the_originals(shifted, data):
    loose = MatchSettings(steps=30, batch=16, closeness=0.0)
    tight = MatchSettings(steps=30, batch=16, closeness=100.0)
    _, free = correct_distribution(shifted.model, shifted.statistics, {"input": data}, loose)
    _, held = correct_distribution(shifted.model, shifted.statistics, {"input": data}, tight)
    assert held.change < free.change


def test_the_configs_closeness_reaches_the_correction(shifted, data):
    from onnxq.correct import corrected_for_refinement
    from onnxq.progress import Silent

    def change(closeness: float) -> float:
        config = onnxq.QuantConfig(refine=True, distribution_correction=True, correction_closeness=closeness)
        corrected, notes, by_unit = corrected_for_refinement(
            shifted.model, shifted.statistics, {"input": data}, config, False, Silent()
        )
        assert len(notes) == 1 and "inputs moved by" in notes[0] and by_unit is None
        return float(np.sqrt(np.mean((corrected["input"] - data) ** 2) / np.mean(data**2)))

    assert change(100.0) < change(0.0)
    with pytest.raises(onnxq.OnnxqError, match="correction closeness"):
        onnxq.QuantConfig(correction_closeness=-1.0)


def test_synthesised_inputs_match_the_statistics_better_than_noise(shifted):
    out, report = synthesize(shifted.model, shifted.statistics, (3, 12, 12), 20, FAST)
    assert out["input"].shape == (20, 3, 12, 12)
    assert report.after < 0.5 * report.before


def test_statistics_loss_weighs_layers_by_their_own_scale():
    stats = onnxq.passes.fold_bn.ChannelStatistics(np.zeros(2), np.ones(2))
    big = onnxq.passes.fold_bn.ChannelStatistics(np.zeros(2), np.full(2, 100.0))
    x = torch.ones(4, 2, 3, 3) * 0.5
    small_loss = statistics_loss({"a": x}, {"a": stats})
    large_loss = statistics_loss({"a": x * 10}, {"a": big})
    assert torch.isclose(small_loss, large_loss, rtol=1e-3)


def test_refinement_runs_on_corrected_data_when_asked_and_says_so(small_model_bn, calibration_data):
    fast = dict(refine=True, refine_iters=5, speed_check=False, fidelity_fallback=False)
    config = onnxq.QuantConfig(weight_bits=4, activation_bits=4, distribution_correction=True, **fast)
    result = onnxq.quantize(small_model_bn, calibration_data, config)
    notes = [n for n in result.notes if n.startswith("distribution correction (")]
    assert len(notes) == 1 and "BatchNorm-statistics loss" in notes[0]
    default = onnxq.quantize(
        small_model_bn, calibration_data, onnxq.QuantConfig(weight_bits=4, activation_bits=4, **fast)
    )
    assert not any("distribution correction" in n for n in default.notes)  # off unless asked


def test_correction_is_skipped_with_the_reason_without_batchnorm(small_model, calibration_data):
    config = onnxq.QuantConfig(
        refine=True, refine_iters=5, speed_check=False, fidelity_fallback=False, distribution_correction=True
    )
    result = onnxq.quantize(small_model, calibration_data, config)
    assert any(n.startswith("distribution correction skipped: the model has no") for n in result.notes)


def test_data_free_calibration_from_the_command_line(tmp_path, small_model_bn):
    source, target = tmp_path / "bn.onnx", tmp_path / "q.onnx"
    onnx.save(small_model_bn, source)
    args = ["quantize", str(source), "--calib", "bn-stats", "--max-samples", "16", "-o", str(target)]
    result = CliRunner().invoke(main, [*args, "--no-speed-check"])
    assert result.exit_code == 0, result.output
    assert "data-free: 16 calibration samples synthesised from BatchNorm statistics" in result.output
    assert onnx.load(target).graph.node


def test_data_free_calibration_needs_batchnorm_statistics(tmp_path, small_model):
    source, target = tmp_path / "plain.onnx", tmp_path / "q.onnx"
    onnx.save(small_model, source)
    result = CliRunner().invoke(main, ["quantize", str(source), "--calib", "bn-stats", "-o", str(target)])
    assert result.exit_code != 0
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("onnxq: error: --calib bn-stats: the model has no BatchNormalization statistics")
    assert "Traceback" not in result.output
    assert not target.exists()


def test_data_free_calibration_of_a_model_with_a_fixed_batch_of_one():
    from tests.conftest import small_cnn

    model = export(small_cnn(), torch.zeros(1, 3, 16, 16), keep_bn=True, dynamic_batch=False)
    result = onnxq.quantize(model, "bn-stats", onnxq.QuantConfig(max_samples=2, speed_check=False))
    assert result.notes[0].startswith("data-free: 2 calibration samples synthesised")
    assert result.samples == 2


def test_a_model_whose_input_fixes_its_batch_is_corrected_in_runs_of_that_batch(monkeypatch):
    """A static export of batch 4 whose simplified graph bakes 4 into a Reshape between two
    BatchNorms: the statistics run (and its micro-batches, past the memory budget) must feed
    the mirror whole multiples of 4 samples, as onnxruntime would need."""
    from torch import nn

    from onnxq.correct import matching

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            n = x.shape[0]
            x = torch.softmax(x.reshape(n, 8, -1), dim=-1).reshape(n, 8, 12, 12)
            return self.bn2(self.conv2(x)).mean(dim=(2, 3))

    torch.manual_seed(0)
    net = Net()
    net.bn2.running_mean += 0.3
    folded = fuse(export(net, torch.zeros(4, 3, 12, 12), keep_bn=True, dynamic_batch=False))
    data = np.random.default_rng(0).standard_normal((24, 3, 12, 12)).astype(np.float32)
    run = _StatisticsRun(folded.model, folded.statistics)
    whole = run.loss(torch.from_numpy(data))
    monkeypatch.setattr(matching, "MEMORY_BUDGET", matching.BYTES_PER_ELEMENT * run.elements_per_sample * 6)
    assert run.micro_batch(torch.from_numpy(data)) == 4  # 6 samples fit: the largest multiple of 4
    assert run.loss(torch.from_numpy(data)) == pytest.approx(whole, rel=1e-5)
    corrected, report = correct_distribution(folded.model, folded.statistics, {"input": data}, FAST)
    assert report.after < report.before and corrected["input"].shape == data.shape
