"""Choose whether cross-layer equalization is on by default, on calibration data only.

Each model and setting is quantized by `onnxq.quantize` with and without `equalize`, calibrated
on the protocol's 256 calibration images (CIFAR-10 train-1017[:256]; the first 256 even-class
ImageNet images) and scored against the float model on calibration-pool images it never saw
(train-1017[512:]; the even-class ImageNet images after the first 256): KL of the quantized
from the float softmax, top-1 agreement, top-1. Equalization becomes the default where it lowers
the mean log held-out KL (the rule tools/choose_qprep.py follows), decided apart for 8-bit and
narrower activations. No evaluation image is read. Writes the "equalize-default" section of
BENCHMARKS.md. `--resume LOG` takes the rows a killed run printed instead of measuring them again.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import held_out

from onnxq.config import CalibrationMethod, QuantConfig

# (weight bits, activation bits, calibration): the default W8A8 path, and the low-bit rows of
# the rounding-refinement issue with the mse search (GPTQ rounding, the default below 8 bits)
SETTINGS = {
    "resnet20_cifar10": [(8, 8, "auto"), (4, 4, "mse"), (2, 4, "mse")],
    "repvgg_cifar10": [(8, 8, "auto")],  # branches merged at 8 bits: Conv → Relu → Conv pairs
    "mobilenet_v2": [(8, 8, "auto"), (6, 6, "mse"), (4, 8, "mse")],
}


def held_out_scores(name: str, setting: tuple[int, int, str], equalize: bool, held, reference) -> dict:
    weight_bits, activation_bits, method = setting
    config = QuantConfig(
        weight_bits=weight_bits,
        activation_bits=activation_bits,
        calibration=CalibrationMethod(method),
        max_samples=bench.LOW_BIT_SAMPLES,
        equalize=equalize,
        speed_check=False,
    )
    return held_out.row(name, config, held, reference)


def main() -> None:
    args = held_out.arguments(__doc__.splitlines()[0], SETTINGS)
    done = held_out.printed_rows(args.resume, ("on", "off")) if args.resume else {}
    lines = [
        "## Cross-layer equalization's default, chosen on held-out calibration images",
        "",
        "`tools/choose_equalize.py`: each model quantized by `onnxq.quantize` at the setting named "
        "(`--max-samples 256`, `--no-speed-check`, defaults otherwise: GPTQ rounding below 8-bit "
        "weights) with `--equalize` and `--no-equalize`, calibrated on the protocol's 256 "
        "calibration images and scored against float on calibration-pool images neither sees "
        "(CIFAR-10 train-1017[512:]; the even-class ImageNet images after the first 256), never "
        "the evaluation split. Equalization becomes the default where it lowers the mean log "
        "held-out KL, decided apart for rows with 8-bit and with narrower activations. s: wall time "
        "of `onnxq.quantize` on 2 cores.",
        "",
        "| model | setting | equalize | KL held-out | agreement % | top-1 % | s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]

    def key(name: str, setting: tuple[int, int, str], equalize: bool) -> str:
        return f"| {name} | W{setting[0]}A{setting[1]} {setting[2]} | {'on' if equalize else 'off'} |"

    rows = held_out.choice_rows(args.models, SETTINGS, (False, True), key, held_out_scores, done)
    table, logs = held_out.grouped_log_kls(rows, lambda setting: setting[1] < 8)
    lines += [*table, ""]
    for narrow, what in ((False, "8-bit activations"), (True, "narrower activations")):
        if narrow not in logs:
            continue
        without, with_ = (float(np.mean(logs[narrow][e])) for e in (False, True))
        wins = held_out.wins(logs[narrow], False, True)
        lines.append(
            f"{what}: equalization lowers the held-out KL on {wins} of {len(logs[narrow][True])} "
            f"rows; mean log held-out KL {without:.2f} without, {with_:.2f} with: "
            f"{'on' if with_ < without else 'off'} by default."
        )
    bench.write_section(args.out, "equalize-default", "\n".join(lines) + "\n", bench.machine_description())
    print("\n".join(lines[-2:]))


if __name__ == "__main__":
    main()
