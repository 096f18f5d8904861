"""After the first QDQ model: choose its activation ranges, win back fidelity and speed by
keeping layers float, measured; then the saved model's fidelity report (`tune_model`).

In the order they run:
- Refinement (refinement.py, before the rest): where `--refine` ran, the model without its
  integers and steps replaces the refined one if the scale search alone keeps the lowest output
  clearly closer to float.
- Ranges (`--calib-method auto`, ranges.py): the model built with percentile ranges or the one
  with min-max ranges, whichever keeps the lowest output closer to float; searched ranges (mse,
  mae, pd) with 8-bit activations meet the min-max ones the same way.
- Speed (speed_choice.py): where the QDQ model runs slower than float at batch 1, the layers
  feeding ops without an integer kernel are kept float too, if that runs faster; where no plan
  runs at float speed, nothing is quantized. Only at 8 bits: narrower widths have no integer
  kernels in onnxruntime, so they run simulated whatever the plan. Timed first, so that the
  fidelity fallback works on the plan that is kept.
- Fidelity (fallback.py): where the outputs fall below the warning threshold on held-back
  samples, the layers whose quantizers alone cost the lowest output most (onnxq.sensitivity) are
  kept float a few at a time, while that raises the lowest output SQNR, up to a tenth of the
  layers; a round that does not help is undone and the next layers are tried, up to three such
  rounds. Taken back where its float layers made the model slower than float; not tried where
  every plan ran more than 1.25× float (speed_choice.RESCUE_RATIO), since nothing will be quantized.
- Ranges again (ranges.py): each activation that does better under the other rule takes it
  (onnxq.range_choice).
- Report (report.py): the saved model's fidelity, and `--min-sqnr`'s error.
Each step rebuilds the model from the same calibration (no new statistics) and says what it did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import onnx

from onnxq.calib.data import Batch
from onnxq.config import QuantConfig
from onnxq.fidelity import Fidelity, HoldBack
from onnxq.progress import Progress
from onnxq.tune.candidate import Build, Candidate, Ranges, Rebuild
from onnxq.tune.fallback import recover_fidelity
from onnxq.tune.ranges import choose_ranges, switch_ranges
from onnxq.tune.refinement import keep_refinement
from onnxq.tune.report import final_report
from onnxq.tune.speed_choice import choose_speed, keep_fallback, speed_warnings

__all__ = ["Build", "Candidate", "Ranges", "Rebuild", "Tuned", "keep_refinement", "tune_model"]


@dataclass
class Tuned:
    """The model to save, its fidelity on the check's samples, and what each step did."""

    candidate: Candidate
    fidelity: Fidelity
    notes: list[str]


def tune_model(
    float_model: onnx.ModelProto,
    baseline: onnx.ModelProto,
    first: Candidate,
    ranges: Ranges,
    extremes: Ranges | None,
    rebuild: Rebuild,
    sample: Batch,
    held: HoldBack,
    config: QuantConfig,
    progress: Progress,
) -> Tuned:
    """The steps above on `first` (built from `ranges`; `extremes`: the min-max ranges where
    they meet auto's or the search's (onnxq.calibrate.compares_extremes), else None), each
    scored on the held-back samples (`sample` where none were held back) and timed on `sample`
    against `baseline`.

    `baseline` is the float model as onnxq prepared it, before the passes that serve only the
    quantizers (equalization's per-channel Muls): the fastest float model onnxq can give, so
    what quantization must beat, and what is saved where nothing ends up quantized. PP-PicoDet's
    124 equalization Muls made its float model 1.15× slower than without them."""
    builder, replan = rebuild.builder, rebuild.replan
    checked = held.batches or [sample]
    progress.stage("check fidelity")
    validated = first
    build, measured, alternative, notes = builder(ranges), None, None, []
    if extremes is not None:
        progress.status("activation ranges: the first model against the min-max one")
        first, chosen, other, measured, ranged = choose_ranges(
            float_model, first, ranges, extremes, builder, checked, config
        )
        build, alternative = builder(chosen), (chosen, other)
        notes += ranged
    progress.stage("compare speed")
    base, timing = choose_speed(baseline, first, sample, config, replan, build)
    final, switched, fallback = base, [], []
    if base.candidate.plan.quantized_nodes:
        tuned = base.candidate
        if base.candidate is not first:
            measured = None
        if not base.beyond_rescue:
            progress.stage("recover fidelity")
            progress.status("fallback: layers kept float where the outputs fall short")
            tuned, measured, fallback = recover_fidelity(
                float_model, base.candidate, checked, config, base.replan, build, measured
            )
        final, kept = keep_fallback(baseline, tuned, base, sample, replan, build)
        timing += kept
        if final.candidate is not tuned:
            fallback, measured = [], None  # undone: it made the model slower
        if alternative is not None and final.candidate.plan.quantized_nodes:
            progress.status("activation ranges: activations tried under the other rule")
            switched_model, build, measured, switched = switch_ranges(
                float_model, final.candidate, *alternative, builder, checked, config, measured
            )
            final = dataclasses.replace(final, candidate=switched_model)
    best = final.candidate if final.candidate.plan.quantized_nodes else _left_float(baseline, final.candidate)
    if best is not validated:
        rebuild.validate(best.model)
    measured = measured if best.plan.quantized_nodes else None
    report = final_report(float_model, best, checked, held.held_back, config, measured)
    notes += (
        fallback
        + switched
        + timing
        + speed_warnings(final)
        + report.lines()
        + report.warnings(suggest_refine=config.lowest_bits < 8 and not config.refine)
    )
    return Tuned(best, report, notes)


def _left_float(baseline: onnx.ModelProto, candidate: Candidate) -> Candidate:
    """Nothing quantized: `baseline` with the candidate's metadata (onnxq's settings and notes)
    saved in its place, so the saved model runs as fast as float can here."""
    model = onnx.ModelProto()
    model.CopyFrom(baseline)
    del model.metadata_props[:]
    model.metadata_props.extend(candidate.model.metadata_props)
    return dataclasses.replace(candidate, model=model)
