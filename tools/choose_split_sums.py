"""Choose whether residual sums get a second quantizer by default, on calibration data only.

A tensor that an Add and a weighted layer both read (a ResNet block's input) is quantized once
at the layers' activation width (`--no-split-sums`), or twice (`--split-sums`): the Add reads it
at `--addend-bits`, the layer through a quantizer of its own at `--a-bits`
(onnxq/passes/split_addend_reads.py). Each model and setting is quantized by `onnxq.quantize`
with the mse scale search (GPTQ rounding, its default), calibrated on the protocol's 256
calibration images and scored against float on calibration-pool images it never saw (CIFAR-10
train-1017[512:]; the even-class ImageNet images after the first 256): KL of the quantized from
the float softmax, top-1 agreement, top-1. Splitting becomes the default if it lowers the mean
log held-out KL. No evaluation image is read. Writes the "split-sums" section of BENCHMARKS.md.
`--resume LOG` takes the rows a killed run printed instead of measuring them.

    .venv/bin/python tools/choose_split_sums.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import held_out

SETTINGS = {  # (weight, activation bits): the widths below 8-bit activations of issue 14's targets
    "resnet20_cifar10": [(4, 4), (2, 4)],
    "resnet56_cifar10": [(4, 4)],
    "mobilenet_v2": [(4, 4), (6, 6)],
}
CHOICES = {"one quantizer": False, "split": True}  # label → split_sums


def held_out_scores(name: str, widths: tuple[int, int], label: str, held, reference) -> dict:
    config = held_out.mse_config(widths, split_sums=CHOICES[label])
    return held_out.row(name, config, held, reference)


def main() -> None:
    args = held_out.arguments(__doc__.splitlines()[0], SETTINGS)
    done = held_out.printed_rows(args.resume, CHOICES) if args.resume else {}
    lines = [
        "## Residual sums with a second quantizer, chosen on held-out calibration images",
        "",
        "`tools/choose_split_sums.py`: each model quantized by `onnxq.quantize` with the mse scale "
        "search (GPTQ rounding, the default; `--max-samples 256`, `--no-speed-check`, everything "
        "else at its defaults: first and last layers at 8 bits, tensors only Add reads at 8 bits), "
        "every tensor that an Add and a layer both read quantized once at the activation width "
        "(`--no-split-sums`) or split (`--split-sums`: the Add reads it at 8 bits, the layer through "
        "a quantizer of its own at the activation width), calibrated on the protocol's 256 "
        "calibration images and scored against float on calibration-pool images neither sees "
        "(CIFAR-10 train-1017[512:]; the even-class ImageNet images after the first 256), never the "
        "evaluation split. Splitting becomes the default if it lowers the mean log held-out KL. s: "
        "wall time of `onnxq.quantize` on 2 cores.",
        "",
        "| model | setting | sums | KL held-out | agreement % | top-1 % | s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]

    def key(name: str, widths: tuple[int, int], label: str) -> str:
        return f"| {name} | W{widths[0]}A{widths[1]} mse | {label} |"

    rows = held_out.choice_rows(args.models, SETTINGS, CHOICES, key, held_out_scores, done)
    table, grouped = held_out.grouped_log_kls(rows, lambda widths: "all")
    lines += table
    logs = grouped["all"]
    wins = held_out.wins(logs, "one quantizer", "split")
    means = {label: float(np.mean(values)) for label, values in logs.items()}
    chosen = "split" if means["split"] < means["one quantizer"] else "one quantizer"
    lines += [
        "",
        f"Splitting lowers the held-out KL on {wins} of {len(logs['split'])} rows; mean log held-out KL "
        f"{means['one quantizer']:.2f} with one quantizer, {means['split']:.2f} split: {chosen} by default.",
    ]
    bench.write_section(args.out, "split-sums", "\n".join(lines) + "\n", bench.machine_description())
    print(lines[-1])


if __name__ == "__main__":
    main()
