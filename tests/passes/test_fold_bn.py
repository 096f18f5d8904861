"""BatchNormalization folding is exact on models exported from torch, and refuses what it must."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxq.io import session, to_ir, to_proto
from onnxq.passes.fold_bn import fold_batchnorm
from onnxq.passes.graph_utils import constants_to_initializers
from onnxq.passes.simplify import max_relative_difference
from tests.conftest import export, randomise_batchnorm


def _fold(model: onnx.ModelProto):
    graph_model = to_ir(model)
    constants_to_initializers(graph_model.graph)
    report = fold_batchnorm(graph_model.graph)
    return to_proto(graph_model), report


def _layer_with_bn(kind: str):
    import torch
    from torch import nn

    if kind == "conv":
        return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)), torch.zeros(1, 4, 8, 8)
    if kind == "conv_no_bias_grouped":
        layer = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(8))
        return layer, torch.zeros(1, 8, 8, 8)
    if kind == "conv_transpose":
        return nn.Sequential(nn.ConvTranspose2d(4, 6, 2, stride=2), nn.BatchNorm2d(6)), torch.zeros(
            1, 4, 5, 5
        )
    return nn.Sequential(nn.Linear(12, 7), nn.BatchNorm1d(7)), torch.zeros(2, 12)


@pytest.mark.parametrize("kind", ["conv", "conv_no_bias_grouped", "conv_transpose", "linear"])
def test_fold_is_numerically_equivalent(kind):
    import torch

    torch.manual_seed(1)
    module, example = _layer_with_bn(kind)
    randomise_batchnorm(module, seed=3)
    model = export(module, example, keep_bn=True)
    assert any(n.op_type == "BatchNormalization" for n in model.graph.node)
    folded, report = _fold(model)
    assert len(report.folded) == 1 and not report.skipped
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    sample = {"input": np.random.default_rng(0).standard_normal((3, *example.shape[1:])).astype(np.float32)}
    assert max_relative_difference(model, folded, sample) <= 1e-5


def test_fold_refuses_when_the_layer_output_is_read_elsewhere():
    import torch
    from torch import nn

    class Tapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = export(Tapped(), torch.zeros(1, 3, 4, 4), keep_bn=True)
    folded, report = _fold(model)
    assert not report.folded
    assert "read elsewhere" in next(iter(report.skipped.values()))
    sample = {"input": np.ones((1, 3, 4, 4), np.float32)}
    np.testing.assert_allclose(
        session(model, optimize=False).run(None, sample)[0],
        session(folded, optimize=False).run(None, sample)[0],
    )


def test_tied_weights_fold_into_copies_of_their_own():
    """One Conv applied twice with a different BatchNorm after each (a siamese or recurrent-style
    block), and once bare: both BatchNorms fold, the bare use keeps the original weights."""
    import torch
    from torch import nn

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            h = torch.relu(self.bn1(self.conv(x)))
            h = torch.relu(self.bn2(self.conv(h)))
            return self.conv(h)

    module = Tied()
    randomise_batchnorm(module, seed=5)
    model = export(module, torch.zeros(1, 4, 6, 6), keep_bn=True)
    folded, report = _fold(model)
    assert len(report.folded) == 2 and not report.skipped
    convs = [n for n in folded.graph.node if n.op_type == "Conv"]
    assert len({n.input[1] for n in convs}) == 3
    sample = {"input": np.random.default_rng(2).standard_normal((2, 4, 6, 6)).astype(np.float32)}
    assert max_relative_difference(model, folded, sample) <= 1e-5


def test_whole_network_folds_to_the_exporters_own_folding(small_model, small_model_bn):
    folded, report = _fold(small_model_bn)
    assert len(report.folded) == 2
    sample = {"input": np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)}
    assert max_relative_difference(small_model, folded, sample) <= 1e-5


def _mixed_kernels(concat_axis: int = 1, tap: bool = False):
    """MixNet's mixed depthwise conv: the channels split, each part convolved with its own
    kernel size, the parts concatenated and one BatchNorm over all of them."""
    import torch
    from torch import nn

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.small = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
            self.large = nn.Conv2d(2, 2, 5, padding=2, groups=2, bias=True)
            self.bn = nn.BatchNorm2d(6 if concat_axis == 1 else 4)

        def forward(self, x):
            a, b = torch.split(x, [4, 2], dim=1)
            if concat_axis == 1:
                joined = torch.cat([self.small(a), self.large(b)], dim=1)
            else:
                joined = torch.cat([self.small(a), self.small(a)], dim=concat_axis)
            out = torch.relu(self.bn(joined))
            return out + joined.mean() if tap else out

    module = Mixed()
    randomise_batchnorm(module, seed=7)
    return module


def test_batchnorm_after_a_concat_of_convs_folds_slice_by_slice():
    import torch

    model = export(_mixed_kernels(), torch.zeros(1, 6, 8, 8), keep_bn=True)
    folded, report = _fold(model)
    assert len(report.folded) == 1 and not report.skipped
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert [s.mean.size for s in report.statistics.values()] == [4, 2]
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    values = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    gamma, beta, _, var = (values[name] for name in bn.input[1:5])
    means = np.concatenate([s.mean for s in report.statistics.values()])
    variances = np.concatenate([s.var for s in report.statistics.values()])
    np.testing.assert_allclose(means, beta)  # each slice keeps its channels' output statistics
    np.testing.assert_allclose(variances, gamma**2 * var / (var + 1e-5))
    sample = {"input": np.random.default_rng(4).standard_normal((3, 6, 8, 8)).astype(np.float32)}
    assert max_relative_difference(model, folded, sample) <= 1e-5


@pytest.mark.parametrize(
    ("axis", "tap", "reason"), [(2, False, "not along channels"), (1, True, "read elsewhere")]
)
def test_batchnorm_after_a_concat_stays_where_slices_cannot_fold(axis, tap, reason):
    import torch

    model = export(_mixed_kernels(axis, tap), torch.zeros(1, 6, 8, 8), keep_bn=True)
    folded, report = _fold(model)
    assert not report.folded
    assert reason in next(iter(report.skipped.values()))
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 1
