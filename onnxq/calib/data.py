"""Calibration and evaluation data: arrays, image folders and onnxruntime data readers.

Every source becomes one stream of batches (`dict[input name, array]`), checked against the
model's inputs as it flows: dtype, rank, fixed dimensions, NaN/Inf, and not empty. Files are
read 64 samples or 32 MB at a time (onnxq.calib.disk_arrays, compressed .npz members too) and a
batch is copied only where it spans two of those slices, so memory stays bounded whatever the
data size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from onnxq.calib.disk_arrays import UNREADABLE, CompressedRows, npy_rows, npz_member_rows
from onnxq.calib.images import channel_axis, fitted_to_input, image_files, load_image, normalise, square_side
from onnxq.calib.inputs import (  # noqa: F401  (re-exported: where data meets the model's inputs)
    DYNAMIC_SIZE,
    SAMPLE_ELEMENTS,
    SMALL_DYNAMIC_SIZE,
    Batch,
    InputSpec,
    model_inputs,
    random_sample,
)
from onnxq.calib.labels import LABEL_KEYS, folder_labels, load_labels  # noqa: F401  (re-exported)
from onnxq.calib.rebatch import rebatch, sample_count, whole_batches
from onnxq.calib.sample_axes import (
    batch_inside,
    lend_batch_axes,
    one_sample_per_run,
    one_value_scalars,
    refuse_scalar_inputs,
    repeat_scalars,
    stacked_layout,
)
from onnxq.errors import OnnxqError, first_line
from onnxq.preprocess import Preprocess


class DataReader(Protocol):
    """onnxruntime's `CalibrationDataReader` interface: dicts of arrays until None."""

    def get_next(self) -> dict[str, np.ndarray] | None: ...


DataSource = str | Path | np.ndarray | dict[str, np.ndarray] | DataReader


LARGE_VALUE = 1e6  # inputs beyond this are almost surely missing their preprocessing


@dataclass
class DataStats:
    """What the stream saw, per input: extremes, for the checks made once it has ended."""

    low: dict[str, float] = field(default_factory=dict)
    high: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, array: np.ndarray) -> None:
        if array.size and array.dtype.kind in "fiu":
            self.low[name] = min(self.low.get(name, np.inf), float(array.min()))
            self.high[name] = max(self.high.get(name, -np.inf), float(array.max()))

    def warnings(self) -> list[str]:
        return [
            f"calibration values of input {name!r} reach {max(-self.low[name], high):.3g}: "
            "check the preprocessing (--scale, --mean/--std); quantized ranges follow them"
            for name, high in self.high.items()
            if max(-self.low[name], high) > LARGE_VALUE
        ]


def batches(
    source: DataSource,
    inputs: list[InputSpec],
    *,
    preprocess: Preprocess | None = None,
    batch_size: int = 8,
    max_samples: int | None = None,
    stats: DataStats | None = None,
    unbatched: list[str] | None = None,
) -> Iterator[Batch]:
    """Checked batches of model input from any supported source.

    A model whose batch dimension is fixed gets batches of exactly that size. With `stats`
    (calibration), data that is constant for an input is refused once the stream has ended:
    it gives ranges of zero width and a model that computes nothing useful. With `unbatched` (a
    list the caller reads once the first batch is out), an input that takes one sample without a
    batch axis ([3, H, W]) while the data stacks samples (N×3×H×W) gets batches of one sample with
    that axis kept, and its name goes into the list: the caller lends the model the axis
    (onnxq.passes.batch_axis). So do a scalar input (one value per sample, or one 0-d value for
    all) and an input whose batch axis is not its first (silero-vad's state [2, batch, 128],
    given as N×2×1×128). Without the list such data is refused.
    """
    what = _describe(source)
    if unbatched is None:
        refuse_scalar_inputs(inputs)
    chunks = _chunks(source, inputs, preprocess)
    if unbatched is not None:
        chunks, inputs = lend_batch_axes(chunks, inputs, unbatched)
    fixed = {spec.shape[0] for spec in inputs if spec.shape and spec.shape[0]}
    batch_size = next(iter(fixed)) if fixed else batch_size
    hint = _image_hint(source, preprocess, inputs)
    stream = rebatch(chunks, batch_size, max_samples, hint)
    if fixed:
        stream = whole_batches(stream, batch_size, inputs, what)
    yield from _checked(stream, inputs, what, hint, stats)


def first_batch(stream: Iterator[Batch]) -> tuple[Batch, Iterator[Batch]]:
    """Peek at the first batch without losing it from the stream."""
    first = next(stream)
    return first, itertools.chain([first], stream)


def peek_samples(
    stream: Iterator[Batch], samples: int, max_bytes: int | None = None
) -> tuple[list[Batch], Iterator[Batch]]:
    """The first batches holding at least `samples` samples (or all there are, or what fits in
    `max_bytes`, at least one batch), left in the stream."""
    taken: list[Batch] = []

    def held() -> int:
        return sum(array.nbytes for batch in taken for array in batch.values())

    while sum(sample_count(batch) for batch in taken) < samples and not (
        taken and max_bytes and held() >= max_bytes
    ):
        batch = next(stream, None)
        if batch is None:
            break
        taken.append(batch)
    return taken, itertools.chain(taken, stream)


# --- sources -------------------------------------------------------------------------------------


def _chunks(source: DataSource, inputs: list[InputSpec], pre: Preprocess | None) -> Iterator[Batch]:
    for chunk in _source_chunks(source, inputs, pre):
        yield repeat_scalars(chunk, inputs)


def _source_chunks(source: DataSource, inputs: list[InputSpec], pre: Preprocess | None) -> Iterator[Batch]:
    if isinstance(source, np.ndarray | dict):
        yield _arrays_to_batch(source, inputs, pre, "the given arrays")
    elif isinstance(source, str | Path):
        yield from _path_chunks(Path(source), inputs, pre)
    elif hasattr(source, "get_next"):
        yield from _reader_chunks(source)
    else:
        raise OnnxqError(f"unsupported calibration data of type {type(source).__name__}")


def _path_chunks(path: Path, inputs: list[InputSpec], pre: Preprocess | None) -> Iterator[Batch]:
    if not path.exists():
        raise OnnxqError(f"data not found: {path}")
    if path.is_dir():
        yield from _image_chunks(path, inputs, pre or Preprocess())
        return
    if path.suffix not in (".npy", ".npz"):
        raise OnnxqError(f"unsupported data file {path}: expected .npy, .npz or a folder of images")
    try:
        if path.suffix == ".npy":
            arrays = npy_rows(path)
        else:
            with np.load(path) as archive:
                arrays = _npz_arrays(archive, inputs, path)
    except UNREADABLE as err:
        raise OnnxqError(f"cannot read data from {path}: {first_line(err)}") from None
    try:
        yield from _sliced(arrays, inputs, pre, str(path))
    finally:  # a compressed member's open stream
        for rows in arrays.values() if isinstance(arrays, dict) else [arrays]:
            if isinstance(rows, CompressedRows):
                rows.close()


SLICE_SAMPLES = 64  # samples read from a file at a time, at most
SLICE_BYTES = 32 << 20  # and at most this much of them


def _npz_arrays(archive: Any, inputs: list[InputSpec], path: Path) -> dict[str, np.ndarray]:
    names = [spec.name for spec in inputs]
    if all(name in archive.files for name in names):
        return {name: npz_member_rows(path, archive, name) for name in names}
    candidates = [k for k in archive.files if k not in LABEL_KEYS and k != "all_test_labels"]
    if len(inputs) == 1 and ("x" in archive.files or len(candidates) == 1):
        return {names[0]: npz_member_rows(path, archive, "x" if "x" in archive.files else candidates[0])}
    raise OnnxqError(
        f"{path} must hold one array per model input ({', '.join(names)}); it has {', '.join(archive.files)}"
    )


def _sliced(data: np.ndarray | dict, inputs: list[InputSpec], pre: Preprocess | None, what: str):
    """Hand out big arrays in slices so integer data is converted one piece at a time."""
    arrays = data if isinstance(data, dict) else {inputs[0].name: data} if len(inputs) == 1 else None
    if arrays is None:
        raise OnnxqError(f"{what}: a single array can only feed a model with one input")
    names = {spec.name for spec in inputs}
    one_value = one_value_scalars(arrays, inputs)
    counts = {name: len(a) if a.ndim else 1 for name, a in arrays.items() if name in names - one_value}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name!r} {count}" for name, count in counts.items())
        inside = [spec for spec in batch_inside(inputs) if spec.name in counts]
        hint = f" ({stacked_layout(inside[0])})" if inside else ""
        raise OnnxqError(
            f"{what}: the inputs hold different numbers of samples ({listed}); each sample needs every "
            f"input{hint}"
        )
    count = min(counts.values(), default=0)
    rows = _slice_rows(arrays)
    for start in range(0, count, rows):
        part = {name: np.asarray(a if a.ndim == 0 else a[start : start + rows]) for name, a in arrays.items()}
        yield _arrays_to_batch(part, inputs, pre, what)


def _slice_rows(arrays: dict) -> int:
    """Samples per slice: 64, or fewer where 64 would pass SLICE_BYTES. A batch or the held-back
    samples taken from a slice without a copy keep the whole slice alive, and 64 of PP-OCR's
    640×640 images are 315 MB."""
    sample_bytes = sum(
        int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize for a in arrays.values() if a.ndim
    )
    return int(max(1, min(SLICE_SAMPLES, SLICE_BYTES // max(1, sample_bytes))))


def _arrays_to_batch(
    data: np.ndarray | dict, inputs: list[InputSpec], pre: Preprocess | None, what: str
) -> Batch:
    if isinstance(data, np.ndarray):
        if len(inputs) != 1:
            raise OnnxqError(f"{what}: a single array can only feed a model with one input")
        data = {inputs[0].name: data}
    batch = {}
    for spec in inputs:
        if spec.name not in data:
            raise OnnxqError(f"{what}: no data for model input {spec.name!r}")
        array = np.asarray(data[spec.name])
        if pre is not None and np.issubdtype(array.dtype, np.integer) and spec.dtype.kind == "f":
            array = normalise(array.astype(np.float32) * pre.scale, pre, axis=channel_axis(pre))
        if array.dtype.kind == "f" and spec.dtype.kind == "f":
            array = array.astype(spec.dtype, copy=False)  # numpy's float64 default, a float16 export
        batch[spec.name] = array
    return batch


def _reader_chunks(reader: DataReader) -> Iterator[Batch]:
    while (item := reader.get_next()) is not None:
        yield {name: np.asarray(value) for name, value in item.items()}


def _image_chunks(folder: Path, inputs: list[InputSpec], pre: Preprocess) -> Iterator[Batch]:
    if len(inputs) != 1:
        raise OnnxqError("an image folder can only feed a model with one input")
    files = image_files(folder)
    if not files:
        raise OnnxqError(f"no images found in {folder}")
    spec = inputs[0]
    pre = fitted_to_input(pre, spec.shape, spec.dtype)
    for file in files:
        yield {spec.name: load_image(file, pre)[None].astype(spec.dtype, copy=False)}


# --- batching and checks -------------------------------------------------------------------------


def _image_hint(source: DataSource, pre: Preprocess | None, inputs: list[InputSpec]) -> str:
    """Images decoded at their own size, or at a preset's, may not fit a model: say how to size
    them, with the model's own size where its input fixes one."""
    if not (isinstance(source, str | Path) and Path(source).is_dir()):
        return ""
    spec = inputs[0] if inputs else None
    fitted = fitted_to_input(pre or Preprocess(), spec.shape, spec.dtype) if spec else None
    side = square_side(spec.shape, fitted) if spec else None
    if side is not None and not (pre and pre.crop == side):
        named = [name for name in ("imagenet", "cifar10") if Preprocess.preset(name).crop == side]
        preset = f"--preset {named[0]}, or " if named else ""
        return f" (the model takes {side}×{side} images: add {preset}--resize {side} --crop {side})"
    if not (pre and (pre.resize or pre.crop)):
        return " (images are used at their own size: add --preset imagenet or --resize/--crop)"
    return ""


def _checked(
    stream: Iterable[Batch], inputs: list[InputSpec], what: str, hint: str, stats: DataStats | None
) -> Iterator[Batch]:
    seen = False
    for batch in stream:
        for spec in inputs:
            _check_array(batch.get(spec.name), spec, what, hint)
            if stats is not None:
                stats.add(spec.name, batch[spec.name])
        seen = True
        yield batch
    if not seen:
        raise OnnxqError(f"no samples in {what}")
    if stats is not None and stats.low and all(low == stats.high[n] for n, low in stats.low.items()):
        values = ", ".join(f"{name!r} is {low:g}" for name, low in stats.low.items())
        raise OnnxqError(
            f"{what}: every calibration value of input {values}; constant data gives no ranges to "
            "quantize with"
        )


def _check_array(array: np.ndarray | None, spec: InputSpec, what: str, hint: str = "") -> None:
    if array is None:
        raise OnnxqError(f"{what}: no data for model input {spec.name!r}")
    if array.dtype != spec.dtype:
        hint = " (give preprocessing: --preset or --mean/--std)" if array.dtype.kind in "ui" else ""
        raise OnnxqError(
            f"{what}: data for input {spec.name!r} is {array.dtype}, the model expects {spec.dtype}{hint}"
        )
    if one_sample_per_run(array, spec):
        shape = "×".join(str(d) for d in spec.shape)
        raise OnnxqError(
            f"{what}: input {spec.name!r} takes one sample without a batch axis ({shape}), so its "
            "data cannot be batched; onnxq calibrates models whose inputs start with a batch "
            "axis: export the model with one (a dynamic first dimension)"
        )
    shapeless = not spec.shape and not spec.scalar  # the model declares no shape: any will do
    if not shapeless and (
        array.ndim != len(spec.shape)
        or any(
            want is not None and want != got
            for want, got in zip(spec.shape[1:], array.shape[1:], strict=False)
        )
    ):
        want = "×".join("?" if d is None else str(d) for d in spec.shape)
        raise OnnxqError(
            f"{what}: data for input {spec.name!r} has shape {list(array.shape)}, the model expects "
            f"{want}{hint}"
        )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise OnnxqError(f"{what}: data for input {spec.name!r} contains NaN or infinite values")


def _describe(source: DataSource) -> str:
    if isinstance(source, str | Path):
        return str(source)
    return "the calibration data reader" if hasattr(source, "get_next") else "the given arrays"
