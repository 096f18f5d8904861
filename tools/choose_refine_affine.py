"""Choose whether every refined layer learns a per-channel affine by default, on calibration data only.

With `--refine-affine` each layer refinement learns also learns QPRep's per-channel γ and β (a
scale and shift of its output, folded into its weight scales and bias at export). Nearest
rounding shifts a layer's output mean: on MobileNetV2 at 4-bit weights, activations float,
correcting each layer's bias for it took the held-out KL from 3.36 to 0.49 (BENCHMARKS.md,
"rounding-mean-error"). Where a unit learns its rounding for enough iterations, rounding can mend that
itself; where a time budget gives it few, β mends it directly. Each model and width is quantized
with the mse scale search and `--refine` (pd, the default loss; MobileNetV2 under `--time-budget
1800`, issue 14's 30 minutes) with and without `--refine-affine` on the protocol's 256
calibration images, and scored against float on calibration-pool images no stage sees
(`bench.held_out_split`; never the evaluation split): KL of the quantized from the float
softmax, top-1 agreement, top-1. `--refine-affine` becomes the default where it lowers the mean
log held-out KL over all rows. Writes the "refine-affine-default" section of BENCHMARKS.md.

    .venv/bin/python tools/choose_refine_affine.py --models resnet20_cifar10
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import held_out

SETTINGS = {  # (weight, activation bits): issue 14's refinement targets
    "resnet20_cifar10": [(4, 4), (2, 4)],
    "mobilenet_v2": [(4, 4), (4, 8)],
}
BUDGET_S = {"mobilenet_v2": 1800.0}  # the others refine every unit for its iterations
CHOICES = ("--no-refine-affine", "--refine-affine")


def held_out_scores(name: str, widths: tuple[int, int], label: str, held, reference) -> dict:
    budget = {"time_budget": BUDGET_S[name]} if name in BUDGET_S else {}
    config = held_out.mse_config(widths, refine=True, refine_affine=label == CHOICES[1], **budget)
    return held_out.row(name, config, held, reference)


def main() -> None:
    args = held_out.arguments(__doc__.splitlines()[0], SETTINGS)
    header = [
        "## A per-channel affine on every refined layer, chosen on held-out calibration images",
        "",
        "`tools/choose_refine_affine.py`: mse scale search on the protocol's 256 calibration images, "
        "then `--refine` (pd) with and without `--refine-affine` (MobileNetV2 under `--time-budget "
        "1800`); scored against float on calibration-pool images no stage sees (never the evaluation "
        "split). s: wall time of `onnxq.quantize` on 2 cores.",
        *held_out.partial_run(args.models, SETTINGS),
        "| model | width | refinement | KL held-out | agreement % | top-1 % | s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    held_out.two_way_choice(
        args, SETTINGS, CHOICES, held_out_scores, header, "refine-affine-default", "--refine-affine"
    )


if __name__ == "__main__":
    main()
