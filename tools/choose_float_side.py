"""Choose how far equalization across a float op lines channels up (FLOAT_SIDE_HEADROOM), on
held-out calibration samples of the zoo's models whose conv outputs only float ops read.

Each model is quantized at W8A8 (no fidelity fallback, no speed check) on the first half of its
calibration file and scored against float on the second half: never its evaluation file. Rows:
the moves off (--no-equalize), and channels lined up to the widest ÷ 1, 2 and 4. The worst
output SQNR decides, averaged over the models whose outputs are not saturated probabilities.

    python tools/choose_float_side.py [--models ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_bench import zoo_batch, zoo_calibration_halves, zoo_dir, zoo_fidelity, zoo_manifest, zoo_outputs

import onnxq
from onnxq.passes import equalize

MODELS = ["picodet_layout", "ppocr_det_v4", "mobilenet_v3_nhwc", "ppocr_cls_v2"]
SATURATED = {"ppocr_cls_v2"}  # a 2-class softmax output: its SQNR is one borderline sample's
HEADROOMS = [None, 1.0, 2.0, 4.0]  # None: the moves off


def measure(entry: dict, headroom: float | None) -> tuple[float, float | None, float]:
    """Worst output SQNR on the held-out half, top-1 agreement of a 2-D output, seconds."""
    zoo = zoo_dir()
    fit, held = zoo_calibration_halves(entry)
    float_model = onnx.load(zoo / entry["file"])
    if headroom is not None:
        equalize.FLOAT_SIDE_HEADROOM = headroom
    config = onnxq.QuantConfig(
        equalize=False if headroom is None else None, speed_check=False, fidelity_fallback=False
    )
    start = time.perf_counter()
    model = onnxq.quantize(str(zoo / entry["file"]), fit, config).model
    seconds = time.perf_counter() - start
    batch = zoo_batch(entry, len(next(iter(held.values()))))
    reference, got = zoo_outputs(float_model, held, batch), zoo_outputs(model, held, batch)
    names = [output.name for output in float_model.graph.output]
    worst = min(sqnr for _, sqnr in zoo_fidelity(entry, names, reference, got).values())
    agreement = None
    if reference[0].ndim == 2:
        agreement = float(np.mean(reference[0].argmax(1) == got[0].argmax(1)) * 100)
    return worst, agreement, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    args = parser.parse_args()
    print("| model | moves across float ops | worst SQNR dB | agreement % | s |")
    print("| --- | --- | ---: | ---: | ---: |")
    means: dict[str, list[float]] = {}
    manifest = zoo_manifest()
    for name in args.models:
        for headroom in HEADROOMS:
            label = "off" if headroom is None else f"lined up to the widest ÷ {headroom:g}"
            worst, agreement, seconds = measure(manifest[name], headroom)
            shown = "" if agreement is None else f"{agreement:.1f}"
            print(f"| {name} | {label} | {worst:.1f} | {shown} | {seconds:.0f} |", flush=True)
            if name not in SATURATED:
                means.setdefault(label, []).append(worst)
    for label, values in means.items():
        others = ", ".join(sorted(SATURATED))
        print(f"| mean of {len(values)} (not {others}) | {label} | {np.mean(values):.1f} | | |")


if __name__ == "__main__":
    main()
