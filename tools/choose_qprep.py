"""Choose whether QPRep is on by default, on calibration data only.

For each merged re-parameterized model (RepVGG, MobileOne: `--fuse-branches`) and each width,
`onnxq.quantize --refine` runs with and without QPRep on the protocol's 256 calibration images
(train-1017[:256]) and is scored against the float model on CIFAR-10 training images it never
saw (train-1017[512:]): KL of the quantized from the float softmax, top-1 agreement, top-1.
QPRep becomes the default where it lowers the mean log held-out KL over all models and widths
(the rule tools/choose_refine_loss.py follows). No evaluation image is read. Writes the
"qprep-default" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import held_out

from onnxq.config import CalibrationMethod, QuantConfig

MODELS = ["repvgg_cifar10", "mobileone_cifar10"]
WIDTHS = [(6, 6), (4, 8)]  # where issue 15 sets merged targets below float


def held_out_scores(
    name: str, bits: tuple[int, int], qprep: bool, held: tuple, reference: np.ndarray
) -> dict:
    """Quantize the merged model with refinement, with or without QPRep; score on held-out images."""
    config = QuantConfig(
        weight_bits=bits[0],
        activation_bits=bits[1],
        calibration=CalibrationMethod.MSE,
        max_samples=bench.LOW_BIT_SAMPLES,
        fuse_branches=True,
        refine=True,
        qprep=qprep,
        speed_check=False,
    )
    return held_out.row(name, config, held, reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=bench.ROOT / "BENCHMARKS.md")
    parser.add_argument("--models", nargs="+", default=MODELS)
    args = parser.parse_args()
    lines = [
        "## QPRep's default, chosen on held-out calibration images",
        "",
        "`tools/choose_qprep.py`: merged (`--fuse-branches`) models, mse scale search on "
        "train-1017[:256], then `--refine` at its defaults with and without `--qprep`; scored against "
        "float on train-1017[512:], which neither the search nor refinement sees (never the evaluation "
        "split). QPRep becomes the default if it lowers the mean log held-out KL over all rows. "
        "s: wall time of `onnxq.quantize` on 2 cores.",
        "",
        "| model | width | refinement | KL held-out | agreement % | top-1 % | s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    logs: dict[bool, list[float]] = {False: [], True: []}
    wins = 0
    for name in args.models:
        held = bench.held_out_split(name)
        reference = bench.logits(onnx.load(bench.model_path(name)), held[0])
        for bits in WIDTHS:
            kl = {}
            for qprep in (False, True):
                result = held_out_scores(name, bits, qprep, held, reference)
                kl[qprep] = result["kl"]
                logs[qprep].append(float(np.log(result["kl"])))
                lines.append(
                    f"| {name} | W{bits[0]}A{bits[1]} | {'--refine --qprep' if qprep else '--refine'} | "
                    f"{result['kl']:.4f} | {100 * result['agreement']:.2f} | {100 * result['top1']:.2f} | "
                    f"{result['seconds']:.0f} |"
                )
                print(lines[-1], flush=True)
            wins += kl[True] < kl[False]
    means = {qprep: float(np.mean(values)) for qprep, values in logs.items()}
    chosen = means[True] < means[False]
    lines += [
        "",
        f"QPRep lowers the held-out KL on {wins} of {len(logs[True])} rows; mean log held-out KL "
        f"{means[False]:.2f} without, {means[True]:.2f} with. Chosen: QPRep {'on' if chosen else 'off'} "
        "by default for merged convs under `--refine`.",
    ]
    bench.write_section(args.out, "qprep-default", "\n".join(lines) + "\n", bench.machine_description())
    print("chosen", "on" if chosen else "off")


if __name__ == "__main__":
    main()
