"""Calibration inputs shaped by the BatchNorm statistics kept when folding (PD-Quant, ZeroQ).

- Distribution correction: a few hundred calibration images over-fit the refinement; nudging
  them so that the per-channel mean and standard deviation they produce at every folded layer
  match the statistics BatchNorm recorded over the whole training set, while staying close to
  the originals, makes them stand for that set better (PD-Quant's DC).
- Data-free calibration: the same statistics-matching loss, started from noise, synthesises
  calibration inputs for a user who has no data (ZeroQ's distilled data).

Both run the float model in the refinement's torch mirror, so they need the `refine` extra.
"""

from __future__ import annotations

from onnxq.refine import require_torch


def correct_distribution(*args, **kwargs):
    """See onnxq.correct.matching.correct_distribution (torch is imported only when called)."""
    require_torch()
    from onnxq.correct.matching import correct_distribution as run

    return run(*args, **kwargs)


def synthesize(*args, **kwargs):
    """See onnxq.correct.matching.synthesize (torch is imported only when called)."""
    require_torch()
    from onnxq.correct.matching import synthesize as run

    return run(*args, **kwargs)
