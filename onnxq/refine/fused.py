"""The fake quantizer's learning passes as compiled kernels, where torch can compile them.

While a unit learns, every activation quantizer runs about ten elementwise passes over its
tensor forward (divide, round, clamp, QDrop's random mask and select) and as many backward; on a
MobileNetV2 unit at 224×224 those passes, not the convolutions, took most of the time. torch's
compiler (inductor, which needs a C++ compiler at run time) fuses each direction into one loop.

Only learning uses them: values measured or exported go through the eager quantizer, which
matches QuantizeLinear/DequantizeLinear bit for bit. Where compiling fails (no C++ compiler, an
unsupported platform) the first failure switches the kernels off for the process and learning
goes on eagerly; `compiled_kernels(False)` switches them off on purpose.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch

# Tensors smaller than this stay eager: their passes are cheap, and every new layout costs a
# compilation of a few seconds. At 2^18, ResNet-20's refinement (32×32 inputs) took 95 s instead
# of 79 s; at 2^22 only large images' early layers (MobileNetV2: 56×56 and up, batch 32) compile.
MIN_ELEMENTS = 1 << 22

_state = {"enabled": True, "failure": ""}
_compiled: dict[str, Callable] = {}


def quantize_forward(x, scale, zero: float, qmin: float, qmax: float, keep):
    """(clamp(round(x / s) + z, qmin, qmax) − z)·s, x itself where `keep` is 1 (QDrop)."""
    y = (torch.clamp(torch.round(x / scale) + zero, qmin, qmax) - zero) * scale
    return y if keep is None else torch.where(keep != 0, x, y)


def quantize_backward(x, scale, zero: float, qmin: float, qmax: float, keep, grad):
    """LSQ's gradients with round passed straight through; kept elements pass grad to x only."""
    scaled = x / scale
    rounded = torch.round(scaled)
    low, high = qmin - zero, qmax - zero
    inside = (rounded >= low) & (rounded <= high)
    step = torch.where(inside, rounded - scaled, torch.clamp(rounded, low, high)) * grad
    if keep is None:
        return torch.where(inside, grad, 0.0), step.sum()
    kept = keep != 0
    return torch.where(inside | kept, grad, 0.0), torch.where(kept, 0.0, step).sum()


def kernel(name: str, x: torch.Tensor) -> Callable | None:
    """The compiled kernel `name` for a tensor like `x`, or None where the eager passes serve."""
    if not _state["enabled"] or _state["failure"] or x.numel() < MIN_ELEMENTS or x.device.type != "cpu":
        return None
    if name not in _compiled:
        function = {"forward": quantize_forward, "backward": quantize_backward}[name]
        _compiled[name] = torch.compile(function, dynamic=True)
    return _compiled[name]


def run(name: str, x: torch.Tensor, *args) -> tuple | torch.Tensor | None:
    """The compiled kernel's result, or None when there is none or it fails (then never again)."""
    compiled = kernel(name, x)
    if compiled is None:
        return None
    try:
        with _quiet_compiler():
            return compiled(x, *args)
    except Exception as error:  # a missing C++ compiler surfaces here, at the first call
        _state["failure"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        return None


def failure() -> str:
    """Why compiled kernels were switched off during this process, or ''."""
    return _state["failure"]


@contextlib.contextmanager
def compiled_kernels(enabled: bool) -> Iterator[None]:
    """Compiled kernels on or off inside the block (never on again once compiling has failed)."""
    before = _state["enabled"]
    _state["enabled"] = enabled
    try:
        yield
    finally:
        _state["enabled"] = before


@contextlib.contextmanager
def _quiet_compiler() -> Iterator[None]:
    """The compiler logs its own warnings (recompilations, fallbacks); onnxq's notes speak."""
    loggers = [logging.getLogger(name) for name in ("torch._dynamo", "torch._inductor")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
