"""Fake quantizers that match ONNX QuantizeLinear → DequantizeLinear, and the learned ones.

Forward: q = saturate(round_half_to_even(x / s) + z) in [qmin, qmax]; y = (q − z)·s, in float32
as onnxruntime computes it (torch.round rounds half to even). Backward: the straight-through
estimator for round, so activation steps learn as in LSQ. Weights learn their rounding as in
AdaRound: each integer is floor(w/s) + h(V), h a rectified sigmoid pushed to 0 or 1 by a
regulariser, and export takes h = [V ≥ 0], so every integer is within one step of nearest.

QPRep (RepAPQ): a weight may also learn a per-output-channel affine γ·y + β of its layer's
output. The layer is linear, so γ folds into the weight's per-channel scales and γ·b + β into the
bias at export: the deployed graph is the same QDQ graph with other scales and biases.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from onnxq.refine import fused

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches 0 and 1 exactly
MASK_LEVELS = 256  # a random mask's probability is rounded to a multiple of 1/MASK_LEVELS


def random_mask(like: torch.Tensor, probability: float, random: np.random.Generator) -> torch.Tensor:
    """QDrop's float elements: float32 ones and zeros in `like`'s shape and memory layout, each
    one with `probability` (to 1/MASK_LEVELS).

    One random byte per element from numpy's PCG64 costs about a third of torch's CPU uniform
    draw (mt19937, one float per element), which took a tenth of ResNet-20's refinement. The
    mask is float and laid out like the activation (channels-last after a conv) because torch's
    CPU selects on a random boolean mask (where, masked_fill) run 5-20 times slower than
    multiplications, which is what `blend` does with it."""
    count, level = like.numel(), round(probability * MASK_LEVELS)
    values = np.empty(count, np.float32)
    if 2 * level == MASK_LEVELS:  # QDrop's default, one half: a random bit per element does
        values[:] = np.unpackbits(np.frombuffer(random.bytes(-(-count // 8)), np.uint8), count=count)
    else:
        np.less(np.frombuffer(random.bytes(count), np.uint8), level, out=values, casting="unsafe")
    mask = torch.from_numpy(values)
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        batch, channels, height, width = like.shape
        return mask.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    return mask.reshape(like.shape)


def blend(
    keep: torch.Tensor, kept: torch.Tensor, other: torch.Tensor, *, in_place: bool = False
) -> torch.Tensor:
    """torch.where(keep == 1, kept, other) for a 0/1 float `keep` and finite values, exactly:
    other − other·keep + kept·keep, where every product is a value or a zero. `in_place` writes
    it into `other` (a tensor nothing else holds)."""
    target = other if in_place else other.clone()
    return target.sub_(target * keep).addcmul_(kept, keep)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: float,
    qmin: float,
    qmax: float,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear with one scale for the tensor; gradients as LSQ's
    straight-through estimator gives them. Elements where the 0/1 float `keep` is 1 stay float
    (QDrop): the same values and gradients as torch.where(keep == 1, x, fake_quantize(x)), in
    fewer passes over the tensor."""
    return _FakeQuantize.apply(x, scale, zero, qmin, qmax, keep)


class _FakeQuantize(torch.autograd.Function):
    """The backward pass keeps only x and recomputes the rest from it.

    Autograd of the plain expression (x / s, round, + z, clamp, − z, · s) keeps three tensors
    of x's size per quantizer; at 224×224 those dominated refinement's peak memory.
    Gradients: ∂y/∂x = 1 inside the integer range, 0 outside (round passes straight through);
    ∂y/∂s = round(x/s) − x/s inside, the saturated integer − z outside (LSQ). Elements QDrop
    keeps float pass the gradient to x and none to s. The mask is applied here rather than by a
    torch.where around the quantizer, whose backward pass would run two more full-size selects
    (a third of a MobileNetV2 unit's time went to selects).
    """

    @staticmethod
    def forward(ctx, x, scale, zero, qmin, qmax, keep):
        ctx.save_for_backward(x, scale, keep)
        ctx.bounds = (zero, qmin, qmax)
        if any(ctx.needs_input_grad[:2]):  # learning: one fused pass where it compiles
            result = fused.run("forward", x, scale, zero, qmin, qmax, keep)
            if result is not None:
                return result
        # One new tensor, updated in place: the same float32 operations in the same order as
        # (clamp(round(x / s) + z, qmin, qmax) − z)·s, without a temporary per operation (adding
        # and taking away a zero point of 0 changes no value, so those passes are skipped).
        y = x / scale
        if zero:
            y.round_().add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale)
        else:
            y.round_().clamp_(qmin, qmax).mul_(scale)
        return y if keep is None else blend(keep, x, y, in_place=True)

    @staticmethod
    def backward(ctx, grad):
        x, scale, keep = ctx.saved_tensors
        zero, qmin, qmax = ctx.bounds
        result = fused.run("backward", x, scale, zero, qmin, qmax, keep, grad)
        if result is not None:
            return result[0], result[1].reshape(scale.shape), None, None, None, None
        scaled = x / scale
        rounded = torch.round(scaled)
        # round(x/s) + z inside [qmin, qmax] ⇔ round(x/s) inside [qmin − z, qmax − z] (integers).
        # Masks are 0/1 floats made by arithmetic: torch's CPU compares and selects on them run
        # several times slower than these passes. Outside the range |round − clamp| ≥ 1.
        clamped = rounded.clamp(qmin - zero, qmax - zero)
        inside = rounded.sub_(clamped).abs_().clamp_(max=1.0).neg_().add_(1.0)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * (inside if keep is None else torch.maximum(inside, keep))
        grad_scale = None
        if ctx.needs_input_grad[1]:
            # round(x/s) − x/s inside, the saturated integer − z outside: each product is exact.
            step = clamped.addcmul_(scaled, inside, value=-1.0).mul_(grad)
            if keep is not None:
                step.sub_(step * keep)
            grad_scale = step.sum().reshape(scale.shape)
        return grad_x, grad_scale, None, None, None, None


class ActivationQuantizer(nn.Module):
    """Per-tensor activation quantizer whose step is learnable (LSQ), zero point fixed.

    `drop` (QDrop): while training, each element keeps its float value with this probability,
    which flattens the loss landscape the rounding is learned on; `random` draws which.
    """

    def __init__(self, scale: float, zero: int, qmin: int, qmax: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale), dtype=torch.float32))
        self.zero, self.qmin, self.qmax = float(zero), float(qmin), float(qmax)
        self.drop = 0.0
        self.random = np.random.default_rng(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropping = self.training and self.drop > 0
        keep_float = random_mask(x, self.drop, self.random).to(x.device) if dropping else None
        return fake_quantize(x, self.scale.clamp_min(1e-12), self.zero, self.qmin, self.qmax, keep_float)

    def learned_scale(self) -> np.float32:
        return np.float32(self.scale.detach().clamp_min(1e-12).item())


SEEDED_REST = 0.2  # h's distance from the integer a seeded weight starts on (see RoundingWeight)


class RoundingWeight(nn.Module):
    """A weight with fixed per-element scale and zero point and learnable rounding (AdaRound).

    Unseeded, h starts at w/s − floor(w/s), so the soft weight is the float weight and hard
    rounding is nearest rounding. Seeded with integers another rounding chose (GPTQ's), each
    weight may end on that integer or on its neighbour towards w/s, and h starts SEEDED_REST
    away from the seed: hard rounding starts on the seed."""

    def __init__(
        self,
        weight: np.ndarray,
        scale: np.ndarray,
        zero: np.ndarray,
        qmin: int,
        qmax: int,
        seed: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        scaled = torch.from_numpy(weight.astype(np.float32) / scale)
        floor = torch.floor(scaled)
        rest = scaled - floor
        if seed is not None:
            start = torch.from_numpy((seed.astype(np.float64) - zero).astype(np.float32))
            up = start > scaled  # the seed above w/s: its lower neighbour is the other choice
            floor = torch.where(up, start - 1, start)
            rest = torch.where(up, 1 - SEEDED_REST, SEEDED_REST).to(torch.float32)
        self.register_buffer("floor", floor)
        self.register_buffer("scale", torch.from_numpy(scale.astype(np.float32)))
        self.register_buffer("zero", torch.from_numpy(zero.astype(np.float32)))
        self.qmin, self.qmax = float(qmin), float(qmax)
        rest = rest.clamp(1e-4, 1 - 1e-4)
        self.logits = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.soft = False  # True while learning; False: hard rounding [V ≥ 0]
        self.gain: nn.Parameter | None = None  # QPRep's γ, shaped to broadcast on the weight
        self.shift: nn.Parameter | None = None  # QPRep's β, one per output channel

    def enable_affine(self, axis: int) -> None:
        """Learn QPRep's per-output-channel γ (from 1) and β (from 0) along `axis`."""
        shape = [1] * self.floor.dim()
        shape[axis] = self.floor.shape[axis]
        self.gain = nn.Parameter(torch.ones(shape))
        self.shift = nn.Parameter(torch.zeros(self.floor.shape[axis]))

    def channel_gain(self) -> torch.Tensor | None:
        """γ as one number per output channel, or None without QPRep."""
        return None if self.gain is None else self.gain.reshape(-1)

    def affine_parameters(self) -> list[nn.Parameter]:
        return [] if self.gain is None else [self.gain, self.shift]

    def _soft_rounding(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.logits) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def _integers(self) -> torch.Tensor:
        rounding = self._soft_rounding() if self.soft else (self.logits >= 0).to(self.floor.dtype)
        return torch.clamp(self.floor + rounding + self.zero, self.qmin, self.qmax)

    def forward(self) -> torch.Tensor:
        weight = (self._integers() - self.zero) * self.scale
        return weight if self.gain is None else weight * self.gain

    def regulariser(self, beta: float) -> torch.Tensor:
        """Σ 1 − |2h − 1|^β: zero once every h is 0 or 1."""
        return (1 - (2 * self._soft_rounding() - 1).abs().pow(beta)).sum()

    def integers(self) -> np.ndarray:
        """The exported integers: base + [V ≥ 0] + z, inside [qmin, qmax] (hard rounding)."""
        return self._integers().detach().cpu().numpy().astype(np.int64)
