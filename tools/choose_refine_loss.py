"""Choose refinement's default loss on calibration data only.

For each loss, `onnxq.quantize --refine` runs on ResNet-20 at W4A4 and W2A4 with the protocol's
256 calibration images (train-1017[:256]) and is scored against the float model on CIFAR-10
training images it never saw (train-1017[512:]): KL of the quantized from the float softmax,
top-1 agreement with float, top-1. The loss with the lowest mean log held-out KL over the widths
becomes QuantConfig.refine_loss (the rule tools/choose_pd_lambda.py follows); the lowest per width
is printed beside it. No evaluation image is read. Writes the "refine-loss" section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

import onnxq
from onnxq.config import CalibrationMethod, QuantConfig

MODEL = "resnet20_cifar10"
WIDTHS = [(4, 4), (2, 4)]
LOSSES = ["mse", "pd"]


def softmax_kl(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(softmax(reference) ‖ softmax(logits)) over samples."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(1, keepdims=True)
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    log_p, log_q = log_softmax(reference), log_softmax(logits)
    return float((np.exp(log_p) * (log_p - log_q)).sum(1).mean())


def held_out_scores(bits: tuple[int, int], loss: str | None, held: tuple, reference: np.ndarray) -> dict:
    """Quantize (search only where `loss` is None) and score on the held-out images."""
    config = QuantConfig(
        weight_bits=bits[0],
        activation_bits=bits[1],
        calibration=CalibrationMethod.MSE,
        max_samples=bench.LOW_BIT_SAMPLES,
        refine=loss is not None,
        refine_loss=loss or QuantConfig.refine_loss,
        speed_check=False,
    )
    start = time.perf_counter()
    calib = bench.split_for(MODEL, bench.LOW_BIT_SAMPLES).calib
    result = onnxq.quantize(bench.model_path(MODEL), calib, config)
    seconds = time.perf_counter() - start
    logits = bench.logits(result.model, held[0])
    return {
        "kl": softmax_kl(reference, logits),
        "agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
        "top1": float((logits.argmax(1) == held[1]).mean()),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=bench.ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    held = bench.held_out_split(MODEL)
    reference = bench.logits(onnx.load(bench.model_path(MODEL)), held[0])
    lines = [
        "## Refinement's default loss, chosen on held-out calibration images",
        "",
        f"`tools/choose_refine_loss.py`: {MODEL}, mse scale search on train-1017[:256], then `--refine` "
        "with each loss at its other defaults; scored against float on train-1017[512:], which neither "
        "the search nor refinement sees (never the evaluation split). The lowest mean log held-out KL "
        "over the widths wins. s: wall time of `onnxq.quantize` on 2 cores.",
        "",
        "| width | refinement | KL held-out | agreement % | top-1 % | s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    chosen, logs = [], {loss: [] for loss in LOSSES}
    for bits in WIDTHS:
        kl = {}
        for loss in [None, *LOSSES]:
            result = held_out_scores(bits, loss, held, reference)
            if loss is not None:
                kl[loss] = result["kl"]
                logs[loss].append(np.log(result["kl"]))
            lines.append(
                f"| W{bits[0]}A{bits[1]} | {loss + ' loss' if loss else 'none (search only)'} | "
                f"{result['kl']:.4f} | {100 * result['agreement']:.2f} | {100 * result['top1']:.2f} | "
                f"{result['seconds']:.0f} |"
            )
            print(lines[-1], flush=True)
        chosen.append(f"W{bits[0]}A{bits[1]}: {min(kl, key=kl.get)}")
    means = {loss: float(np.mean(values)) for loss, values in logs.items()}
    best = min(means, key=means.get)
    cells = ", ".join(f"{loss} {value:.2f}" for loss, value in means.items())
    lines += ["", f"Lowest held-out KL: {'; '.join(chosen)}."]
    lines += [f"Chosen: {best} (mean log held-out KL {cells})."]
    bench.write_section(args.out, "refine-loss", "\n".join(lines) + "\n", bench.machine_description())
    print("chosen", best)


if __name__ == "__main__":
    main()
