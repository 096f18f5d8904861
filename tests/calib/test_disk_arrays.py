"""Calibration files read a slice at a time: the same samples as numpy's whole read, in the same
batches, with only the slice in memory."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.calib.data import InputSpec, batches
from onnxq.calib.disk_arrays import CompressedRows, RowsOnDisk, npy_rows, npz_member_rows
from onnxq.errors import OnnxqError

DTYPES = (np.float32, np.float64, np.uint8, np.int16, np.float16)


@settings(max_examples=30, deadline=None)
@given(
    samples=st.integers(0, 70),
    sample_shape=st.lists(st.integers(1, 4), max_size=3),
    dtype=st.sampled_from(DTYPES),
    start=st.integers(0, 80),
    stop=st.integers(0, 80),
)
def test_rows_read_on_demand_equal_numpys_whole_read(
    tmp_path_factory, samples, sample_shape, dtype, start, stop
):
    folder = tmp_path_factory.mktemp("rows")
    array = np.arange(samples * int(np.prod(sample_shape)), dtype=np.float64).astype(dtype)
    array = array.reshape((samples, *sample_shape))
    np.save(folder / "a.npy", array)
    np.savez(folder / "stored.npz", x=array, y=np.arange(samples))
    np.savez_compressed(folder / "packed.npz", x=array)
    on_disk = [npy_rows(folder / "a.npy")]
    for name in ("stored", "packed"):
        with np.load(folder / f"{name}.npz") as archive:
            on_disk.append(npz_member_rows(folder / f"{name}.npz", archive, "x"))
    assert isinstance(on_disk[0], RowsOnDisk) and isinstance(on_disk[1], RowsOnDisk)
    assert isinstance(on_disk[2], CompressedRows)
    for rows in on_disk:
        assert len(rows) == samples and rows.shape == array.shape
        np.testing.assert_array_equal(rows[start:stop], array[start:stop])
        assert rows[start:stop].dtype == array.dtype
        np.testing.assert_array_equal(np.asarray(rows), array)
        np.testing.assert_array_equal(rows[start:stop], array[start:stop])  # again, behind the stream


def test_a_compressed_member_read_in_order_is_decompressed_once(tmp_path, monkeypatch):
    """Slices asked for in order continue one stream; one before its position starts it again."""
    array = np.random.default_rng(0).normal(size=(200, 3, 5)).astype(np.float32)
    np.savez_compressed(tmp_path / "packed.npz", x=array)
    with np.load(tmp_path / "packed.npz") as archive:
        rows = npz_member_rows(tmp_path / "packed.npz", archive, "x")
    starts = []  # zipfile makes a decompressor where a member's stream starts, or starts again
    real = zipfile._get_decompressor
    monkeypatch.setattr(zipfile, "_get_decompressor", lambda kind: starts.append(kind) or real(kind))
    for start in range(0, 200, 64):
        np.testing.assert_array_equal(rows[start : start + 64], array[start : start + 64])
    assert len(starts) == 1
    np.testing.assert_array_equal(rows[10:20], array[10:20])
    assert len(starts) == 2


def test_a_corrupt_compressed_member_is_refused_with_a_one_line_error(tmp_path):
    np.savez_compressed(tmp_path / "packed.npz", x=np.random.default_rng(1).normal(size=(300, 40)))
    data = bytearray((tmp_path / "packed.npz").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = np.random.default_rng(2).bytes(64)  # damage the deflate stream
    (tmp_path / "packed.npz").write_bytes(bytes(data))
    spec = [InputSpec("input", np.dtype(np.float64), (None, 40))]
    with pytest.raises(OnnxqError, match=r"cannot read data from .*packed\.npz: ") as caught:
        list(batches(tmp_path / "packed.npz", spec, batch_size=64))
    assert "\n" not in str(caught.value)


def test_object_and_fortran_arrays_are_read_as_numpy_reads_them(tmp_path):
    fortran = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    np.save(tmp_path / "f.npy", fortran)
    np.savez(tmp_path / "f.npz", x=fortran)
    assert isinstance(npy_rows(tmp_path / "f.npy"), np.ndarray)
    with np.load(tmp_path / "f.npz") as archive:
        member = npz_member_rows(tmp_path / "f.npz", archive, "x")
    assert isinstance(member, np.ndarray)
    np.testing.assert_array_equal(member, fortran)


def test_a_truncated_file_is_refused_with_a_one_line_error(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((10, 3, 4, 4), np.float32))
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "a.npy").write_bytes(data[: len(data) // 2])
    spec = [InputSpec("input", np.dtype(np.float32), (None, 3, 4, 4))]
    with pytest.raises(OnnxqError, match=r"a\.npy: the file ends inside its array"):
        list(batches(tmp_path / "a.npy", spec, batch_size=4))


@settings(max_examples=25, deadline=None)
@given(samples=st.integers(1, 200), batch_size=st.integers(1, 70), limit=st.none() | st.integers(1, 200))
def test_a_stored_npz_gives_the_batches_of_the_array_in_memory(tmp_path_factory, samples, batch_size, limit):
    """Files go in 64-sample slices and batches across them; in-memory arrays are the reference."""
    folder = tmp_path_factory.mktemp("batches")
    array = np.random.default_rng(samples).normal(size=(samples, 2, 3)).astype(np.float32)
    np.savez(folder / "data.npz", input=array)
    spec = [InputSpec("input", np.dtype(np.float32), (None, 2, 3))]
    from_file = list(batches(folder / "data.npz", spec, batch_size=batch_size, max_samples=limit))
    wanted = array[:limit]
    assert [len(b["input"]) for b in from_file[:-1]] == [batch_size] * (len(from_file) - 1)
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in from_file]), wanted)


def test_chunks_of_different_sample_shapes_are_refused_at_a_batch_boundary(tmp_path):
    """A batch that ends where a chunk ends never concatenates the two: the shapes are compared."""

    class Reader:
        def __init__(self):
            self.items = iter(
                [{"input": np.ones((4, 3, 8, 8), np.float32)}, {"input": np.ones((4, 3, 9, 9), np.float32)}]
            )

        def get_next(self):
            return next(self.items, None)

    spec = [InputSpec("input", np.dtype(np.float32), (None, 3, None, None))]
    with pytest.raises(OnnxqError, match="differ in shape"):
        list(batches(Reader(), spec, batch_size=4))


@pytest.mark.parametrize("compressed", [False, True])
def test_big_samples_are_read_a_few_at_a_time(tmp_path, monkeypatch, compressed):
    """A slice holds at most SLICE_BYTES of samples, so a batch kept as a view of it (the held-back
    samples, the first batch) pins little; the batches are those of the array in memory."""
    from onnxq.calib import data as data_module

    array = np.random.default_rng(3).normal(size=(50, 3, 4, 4)).astype(np.float32)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "data.npz", input=array)
    monkeypatch.setattr(data_module, "SLICE_BYTES", 4 * array[0].nbytes + 1)
    reads = []
    real = CompressedRows._read if compressed else RowsOnDisk._read
    owner = CompressedRows if compressed else RowsOnDisk
    monkeypatch.setattr(
        owner, "_read", lambda self, start, stop: reads.append(stop - start) or real(self, start, stop)
    )
    spec = [InputSpec("input", np.dtype(np.float32), (None, 3, 4, 4))]
    got = list(batches(tmp_path / "data.npz", spec, batch_size=7))
    assert max(reads) == 4 and sum(reads) == 50
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in got]), array)
    assert [len(b["input"]) for b in got] == [7] * 7 + [1]
