"""Choose λ of the PD regulariser on calibration data only.

For each λ, `onnxq.quantize --calib-method pd` runs with its default held-out split (20 % of the
calibration images never seen by the search) and reports the prediction difference (KL of the
quantized from the float softmax) on the search and held-out parts. The λ with the lowest mean
held-out KL over the models and seeds becomes onnxq.config.PD_LAMBDA. No evaluation image is
read. Writes the "pd-lambda" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

import onnxq
from onnxq.config import CalibrationMethod, QuantConfig

LAMBDAS = [0.0, 0.1, 1.0, 10.0]
SETTINGS = {"resnet20_cifar10": (4, 4), "mobileone_cifar10": (4, 8)}


def held_out_losses(name: str, bits: tuple[int, int], lam: float, seed: int) -> dict[str, float]:
    split = bench.split_for(name, bench.LOW_BIT_SAMPLES)
    config = QuantConfig(
        weight_bits=bits[0],
        activation_bits=bits[1],
        calibration=CalibrationMethod.PD,
        pd_lambda=lam,
        seed=seed,
        max_samples=bench.LOW_BIT_SAMPLES,
    )
    return onnxq.quantize(bench.model_path(name), split.calib, config).calibration.pd_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=bench.ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    lines = [
        "## PD regulariser λ, chosen on held-out calibration images",
        "",
        "`tools/choose_pd_lambda.py`: pd calibration with 256 calibration images, 20 % of them held out "
        f"of the search (seeds 0–{args.seeds - 1}); KL of the quantized from the float softmax. "
        "Lowest mean held-out KL wins.",
        "",
        "| model | bits | λ | KL search, before pd | KL search | KL held-out, before pd | KL held-out |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    score = {}
    for lam in LAMBDAS:
        held = []
        for name, bits in SETTINGS.items():
            runs = [held_out_losses(name, bits, lam, seed) for seed in range(args.seeds)]
            mean = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
            held.append(np.log(mean["held-out"]))
            lines.append(
                f"| {name} | W{bits[0]}A{bits[1]} | {lam:g} | {mean['calibration before pd']:.4f} | "
                f"{mean['calibration']:.4f} | {mean['held-out before pd']:.4f} | {mean['held-out']:.4f} |"
            )
            print(lines[-1], flush=True)
        score[lam] = float(np.mean(held))
    best = min(score, key=score.get)
    lines += ["", f"Chosen: λ = {best:g} (lowest mean log held-out KL over the models)."]
    bench.write_section(args.out, "pd-lambda", "\n".join(lines) + "\n", bench.machine_description())
    print("chosen", best)


if __name__ == "__main__":
    main()
