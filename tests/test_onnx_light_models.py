"""The Caffe2 exports onnx ships as backend test data (IR version 3, opset 9: initializers listed
as graph inputs, weights made by ConstantOfShape, LRN, Dropout, Sum of several inputs, a
Reshape/Transpose channel shuffle) quantize at the defaults and compute what they computed. Their
weights are constants of one value each, so these check the exporter's forms, not accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxq
from onnxq.calib.inputs import model_inputs
from onnxq.io import session

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


@pytest.mark.parametrize("name", ["light_squeezenet", "light_shufflenet", "light_inception_v1"])
def test_a_caffe2_export_of_ir_version_3_quantizes(name):
    path = LIGHT / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} is not in this onnx wheel")
    model = onnx.load(path)
    (spec,) = model_inputs(model)
    images = np.random.default_rng(0).standard_normal((8, *spec.shape[1:])).astype(np.float32)
    result = onnxq.quantize(model, {spec.name: images}, onnxq.QuantConfig(speed_check=False))
    assert result.quantized_nodes > 0
    assert [value.name for value in result.model.graph.input] == [spec.name]
    sample = {spec.name: images[:1]}
    want, got = session(model).run(None, sample)[0], session(result.model).run(None, sample)[0]
    assert np.isfinite(got).all()
    assert 10 * np.log10(np.square(want).sum() / max(np.square(want - got).sum(), 1e-30)) > 30
