"""numpy reference for quantization: integer ranges, scales, quantize and dequantize.

These are the definitions; every ONNX graph onnxq writes is tested against them.
Quantize follows ONNX QuantizeLinear: q = saturate(round_half_to_even(x / s) + z).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_TINY = np.float32(1e-12)


@dataclass(frozen=True)
class IntRange:
    """The integers a quantized tensor may take, and its numpy type in this reference.

    `container_bits` is the ONNX integer type that stores it: 2 (INT2/UINT2, opset 25), 4
    (INT4/UINT4, opset 21) or 8; widths without a type of their own (3, 5, 6, 7) use the next
    larger one, with values kept inside the narrower range.
    """

    qmin: int
    qmax: int
    dtype: type[np.integer]

    @classmethod
    def signed(cls, bits: int, *, narrow: bool = True) -> IntRange:
        """Symmetric weights: [-(2^(b-1)-1), 2^(b-1)-1] (narrow) keeps zero exactly in the middle."""
        top = 2 ** (bits - 1) - 1
        return cls(-top if narrow else -top - 1, top, np.int8 if bits <= 8 else np.int32)

    @classmethod
    def unsigned(cls, bits: int) -> IntRange:
        return cls(0, 2**bits - 1, np.uint8 if bits <= 8 else np.uint32)

    @property
    def signed_type(self) -> bool:
        return self.qmin < 0

    @property
    def bits(self) -> int:
        """The narrowest width holding [qmin, qmax]."""
        levels = self.qmax - self.qmin + 1
        return max(1, int(np.ceil(np.log2(levels))))

    @property
    def container_bits(self) -> int:
        if self.dtype in (np.int32, np.uint32):
            return 32
        return next(c for c in (2, 4, 8) if c >= self.bits)


def symmetric_scale(absmax: np.ndarray, target: IntRange) -> np.ndarray:
    """Scale mapping ±absmax onto ±qmax.

    A channel whose scale would be zero or subnormal (all-zero or denormal weights) gets scale 1:
    its weights quantize to 0, and a zero scale would divide by zero in QuantizeLinear.
    """
    absmax = np.asarray(absmax, np.float32)
    scale = absmax / np.float32(target.qmax)
    return np.where(scale >= np.finfo(np.float32).tiny, scale, np.float32(1.0)).astype(np.float32)


def affine_params(low: float, high: float, target: IntRange) -> tuple[np.float32, np.integer]:
    """Scale and zero point covering [low, high] widened to hold 0, with 0 exactly representable."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = np.float32((high - low) / (target.qmax - target.qmin))
    if scale <= _TINY:
        return np.float32(1.0), target.dtype(target.qmin if low == 0 else 0)
    zero_point = int(np.clip(np.round(target.qmin - low / scale), target.qmin, target.qmax))
    return scale, target.dtype(zero_point)


def weight_absmax(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """max |w| per slice along `axis` (per output channel), or over the whole tensor."""
    magnitude = np.abs(weight.astype(np.float32))
    if axis is None:
        return np.asarray(magnitude.max(), np.float32)
    other = tuple(i for i in range(weight.ndim) if i != axis)
    return magnitude.max(axis=other)


def quantize(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    target: IntRange,
    axis: int | None = None,
) -> np.ndarray:
    """QuantizeLinear, with saturation to the target range (which may be narrower than the type)."""
    scale, zero_point = broadcast(scale, x.ndim, axis), broadcast(zero_point, x.ndim, axis)
    q = np.rint(x.astype(np.float32) / scale) + zero_point.astype(np.int64)
    return np.clip(q, target.qmin, target.qmax).astype(target.dtype)


def dequantize(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None
) -> np.ndarray:
    """DequantizeLinear: (q - z) · s."""
    scale, zero_point = broadcast(scale, q.ndim, axis), broadcast(zero_point, q.ndim, axis)
    return ((q.astype(np.int64) - zero_point.astype(np.int64)) * scale).astype(np.float32)


def broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """A per-axis parameter shaped to broadcast against a tensor of `ndim` dimensions."""
    param = np.asarray(param)
    if axis is None or param.ndim == 0:
        return param
    shape = [1] * ndim
    shape[axis] = param.size
    return param.reshape(shape)
