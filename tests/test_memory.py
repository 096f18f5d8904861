"""The allocator settings refinement's loops run under: set for the block, restored after it."""

from __future__ import annotations

import pytest

from onnxq import memory


class _FakeLibc:
    """mallopt and malloc_trim that record their calls; mallopt accepts or refuses."""

    def __init__(self, accepts: bool = True) -> None:
        self.calls: list[tuple] = []
        self.accepts = accepts

    def function(self, name: str):
        def mallopt(parameter: int, value: int) -> int:
            self.calls.append(("mallopt", parameter, value))
            return int(self.accepts)

        def malloc_trim(pad: int) -> int:
            self.calls.append(("malloc_trim", pad))
            return 1

        return {"mallopt": mallopt, "malloc_trim": malloc_trim}[name]


@pytest.fixture
def libc(monkeypatch) -> _FakeLibc:
    fake = _FakeLibc()
    monkeypatch.setattr(memory, "_libc", fake.function)
    return fake


def test_heap_allocations_turn_mmap_off_and_restore_the_default(libc):
    with memory.heap_allocations():
        assert libc.calls == [("mallopt", memory.M_MMAP_MAX, 0)]
    assert libc.calls[1:] == [("mallopt", memory.M_MMAP_MAX, memory.DEFAULT_MMAP_MAX), ("malloc_trim", 0)]


def test_heap_allocations_restore_the_default_when_the_block_fails(libc):
    with pytest.raises(RuntimeError, match="inside"), memory.heap_allocations():
        raise RuntimeError("inside")
    assert ("mallopt", memory.M_MMAP_MAX, memory.DEFAULT_MMAP_MAX) in libc.calls


def test_heap_allocations_change_nothing_where_mallopt_refuses(libc):
    libc.accepts = False
    with memory.heap_allocations():
        pass
    assert libc.calls == [("mallopt", memory.M_MMAP_MAX, 0)]


def test_heap_allocations_run_the_block_without_a_c_library(monkeypatch):
    monkeypatch.setattr(memory, "_libc", lambda name: None)
    ran = []
    with memory.heap_allocations():
        ran.append(True)
    assert ran == [True]


def test_the_real_allocator_accepts_the_setting_and_its_default_back():
    """On glibc (the CI's and this project's machines) mallopt takes both values."""
    mallopt = memory._libc("mallopt")
    if mallopt is None:
        pytest.skip("no mallopt in this C library")
    assert mallopt(memory.M_MMAP_MAX, 0) == 1
    assert mallopt(memory.M_MMAP_MAX, memory.DEFAULT_MMAP_MAX) == 1
