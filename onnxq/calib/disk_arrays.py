"""Arrays in .npy files and .npz archives, read a slice of samples at a time.

numpy reads an .npz member whole, and a memory-mapped .npy keeps every page it has touched in
the process's resident memory until the system needs it back. Either way a calibration file
of 256 PP-OCR images at 640×640 (1.26 GB) stood in the peak of a run whose own working set is
under 1 GB. Reading the rows each slice needs with a plain file read keeps the data's share of
the peak at one slice. A compressed member (np.savez_compressed) is decompressed as its rows are
asked for, forward through one stream, so a pass over the slices in order decompresses it once.
Object arrays and Fortran-ordered arrays are none of this and are read as numpy reads them.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from onnxq.errors import OnnxqError

# what numpy raises on a truncated or corrupt .npy/.npz (a zip archive of compressed arrays)
UNREADABLE = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)

LOCAL_HEADER = struct.Struct(
    "<4s22xHH"
)  # a zip member's local header: signature, ..., name and extra lengths
READ_BYTES = 16 << 20  # a compressed member is copied into its rows this much at a time


class RowsOnDisk:
    """A C-ordered array stored raw at `offset` in `path`; slicing the first axis reads those rows."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype
        self.ndim = len(shape)
        self.row_items = int(np.prod(shape[1:], dtype=np.int64)) if shape else 1

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if not isinstance(rows, slice) or not self.shape:
            return np.asarray(self)[rows]  # anything but a slice of rows: read whole, as numpy would
        start, stop, step = rows.indices(len(self))
        return self._read(start, max(start, stop))[::step]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self._read(0, len(self)) if self.shape else self._read(0, 1).reshape(())
        return whole if dtype is None else whole.astype(dtype)

    def _read(self, start: int, stop: int) -> np.ndarray:
        count = (stop - start) * self.row_items
        flat = self._values(self.offset + start * self.row_items * self.dtype.itemsize, count)
        if flat.size != count:
            raise OnnxqError(f"cannot read data from {self.path}: the file ends inside its array (truncated)")
        return flat.reshape((stop - start, *self.shape[1:]))

    def _values(self, position: int, count: int) -> np.ndarray:
        """Up to `count` values from byte `position` of the file (fewer where it ends first)."""
        with open(self.path, "rb") as file:
            file.seek(position)
            return np.fromfile(file, dtype=self.dtype, count=count)


class CompressedRows(RowsOnDisk):
    """A compressed .npz member's array, its rows decompressed on demand.

    One stream stays open and moves forward: reading the slices in order decompresses the member
    once per pass; a row before the stream's position starts the stream again.
    """

    def __init__(self, path: Path, member: str, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        super().__init__(path, offset, shape, dtype)
        self.member = member
        self._archive: zipfile.ZipFile | None = None
        self._stream = None

    def _values(self, position: int, count: int) -> np.ndarray:
        """Up to `count` values from byte `position` of the member's data, decompressed."""
        flat = np.empty(count, dtype=self.dtype)
        try:
            filled = _fill(self._stream_at(position), memoryview(flat).cast("B"))
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            self.close()
            raise OnnxqError(f"cannot read data from {self.path}: {err}") from None
        return flat[: filled // self.dtype.itemsize]

    def _stream_at(self, position: int):
        """The member's stream at byte `position`: forward, it decompresses and drops what lies
        between; backward, zipfile starts the member again."""
        if self._stream is None:
            self._archive = zipfile.ZipFile(self.path)
            self._stream = self._archive.open(self.member)
        self._stream.seek(position)
        return self._stream

    def close(self) -> None:
        for handle in (self._stream, self._archive):
            if handle is not None:
                handle.close()
        self._stream = self._archive = None


def _fill(stream, target: memoryview) -> int:
    """Read the stream into `target` in pieces (no whole-slice bytes copy); the bytes filled."""
    filled = 0
    while filled < len(target):
        piece = stream.read(min(READ_BYTES, len(target) - filled))
        if not piece:
            break
        target[filled : filled + len(piece)] = piece
        filled += len(piece)
    return filled


def npy_rows(path: Path) -> RowsOnDisk | np.ndarray:
    """An .npy file as rows read on demand, or as numpy loads it where it cannot be."""
    with open(path, "rb") as file:
        found = _array_header(file)
    return RowsOnDisk(path, *found) if found else np.load(path)


def npz_member_rows(path: Path, archive: np.lib.npyio.NpzFile, name: str) -> RowsOnDisk | np.ndarray:
    """One .npz member as rows read on demand: stored ones by file reads, compressed ones by
    decompressing forward; an encrypted member, or one numpy finds by another name, read whole."""
    try:
        info = archive.zip.getinfo(f"{name}.npy")
    except KeyError:  # a member saved under another name: numpy finds it
        return archive[name]
    if info.flag_bits & 0x1:
        return archive[name]
    if info.compress_type != zipfile.ZIP_STORED:
        rows = _compressed_rows(path, archive, info)
        return archive[name] if rows is None else rows
    with open(path, "rb") as file:
        file.seek(info.header_offset)
        signature, name_length, extra_length = LOCAL_HEADER.unpack(file.read(LOCAL_HEADER.size))
        if signature != b"PK\x03\x04":
            return archive[name]
        file.seek(info.header_offset + LOCAL_HEADER.size + name_length + extra_length)
        found = _array_header(file)
    return RowsOnDisk(path, *found) if found else archive[name]


def _compressed_rows(
    path: Path, archive: np.lib.npyio.NpzFile, info: zipfile.ZipInfo
) -> CompressedRows | None:
    """A compressed member as CompressedRows, None where its header says numpy must read it."""
    with archive.zip.open(info) as stream:
        found = _array_header(stream)
    return CompressedRows(path, info.filename, *found) if found else None


def _array_header(file) -> tuple[int, tuple[int, ...], np.dtype] | None:
    """(data offset, shape, dtype) of the .npy header at the file's position; None where the array
    is not plain C-ordered data (object dtype, Fortran order) or the header is of a later version."""
    version = np.lib.format.read_magic(file)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        return None
    shape, fortran, dtype = readers[version](file)
    if dtype.hasobject or (fortran and len(shape) > 1):
        return None
    return file.tell(), tuple(shape), dtype
