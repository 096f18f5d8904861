"""What the refinement tests share: a short refinement's settings, and the check that the mirror
computes what onnxruntime computes on the exported QDQ model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch

from onnxq.refine.mirror import Mirror

# refine_check off: these tests follow what refinement learned into the saved model, which the
# check may replace by the search's where 40 iterations on a random network learn little
FAST = dict(refine=True, refine_iters=40, refine_batch=16, speed_check=False, fidelity_fallback=False)
FAST["refine_check"] = False


def reference_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnxruntime on the QDQ graph as written (no fusion into integer kernels)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    runner = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return runner.run(None, {runner.get_inputs()[0].name: x})[0]


def mirror_run(mirror: Mirror, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return mirror({mirror.graph_inputs[0]: torch.from_numpy(x)}, quantized=True)[0].numpy()


def sqnr(reference: np.ndarray, other: np.ndarray) -> float:
    noise = max(float(np.sum((other.astype(np.float64) - reference) ** 2)), 1e-30)
    return 10 * np.log10(float(np.sum(reference.astype(np.float64) ** 2)) / noise)


def assert_same_as_qdq(mirror: Mirror, model: onnx.ModelProto, x: np.ndarray) -> None:
    """Equal up to float summation order. An activation that sits on a rounding boundary may land
    one step away in one of the two and carry that step on (on MobileNetV2, 1 element of 800 000
    at the first layer), so the two must agree 10 dB beyond the quantization noise itself and
    pick the same classes."""
    want, got = reference_run(model, x), mirror_run(mirror, x)
    with torch.no_grad():
        floating = mirror({mirror.graph_inputs[0]: torch.from_numpy(x)}, quantized=False)[0].numpy()
    assert sqnr(want, got) >= sqnr(floating, want) + 10.0
    assert (got.argmax(1) == want.argmax(1)).all()
