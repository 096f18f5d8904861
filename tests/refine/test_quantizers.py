"""The fake quantizers match QuantizeLinear/DequantizeLinear, learn with LSQ's gradients, and
apply QDrop's masks exactly as a select around them would."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from onnxq.refine.quantizers import MASK_LEVELS, blend, fake_quantize, random_mask  # noqa: E402


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 8),
    st.booleans(),
    st.floats(1e-3, 10.0),
    st.integers(0, 10**6),
)
def test_fake_quantize_matches_quantize_linear(bits, signed, scale, seed):
    """Round half to even, saturation and zero points exactly as QuantizeLinear/DequantizeLinear."""
    from onnxq.quant import primitives as P

    target = P.IntRange.signed(bits) if signed else P.IntRange.unsigned(bits)
    zero = 0 if signed else int(rng(seed).integers(0, 2**bits))
    x = (rng(seed).standard_normal(200) * scale * 2**bits).astype(np.float32)
    x[:4] = np.float32(scale) * np.array([0.5, 1.5, -2.5, 3.5], np.float32)  # ties
    expected = P.dequantize(
        P.quantize(x, np.float32(scale), np.asarray(zero), target), np.float32(scale), np.asarray(zero)
    )
    got = fake_quantize(
        torch.from_numpy(x), torch.tensor(np.float32(scale)), float(zero), target.qmin, target.qmax
    )
    np.testing.assert_array_equal(got.numpy(), expected)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.booleans(), st.floats(1e-2, 10.0), st.integers(0, 10**6))
def test_fake_quantize_gradients_are_lsqs(bits, signed, scale, seed):
    """The memory-lean backward pass gives the gradients autograd gives the plain expression:
    straight through round inside the range, LSQ's step gradient."""
    from onnxq.quant import primitives as P

    target = P.IntRange.signed(bits) if signed else P.IntRange.unsigned(bits)
    zero = 0.0 if signed else float(rng(seed).integers(0, 2**bits))
    x = torch.from_numpy((rng(seed).standard_normal(300) * scale * 2**bits).astype(np.float32))
    upstream = torch.from_numpy(rng(seed + 1).standard_normal(300).astype(np.float32))

    def gradients(quantize):
        inputs = x.clone().requires_grad_(True)
        step = torch.tensor(np.float32(scale), requires_grad=True)
        (quantize(inputs, step) * upstream).sum().backward()
        return inputs.grad, step.grad

    def plain(inputs, step):
        scaled = inputs / step
        rounded = scaled + (torch.round(scaled) - scaled).detach()
        return (torch.clamp(rounded + zero, target.qmin, target.qmax) - zero) * step

    lean = gradients(lambda inputs, step: fake_quantize(inputs, step, zero, target.qmin, target.qmax))
    reference = gradients(plain)
    torch.testing.assert_close(lean[0], reference[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean[1], reference[1], rtol=1e-4, atol=1e-4 * float(upstream.abs().sum()))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.floats(1e-2, 10.0), st.floats(0.0, 1.0), st.integers(0, 10**6))
def test_qdrop_inside_the_quantizer_equals_a_select_around_it(bits, scale, drop, seed):
    """QDrop's float elements applied inside the fake quantizer give the values and gradients of
    torch.where(keep, x, fake_quantize(x)), the expression QDrop's paper writes (the mask a 0/1
    float there, which the quantizer multiplies by instead of selecting)."""
    qmax = 2.0**bits - 1
    zero = float(rng(seed).integers(0, 2**bits))
    x = torch.from_numpy((rng(seed).standard_normal(300) * scale * 2**bits).astype(np.float32))
    keep = torch.from_numpy((rng(seed + 2).random(300) < drop).astype(np.float32))
    upstream = torch.from_numpy(rng(seed + 1).standard_normal(300).astype(np.float32))

    def run(quantize):
        inputs = x.clone().requires_grad_(True)
        step = torch.tensor(np.float32(scale), requires_grad=True)
        output = quantize(inputs, step)
        (output * upstream).sum().backward()
        return output.detach(), inputs.grad, step.grad

    fused = run(lambda inputs, step: fake_quantize(inputs, step, zero, 0.0, qmax, keep))
    around = run(
        lambda inputs, step: torch.where(keep == 1, inputs, fake_quantize(inputs, step, zero, 0.0, qmax))
    )
    torch.testing.assert_close(fused[0], around[0], rtol=0, atol=0)
    torch.testing.assert_close(fused[1], around[1], rtol=0, atol=0)
    torch.testing.assert_close(fused[2], around[2], rtol=1e-5, atol=1e-4 * float(upstream.abs().sum()))


@settings(max_examples=20, deadline=None)
@given(st.floats(0.0, 1.0), st.integers(0, 10**6), st.booleans())
@example(0.5, 7, True)  # one half draws a bit per element instead of a byte
@example(0.5, 7, False)
def test_qdrop_masks_keep_each_element_with_the_probability_asked(probability, seed, channels_last):
    """QDrop's masks: 0/1 floats of the shape and memory layout asked, 1 at the rate asked (to
    1/MASK_LEVELS) within 4 binomial standard deviations, and the same mask again from the same
    seed."""
    like = torch.zeros(8, 16, 32, 30)
    if channels_last:
        like = like.contiguous(memory_format=torch.channels_last)
    mask = random_mask(like, probability, rng(seed))
    assert mask.dtype == torch.float32 and mask.shape == like.shape and mask.stride() == like.stride()
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
    rate = round(probability * MASK_LEVELS) / MASK_LEVELS
    count = mask.numel()
    assert abs(float(mask.mean()) - rate) <= 4 * np.sqrt(rate * (1 - rate) / count) + 1e-12
    assert torch.equal(mask, random_mask(like, probability, rng(seed)))


@settings(max_examples=30, deadline=None)
@given(st.floats(0.0, 1.0), st.floats(1e-30, 1e30), st.integers(0, 10**6))
def test_blend_selects_exactly_as_where_does(probability, magnitude, seed):
    """blend's arithmetic select gives torch.where's values exactly, whatever their size."""
    generator = rng(seed)
    kept = torch.from_numpy((generator.standard_normal(500) * magnitude).astype(np.float32))
    other = torch.from_numpy((generator.standard_normal(500) * magnitude).astype(np.float32))
    keep = torch.from_numpy((generator.random(500) < probability).astype(np.float32))
    expected = torch.where(keep == 1, kept, other)
    assert torch.equal(blend(keep, kept, other), expected)
