"""Whether an output holds class scores, whose top-1 agreement with float means something.

The fidelity check and `onnxq eval` report top-1 agreement (and eval the KL) only for outputs
that look like (samples, classes) scores: not an L2-normalised embedding, whose largest entry is
no class, and not TopK's values, sorted so that their first entry always wins.
"""

from __future__ import annotations

from math import lgamma, log

import numpy as np

# TopK's values come sorted, largest first, so their top-1 "agreement" is always 100 %: rows all
# sorted that way are taken for TopK's, not class scores, where class scores would come out so
# by chance at most this often (rows of w entries: (1/w!)^rows; one row of 8 or more, two of 5),
# and only from TOPK_WIDTH entries on: a 2-class classifier sure of one class on every sample
# (an orientation classifier on upright text) sorts its rows too.
SORTED_BY_CHANCE = 1e-4
TOPK_WIDTH = 5


def looks_like_scores(values: np.ndarray, samples: int | None = None) -> bool:
    """(samples, classes) or (samples, classes, 1, 1) with a few classes at least, and not an
    L2-normalised embedding (a face or image encoder's output), whose largest entry is no class.
    With `samples` (the run's), rows that are not one per sample (a batch-1 detector's
    [boxes, 4]) are no class scores."""
    if values.ndim < 2 or any(d != 1 for d in values.shape[2:]):
        return False
    if samples is not None and len(values) != samples:
        return False
    return values.shape[1] >= 2 and values.dtype.kind == "f" and not _unit_embeddings(values)


def sorted_like_topk(values: np.ndarray) -> bool:
    """Rows every one sorted largest first, too many of them for class scores sorted by chance:
    TopK's values, whose top-1 agreement says nothing."""
    rows = values.reshape(len(values), -1) if values.ndim else values.reshape(1, -1)
    return rows_descend(rows) and topk_values(len(rows), rows.shape[1])


def rows_descend(rows: np.ndarray) -> bool:
    """Every row sorted largest first (TopK's values)."""
    return bool((np.diff(rows, axis=1) <= 0).all())


def topk_values(sorted_rows: int, width: int) -> bool:
    """Whether `sorted_rows` rows of `width` entries, every one sorted largest first, are too many
    to be class scores sorted by chance (SORTED_BY_CHANCE)."""
    return (
        sorted_rows > 0 and width >= TOPK_WIDTH and sorted_rows * lgamma(width + 1) >= -log(SORTED_BY_CHANCE)
    )


def _unit_embeddings(values: np.ndarray) -> bool:
    """Rows of unit length with negative entries (probabilities, also of unit length when one
    class takes all, have none)."""
    rows = values.reshape(len(values), -1).astype(np.float64)
    return bool((rows < 0).any()) and bool(np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-3))
