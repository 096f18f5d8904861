"""How refinement's result grows with its iterations per unit, on held-out calibration images.

Each count is one `onnxq.quantize` run of the model with the mse scale search and `--refine`
(the loss given, no time budget, its other defaults), calibrated on the protocol's 256
calibration images and scored against float on calibration-pool images it never saw
(`bench.held_out_split`; never the evaluation split). Prints one line per count; the
refine-targets section of BENCHMARKS.md quotes them by hand.

    .venv/bin/python tools/refine_iterations.py --model mobilenet_v2 --bits 4 4 --iters 125 500
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import held_out

from onnxq.config import CalibrationMethod, QuantConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--bits", nargs=2, type=int, default=(4, 4), metavar=("W", "A"))
    parser.add_argument("--loss", default="mse", choices=["mse", "mae", "pd"])
    parser.add_argument("--iters", nargs="+", type=int, default=[125, 500])
    args = parser.parse_args()
    held = bench.held_out_split(args.model)
    reference = bench.logits(onnx.load(bench.model_path(args.model)), held[0])
    for iterations in args.iters:
        config = QuantConfig(
            weight_bits=args.bits[0],
            activation_bits=args.bits[1],
            calibration=CalibrationMethod.MSE,
            max_samples=bench.LOW_BIT_SAMPLES,
            speed_check=False,
            refine=True,
            refine_loss=args.loss,
            refine_iters=iterations,
        )
        row = held_out.row(args.model, config, held, reference)
        print(
            f"{args.model} W{args.bits[0]}A{args.bits[1]} {args.loss}, {iterations} iterations: "
            f"held-out KL {row['kl']:.4f}, agreement {100 * row['agreement']:.2f} %, "
            f"top-1 {100 * row['top1']:.2f} %, {row['seconds']:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
