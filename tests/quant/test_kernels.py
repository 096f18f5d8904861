"""Which 8-bit weights take the 7-bit range where onnxruntime's int8 GEMM kernels saturate."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxq
from onnxq.io import session
from onnxq.quant import kernels
from tests.conftest import export


def upsampling_cnn() -> onnx.ModelProto:
    """A plain Conv, a ConvTranspose, a depthwise Conv and a 1×1 Conv: one layer of each kind."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 2, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )
    return export(model, torch.zeros(1, 3, 8, 8))


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)


def largest_integer_per_op(model: onnx.ModelProto) -> dict[str, int]:
    """max |q| of each weighted layer's integers, keyed by its op and group (depthwise apart)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose") or node.input[1] not in producers:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        key = node.op_type + (" depthwise" if group > 1 else "")
        integers = inits[producers[node.input[1]].input[0]].astype(np.int16)
        found[key] = max(found.get(key, 0), int(np.abs(integers).max()))
    return found


@pytest.mark.parametrize("exact", [frozenset(), frozenset({kernels.DEPTHWISE, kernels.TRANSPOSE})])
def test_only_layers_on_saturating_kernels_take_seven_bits(monkeypatch, data, exact):
    """Both probes' answers forced: the suite decides nothing from this CPU's kernels."""
    monkeypatch.setattr(kernels, "int8_kernels_saturate", lambda: True)
    monkeypatch.setattr(kernels, "full_range_kernels", lambda: exact)
    config = onnxq.QuantConfig(
        calibration=onnxq.CalibrationMethod.MINMAX, fidelity_fallback=False, speed_check=False
    )
    result = onnxq.quantize(upsampling_cnn(), data, config)
    full = 127 if exact else 63
    assert largest_integer_per_op(result.model) == {"Conv": 63, "ConvTranspose": full, "Conv depthwise": full}
    named = {kernels.DEPTHWISE: "depthwise convolutions", kernels.TRANSPOSE: "ConvTranspose"}
    assert all(named[kind] in result.weight_range for kind in exact)


def test_the_full_range_layers_run_exactly_on_this_cpu(monkeypatch, data):
    """Where this CPU's probes let depthwise and ConvTranspose weights keep [-127, 127], the fused
    model computes what the QDQ graph says (the GEMM layers at 7 bits, as on a CPU without VNNI)."""
    monkeypatch.setattr(kernels, "int8_kernels_saturate", lambda: True)
    config = onnxq.QuantConfig(
        calibration=onnxq.CalibrationMethod.MINMAX, fidelity_fallback=False, speed_check=False
    )
    result = onnxq.quantize(upsampling_cnn(), data, config)
    if not kernels.full_range_kernels():
        pytest.skip("every int8 kernel of this CPU saturates: all weights take 7 bits")
    reference = session(result.model, optimize=False).run(None, {"input": data})[0]
    deployed = session(result.model).run(None, {"input": data})[0]
    assert np.abs(reference - deployed).max() <= 0.005 * np.abs(reference).max()


def test_the_gemm_probe_tells_a_saturating_kernel_from_an_exact_one():
    """The GEMM probe's sum is either exact or visibly short (vpmaddubsw halves it)."""
    probe, x, terms = kernels._probe(kernels.GEMM)
    got = float(session(probe, optimize=True, threads=1).run(None, {"x": x})[0].ravel()[0])
    exact = 255.0 * 127.0 * terms
    assert got == pytest.approx(exact, rel=0.01) or got < 0.9 * exact
    assert kernels.int8_kernels_saturate() == (got < 0.9 * exact)
