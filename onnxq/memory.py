"""How the C library's allocator holds memory across stages and loops (glibc only).

glibc keeps memory freed by numpy, torch and onnxruntime in its heaps for reuse; after a stage
that held large activations, that slack stays resident (about 1.1 GB after MobileNetV2's
calibration) and the next stage's peak lands on top of it. `malloc_trim(0)` returns the free
pages. Inside a loop that allocates and frees the same large tensors over and over, the opposite
holds: `heap_allocations` keeps them in the heap for reuse. Elsewhere (musl, macOS, Windows)
both do nothing: those allocators manage memory themselves or offer no such calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
from collections.abc import Iterator

M_MMAP_MAX = -4  # mallopt's parameter: how many blocks glibc may serve by mmap at once
DEFAULT_MMAP_MAX = 65536  # glibc's default for it


@functools.cache
def _libc(name: str):
    """A function of the C library already loaded, or None where there is none by that name."""
    try:
        return getattr(ctypes.CDLL(None), name, None)
    except (OSError, TypeError):  # TypeError: Windows has no process-wide handle
        return None


@contextlib.contextmanager
def heap_allocations() -> Iterator[None]:
    """Large blocks served from the heap and reused, not mapped afresh, for the duration.

    glibc maps every block above 32 MB (its largest mmap threshold) on its own and unmaps it
    when freed, so each new one starts as untouched pages and faults them in one by one. A
    refinement iteration at 224×224 allocates and frees dozens of such activations and their
    gradients: on MobileNetV2 the page faults cost half of an iteration of its first units
    (1.3 → 0.7 s). Within the block, freed memory stays in the heap for the next iteration;
    afterwards the default comes back and the free pages are returned."""
    mallopt = _libc("mallopt")
    if mallopt is None or not mallopt(M_MMAP_MAX, 0):
        yield
        return
    try:
        yield
    finally:
        mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        return_free_pages()


def release_free_memory() -> None:
    """Collect unreachable objects, then return the allocator's free pages (glibc only)."""
    gc.collect()
    return_free_pages()


def return_free_pages() -> None:
    """Only the allocator's free pages, without a garbage collection: cheap enough to call
    after each step that allocates and frees tensors of tens of MB, which glibc would otherwise
    keep (its mmap threshold rises to the largest block freed, so the next ones come from the
    heap and stay resident)."""
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)
