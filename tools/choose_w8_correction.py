"""Choose what corrects 8-bit weights by default: nothing (nearest rounding), bias correction,
GPTQ's rounding, or both, on held-out calibration data.

tools/fidelity_bound.py shows 8-bit per-channel weights alone keep under 30 dB on most trained
detectors: their rounding errors add up over 60-100 layers. Bias correction removes each layer's
mean output error; GPTQ rounds each layer's weights so that their errors cancel on the
calibration inputs. "gptq" alone runs in the observation pass on the float model's inputs
(onnxq.calib.streamed_gptq), so auto's choice between percentile and min-max ranges stays; with
bias correction both run in the calibration sweep, on the quantized model's inputs, with the
percentile ranges fixed.

Rows: W8A8 at onnxq's defaults otherwise (no fidelity fallback, no speed check):
- the zoo's trained models (tools/build_zoo.py): quantized on the first half of each calibration
  file, worst output SQNR on the second half, never the evaluation file;
- the shared classifiers: quantized on the protocol's 256 calibration images, KL to float on the
  held-out calibration images (tools/held_out.py), never the evaluation split.

    python tools/choose_w8_correction.py [--zoo ...] [--shared ...] [--variants ...]
        [--max-positions N ...] [--grid-rows N|every ...] [--out FILE]

--max-positions: each GPTQ variant once per value of onnxq.calib.patches.MAX_POSITIONS, the
patches per sample a Conv's H reads at most (random ones where a map has more). --grid-rows: once
per value of GRID_ROWS_PER_INPUT, the patches per input per sample below which a gathered map is
read in full and above which on a sub-grid ('every': always in full). The section
"GPTQ's patches per sample" was measured at d785161 with --min-positions, a floor of patches
per sample (max(floor, 8 per input correlated), at most 16384) since taken back.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import held_out
from zoo_bench import zoo_batch, zoo_calibration_halves, zoo_dir, zoo_fidelity, zoo_manifest, zoo_outputs

import onnxq
from onnxq.calib import patches

ZOO = [
    "ppocr_det_v4",
    "picodet_layout",
    "yolov8n_nudenet",
    "yolox_ddddocr",
    "ppocr_rec_v4",
    "ppocr_cls_v2",
    "efficientnet_lite0",
    "magika_v3_3",
]  # the trained ones: random weights say little about rounding
SHARED = ["resnet20_cifar10", "mobilenet_v2"]
VARIANTS = {
    "nearest": {"weight_rounding": "nearest", "bias_correction": False},
    "bias correction": {"weight_rounding": "nearest", "bias_correction": True},
    "gptq": {"weight_rounding": "gptq", "bias_correction": False},
    "gptq + bias correction": {"weight_rounding": "gptq", "bias_correction": True},
}


def config(variant: str) -> onnxq.QuantConfig:
    return onnxq.QuantConfig(speed_check=False, fidelity_fallback=False, **VARIANTS[variant])


def zoo_row(entry: dict, variant: str) -> tuple[float, float]:
    """Worst output SQNR on the held-out half of the calibration file, seconds."""
    zoo = zoo_dir()
    fit, held = zoo_calibration_halves(entry)
    float_model = onnx.load(zoo / entry["file"])
    start = time.perf_counter()
    model = onnxq.quantize(str(zoo / entry["file"]), fit, config(variant)).model
    seconds = time.perf_counter() - start
    batch = zoo_batch(entry, len(next(iter(held.values()))))
    reference, got = zoo_outputs(float_model, held, batch), zoo_outputs(model, held, batch)
    names = [output.name for output in float_model.graph.output]
    return min(sqnr for _, sqnr in zoo_fidelity(entry, names, reference, got).values()), seconds


@contextlib.contextmanager
def patch_sampling(setting: dict[str, object]):
    """onnxq.calib.patches's constants named in `setting` (MAX_POSITIONS, GRID_ROWS_PER_INPUT)
    set for the runs inside."""
    before = {name: getattr(patches, name) for name in setting}
    for name, value in setting.items():
        setattr(patches, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(patches, name, value)


def columns(variants: list[str], positions: list[int], grids: list[str]) -> list[tuple[str, str, dict]]:
    """(label, variant, rounding constants) per column: GPTQ variants once per value given."""
    settings = [(f", ≤ {n} patches", {"MAX_POSITIONS": n}) for n in positions]
    for grid in grids:
        every = grid == "every"
        label = ", every position" if every else f", sub-grid ≥ {grid} per input"
        settings.append((label, {"GRID_ROWS_PER_INPUT": None if every else int(grid)}))
    result = []
    for variant in variants:
        if variant.startswith("gptq") and settings:
            result += [(variant + label, variant, setting) for label, setting in settings]
        else:
            result.append((variant, variant, {}))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", nargs="*", default=ZOO)
    parser.add_argument("--shared", nargs="*", default=SHARED)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--max-positions", nargs="*", type=int, default=[])
    parser.add_argument("--grid-rows", nargs="*", default=[], help="GRID_ROWS_PER_INPUT values, or 'every'")
    parser.add_argument("--out", type=Path, help="also write the markdown section here")
    args = parser.parse_args()
    runs = columns(args.variants, args.max_positions, args.grid_rows)
    labels = [label for label, _, _ in runs]
    lines = [
        "## What corrects 8-bit weights, chosen on held-out calibration data",
        "",
        "`tools/choose_w8_correction.py`: W8A8 at onnxq's defaults otherwise (no fidelity fallback, no "
        "speed check). Zoo: quantized on the first half of each calibration file, worst output SQNR "
        "(dB) on the second half. Shared classifiers: quantized on the protocol's 256 calibration "
        "images, KL to float on held-out calibration images. Never an evaluation split. s: wall time "
        "of `onnxq.quantize` on 2 cores.",
        "",
        "| model | " + " | ".join(f"{label} | s" for label in labels) + " |",
        "| --- |" + " ---: | ---: |" * len(runs),
    ]
    print("\n".join(lines), flush=True)
    sqnr: dict[str, list[float]] = {label: [] for label in labels}
    kl: dict[str, list[float]] = {label: [] for label in labels}
    manifest = zoo_manifest() if args.zoo else {}
    for name in args.zoo:
        cells = []
        for label, variant, setting in runs:
            with patch_sampling(setting):
                worst, seconds = zoo_row(manifest[name], variant)
            sqnr[label].append(worst)
            cells += [f"{worst:.1f} dB", f"{seconds:.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    for name in args.shared:
        held = bench.held_out_split(name)
        reference = bench.logits(onnx.load(bench.model_path(name)), held[0])
        cells = []
        for label, variant, setting in runs:
            with patch_sampling(setting):
                scores = held_out.row(name, config(variant), held, reference)
            kl[label].append(scores["kl"])
            cells += [f"KL {scores['kl']:.5f}, top-1 {100 * scores['top1']:.2f}", f"{scores['seconds']:.0f}"]
        lines.append(f"| {name} (held-out) | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines.append("")
    for label in labels:
        mean_sqnr = np.mean(sqnr[label]) if sqnr[label] else float("nan")
        mean_kl = np.exp(np.mean(np.log(kl[label]))) if kl[label] else float("nan")
        lines.append(
            f"- {label}: zoo mean worst SQNR {mean_sqnr:.2f} dB; shared geometric mean KL {mean_kl:.4f}"
        )
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n\nMachine: " + bench.machine_description() + "\n")


if __name__ == "__main__":
    main()
