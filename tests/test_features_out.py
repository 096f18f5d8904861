"""A backbone exported to hand every stage's features out: each stage's Relu output is a graph
output and the next stage's input. The conv before such a Relu must run on an integer kernel
(the Relu folded into its quantizer), the graph output holding the dequantized tensor the next
stage reads; a stage output no layer reads stays float, as every graph output does."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import onnxq  # noqa: E402
from onnxq.io import session  # noqa: E402
from onnxq.runtime_kernels import count_kernels  # noqa: E402
from tests.conftest import export  # noqa: E402

nn = torch.nn
OUTPUTS = ("stage1", "stage2", "stage3")


class StagesOut(nn.Module):
    """Three conv stages, each one's activation handed out (timm's features_only form)."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU()),
                nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU()),
                nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU6()),
            ]
        )

    def forward(self, x):
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return tuple(features)


def _images(rng: np.random.Generator, count: int) -> np.ndarray:
    coarse = rng.standard_normal((count, 3, 8, 8)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    module = StagesOut()
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):  # statistics away from the identity
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    rng = np.random.default_rng(0)
    calibration, evaluation = _images(rng, 32), _images(rng, 8)
    model = export(module, torch.from_numpy(calibration[:2]), outputs=OUTPUTS)
    result = onnxq.quantize(model, calibration, onnxq.QuantConfig(speed_check=False))
    return model, result.model, evaluation


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def test_stages_a_layer_reads_on_run_on_integer_kernels_and_the_outputs_keep_their_names(exported):
    model, quantized, _ = exported
    assert [o.name for o in quantized.graph.output] == [o.name for o in model.graph.output]
    kernels = count_kernels(quantized)
    assert (kernels.integer, kernels.floating) == (2, 1)  # the last stage only feeds an output


def test_a_stage_output_holds_what_the_next_stage_reads(exported):
    model, quantized, evaluation = exported
    producers = _producers(quantized)
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
    outputs = dict(zip(OUTPUTS, session(quantized).run(None, {"input": evaluation}), strict=True))
    reference = dict(zip(OUTPUTS, session(model).run(None, {"input": evaluation}), strict=True))
    for name in OUTPUTS[:2]:
        relu = producers[name]
        dequantize = producers[relu.input[0]]
        assert (relu.op_type, dequantize.op_type) == ("Relu", "DequantizeLinear")
        readers = [n for n in quantized.graph.node if dequantize.output[0] in n.input]
        assert {n.op_type for n in readers} == {"Relu", "Conv"}
        scale, zero = (constants[i] for i in dequantize.input[1:3])
        assert zero == 0  # the Relu folded in: the range starts at 0
        steps = outputs[name] / scale
        np.testing.assert_allclose(steps, np.rint(steps), atol=1e-3)  # on the quantizer's grid
        assert steps.min() >= 0 and steps.max() <= 255
        noise = np.square(reference[name].astype(np.float64) - outputs[name]).sum()
        assert 10 * np.log10(np.square(reference[name].astype(np.float64)).sum() / noise) > 30
    last = producers[OUTPUTS[2]]
    assert last.op_type == "Clip" and producers[last.input[0]].op_type == "Conv"
