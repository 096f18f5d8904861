"""A fixed-batch export's mirror runs many samples at once where the batch is baked into Reshape
targets only (onnxq/refine/free_batch.py), and one run at a time where it is baked in elsewhere."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import onnxq  # noqa: E402
from onnxq.io import session  # noqa: E402
from onnxq.refine.free_batch import freed_batch  # noqa: E402
from tests.refine.common import FAST  # noqa: E402


class _Classifier(nn.Module):
    """Convs, global pooling and torch.flatten: the static dynamo export writes Reshape(x, [1, 8])
    with allowzero set."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.flatten(self.convs(x).mean((2, 3), keepdim=True), 1))


class _Folding(nn.Module):
    """Folds the batch into its rows with a Reshape whose target does not lead with the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).reshape(4, -1)


class _Attention(nn.Module):
    """Patches, then attention whose heads are folded with the batch: [batch·heads, tokens, size]."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, 2)
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # [b, 9, 8]
        b, t, _ = tokens.shape
        q, k, v = (
            h.reshape(b * 2, t, 4) for h in self.qkv(tokens).reshape(b, t, 3, 2, 4).permute(2, 0, 3, 1, 4)
        )
        weights = torch.softmax(q @ k.transpose(1, 2), -1)
        return (weights @ v).reshape(b, 2, t, 4).transpose(1, 2).reshape(b, t, 8)


class _HeadsFoldedSecond(_Attention):
    """The batch folded into the second axis, [3, batch·heads, tokens, size]: a -1 in front of the
    target would give [3·batch, heads, …] and mix the samples, which the check must catch."""

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        b, t, _ = tokens.shape
        q, k, v = self.qkv(tokens).reshape(b, t, 3, 2, 4).permute(2, 0, 3, 1, 4).reshape(3, b * 2, t, 4)
        return torch.softmax(q @ k.transpose(1, 2), -1) @ v


def _static_export(module: nn.Module, tmp_path) -> onnx.ModelProto:
    torch.manual_seed(0)
    path = tmp_path / "static.onnx"
    torch.onnx.export(module.eval(), (torch.zeros(1, 3, 6, 6),), str(path), dynamo=True, external_data=False)
    return onnx.load(path)


def _samples(count: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((count, 3, 6, 6)).astype(np.float32)}


def test_a_static_export_is_freed_where_only_its_reshape_reads_the_batch(tmp_path):
    model = _static_export(_Classifier(), tmp_path)
    reshape = next(node for node in model.graph.node if node.op_type == "Reshape")
    assert any(a.name == "allowzero" and a.i for a in reshape.attribute)
    _assert_freed(model)


def test_heads_folded_with_the_batch_are_freed_with_it(tmp_path):
    _assert_freed(_static_export(_Attention(), tmp_path))


def _assert_freed(model: onnx.ModelProto) -> None:
    """The freed copy gives three samples at once what the model gives one at a time."""
    freed = freed_batch(model, _samples(4))
    assert freed is not None
    x = _samples(3)["x"]
    (together,) = session(freed, optimize=False).run(None, {"x": x})
    fixed = session(model, optimize=False)
    one_at_a_time = np.concatenate([fixed.run(None, {"x": x[i : i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(together, one_at_a_time, rtol=1e-5, atol=1e-6)


def test_a_batch_folded_into_rows_keeps_the_batch_fixed(tmp_path):
    assert freed_batch(_static_export(_Folding(), tmp_path), _samples(4)) is None


def test_a_batch_folded_behind_another_axis_keeps_the_batch_fixed(tmp_path):
    assert freed_batch(_static_export(_HeadsFoldedSecond(), tmp_path), _samples(4)) is None


def test_refinement_of_a_static_export_learns_on_the_freed_copy(tmp_path):
    model = _static_export(_Classifier(), tmp_path)
    data = _samples(32)["x"]
    config = onnxq.QuantConfig(weight_bits=4, **{**FAST, "refine_iters": 5})
    result = onnxq.quantize(model, data, config)
    assert result.refinement.freed_batch == 1
    assert any("the export fixes the batch at 1" in note for note in result.notes)
    assert all(not unit.skipped for unit in result.refinement.units)
    assert result.fidelity.min_sqnr > 10
