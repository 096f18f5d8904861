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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import held_out

SETTINGS = {  # (weight, activation bits): the widths below 8-bit activations of issue 14's targets
    "resnet20_cifar10": [(4, 4), (2, 4)],
    "resnet56_cifar10": [(4, 4)],
    "mobilenet_v2": [(4, 4), (6, 6)],
}
CHOICES = ("one quantizer", "split")  # labels; split_sums = label == "split"


def held_out_scores(name: str, widths: tuple[int, int], label: str, held, reference) -> dict:
    config = held_out.mse_config(widths, split_sums=label == "split")
    return held_out.row(name, config, held, reference)


def main() -> None:
    args = held_out.arguments(__doc__.splitlines()[0], SETTINGS)
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

    held_out.two_way_choice(args, SETTINGS, CHOICES, held_out_scores, lines, "split-sums", "Splitting")


if __name__ == "__main__":
    main()
