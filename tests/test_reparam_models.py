"""The re-parameterized models trained by tools/train_reparam.py fuse to their plain deployed form
without changing a prediction, and quantize the same whether given fused or not."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxq
from onnxq.io import session
from tests.conftest import SHARED

MODELS = Path(__file__).resolve().parent.parent / "models"
NAMES = ["repvgg_cifar10", "mobileone_cifar10"]


def _inputs() -> np.ndarray:
    """test-1017 preprocessed when ../shared is here; random images otherwise."""
    path = SHARED / "data" / "cifar10" / "test-1017.npz"
    if path.exists():
        x = np.load(path)["x"].astype(np.float32) / 255.0
    else:
        x = np.random.default_rng(0).random((256, 3, 32, 32), dtype=np.float32)
    mean = np.asarray([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
    return ((x - mean) / std).astype(np.float32)


@pytest.fixture(scope="module", params=NAMES)
def trained(request) -> tuple[onnx.ModelProto, onnxq.FuseResult]:
    path = MODELS / f"{request.param}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not built (tools/train_reparam.py)")
    return onnx.load(path), onnxq.fuse(path)


def test_fuses_to_the_plain_deployed_form(trained):
    original, fused = trained
    before = Counter(n.op_type for n in original.graph.node)
    after = Counter(n.op_type for n in fused.model.graph.node)
    assert before["Add"] > 0 and before["BatchNormalization"] > 0
    assert after["Add"] == 0 and after["BatchNormalization"] == 0
    assert after["Conv"] == after["Relu"] == before["Relu"]  # one Conv per re-parameterized block
    assert not fused.fused.refused


def test_fused_model_predicts_what_the_unfused_one_does(trained):
    original, fused = trained
    x = _inputs()
    run = [session(m, optimize=False).run for m in (original, fused.model)]
    want, got = (
        np.concatenate([r(None, {"input": x[i : i + 256]})[0] for i in range(0, len(x), 256)]) for r in run
    )
    assert np.abs(want - got).max() <= 1e-4 * np.abs(want).max()
    np.testing.assert_array_equal(want.argmax(1), got.argmax(1))


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    run = session(model, optimize=False).run
    return np.concatenate([run(None, {"input": x[i : i + 256]})[0] for i in range(0, len(x), 256)])


def test_quantizing_unfused_equals_quantizing_fused(trained):
    original, fused = trained
    calib = _inputs()[:32]
    # no speed check: where int8 kernels saturate, timing chooses how 8-bit weights are stored
    config = onnxq.QuantConfig(calibration=onnxq.CalibrationMethod.MINMAX, speed_check=False)
    from_unfused = onnxq.quantize(original, calib, config).model
    from_fused = onnxq.quantize(fused.model, calib, config).model
    assert from_unfused.graph.SerializeToString() == from_fused.graph.SerializeToString()


def test_low_bit_weights_keep_branches_apart_unless_asked(trained):
    """Below 8 bits each branch gets its own scales by default; --fuse-branches still merges."""
    original, _ = trained
    calib = _inputs()[:16]
    low = {"weight_bits": 4, "calibration": onnxq.CalibrationMethod.MINMAX}
    separate = onnxq.quantize(original, calib, onnxq.QuantConfig(**low)).model
    merged = onnxq.quantize(original, calib, onnxq.QuantConfig(**low, fuse_branches=True)).model
    adds = [sum(n.op_type == "Add" for n in m.graph.node) for m in (separate, merged)]
    assert adds[0] > 0 and adds[1] == 0
    assert onnxq.QuantConfig().merges_branches and not onnxq.QuantConfig(weight_bits=4).merges_branches
