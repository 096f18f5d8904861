"""Which of two range rules each activation takes, chosen by the fidelity of the outputs.

`--calib-method auto` builds the model twice, with percentile and with min-max activation
ranges, and keeps the one whose lowest output stays closer to float. Tensors differ, though:
a detector's score path may need one tensor's rare large values while another tensor's outliers
only cost resolution. On yolox_ddddocr (W8A8) percentile ranges gave 18.0 dB and min-max 4.6 dB
at the lowest output; percentile with 8 tensors switched to min-max gave 21.6 dB on the
calibration samples and 21.5 dB (from 17.9) on evaluation samples the choice never saw.

Each activation whose two ranges differ is switched alone to the other rule in the tunable float
graph (every quantizer fed as the QDQ models hold it, each switch run from its cut on:
onnxq.branching), on a few samples, those whose ranges differ most first, at most MOST_SCANNED
of them (scanning yolox_ddddocr's 40, 80
or 128 most different gave its boxes 21.0, 21.1 and 21.0 dB): a count, not a time, so that the
same data gives the same plan on any machine and under any load (a 30 s cap scanned 101 of
yolox_ddddocr's 162 on this project's 2-core machine alone, fewer beside other work, so that
`--no-speed-check` did not give byte-reproducible files). SAFETY_SECONDS stops a scan of a model
far larger than the zoo's, and the taking of switches after it, and the notes say so (Keypoint
R-CNN ResNet50-FPN at 320×320: a 188 s scan, then 111 s of trials that took nothing). Those
that lift the lowest output are then taken, most helpful first, each kept only while the lowest
output rises with it.
The switches are chosen on the first LAYER_SAMPLES samples and kept only if they also lift the
lowest output on the next LAYER_SAMPLES by MIN_CONFIRMED_DB: lifts of 0.1 and 0.5 dB on the
check's samples alone turned into losses on the zoo's evaluation samples (magika -1.0 dB,
ppocr_det -0.2 dB).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import onnx

from onnxq import selections
from onnxq.branching import compare_variants
from onnxq.calib.data import Batch
from onnxq.calib.runner import fixed_batch
from onnxq.calib.simulate import Arrays, param_names, tunable_model
from onnxq.comparison import OutputFidelity
from onnxq.fidelity import LAYER_SAMPLES, compare_outputs, first_samples
from onnxq.io import run, session
from onnxq.quant.plan import QuantPlan
from onnxq.sensitivity import quantized_feeds

MIN_GAIN_DB = 0.05  # a switch must lift the lowest output at least this much to be tried
SCAN_SAMPLES = 2  # samples each single switch is scored on (the taking is scored on LAYER_SAMPLES)
MOST_SCANNED = 64  # single switches scanned at most (the zoo has 47 to 162 candidates)
SAFETY_SECONDS = 180.0  # a scan, or the taking after it, still running after this stops where it is
SCAN_CHUNK = 16  # switches scanned together (one float run per sample, each branching off at its cut)
MOST_TAKEN = 16  # switches tried for taking, most helpful first
MIN_CONFIRMED_DB = 0.5  # lift the switches must keep on the samples they were not chosen on
ENOUGH_DB = 30.0  # a lowest output at least this close to float is left as it is (issue 13's target)


def switched_activations(
    float_model: onnx.ModelProto,
    plan: QuantPlan,
    chosen: onnx.ModelProto,
    other: onnx.ModelProto,
    samples: list[Batch],
    seconds: float | None = None,
) -> tuple[list[str], list[str]]:
    """The activations (plan roots) that should take `other`'s range rather than `chosen`'s, and
    a note where the safety cap cut the scan short."""
    seconds = SAFETY_SECONDS if seconds is None else seconds
    judged, names = selections.judged_model(float_model)
    tunable, float_feed, _ = tunable_model(judged, plan)
    del judged  # a copy with outputs added, where the model has picked outputs: only the tunable graph runs
    runner = session(tunable, arena=False)
    whole = fixed_batch(float_model) is not None
    batches = list(first_samples(samples, 2 * LAYER_SAMPLES, whole=whole))
    reference = [run(runner, {**batch, **float_feed}, names) for batch in batches]
    chosen_on = max(1, len(batches) // 2)  # the rest confirm the choice on samples it never saw
    scanned = max(1, SCAN_SAMPLES * chosen_on // LAYER_SAMPLES)
    # the two models differ in activation ranges only: their weights are read from `chosen`
    base, alternative = quantized_feeds(chosen, plan), quantized_feeds(other, plan, weights=False)
    roots = [root for root in plan.activations if _differs(base.get(root), alternative.get(root))]
    roots.sort(key=lambda root: -_step_ratio(root, base, alternative))  # the time cap cuts the closest
    chosen_feed = {**float_feed, **_merged(base)}
    del float_feed  # the float weights chosen_feed replaced: as much memory as the model

    def lowest(switch: list[str], count: int = chosen_on, first: int = 0) -> float:
        feed = dict(chosen_feed)
        for root in switch:
            feed.update(alternative[root])
        pairs = zip(batches[first:count], reference[first:count], strict=True)
        runs = ((want, run(runner, {**batch, **feed}, names)) for batch, want in pairs)
        return min((result.sqnr_db for result in compare_outputs(names, runs)), default=float("inf"))

    def scan(variants: dict[str, Arrays]) -> dict[str, float]:
        """The lowest output SQNR with each variant's switch alone, on the scan's samples."""
        compared = compare_variants(
            tunable, chosen_feed, variants, batches[:scanned], names, reference[:scanned]
        )
        return {key: _lowest(results) for key, results in compared.items()}

    start, scan_start = lowest([]), scan({"": {}})[""]
    gains, scanned_roots, candidates = [], 0, roots[:MOST_SCANNED]
    deadline = time.perf_counter() + seconds
    for chunk in _chunks(candidates, SCAN_CHUNK, deadline):
        for root, sqnr in scan({root: alternative[root] for root in chunk}).items():
            scanned_roots += 1
            if sqnr - scan_start >= MIN_GAIN_DB:
                gains.append((sqnr - scan_start, root))
    notes = []
    if scanned_roots < len(candidates):
        notes.append(
            f"activation ranges: the scan stopped after {seconds:.0f} s at {scanned_roots} of "
            f"{len(candidates)} activations, so the plan depends on this machine's speed"
        )
    taken, best = [], start
    for tried, (_, root) in enumerate(sorted(gains, reverse=True)[:MOST_TAKEN]):
        if time.perf_counter() > deadline:  # Keypoint R-CNN: 19 full runs of 6 s after its scan
            notes.append(
                f"activation ranges: the search stopped after {seconds:.0f} s at {tried} of "
                f"{min(len(gains), MOST_TAKEN)} switches tried, so the plan depends on this machine's speed"
            )
            break
        trial = lowest([*taken, root])
        if trial > best:
            taken, best = [*taken, root], trial
    if taken and chosen_on < len(batches):  # a lift that does not hold on the other samples is noise
        confirmed = lowest(taken, len(batches), chosen_on) - lowest([], len(batches), chosen_on)
        if confirmed < MIN_CONFIRMED_DB:
            return [], notes
    return taken, notes


def _chunks(items: list[str], size: int, deadline: float) -> Iterator[list[str]]:
    for begin in range(0, len(items), size):
        if time.perf_counter() > deadline:
            return
        yield items[begin : begin + size]


def _lowest(results: list[OutputFidelity]) -> float:
    return min((result.sqnr_db for result in results), default=float("inf"))


def _differs(first: Arrays | None, second: Arrays | None) -> bool:
    if first is None or second is None or first.keys() != second.keys():
        return False
    return any(not np.allclose(first[k], second[k], rtol=1e-4, atol=0.0) for k in first)


def _step_ratio(root: str, first: dict[str, Arrays], second: dict[str, Arrays]) -> float:
    """How far apart the two quantizers' steps of `root` are, as |log| of their ratio."""
    scale = param_names(root)["scale"]
    return abs(float(np.log(first[root][scale] / second[root][scale])))


def _merged(feeds: dict[str, Arrays]) -> Arrays:
    return {name: value for feed in feeds.values() for name, value in feed.items()}
