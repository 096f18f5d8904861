"""Benchmark onnxq against onnxruntime's quantize_static on ../shared/models; writes BENCHMARKS.md.

Protocol (../shared/data/README.md): CIFAR-10 models calibrate on train-1017.npz and evaluate on
test-1017.npz; ImageNet models calibrate on the even-class half of imagenet-sample and evaluate
on the odd-class half. Every model runs at onnxruntime's default optimization level (the integer
kernels users deploy); latency is batch 1 on 2 threads, float and quantized in the same run.

    .venv/bin/python tools/bench.py [--models resnet20_cifar10 ...] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

import onnxq
from onnxq.calib.data import load_image
from onnxq.evaluate import kernel_summary, kl_divergence, latency_ms
from onnxq.io import session

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
THREADS = 2
CALIBRATION_SAMPLES = 512


@dataclass
class Row:
    setting: str
    top1: float
    agreement: float
    kl: float
    calib_s: float
    latency_ratio: float
    kernels: str


def cifar_split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pre = onnxq.Preprocess.preset("cifar10")
    mean = np.asarray(pre.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(pre.std, np.float32).reshape(1, 3, 1, 1)
    train = np.load(SHARED / "data/cifar10/train-1017.npz")
    test = np.load(SHARED / "data/cifar10/test-1017.npz")

    def prep(x):
        return ((x.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)

    return prep(train["x"][:CALIBRATION_SAMPLES]), prep(test["x"]), test["y"]


def imagenet_split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    root = SHARED / "data/imagenet-sample"
    pre = onnxq.Preprocess.preset("imagenet")
    synsets = sorted(p.name for p in root.iterdir() if p.is_dir())
    images = [load_image(sorted((root / s).iterdir())[0], pre) for s in synsets]
    x = np.stack(images).astype(np.float32)
    labels = np.arange(len(synsets))
    return x[0::2], x[1::2], labels[1::2]


def run_onnxq(path: Path, calib: np.ndarray, config: onnxq.QuantConfig) -> tuple[onnx.ModelProto, float]:
    start = time.perf_counter()
    result = onnxq.quantize(path, calib, config)
    return result.model, time.perf_counter() - start


def run_onnxruntime(path: Path, calib: np.ndarray, method: str) -> tuple[onnx.ModelProto, float]:
    """onnxruntime's own quantize_static: QDQ, per-channel int8 weights, uint8 activations."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calib[i : i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):
        out = os.path.join(folder, "quantized.onnx")
        start = time.perf_counter()
        quantize_static(
            str(path),
            out,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, method),
        )
        seconds = time.perf_counter() - start
        return onnx.load(out), seconds


def score(
    model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, reference: np.ndarray
) -> tuple[float, float, float]:
    logits = np.concatenate(
        [session(model).run(None, {"input": x[i : i + 50]})[0] for i in range(0, len(x), 50)]
    )
    top1 = float((logits.argmax(1) == y).mean())
    agreement = float((logits.argmax(1) == reference.argmax(1)).mean())
    return top1, agreement, float(kl_divergence(reference, logits).mean())


def bench_model(name: str) -> tuple[float, list[Row]]:
    path = SHARED / "models" / f"{name}.onnx"
    calib, x, y = cifar_split() if "cifar" in name else imagenet_split()
    float_model = onnx.load(path)
    reference = np.concatenate(
        [session(float_model).run(None, {"input": x[i : i + 50]})[0] for i in range(0, len(x), 50)]
    )
    float_top1 = float((reference.argmax(1) == y).mean())
    sample = {"input": x[:1]}
    float_latency = latency_ms(session(float_model, threads=THREADS), sample, runs=100)
    # onnxruntime's histogram calibrator keeps every activation of every sample: with the 500
    # ImageNet images it exhausts this machine's 24 GB on MobileNetV2 (killed, measured), so it
    # gets 128 of them there. onnxq streams and calibrates on all of them.
    percentile_samples = len(calib) if "cifar" in name else 128
    percentile_label = "onnxruntime quantize_static Percentile" + (
        "" if percentile_samples == len(calib) else f" ({percentile_samples} calibration images)"
    )
    settings = {
        "onnxq W8A8 percentile (default)": lambda: run_onnxq(path, calib, onnxq.QuantConfig()),
        "onnxq W8A8 minmax": lambda: run_onnxq(
            path, calib, onnxq.QuantConfig(calibration=onnxq.CalibrationMethod.MINMAX)
        ),
        "onnxq W8A8 percentile, 7-bit weights": lambda: run_onnxq(
            path, calib, onnxq.QuantConfig(weight_range=onnxq.WeightRange.REDUCED)
        ),
        "onnxruntime quantize_static MinMax": lambda: run_onnxruntime(path, calib, "MinMax"),
        percentile_label: lambda: run_onnxruntime(path, calib[:percentile_samples], "Percentile"),
    }
    rows = []
    for setting, build in settings.items():
        print(f"  {name}: {setting}", flush=True)
        model, seconds = build()
        top1, agreement, kl = score(model, x, y, reference)
        quant_latency = latency_ms(session(model, threads=THREADS), sample, runs=100)
        rows.append(
            Row(setting, top1, agreement, kl, seconds, quant_latency / float_latency, kernel_summary(model))
        )
        print(
            f"    top-1 {100 * top1:.2f} (float {100 * float_top1:.2f}), agreement {100 * agreement:.2f}",
            flush=True,
        )
    return float_top1, rows


def markdown(results: dict[str, tuple[float, list[Row]]], machine: str) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `tools/bench.py` (do not edit by hand). Protocol: ../shared/data/README.md; "
        f"calibration on {CALIBRATION_SAMPLES} CIFAR-10 training images or the 500 even-class "
        "imagenet-sample images; evaluation on test-1017 or the 500 odd-class images. All models run at "
        "onnxruntime's default optimization level. Latency: batch 1, 2 threads, quantized over float, "
        "measured in the same run (compare ratios, not milliseconds, across runs).",
        "",
        f"Machine: {machine}",
        "",
    ]
    for name, (float_top1, rows) in results.items():
        lines += [
            f"## {name} (float top-1 {100 * float_top1:.2f} %)",
            "",
            "| setting | top-1 % | Δ float | agreement % | KL | calib. s | latency ×float | kernels |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in rows:
            lines.append(
                f"| {r.setting} | {100 * r.top1:.2f} | {100 * (r.top1 - float_top1):+.2f} | "
                f"{100 * r.agreement:.2f} | {r.kl:.4f} | {r.calib_s:.1f} | {r.latency_ratio:.2f} | "
                f"{r.kernels} |"
            )
        lines.append("")
    return "\n".join(lines)


def machine_description() -> str:
    import onnxruntime

    from onnxq.quant.kernels import int8_kernels_saturate

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "unknown CPU",
    )
    saturate = "saturate" if int8_kernels_saturate() else "do not saturate"
    runtime = f"onnxruntime {onnxruntime.__version__}"
    return (
        f"{cpu}, {os.cpu_count()} cores, {runtime}; its int8 kernels here {saturate} with full-range weights"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_models = sorted(p.stem for p in (SHARED / "models").glob("*.onnx"))
    parser.add_argument("--models", nargs="*", default=default_models)
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} is missing: the benchmark needs ../shared")
    results = {name: bench_model(name) for name in args.models}
    args.out.write_text(markdown(results, machine_description()))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
