"""Calibration inputs shaped by the BatchNorm statistics kept when folding (PD-Quant, ZeroQ).

- Distribution correction: a few hundred calibration images over-fit the refinement; nudging
  them so that the per-channel mean and standard deviation they produce at every folded layer
  match the statistics BatchNorm recorded over the whole training set, while staying close to
  the originals, makes them stand for that set better (PD-Quant's DC).
- Data-free calibration: the same statistics-matching loss, started from noise, synthesises
  calibration inputs for a user who has no data (ZeroQ's distilled data).

Both run the float model in the refinement's torch mirror, so they need the `refine` extra;
this module itself imports no torch.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxq.calib.inputs import InputSpec
from onnxq.calib.runner import fixed_batch
from onnxq.config import QuantConfig
from onnxq.errors import OnnxqError
from onnxq.passes.fold_bn import ChannelStatistics
from onnxq.progress import Progress
from onnxq.refine import require_torch

DATA_FREE = "bn-stats"  # the calibration source that synthesises data from BatchNorm statistics
SYNTHETIC_SAMPLES = 256  # samples synthesised at most (the protocol's calibration size)
# of --time-budget (of each unit's share, by blocks) for distribution correction; refinement gets the rest
CORRECTION_SHARE = 0.1


def check_synthesis_inputs(inputs: list[InputSpec]) -> tuple[int, ...]:
    """One sample's shape, where the model has the one float input of fixed size synthesis needs."""
    shape = inputs[0].shape[1:] if len(inputs) == 1 else (None,)
    if len(inputs) != 1 or inputs[0].dtype.kind != "f" or any(d is None for d in shape):
        raise OnnxqError(
            f"--calib {DATA_FREE} needs one float input of fixed size apart from the batch axis; "
            f"the model has {', '.join(f'{i.name} {list(i.shape)}' for i in inputs)}"
        )
    return tuple(shape)


def synthesised_calibration(
    model: onnx.ModelProto,
    statistics: dict[str, ChannelStatistics],
    shape: tuple[int, ...],
    config: QuantConfig,
    progress: Progress,
) -> tuple[dict[str, np.ndarray], str]:
    """Calibration inputs synthesised from noise by the statistics, and the note that says so."""
    if not statistics:
        raise OnnxqError(
            f"--calib {DATA_FREE}: the model has no BatchNormalization statistics to synthesise data from"
        )
    settings = _settings(model, config)
    count = min(config.max_samples or SYNTHETIC_SAMPLES, SYNTHETIC_SAMPLES)
    if fixed := fixed_batch(model):  # whole batches of a fixed batch size; otherwise what was asked
        count = max(fixed, count - count % fixed)
    data, report = synthesize(model, statistics, shape, count, settings, progress)
    return data, report.note(f"data-free: {count} calibration samples synthesised from BatchNorm statistics")


def corrected_for_refinement(
    model: onnx.ModelProto,
    statistics: dict[str, ChannelStatistics],
    data: dict[str, np.ndarray],
    config: QuantConfig,
    synthesised: bool,
    progress: Progress,
) -> tuple[dict[str, np.ndarray], list[str], dict[str, ChannelStatistics] | None]:
    """The calibration data nudged towards the statistics (or as it was), the notes, and the
    statistics refinement corrects each unit's inputs by (`correction_at` blocks; else None)."""
    if not config.distribution_correction:
        return data, [], None
    skipped = "distribution correction skipped: "
    if synthesised:
        return data, [skipped + "the data was synthesised from the same statistics"], None
    if not statistics:
        reason = "the model has no BatchNormalization statistics (its exporter may have folded them away)"
        return data, [skipped + reason], None
    if config.correction_at == "blocks":
        return data, [], statistics
    if len(data) != 1 or next(iter(data.values())).dtype.kind != "f":
        return data, [skipped + "it corrects models with one float input only"], None
    budget = None if config.time_budget is None else CORRECTION_SHARE * config.time_budget
    settings = _settings(model, config, time_budget=budget, closeness=config.correction_closeness)
    corrected, report = correct_distribution(model, statistics, data, settings, progress)
    return corrected, [report.note(f"distribution correction ({report.seconds:.0f} s)")], None


def _settings(model: onnx.ModelProto, config: QuantConfig, **extra):
    """MatchSettings from the config, in batches of the model's fixed batch size where it has one."""
    require_torch()
    from onnxq.correct.matching import MatchSettings

    batch = fixed_batch(model) or MatchSettings.batch
    return MatchSettings(batch=batch, seed=config.seed, threads=config.threads, **extra)


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
