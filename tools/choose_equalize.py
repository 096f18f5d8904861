"""Choose whether cross-layer equalization is on by default, and how channels line up, on
calibration data only.

Each model and setting is quantized by `onnxq.quantize` without equalization and with it,
calibrated on the protocol's 256 calibration images (CIFAR-10 train-1017[:256]; the first 256
even-class ImageNet images) and scored against the float model on calibration-pool images it
never saw (train-1017[512:]; the even-class ImageNet images after the first 256): KL of the
quantized from the float softmax, top-1 agreement, top-1. Below 8-bit activations equalization
runs two ways: depthwise inputs lined up by their channels' maxima, or by where each channel is
best clipped at the activation width (onnxq.calib.observers.ChannelRangeObserver). The lowest
mean log held-out KL wins, decided apart for 8-bit activations and for each narrower width (the
rule tools/choose_qprep.py follows). No evaluation image is read. Writes the "equalize-default"
section of BENCHMARKS.md. `--resume LOG` takes the rows a killed run printed instead of
measuring them again.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import held_out

from onnxq import pipeline
from onnxq.config import CalibrationMethod, QuantConfig

# (weight bits, activation bits, calibration): the default W8A8 path, and the low-bit rows of
# the rounding-refinement issue with the mse search (GPTQ rounding, the default below 8 bits)
SETTINGS = {
    "resnet20_cifar10": [(8, 8, "auto"), (4, 4, "mse"), (2, 4, "mse")],
    "repvgg_cifar10": [(8, 8, "auto")],  # branches merged at 8 bits: Conv → Relu → Conv pairs
    "mobilenet_v2": [(8, 8, "auto"), (4, 8, "mse"), (6, 6, "mse"), (5, 5, "mse"), (4, 4, "mse")],
    # depthwise convs behind a BatchNorm-folded branch sum, unmerged below 8-bit weights
    "mobileone_cifar10": [(6, 6, "mse"), (4, 4, "mse")],
}
WIDE_CHOICES = ("off", "on")  # 8-bit activations: channels line up by maxima
NARROW_CHOICES = ("off", "maxima", "clipping points")


def held_out_scores(name: str, setting: tuple[int, int, str], choice: str, held, reference) -> dict:
    weight_bits, activation_bits, method = setting
    config = QuantConfig(
        weight_bits=weight_bits,
        activation_bits=activation_bits,
        calibration=CalibrationMethod(method),
        max_samples=bench.LOW_BIT_SAMPLES,
        equalize=choice != "off",
        speed_check=False,
    )
    clipped = pipeline.CLIPPED_EQUALIZATION_BITS
    pipeline.CLIPPED_EQUALIZATION_BITS = 9 if choice == "clipping points" else 0
    try:
        return held_out.row(name, config, held, reference)
    finally:
        pipeline.CLIPPED_EQUALIZATION_BITS = clipped


def _settings(narrow: bool) -> dict[str, list]:
    return {name: [s for s in settings if (s[1] < 8) == narrow] for name, settings in SETTINGS.items()}


def _verdicts(logs: dict, choices: tuple[str, ...]) -> list[str]:
    """One line per class of widths: each choice's mean log held-out KL and the lowest."""
    lines = []
    for width in sorted(logs, reverse=True):
        means = {choice: float(np.mean(logs[width][choice])) for choice in choices}
        best = min(means, key=means.get)
        listed = ", ".join(f"{choice} {value:.2f}" for choice, value in means.items())
        what = "8-bit activations" if width == 8 else f"{width}-bit activations"
        wins = {c: held_out.wins(logs[width], choices[0], c) for c in choices[1:]}
        won = ", ".join(f"{c} on {n} of {len(logs[width][c])}" for c, n in wins.items())
        lines.append(f"{what}: lower held-out KL than off: {won}; mean log held-out KL {listed}: {best}.")
    return lines


def main() -> None:
    args = held_out.arguments(__doc__.splitlines()[0], SETTINGS)
    done = held_out.printed_rows(args.resume, (*WIDE_CHOICES, *NARROW_CHOICES)) if args.resume else {}
    lines = [
        "## Cross-layer equalization's default, chosen on held-out calibration images",
        "",
        "`tools/choose_equalize.py`: each model quantized by `onnxq.quantize` at the setting named "
        "(`--max-samples 256`, `--no-speed-check`, defaults otherwise: GPTQ rounding below 8-bit "
        "weights) without equalization and with it (below 8-bit activations two ways: depthwise "
        "inputs lined up by their channels' maxima, or by where each channel is best clipped at "
        "that width), calibrated on the protocol's 256 calibration images and scored against "
        "float on calibration-pool images none sees (CIFAR-10 train-1017[512:]; the even-class "
        "ImageNet images after the first 256), never the evaluation split. The lowest mean log "
        "held-out KL sets the default, for 8-bit activations and for each narrower width apart. "
        "s: wall time of `onnxq.quantize` on 2 cores.",
        "",
        "| model | setting | equalize | KL held-out | agreement % | top-1 % | s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]

    def key(name: str, setting: tuple[int, int, str], choice: str) -> str:
        return f"| {name} | W{setting[0]}A{setting[1]} {setting[2]} | {choice} |"

    models = args.models
    wide = held_out.choice_rows(models, _settings(False), WIDE_CHOICES, key, held_out_scores, done)
    narrow = held_out.choice_rows(models, _settings(True), NARROW_CHOICES, key, held_out_scores, done)
    wide_table, wide_logs = held_out.grouped_log_kls(wide, lambda setting: setting[1])
    narrow_table, narrow_logs = held_out.grouped_log_kls(narrow, lambda setting: setting[1])
    lines += [*wide_table, *narrow_table, ""]
    lines += _verdicts(wide_logs, WIDE_CHOICES) + _verdicts(narrow_logs, NARROW_CHOICES)
    bench.write_section(args.out, "equalize-default", "\n".join(lines) + "\n", bench.machine_description())
    print("\n".join(lines[-len(wide_logs) - len(narrow_logs) :]))


if __name__ == "__main__":
    main()
