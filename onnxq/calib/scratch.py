"""Working arrays reused from call to call instead of allocated afresh.

Calibration passes tens of MB of activations per run through numpy temporaries. A fresh array
of that size is new memory to the process (glibc maps blocks that large on their own and unmaps
them when freed), and first touching it costs far more than the arithmetic on a virtual machine
whose host reclaims idle pages: a histogram update of a 77 MB activation took 0.4-0.8 s on fresh
memory and 0.03 s on memory reused. One buffer per dtype grows to the largest request and is
reused by every caller; a caller must be done with its view before it asks again.
"""

from __future__ import annotations

import numpy as np

_buffers: dict[np.dtype, np.ndarray] = {}


def scratch(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """An uninitialised array of `shape` on the reused buffer of `dtype`."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape))
    buffer = _buffers.get(dtype)
    if buffer is None or buffer.size < size:
        buffer = _buffers[dtype] = np.empty(size, dtype)
    return buffer[:size].reshape(shape)


def release() -> None:
    """Drop the buffers (their memory goes back once nothing views them)."""
    _buffers.clear()
