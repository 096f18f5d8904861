"""Choose how the scale search scores an activation's range by default, on calibration data only.

The mse/mae/pd search tries clipping ratios of each activation's observed range. `own` scores a
ratio by the tensor's own error, every value alike; `readers` weighs each channel's error by the
squared weights of the layers that read it (onnxq/calib/reader_weights.py), which is about the
squared error those layers' outputs receive. Each model and setting is quantized by
`onnxq.quantize` with the mse scale search (GPTQ rounding, its default), calibrated on the
protocol's 256 calibration images and scored against float on calibration-pool images it never
saw (CIFAR-10 train-1017[512:]; the even-class ImageNet images after the first 256): KL of the
quantized from the float softmax, top-1 agreement, top-1. `readers` becomes the default if it
lowers the mean log held-out KL. No evaluation image is read. Writes the "activation-error"
section of BENCHMARKS.md. `--resume LOG` takes the rows a killed run printed instead of
measuring them.

    .venv/bin/python tools/choose_activation_error.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import held_out

SETTINGS = {  # (weight, activation bits): issue 14's widths, and 8-bit activations beside them
    "resnet20_cifar10": [(4, 4), (2, 4)],
    "resnet56_cifar10": [(4, 4)],
    "mobilenet_v2": [(4, 4), (6, 6), (4, 8)],
}
CHOICES = ("own", "readers")


def held_out_scores(name: str, widths: tuple[int, int], label: str, held, reference) -> dict:
    config = held_out.mse_config(widths, activation_error=label)
    return held_out.row(name, config, held, reference)


def main() -> None:
    args = held_out.arguments(__doc__.splitlines()[0], SETTINGS)
    lines = [
        "## How the search scores an activation's range, chosen on held-out calibration images",
        "",
        "`tools/choose_activation_error.py`: each model quantized by `onnxq.quantize` with the mse "
        "scale search (GPTQ rounding, the default; `--max-samples 256`, `--no-speed-check`, "
        "everything else at its defaults), each activation's clipping ratio scored by its own "
        "squared error (own) or by each channel's squared error weighted by the squared weights "
        "of the layers reading it (readers; a tensor read by anything else keeps its own error), "
        "calibrated on the protocol's 256 calibration images and scored against float on "
        "calibration-pool images neither sees (CIFAR-10 train-1017[512:]; the even-class ImageNet "
        "images after the first 256), never the evaluation split. readers becomes the default if "
        "it lowers the mean log held-out KL. s: wall time of `onnxq.quantize` on 2 cores.",
        "",
        "| model | setting | activation error | KL held-out | agreement % | top-1 % | s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]

    held_out.two_way_choice(
        args, SETTINGS, CHOICES, held_out_scores, lines, "activation-error", "Weighing by the readers"
    )


if __name__ == "__main__":
    main()
