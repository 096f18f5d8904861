"""The fidelity fallback: where the outputs fall below the warning threshold on held-back
samples, the layers whose quantizers alone cost the lowest output most (onnxq.sensitivity) are
kept float a few at a time, while that raises the lowest output SQNR, up to a tenth of the
layers; a round that does not help is undone and the next layers are tried, up to three such
rounds."""

from __future__ import annotations

import onnx

from onnxq import fidelity, sensitivity
from onnxq.calib.data import Batch
from onnxq.config import QuantConfig
from onnxq.fidelity import Fidelity
from onnxq.quant.plan import Replan
from onnxq.tune.candidate import Build, Candidate

FALLBACK_SHARE = 0.1  # at most this part of the layers is kept float for fidelity
FALLBACK_STEP = 2  # layers kept float per round
FALLBACK_MISSES = 3  # rounds that did not help before the fallback gives up


def recover_fidelity(
    float_model: onnx.ModelProto,
    best: Candidate,
    samples: list[Batch],
    config: QuantConfig,
    replan: Replan,
    build: Build,
    measured: Fidelity | None = None,
) -> tuple[Candidate, Fidelity, list[str]]:
    """The model with the fewest float layers that lifts the outputs, its fidelity (`measured`
    when already known for `best`), and notes."""
    report = measured or fidelity.measure(float_model, best.model, samples, config.lowest_bits)
    if not config.fidelity_fallback or not report.poor:
        return best, report, []
    budget = int(FALLBACK_SHARE * len(best.plan.layers))
    initial = dict(best.plan.kept_float)
    floated, start, tried, misses = initial, report.min_sqnr, set(), 0
    ranking: list[str] | None = None  # the first model's layers, costliest first (costs add up)
    while report.poor and misses < FALLBACK_MISSES and len(floated) + FALLBACK_STEP <= len(initial) + budget:
        if ranking is None:
            lowest = report.lowest.name
            ranked = sensitivity.layer_costs(float_model, best.model, best.plan, best.layers, samples, lowest)
            ranking = [name for name, _ in ranked]
        pair = [name for name in ranking if name not in tried][:FALLBACK_STEP]
        if not pair:
            break
        tried.update(pair)
        reason = f"kept float for fidelity: the outputs fell to {start:.1f} dB SQNR"
        trial = {**floated, **dict.fromkeys(pair, reason)}
        candidate = build(replan(keep_float=trial))
        trial_report = fidelity.measure(float_model, candidate.model, samples, config.lowest_bits)
        if trial_report.min_sqnr <= report.min_sqnr:
            misses += 1  # these layers did not help: try the next ones of the same ranking
            continue
        best, report, floated = candidate, trial_report, trial
    if floated is initial:
        return best, report, []
    added = len(floated) - len(initial)
    lifted = f"{start:.1f} → {report.min_sqnr:.1f} dB"
    note = f"fidelity: {added} layers kept float lift the lowest output SQNR {lifted}"
    return best, report, [note]
