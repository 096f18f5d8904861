"""Choose where `--refine` starts its rounding by default, on calibration data only.

AdaRound learns, per weight, one of two neighbouring integers. It can start from nearest
rounding (AdaRound's own start: h = w/s − floor(w/s)) or from the integers GPTQ chose during
the scale search (onnxq.calib.rounding; each weight may keep its GPTQ integer or move one step
towards w/s). Each model and setting is quantized by `onnxq.quantize` with the mse scale search
and `--refine` (its defaults otherwise) from both starts, calibrated on the protocol's 256
calibration images and scored against the float model on calibration-pool images it never saw
(CIFAR-10 train-1017[512:]; the even-class ImageNet images after the first 256): KL of the
quantized from the float softmax, top-1 agreement, top-1. The start with the lower mean log
held-out KL becomes the default, decided apart for weights below 4 bits, for wider weights
with 8-bit activations (where weights get a zero point) and for the rest.
No evaluation image is read. Writes the "refine-start" section
of BENCHMARKS.md. `--resume LOG` takes the rows a killed run printed instead of measuring them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import bench_suites
import held_out

# (weight, activation bits) per model
SETTINGS = {"resnet20_cifar10": [(4, 4), (2, 4)], "mobilenet_v2": [(4, 8), (4, 4)]}
STARTS = {"nearest": "nearest", "gptq": "gptq"}  # start → --weight-rounding


CLASSES = {
    "narrow": "weights below 4 bits",
    "a8": "4- to 7-bit weights with 8-bit activations (a zero point on the weights)",
    "rest": "4-bit and wider weights with narrower activations",
}


def width_class(widths: tuple[int, int]) -> str:
    """The class of widths a default start is decided for (QuantConfig.rounds_by_gptq)."""
    if widths[0] < 4:
        return "narrow"
    return "a8" if widths[1] >= 8 and widths[0] < 8 else "rest"


def held_out_scores(name: str, widths: tuple[int, int], start: str, held, reference) -> dict:
    config = held_out.mse_config(
        widths,
        refine=True,
        weight_rounding=STARTS[start],
        time_budget=float(bench_suites.REFINE_BUDGETS[name]) if name in bench_suites.REFINE_BUDGETS else None,
    )
    return held_out.row(name, config, held, reference)


def main() -> None:
    args = held_out.arguments(__doc__.splitlines()[0], SETTINGS)
    done = held_out.printed_rows(args.resume, STARTS) if args.resume else {}
    lines = [
        "## Where refinement's rounding starts, chosen on held-out calibration images",
        "",
        "`tools/choose_refine_start.py`: each model quantized by `onnxq.quantize` with the mse "
        "scale search and `--refine` (pd loss, block units, 500 iterations; MobileNetV2 with "
        "`--time-budget 1800`; `--max-samples 256`, `--no-speed-check`), its AdaRound rounding "
        "started from nearest rounding (`--weight-rounding nearest`) or from the integers GPTQ chose "
        "in the search (`--weight-rounding gptq`), calibrated on the protocol's 256 calibration "
        "images and scored against float on calibration-pool images neither sees (CIFAR-10 "
        "train-1017[512:]; the even-class ImageNet images after the first 256), never the "
        "evaluation split. The start with the lower mean log held-out KL becomes the default. s: "
        "wall time of `onnxq.quantize` on 2 cores.",
        "",
        "| model | setting | start | KL held-out | agreement % | top-1 % | s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]

    def key(name: str, widths: tuple[int, int], start: str) -> str:
        return f"| {name} | W{widths[0]}A{widths[1]} mse + --refine | {start} |"

    rows = held_out.choice_rows(args.models, SETTINGS, STARTS, key, held_out_scores, done)
    table, logs = held_out.grouped_log_kls(rows, width_class)
    lines += [*table, ""]
    for group, what in CLASSES.items():
        if group not in logs:
            continue
        means = {start: float(np.mean(logs[group][start])) for start in STARTS}
        chosen = min(means, key=means.get)
        wins = held_out.wins(logs[group], "nearest", "gptq")
        lines.append(
            f"{what}: GPTQ's start lowers the held-out KL on {wins} of {len(logs[group]['gptq'])} "
            f"rows; mean log held-out KL {means['nearest']:.2f} from nearest rounding, "
            f"{means['gptq']:.2f} from GPTQ's integers: {chosen} by default."
        )
    bench.write_section(args.out, "refine-start", "\n".join(lines) + "\n", bench.machine_description())
    print("\n".join(lines[-2:]))


if __name__ == "__main__":
    main()
