"""Hand freed heap memory back to the operating system between large stages.

glibc keeps memory freed by numpy, torch and onnxruntime in its heaps for reuse; after a stage
that held large activations, that slack stays resident (about 1.1 GB after MobileNetV2's
calibration) and the next stage's peak lands on top of it. `malloc_trim(0)` returns the free
pages. Elsewhere (musl, macOS, Windows) it does nothing: those allocators return memory
themselves or offer no such call.
"""

from __future__ import annotations

import ctypes
import functools
import gc


@functools.cache
def _malloc_trim():
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # the C library already loaded
    except (OSError, TypeError):  # TypeError: Windows has no process-wide handle
        return None


def release_free_memory() -> None:
    """Collect unreachable objects, then return the allocator's free pages (glibc only)."""
    gc.collect()
    return_free_pages()


def return_free_pages() -> None:
    """Only the allocator's free pages, without a garbage collection: cheap enough to call
    after each step that allocates and frees tensors of tens of MB, which glibc would otherwise
    keep (its mmap threshold rises to the largest block freed, so the next ones come from the
    heap and stay resident)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
