"""Chunks of any size (file slices, images, a reader's dicts) into batches of the size asked,
copying only a batch that spans two chunks; and the fixed batch size a model may demand."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from onnxq.calib.inputs import Batch, InputSpec
from onnxq.errors import OnnxqError, first_line


def whole_batches(stream: Iterable[Batch], size: int, inputs: list[InputSpec], what: str):
    """A model with a fixed batch dimension runs only on batches of exactly that size."""
    total = 0
    for batch in stream:
        count = sample_count(batch)
        if count != size:
            name = inputs[0].name
            usable = total + count - (total + count) % size
            raise OnnxqError(
                f"{what}: {total + count} samples do not fill batches of {size}, the fixed batch "
                f"size of input {name!r}; give a multiple of {size} samples"
                + (f" (e.g. --max-samples {usable})" if usable else "")
            )
        total += count
        yield batch


def rebatch(
    chunks: Iterable[Batch], batch_size: int, max_samples: int | None, hint: str = ""
) -> Iterator[Batch]:
    pending: list[Batch] = []
    first: Batch | None = None
    pending_count = total = 0
    for chunk in chunks:
        count = sample_count(chunk)
        if max_samples is not None:
            count = min(count, max_samples - total)
            chunk = {k: v[:count] for k, v in chunk.items()}
        if count == 0:
            break
        first = first or chunk
        same_sample_shape(first, chunk, hint)
        pending.append(chunk)
        pending_count += count
        total += count
        while pending_count >= batch_size:
            batch, pending = take_samples(pending, batch_size, hint)
            pending_count -= batch_size
            yield batch
        if max_samples is not None and total >= max_samples:
            break
    if pending_count:
        yield concat_batches(pending, hint)


def same_sample_shape(first: Batch, chunk: Batch, hint: str) -> None:
    """Refuses a chunk whose samples are shaped unlike the first chunk's, whether or not a batch
    would span the two (those that do cannot be concatenated)."""
    for name, values in chunk.items():
        before = first.get(name)
        if before is not None and before.shape[1:] != values.shape[1:]:
            raise OnnxqError(
                f"calibration samples differ in shape: {name!r} {before.shape[1:]} and "
                f"{values.shape[1:]}{hint}"
            )


def take_samples(pieces: list[Batch], size: int, hint: str) -> tuple[Batch, list[Batch]]:
    """The first `size` samples of `pieces` and the pieces left. Only a batch that spans pieces is
    copied: concatenating the rest of each 64-sample chunk with the next copied the whole chunk
    (315 MB for 640×640 images)."""
    taken, need = [], size
    for index, piece in enumerate(pieces):
        count = sample_count(piece)
        if count >= need:
            taken.append({k: v[:need] for k, v in piece.items()})
            rest = [{k: v[need:] for k, v in piece.items()}] if count > need else []
            return concat_batches(taken, hint), rest + pieces[index + 1 :]
        taken.append(piece)
        need -= count
    raise AssertionError(f"fewer than {size} samples pending")


def sample_count(batch: Batch) -> int:
    return min((len(v) if v.ndim else 1) for v in batch.values()) if batch else 0


def concat_batches(parts: list[Batch], hint: str = "") -> Batch:
    if len(parts) == 1:
        return parts[0]
    try:
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    except ValueError as err:
        raise OnnxqError(f"calibration samples differ in shape: {first_line(err)}{hint}") from None
