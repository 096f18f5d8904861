"""Choose whether distribution correction is on by default, and its closeness λ, on calibration
data only.

For each BatchNorm model, `onnxq.quantize --refine` runs at W4A4 (mse scale search) without
distribution correction and with it at each λ of the term that keeps the corrected inputs near
the originals, on the protocol's 256 calibration images, and is scored against the float model on
calibration-pool images it never saw (`bench.held_out_split`): KL of the quantized from the float
softmax, top-1 agreement, top-1. DC becomes the default, at the λ with the lowest mean log
held-out KL, only where that mean is lower than without DC (the rule tools/choose_qprep.py
follows). ImageNet models refine under a time budget, as a user on a laptop would run them, so
DC's share of it comes out of refinement's time. No evaluation image is read.

`--at inputs` (the default) corrects the calibration images once and writes the "dc-default"
section of BENCHMARKS.md; `--at blocks` corrects each unit's float inputs as PD-Quant does
(onnxq/refine/block_correction.py) and writes "dc-blocks-default", or with `--statistics sample`
(each sample's own statistics matched, as PD-Quant's code does) "dc-blocks-sample-default".
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

MODELS = ["resnet20_cifar10_bn", "mobilenet_v2_bn"]
CLOSENESS = [1.0, 10.0]  # λ: 1 is PD-Quant's weighting; 10 moves the inputs less
IMAGENET_BUDGET_S = 600.0  # --time-budget of the ImageNet rows (tools/bench_draws.py --seeds-budget)


def held_out_scores(
    name: str,
    closeness: float | None,
    budget: float | None,
    held,
    reference,
    at: str = "inputs",
    statistics: str = "batch",
) -> dict:
    """W4A4 mse + refinement, without DC (closeness None) or with it at that λ on `at` (inputs
    or blocks); held-out scores."""
    config = QuantConfig(
        weight_bits=4,
        activation_bits=4,
        calibration=CalibrationMethod.MSE,
        max_samples=bench.LOW_BIT_SAMPLES,
        refine=True,
        distribution_correction=closeness is not None,
        correction_closeness=1.0 if closeness is None else closeness,
        correction_at=at,
        correction_statistics=statistics,
        time_budget=budget,
        speed_check=False,
    )
    return held_out.row(name, config, held, reference)


def setting(closeness: float | None, at: str = "inputs", statistics: str = "batch") -> str:
    if closeness is None:
        return "--refine"
    where = " by blocks" if at == "blocks" else ""
    whose = ", per sample" if statistics == "sample" else ""
    return f"--refine + DC{where}{whose}, λ = {closeness:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=bench.ROOT / "BENCHMARKS.md")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--imagenet-budget", type=float, default=IMAGENET_BUDGET_S)
    parser.add_argument("--at", choices=["inputs", "blocks"], default="inputs")
    parser.add_argument("--closeness", type=float, nargs="+", default=CLOSENESS)
    parser.add_argument("--statistics", choices=["batch", "sample"], default="batch")
    args = parser.parse_args()
    if args.statistics == "sample" and args.at != "blocks":
        parser.error("--statistics sample needs --at blocks")
    whose = args.statistics
    what = "each unit's float inputs (`--correction-at blocks`)" if args.at == "blocks" else "the images"
    lines = [
        "## Distribution correction's default, chosen on held-out calibration images"
        + (": block by block, as PD-Quant runs it" if args.at == "blocks" else "")
        + (", each sample's statistics" if whose == "sample" else ""),
        "",
        "`tools/choose_dc.py`: W4A4, mse scale search on the protocol's 256 calibration images, then "
        "`--refine` at its defaults without distribution correction and with it at each closeness λ "
        f"(`QuantConfig.correction_closeness`), correcting {what}; scored against float on "
        "calibration-pool images that "
        "neither calibration nor refinement sees (never the evaluation split). ImageNet rows run under "
        f"`--time-budget {args.imagenet_budget:g}`, of which DC takes a tenth; CIFAR rows have no "
        "budget. DC becomes the default at the λ with the lowest mean log held-out KL, only if that "
        "is lower than without DC. s: wall time of `onnxq.quantize` on 2 cores.",
        "",
        "| model | width | refinement | KL held-out | agreement % | top-1 % | s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    options = [None, *args.closeness]
    logs: dict[float | None, list[float]] = {option: [] for option in options}
    for name in args.models:
        held = bench.held_out_split(name)
        reference = bench.logits(onnx.load(bench.model_path(name)), held[0])
        budget = None if "cifar" in name else args.imagenet_budget
        for closeness in options:
            result = held_out_scores(name, closeness, budget, held, reference, args.at, whose)
            logs[closeness].append(float(np.log(result["kl"])))
            lines.append(
                f"| {name} | W4A4 | {setting(closeness, args.at, whose)} | {result['kl']:.4f} | "
                f"{100 * result['agreement']:.2f} | {100 * result['top1']:.2f} | {result['seconds']:.0f} |"
            )
            print(lines[-1], flush=True)
    means = {option: float(np.mean(values)) for option, values in logs.items()}
    best = min(args.closeness, key=lambda option: means[option])
    chosen = means[best] < means[None]
    summary = ", ".join(f"{setting(option, args.at, whose)} {means[option]:.2f}" for option in options)
    verdict = (
        f"on{' by blocks' if args.at == 'blocks' else ''}, λ = {best:g}"
        if chosen
        else "off (it stays available as --distribution-correction)"
    )
    lines += ["", f"Mean log held-out KL: {summary}. Chosen: distribution correction {verdict}."]
    section = "dc-blocks-default" if args.at == "blocks" else "dc-default"
    section = section.replace("blocks", "blocks-sample") if whose == "sample" else section
    bench.write_section(args.out, section, "\n".join(lines) + "\n", bench.machine_description())
    print("chosen", verdict)


if __name__ == "__main__":
    main()
