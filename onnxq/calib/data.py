"""Calibration and evaluation data: arrays, image folders and onnxruntime data readers.

Every source becomes one stream of batches (`dict[input name, array]`), checked against the
model's inputs as it flows: dtype, rank, fixed dimensions, NaN/Inf, and not empty. Nothing holds
more than one batch, so memory stays bounded whatever the data size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from onnxq.config import Preprocess
from onnxq.errors import OnnxqError

Batch = dict[str, np.ndarray]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
LABEL_KEYS = ("y", "label", "labels")


class DataReader(Protocol):
    """onnxruntime's `CalibrationDataReader` interface: dicts of arrays until None."""

    def get_next(self) -> dict[str, np.ndarray] | None: ...


@dataclass(frozen=True)
class InputSpec:
    """A model input as data must match it: name, numpy dtype and shape (None = any size)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are not initializers."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


DataSource = str | Path | np.ndarray | dict[str, np.ndarray] | DataReader


def random_sample(inputs: list[InputSpec], batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal inputs (unknown sizes set to `batch`): enough to compare two graphs' outputs."""
    rng = np.random.default_rng(seed)
    sample = {}
    for spec in inputs:
        shape = tuple(batch if d is None or d <= 0 else d for d in spec.shape)
        sample[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return sample


def batches(
    source: DataSource,
    inputs: list[InputSpec],
    *,
    preprocess: Preprocess | None = None,
    batch_size: int = 8,
    max_samples: int | None = None,
) -> Iterator[Batch]:
    """Checked batches of model input from any supported source.

    A model whose batch dimension is fixed gets batches of exactly that size.
    """
    fixed = {spec.shape[0] for spec in inputs if spec.shape and spec.shape[0]}
    if fixed:
        batch_size = fixed.pop()
    chunks = _chunks(source, inputs, preprocess)
    yield from _checked(_rebatch(chunks, batch_size, max_samples), inputs, _describe(source))


def first_batch(stream: Iterator[Batch]) -> tuple[Batch, Iterator[Batch]]:
    """Peek at the first batch without losing it from the stream."""
    first = next(stream)
    return first, itertools.chain([first], stream)


def load_labels(path: str | Path) -> np.ndarray:
    """Integer labels from .npy, .txt (one per line) or .npz (key y / label / labels)."""
    path = Path(path)
    if not path.is_file():
        raise OnnxqError(f"labels file not found: {path}")
    try:
        if path.suffix == ".txt":
            return np.array([int(line.split()[-1]) for line in path.read_text().split("\n") if line.strip()])
        if path.suffix == ".npz":
            with np.load(path) as archive:
                key = next((k for k in LABEL_KEYS if k in archive.files), None)
                if key is None:
                    raise OnnxqError(f"{path} has no labels array (looked for {', '.join(LABEL_KEYS)})")
                return np.asarray(archive[key]).astype(np.int64).ravel()
        return np.load(path).astype(np.int64).ravel()
    except (ValueError, OSError) as err:
        raise OnnxqError(f"cannot read labels from {path}: {err}") from None


def folder_labels(folder: str | Path) -> np.ndarray | None:
    """Labels implied by an image folder: class subfolders in sorted order, or labels.txt."""
    folder = Path(folder)
    if (folder / "labels.txt").is_file():
        return load_labels(folder / "labels.txt")
    files = _image_files(folder)
    if not files or all(f.parent == folder for f in files):
        return None
    classes = sorted({f.parent.name for f in files})
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[f.parent.name] for f in files], dtype=np.int64)


# --- sources -------------------------------------------------------------------------------------


def _chunks(source: DataSource, inputs: list[InputSpec], pre: Preprocess | None) -> Iterator[Batch]:
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
        loaded = np.load(path, mmap_mode="r" if path.suffix == ".npy" else None)
    except (ValueError, OSError) as err:
        raise OnnxqError(f"cannot read data from {path}: {err}") from None
    if isinstance(loaded, np.ndarray):
        yield from _sliced(loaded, inputs, pre, str(path))
        return
    with loaded:
        arrays = _npz_arrays(loaded, inputs, path)
    yield from _sliced(arrays, inputs, pre, str(path))


def _npz_arrays(archive: Any, inputs: list[InputSpec], path: Path) -> dict[str, np.ndarray]:
    names = [spec.name for spec in inputs]
    if all(name in archive.files for name in names):
        return {name: archive[name] for name in names}
    candidates = [k for k in archive.files if k not in LABEL_KEYS and k != "all_test_labels"]
    if len(inputs) == 1 and ("x" in archive.files or len(candidates) == 1):
        return {names[0]: archive["x" if "x" in archive.files else candidates[0]]}
    raise OnnxqError(
        f"{path} must hold one array per model input ({', '.join(names)}); it has {', '.join(archive.files)}"
    )


def _sliced(data: np.ndarray | dict, inputs: list[InputSpec], pre: Preprocess | None, what: str):
    """Hand out big arrays in slices so integer data is converted one piece at a time."""
    arrays = data if isinstance(data, dict) else {inputs[0].name: data} if len(inputs) == 1 else None
    if arrays is None:
        raise OnnxqError(f"{what}: a single array can only feed a model with one input")
    count = min(len(np.atleast_1d(a)) for a in arrays.values())
    for start in range(0, count, 64):
        part = {name: np.asarray(a[start : start + 64]) for name, a in arrays.items()}
        yield _arrays_to_batch(part, inputs, pre, what)


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
            array = _normalise(array.astype(np.float32) * pre.scale, pre, channel_axis=_channel_axis(pre))
        batch[spec.name] = array
    return batch


def _reader_chunks(reader: DataReader) -> Iterator[Batch]:
    while (item := reader.get_next()) is not None:
        yield {name: np.asarray(value) for name, value in item.items()}


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _image_chunks(folder: Path, inputs: list[InputSpec], pre: Preprocess) -> Iterator[Batch]:
    if len(inputs) != 1:
        raise OnnxqError("an image folder can only feed a model with one input")
    files = _image_files(folder)
    if not files:
        raise OnnxqError(f"no images found in {folder}")
    for file in files:
        yield {inputs[0].name: load_image(file, pre)[None].astype(inputs[0].dtype, copy=False)}


def load_image(path: Path, pre: Preprocess) -> np.ndarray:
    """Decode one image with Pillow and preprocess it like torchvision (bilinear resize, centre crop)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise OnnxqError(f"cannot decode image {path}: {err}") from None
    if pre.resize:
        w, h = image.size
        short = min(w, h)
        size = (pre.resize, int(pre.resize * h / w)) if w == short else (int(pre.resize * w / h), pre.resize)
        image = image.resize(size, Image.BILINEAR)
    if pre.crop:
        w, h = image.size
        if pre.crop > min(w, h):
            raise OnnxqError(f"crop {pre.crop} is larger than image {path} ({w}×{h}); add --resize")
        left, top = round((w - pre.crop) / 2.0), round((h - pre.crop) / 2.0)
        image = image.crop((left, top, left + pre.crop, top + pre.crop))
    array = np.asarray(image, dtype=np.float32) * pre.scale  # H, W, C
    array = _normalise(array, pre, channel_axis=-1)
    return array.transpose(2, 0, 1) if pre.layout == "NCHW" else array


def _channel_axis(pre: Preprocess) -> int:
    return 1 if pre.layout == "NCHW" else -1


def _normalise(array: np.ndarray, pre: Preprocess, channel_axis: int) -> np.ndarray:
    if not pre.mean:
        return array
    shape = [1] * array.ndim
    shape[channel_axis] = len(pre.mean)
    if array.shape[channel_axis] != len(pre.mean):
        raise OnnxqError(
            f"mean/std have {len(pre.mean)} channels but the data has {array.shape[channel_axis]}"
        )
    mean = np.asarray(pre.mean, np.float32).reshape(shape)
    std = np.asarray(pre.std, np.float32).reshape(shape)
    return (array - mean) / std


# --- batching and checks -------------------------------------------------------------------------


def _rebatch(chunks: Iterable[Batch], batch_size: int, max_samples: int | None) -> Iterator[Batch]:
    pending: list[Batch] = []
    pending_count = total = 0
    for chunk in chunks:
        count = _count(chunk)
        if max_samples is not None:
            count = min(count, max_samples - total)
            chunk = {k: v[:count] for k, v in chunk.items()}
        if count == 0:
            break
        pending.append(chunk)
        pending_count += count
        total += count
        while pending_count >= batch_size:
            merged = _concat(pending)
            yield {k: v[:batch_size] for k, v in merged.items()}
            rest = {k: v[batch_size:] for k, v in merged.items()}
            pending, pending_count = [rest], pending_count - batch_size
        if max_samples is not None and total >= max_samples:
            break
    if pending_count:
        yield _concat(pending)


def _count(batch: Batch) -> int:
    return min((len(v) if v.ndim else 1) for v in batch.values()) if batch else 0


def _concat(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    try:
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    except ValueError as err:
        raise OnnxqError(f"calibration samples differ in shape: {err}") from None


def _checked(stream: Iterable[Batch], inputs: list[InputSpec], what: str) -> Iterator[Batch]:
    seen = False
    for batch in stream:
        for spec in inputs:
            _check_array(batch.get(spec.name), spec, what)
        seen = True
        yield batch
    if not seen:
        raise OnnxqError(f"no samples in {what}")


def _check_array(array: np.ndarray | None, spec: InputSpec, what: str) -> None:
    if array is None:
        raise OnnxqError(f"{what}: no data for model input {spec.name!r}")
    if array.dtype != spec.dtype:
        hint = " (give preprocessing: --preset or --mean/--std)" if array.dtype.kind in "ui" else ""
        raise OnnxqError(
            f"{what}: data for input {spec.name!r} is {array.dtype}, the model expects {spec.dtype}{hint}"
        )
    if array.ndim != len(spec.shape) or any(
        want is not None and want != got for want, got in zip(spec.shape[1:], array.shape[1:], strict=False)
    ):
        want = "×".join("?" if d is None else str(d) for d in spec.shape)
        raise OnnxqError(
            f"{what}: data for input {spec.name!r} has shape {list(array.shape)}, the model expects {want}"
        )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise OnnxqError(f"{what}: data for input {spec.name!r} contains NaN or infinite values")


def _describe(source: DataSource) -> str:
    if isinstance(source, str | Path):
        return str(source)
    return "the calibration data reader" if hasattr(source, "get_next") else "the given arrays"
