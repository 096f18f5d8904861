"""QPRep (RepAPQ): a per-channel affine learned after each merged re-parameterized conv, folded
into its weight scales and bias at export, so the deployed graph gains nothing."""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.refine.common import FAST, assert_same_as_qdq  # noqa: E402


def repvgg_net():
    """Stem, two RepVGG blocks (3×3, 1×1 and identity branches with BatchNorm), a linear head."""
    from tests.passes.test_fuse_branches import Block, conv_bn

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Sequential(*conv_bn(3, 8, (3, 3)), torch.nn.ReLU())
            self.blocks = torch.nn.Sequential(
                *(Block([conv_bn(8, 8, (3, 3)), conv_bn(8, 8, (1, 1))], "bn") for _ in range(2))
            )
            self.head = torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    return Net()


def _perturbed_affine(mirror, units, feeds, settings, progress, correction=None):
    """Stands in for learning: every QPRep γ and β set to values far from their start."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in mirror.affine_weights:
            rounding = mirror.rounding[mirror.weight_index[name]]
            rounding.gain.copy_(0.7 + 0.6 * torch.rand(rounding.gain.shape, generator=generator))
            rounding.shift.copy_(0.3 * torch.randn(rounding.shift.shape, generator=generator))
    return []


def _repvgg_quantized(monkeypatch, data, **options):
    import onnxq.refine.export
    from tests.conftest import export, randomise_batchnorm

    monkeypatch.setattr(onnxq.refine.export, "reconstruct", _perturbed_affine)
    net = repvgg_net()
    randomise_batchnorm(net)
    model = export(net, torch.zeros(1, 3, 16, 16), keep_bn=True)
    options = {"fuse_branches": True, **options}
    config = onnxq.QuantConfig(weight_bits=4, activation_bits=4, **options, **FAST)
    return onnxq.quantize(model, data, config)


@pytest.fixture
def qprep(monkeypatch, calibration_data):
    """QPRep at its default: on."""
    return _repvgg_quantized(monkeypatch, calibration_data)


def test_qprep_gives_each_merged_conv_an_affine(qprep):
    assert "QPRep: 2 merged re-parameterized convs learned a per-channel affine" in qprep.notes
    mirror = qprep.refinement.mirror
    assert len(mirror.affine_weights) == 2
    changed = {b for b, w in mirror.bias_weights.items() if w in mirror.affine_weights}
    assert set(qprep.refinement.biases) == changed and changed


def test_qprep_absorbed_into_scales_and_bias_leaves_the_export_equal_to_the_mirror(
    qprep, monkeypatch, calibration_data
):
    """γ far from 1 and β far from 0, folded into per-channel scales and int32 biases: onnxruntime
    on the exported QDQ model computes what the mirror computes with them, and the graph has
    the same nodes as without QPRep."""
    from collections import Counter

    mirror = qprep.refinement.mirror
    assert_same_as_qdq(mirror, qprep.model, calibration_data[:8])
    for name in mirror.affine_weights:
        rounding = mirror.rounding[mirror.weight_index[name]]
        calibrated = rounding.scale.reshape(len(rounding.scale), -1)[:, 0]
        expected = (calibrated * rounding.channel_gain()).detach().numpy()
        np.testing.assert_allclose(qprep.refinement.weights[name].scale, expected, rtol=1e-6)
    plain = _repvgg_quantized(monkeypatch, calibration_data, qprep=False)
    assert not plain.refinement.mirror.affine_weights
    assert Counter(n.op_type for n in qprep.model.graph.node) == Counter(
        n.op_type for n in plain.model.graph.node
    )


@pytest.fixture
def every_layer(monkeypatch, calibration_data):
    """--refine-affine on the unmerged network: every layer, not only merged convs."""
    return _repvgg_quantized(monkeypatch, calibration_data, fuse_branches=False, refine_affine=True)


def test_refine_affine_gives_every_layer_with_channel_scales_an_affine(every_layer):
    mirror = every_layer.refinement.mirror
    channel_scaled = [
        name for name, index in mirror.weight_index.items() if mirror.rounding[index].scale.numel() > 1
    ]
    assert sorted(mirror.affine_weights) == sorted(channel_scaled)
    assert len(channel_scaled) > 2  # the stem, the unmerged branches and the head, not 2 merged convs
    note = rf"{len(channel_scaled)} of \d+ layers learned a per-channel affine \(--refine-affine\)"
    assert any(re.fullmatch(note, line) for line in every_layer.notes)
    changed = {b for b, w in mirror.bias_weights.items() if w in mirror.affine_weights}
    assert set(every_layer.refinement.biases) == changed and changed


def test_refine_affine_absorbed_leaves_the_export_equal_to_the_mirror(every_layer, calibration_data):
    assert every_layer.refinement.mirror.affine_weights  # γ and β set far from 1 and 0 on each
    assert_same_as_qdq(every_layer.refinement.mirror, every_layer.model, calibration_data[:8])


def test_refine_affine_from_the_command_line(small_model_path, calibration_data, tmp_path):
    from click.testing import CliRunner

    from onnxq.cli import main

    calib, target = tmp_path / "calib.npy", tmp_path / "q.onnx"
    np.save(calib, calibration_data)
    args = ["quantize", str(small_model_path), "--calib", str(calib), "-o", str(target), "--no-speed-check"]
    refine = ["--w-bits", "4", "--a-bits", "4", "--refine", "--refine-iters", "3"]
    result = CliRunner().invoke(main, [*args, *refine, "--refine-affine"])
    assert result.exit_code == 0, result.output
    assert re.search(r"\d+ of \d+ layers learned a per-channel affine \(--refine-affine\)", result.output)
    plain = CliRunner().invoke(main, [*args, *refine])
    assert plain.exit_code == 0 and "--refine-affine" not in plain.output
