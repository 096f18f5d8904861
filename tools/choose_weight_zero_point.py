"""Choose whether weights narrower than 8 bits get a zero point by default, on calibration data only.

Symmetric weights (zero point 0, signed) spend half of a channel's levels on the side its
weights barely reach when the channel is skewed, as MobileNetV2's depthwise filters are; a zero
point per scale (unsigned) fits the levels to [min, max]. 8-bit weights stay symmetric either
way: onnxruntime's integer kernels run them. Each model and setting is quantized by
`onnxq.quantize` with the mse scale search (GPTQ rounding, its default) with every weight
symmetric (`--w-zero-point none`) or with a zero point below 8 bits (`narrow`), calibrated on
the protocol's 256 calibration images and scored against float on calibration-pool images it
never saw (CIFAR-10 train-1017[512:]; the even-class ImageNet images after the first 256): KL
of the quantized from the float softmax, top-1 agreement, top-1. The zero point becomes the
default, per class of widths, where it lowers the class's mean log held-out KL. No evaluation
image is read. Writes the "weight-zero-point" section of BENCHMARKS.md. `--resume LOG` takes
the rows a killed run printed instead of measuring them.

    .venv/bin/python tools/choose_weight_zero_point.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import held_out

SETTINGS = {  # (weight, activation bits): the sub-8-bit weights of issue 14's targets
    "mobilenet_v2": [(4, 8), (4, 4), (6, 6)],
    "resnet20_cifar10": [(4, 4), (2, 4)],
    "resnet56_cifar10": [(4, 4)],
    "mobileone_cifar10": [(4, 4)],
}
CHOICES = {"symmetric": "none", "zero point": "narrow"}  # label → weight_zero_point


def width_class(weight_bits: int, activation_bits: int) -> str:
    """The classes of widths the default is chosen for, each by its own rows."""
    if activation_bits >= 8:
        return "8-bit activations"
    if weight_bits < 4:
        return "weights below 4 bits"
    return "4-bit and wider weights, narrower activations"


def held_out_scores(name: str, widths: tuple[int, int], label: str, held, reference) -> dict:
    config = held_out.mse_config(widths, weight_zero_point=CHOICES[label])
    return held_out.row(name, config, held, reference)


def main() -> None:
    args = held_out.arguments(__doc__.splitlines()[0], SETTINGS)
    done = held_out.printed_rows(args.resume, CHOICES) if args.resume else {}
    lines = [
        "## Weights below 8 bits with a zero point, chosen on held-out calibration images",
        "",
        "`tools/choose_weight_zero_point.py`: each model quantized by `onnxq.quantize` with the mse "
        "scale search (GPTQ rounding, the default; `--max-samples 256`, `--no-speed-check`, "
        "everything else at its defaults: first and last layers at 8 bits, residual sums split), "
        "every weight symmetric (`--w-zero-point none`) or the weights narrower than 8 bits unsigned with a "
        "zero point per channel (`narrow`; 8-bit weights symmetric either way), calibrated on the protocol's "
        "256 calibration images and scored against float on calibration-pool images neither sees "
        "(CIFAR-10 train-1017[512:]; the even-class ImageNet images after the first 256), never the "
        "evaluation split. Rows are grouped by widths (8-bit activations; weights below 4 bits; the "
        "rest), and in each group the zero point becomes the default if it lowers the group's mean "
        "log held-out KL (`--w-zero-point auto`, QuantConfig.symmetric_weights). s: wall time of "
        "`onnxq.quantize` on 2 cores.",
        "",
        "| model | setting | weights | KL held-out | agreement % | top-1 % | s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]

    def key(name: str, widths: tuple[int, int], label: str) -> str:
        return f"| {name} | W{widths[0]}A{widths[1]} mse | {label} |"

    rows = held_out.choice_rows(args.models, SETTINGS, CHOICES, key, held_out_scores, done)
    table, logs = held_out.grouped_log_kls(rows, lambda widths: width_class(*widths))
    lines += [*table, ""]
    for group, by_label in logs.items():
        means = {label: float(np.mean(values)) for label, values in by_label.items()}
        wins = held_out.wins(by_label, "symmetric", "zero point")
        chosen = "zero point" if means["zero point"] < means["symmetric"] else "symmetric"
        lines.append(
            f"- {group}: a zero point lowers the held-out KL on {wins} of {len(by_label['symmetric'])} rows; "
            f"mean log held-out KL {means['symmetric']:.2f} symmetric, {means['zero point']:.2f} with a "
            f"zero point: {chosen} by default."
        )
    overall = {c: float(np.mean([v for by in logs.values() for v in by[c]])) for c in CHOICES}
    lines += [
        "",
        f"Over all rows the mean log held-out KL is {overall['symmetric']:.2f} symmetric and "
        f"{overall['zero point']:.2f} with a zero point, so one rule for every width would give every "
        "weight below 8 bits a zero point, at the cost of the W4A4 rows that lose by it (MobileNetV2 "
        "and ResNet-56). The classes were drawn after these rows were seen, and two of them rest on "
        "one row each: a new model or width should be checked with `--w-zero-point none` and `narrow`.",
    ]
    bench.write_section(args.out, "weight-zero-point", "\n".join(lines) + "\n", bench.machine_description())
    print("\n".join(lines[-len(logs) - 2 :]))


if __name__ == "__main__":
    main()
