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
import time
from pathlib import Path

import numpy as np
import onnx

import onnxq
from onnxq.io import session
from onnxq.passes import equalize

ZOO = Path.home() / ".cache" / "onnxq" / "zoo"
MODELS = ["picodet_layout", "ppocr_det_v4", "mobilenet_v3_nhwc", "ppocr_cls_v2"]
SATURATED = {"ppocr_cls_v2"}  # a 2-class softmax output: its SQNR is one borderline sample's
HEADROOMS = [None, 1.0, 2.0, 4.0]  # None: the moves off


def outputs(model: onnx.ModelProto | str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs, one sample at a time (some zoo models have a fixed batch of 1)."""
    run = session(onnx.load(model) if isinstance(model, str) else model)
    count = len(next(iter(feed.values())))
    rows = [run.run(None, {k: v[i : i + 1] for k, v in feed.items()}) for i in range(count)]
    return [np.concatenate([row[j] for row in rows]).astype(np.float64) for j in range(len(rows[0]))]


def sqnr(reference: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference**2) / max(np.sum((reference - got) ** 2), 1e-30)))


def measure(name: str, headroom: float | None) -> tuple[float, float | None, float]:
    """Worst output SQNR on the held-out half, top-1 agreement of a 2-D output, seconds."""
    data = dict(np.load(ZOO / f"{name}.calib.npz"))
    count = len(next(iter(data.values())))
    fit = {k: v[: count // 2] for k, v in data.items()}
    held = {k: v[count // 2 :] for k, v in data.items()}
    path = str(ZOO / f"{name}.onnx")
    if headroom is not None:
        equalize.FLOAT_SIDE_HEADROOM = headroom
    config = onnxq.QuantConfig(
        equalize=False if headroom is None else None, speed_check=False, fidelity_fallback=False
    )
    start = time.perf_counter()
    model = onnxq.quantize(path, fit, config).model
    seconds = time.perf_counter() - start
    reference, got = outputs(path, held), outputs(model, held)
    worst = min(sqnr(r, g) for r, g in zip(reference, got, strict=True))
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
    for name in args.models:
        for headroom in HEADROOMS:
            label = "off" if headroom is None else f"lined up to the widest ÷ {headroom:g}"
            worst, agreement, seconds = measure(name, headroom)
            shown = "" if agreement is None else f"{agreement:.1f}"
            print(f"| {name} | {label} | {worst:.1f} | {shown} | {seconds:.0f} |", flush=True)
            if name not in SATURATED:
                means.setdefault(label, []).append(worst)
    for label, values in means.items():
        others = ", ".join(sorted(SATURATED))
        print(f"| mean of {len(values)} (not {others}) | {label} | {np.mean(values):.1f} | | |")


if __name__ == "__main__":
    main()
