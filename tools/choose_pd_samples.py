"""Choose how many samples pd's prediction term takes where a time budget binds, on calibration
data only.

Under `--time-budget`, refinement's first units (MobileNetV2's at 112×112) reach a fraction of
their iterations: every pd iteration runs the rest of the network in float, forward and
backward, on the whole batch. `--refine-pd-samples N` takes pd's KL term on N samples of each
batch instead, only in a unit whose timed pace on the whole batch would not reach its
iterations in its share (the feature term keeps every sample). For each setting, MobileNetV2
W4A4 (mse scale search, `--refine` with pd, `--time-budget`) is quantized on the protocol's 256
calibration images and scored against float on calibration-pool images no stage sees
(`bench.held_out_split`): KL of the quantized from the float softmax, top-1 agreement, top-1.
The default is the N with the lowest held-out KL, 0 (never) unless another beats it. No
evaluation image is read. Writes the "pd-samples-default" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import held_out

MODELS = ["mobilenet_v2"]
SAMPLES = [0, 8]  # 0: pd on every sample of the batch (never narrowed)
BUDGET_S = 1800.0  # issue 14's 30 minutes for MobileNetV2


def held_out_scores(name: str, samples: int, budget: float, held, reference) -> dict:
    config = held_out.mse_config((4, 4), refine=True, refine_pd_samples=samples, time_budget=budget)
    return held_out.row(name, config, held, reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=bench.ROOT / "BENCHMARKS.md")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--samples", type=int, nargs="+", default=SAMPLES)
    parser.add_argument("--budget", type=float, default=BUDGET_S)
    args = parser.parse_args()
    lines = [
        "## pd's samples where the time budget binds, chosen on held-out calibration images",
        "",
        "`tools/choose_pd_samples.py`: W4A4, mse scale search on the protocol's 256 calibration images, "
        f"then `--refine` (pd) under `--time-budget {args.budget:g}` with `--refine-pd-samples` N (0: "
        "every sample of the batch); scored against float on calibration-pool images that neither "
        "calibration nor refinement sees (never the evaluation split). s: wall time of "
        "`onnxq.quantize` on 2 cores.",
        "",
        "| model | width | --refine-pd-samples | KL held-out | agreement % | top-1 % | s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    kls: dict[int, list[float]] = {samples: [] for samples in args.samples}
    for name in args.models:
        held = bench.held_out_split(name)
        reference = bench.logits(onnx.load(bench.model_path(name)), held[0])
        for samples in args.samples:
            result = held_out_scores(name, samples, args.budget, held, reference)
            kls[samples].append(result["kl"])
            lines.append(
                f"| {name} | W4A4 | {samples} | {result['kl']:.4f} | {100 * result['agreement']:.2f} | "
                f"{100 * result['top1']:.2f} | {result['seconds']:.0f} |"
            )
            print(lines[-1], flush=True)
    best = min(args.samples, key=lambda samples: sum(kls[samples]))
    lines += ["", f"Chosen: `--refine-pd-samples {best}`."]
    bench.write_section(args.out, "pd-samples-default", "\n".join(lines) + "\n", bench.machine_description())
    print("chosen", best)


if __name__ == "__main__":
    main()
