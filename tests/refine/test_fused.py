"""The compiled learning kernels compute what the eager fake quantizer computes, and learning
goes on eagerly where compiling fails."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnxq.refine import fused  # noqa: E402
from onnxq.refine.quantizers import fake_quantize, random_mask  # noqa: E402


@pytest.fixture
def fresh_kernels(monkeypatch):
    """Kernel state private to the test: a failure in one test does not switch off the next."""
    monkeypatch.setattr(fused, "_state", {"enabled": True, "failure": ""})
    monkeypatch.setattr(fused, "_compiled", {})


def learn_once(x: torch.Tensor, keep: torch.Tensor | None, upstream: torch.Tensor, zero: float, qmax: float):
    inputs = x.clone().requires_grad_(True)
    step = torch.tensor(0.05, requires_grad=True)
    output = fake_quantize(inputs, step, zero, 0.0, qmax, keep)
    (output * upstream).sum().backward()
    return output.detach(), inputs.grad, step.grad


@pytest.mark.parametrize("drop", [True, False])
def test_compiled_learning_passes_equal_the_eager_ones(fresh_kernels, drop):
    """Same forward values and input gradients bit for bit; the step's gradient up to the order
    of its sum. A tensor above MIN_ELEMENTS, in the channels-last layout convs hand on."""
    generator = np.random.default_rng(0)
    shape = (2, 8, 512, 520)  # 4,259,840 elements
    assert np.prod(shape) >= fused.MIN_ELEMENTS
    x = torch.from_numpy((generator.standard_normal(shape) * 0.6).astype(np.float32))
    x = x.contiguous(memory_format=torch.channels_last)
    keep = random_mask(x, 0.5, generator) if drop else None
    upstream = torch.from_numpy(generator.standard_normal(shape).astype(np.float32))
    with fused.compiled_kernels(False):
        eager = learn_once(x, keep, upstream, 3.0, 15.0)
    compiled = learn_once(x, keep, upstream, 3.0, 15.0)
    if fused.failure():
        pytest.skip(f"torch cannot compile here: {fused.failure()}")
    assert fused.kernel("forward", x) is not None
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=0)
    torch.testing.assert_close(compiled[1], eager[1], rtol=0, atol=0)
    torch.testing.assert_close(compiled[2], eager[2], rtol=1e-4, atol=1e-3)


def test_a_failing_compiler_switches_to_eager_passes_once(fresh_kernels, monkeypatch):
    """No C++ compiler surfaces at the first call: the result is the eager one, the reason is
    kept for the notes, and no later call tries again."""
    calls = []

    def broken(function, **_):
        def run(*args):
            calls.append(function.__name__)
            raise RuntimeError("Compiler: cc is not found\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    x = torch.linspace(-2, 2, fused.MIN_ELEMENTS).reshape(64, -1)
    upstream = torch.ones_like(x)
    keep = torch.zeros_like(x)
    with fused.compiled_kernels(False):
        eager = learn_once(x, keep, upstream, 0.0, 15.0)
    fallen_back = learn_once(x, keep, upstream, 0.0, 15.0)
    again = learn_once(x, keep, upstream, 0.0, 15.0)
    assert calls == ["quantize_forward"]
    assert fused.failure() == "RuntimeError: Compiler: cc is not found"
    for result in (fallen_back, again):
        for got, expected in zip(result, eager, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_small_tensors_and_measuring_stay_eager(fresh_kernels):
    """Below MIN_ELEMENTS, and without gradients (what refinement measures and exports), the
    eager quantizer runs: it matches QuantizeLinear bit for bit."""
    small = torch.zeros(fused.MIN_ELEMENTS - 1)
    large = torch.zeros(fused.MIN_ELEMENTS)
    assert fused.kernel("forward", small) is None
    assert fused.kernel("forward", large) is not None
    with fused.compiled_kernels(False):
        assert fused.kernel("forward", large) is None
    calls = []
    fused._compiled["forward"] = lambda *args: calls.append(args)
    with torch.no_grad():
        fake_quantize(large, torch.tensor(0.1), 0.0, -8.0, 7.0)
    assert calls == []
