"""Benchmark onnxq against onnxruntime's quantize_static; writes one section of BENCHMARKS.md.

Protocol (../shared/data/README.md): CIFAR-10 models calibrate on train-1017.npz and evaluate on
test-1017.npz; ImageNet models calibrate on the even-class half of imagenet-sample and evaluate
on the odd-class half. Every model runs at onnxruntime's default optimization level (the integer
kernels users deploy); latency is batch 1 on 2 threads, float and quantized in the same run.

Suites (each rewrites only its own section of BENCHMARKS.md):
    w8a8     W8A8 on ../shared/models against onnxruntime (issue 2)
    reparam  the re-parameterized models of models/: unfused, fused, W8A8 (issue 3)
    lowbit   2-8 bits x granularity x weight range rule (issue 4)
    calib    scales chosen by error: mse, mae, pd, bias correction (issue 5)
    refine   rounding refinement: learned rounding and activation steps (issue 14)
    rounding GPTQ weight rounding against nearest rounding (issue 14)
    equalize cross-layer equalization against none (issues 13 and 14)
    seeds    BatchNorm statistics: data-free calibration, distribution correction (issue 15)
    qprep    merged re-parameterized models: refinement and QPRep (issue 15)
    zoo      real exported models of tools/build_zoo.py: tools/zoo_bench.py, which this runs

What each suite runs, and its table: tools/bench_suites.py. Repeated calibration draws:
tools/bench_draws.py. Defaults are chosen on held-out calibration images by the
tools/choose_*.py scripts (their rows: tools/held_out.py), never here.

    .venv/bin/python tools/bench.py w8a8 [--models resnet20_cifar10 ...] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

# This checkout's onnxq, not the one an editable install points at: a benchmark run from a
# worktree snapshot must measure that snapshot, in this process and in its `onnxq` processes.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import onnxq
from onnxq import speed
from onnxq.calib.images import load_image
from onnxq.calib.runner import fixed_batch
from onnxq.evaluate import kernel_summary, kl_divergence
from onnxq.io import session

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
THREADS = 2
CALIBRATION_SAMPLES = 512
LOW_BIT_SAMPLES = 256


@dataclass
class Row:
    setting: str
    top1: float
    agreement: float
    kl: float
    size_kb: float
    calib_s: float | None = None
    latency_ratio: float | None = None
    kernels: str = ""
    peak_mb: float | None = None


@dataclass
class Split:
    calib: np.ndarray
    x: np.ndarray
    y: np.ndarray


def model_path(name: str) -> Path:
    """models/ (re-parameterized models trained here) first, then ../shared/models."""
    local = ROOT / "models" / f"{name}.onnx"
    return local if local.exists() else SHARED / "models" / f"{name}.onnx"


def cifar_split(samples: int = CALIBRATION_SAMPLES) -> Split:
    pre = onnxq.Preprocess.preset("cifar10")
    mean = np.asarray(pre.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(pre.std, np.float32).reshape(1, 3, 1, 1)
    train = np.load(SHARED / "data/cifar10/train-1017.npz")
    test = np.load(SHARED / "data/cifar10/test-1017.npz")

    def prep(x):
        return ((x.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)

    return Split(prep(train["x"][:samples]), prep(test["x"]), test["y"])


def imagenet_split(samples: int = 500) -> Split:
    root = SHARED / "data/imagenet-sample"
    pre = onnxq.Preprocess.preset("imagenet")
    synsets = sorted(p.name for p in root.iterdir() if p.is_dir())
    images = [load_image(sorted((root / s).iterdir())[0], pre) for s in synsets]
    x = np.stack(images).astype(np.float32)
    labels = np.arange(len(synsets))
    return Split(x[0::2][:samples], x[1::2], labels[1::2])


def split_for(name: str, samples: int) -> Split:
    return cifar_split(samples) if "cifar" in name else imagenet_split(samples)


def run_onnxq(path, calib: np.ndarray, config: onnxq.QuantConfig) -> tuple[onnx.ModelProto, float]:
    start = time.perf_counter()
    result = onnxq.quantize(path, calib, config)
    return result.model, time.perf_counter() - start


def run_onnxruntime(
    path: Path,
    calib: np.ndarray | dict[str, np.ndarray],
    method: str,
    weight_type: str = "QInt8",
    activation_type: str = "QUInt8",
    batch: int = 8,
) -> tuple[onnx.ModelProto, float]:
    """onnxruntime's own quantize_static: QDQ, per-channel weights; `calib` is the array of the
    input named "input" or a feed of named inputs, read `batch` samples at a time."""
    feed = calib if isinstance(calib, dict) else {"input": calib}
    count = len(next(iter(feed.values())))
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [{k: v[i : i + batch] for k, v in feed.items()} for i in range(0, count, batch)]
            )

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
            activation_type=getattr(QuantType, activation_type),
            weight_type=getattr(QuantType, weight_type),
            calibrate_method=getattr(CalibrationMethod, method),
        )
        seconds = time.perf_counter() - start
        return onnx.load(out), seconds


def logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """In runs of 50 samples, or of the batch the model fixes (a static export's one image)."""
    run, step = session(model).run, fixed_batch(model) or 50
    return np.concatenate([run(None, {"input": x[i : i + step]})[0] for i in range(0, len(x), step)])


def score(model: onnx.ModelProto, split: Split, reference: np.ndarray) -> tuple[float, float, float]:
    out = logits(model, split.x)
    top1 = float((out.argmax(1) == split.y).mean())
    agreement = float((out.argmax(1) == reference.argmax(1)).mean())
    return top1, agreement, float(kl_divergence(reference, out).mean())


LATENCY_ROUNDS = 10  # blocks per model in side_by_side_ms: a benchmark can wait longer than quantize's check
LATENCY_SECONDS = 5.0


def side_by_side_ms(models: list[onnx.ModelProto], sample: dict[str, np.ndarray]) -> list[float]:
    """Batch-1 milliseconds of each model, timed in interleaved blocks (onnxq.speed), so that
    load elsewhere on the machine hits float and quantized alike."""
    return speed.compare(models, sample, threads=THREADS, rounds=LATENCY_ROUNDS, seconds=LATENCY_SECONDS)


def measure(
    name: str, settings: dict[str, Callable], *, samples: int, latency: bool, split: Split | None = None
) -> tuple[float, list[Row]]:
    """Build each setting's model, score it against the float model on the evaluation split.

    `split` replaces the protocol's default split (the first `samples` calibration images)."""
    path = model_path(name)
    split = split or split_for(name, samples)
    float_model = onnx.load(path)
    reference = logits(float_model, split.x)
    float_top1 = float((reference.argmax(1) == split.y).mean())
    sample = {"input": split.x[:1]}
    rows, built = [], []
    for setting, build in settings.items():
        print(f"  {name}: {setting}", flush=True)
        try:
            model, seconds, *peak = build(path, split.calib)
        except Exception as err:  # a baseline that cannot do this width is a result, not a crash
            print(f"    failed: {str(err).splitlines()[0][:160]}", flush=True)
            rows.append(Row(f"{setting} (failed: {str(err).splitlines()[0][:80]})", *([float("nan")] * 4)))
            continue
        top1, agreement, kl = score(model, split, reference)
        size = len(model.SerializeToString()) / 1024
        rows.append(Row(setting, top1, agreement, kl, size, seconds, None, kernel_summary(model), *peak))
        built.append((rows[-1], model))
        print(f"    top-1 {100 * top1:.2f} (float {100 * float_top1:.2f}), agreement {100 * agreement:.2f}")
    if latency and built:
        float_ms, *each_ms = side_by_side_ms([float_model, *(model for _, model in built)], sample)
        for (row, _), ms in zip(built, each_ms, strict=True):
            row.latency_ratio = ms / float_ms
    return float_top1, rows


def run_onnxq_cli(
    path: Path, calib: np.ndarray | Path, flags: list[str]
) -> tuple[onnx.ModelProto, float, float]:
    """`onnxq quantize` in its own process: (model, wall seconds, peak resident MB of that process).

    `calib` is an array (saved as .npy for the command) or a data file given as it is."""
    model, seconds, peak_mb, _ = run_onnxq_cli_notes(path, calib, flags)
    return model, seconds, peak_mb


def run_onnxq_cli_notes(
    path: Path, calib: np.ndarray | Path, flags: list[str]
) -> tuple[onnx.ModelProto, float, float, str]:
    """run_onnxq_cli, and what the command printed (its notes), for tools that read them."""
    with tempfile.TemporaryDirectory() as folder:
        data, out = os.path.join(folder, "calib.npy"), os.path.join(folder, "quantized.onnx")
        memory = os.path.join(folder, "peak_kb")
        if isinstance(calib, Path):
            data = str(calib)
        else:
            np.save(data, calib)
        command = [sys.executable, "-m", "onnxq", "quantize", str(path), "--calib", data, "-o", out, *flags]
        # GNU time reports its own child's peak: a child forked straight from this (large) process
        # would report this process's resident size too (Linux keeps the high-water mark on exec).
        command = ["/usr/bin/time", "-f", "%M", "-o", memory, *command]
        start = time.perf_counter()
        finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if finished.returncode != 0:
            lines = finished.stderr.strip().splitlines()
            raise RuntimeError(lines[-1] if lines else f"exit status {finished.returncode}")
        peak_mb = int(Path(memory).read_text().split()[-1]) / 1024
        return onnx.load(out), seconds, peak_mb, finished.stdout + finished.stderr


HELD_OUT_NAMES = {
    "cifar": "train-1017[512:]",
    "imagenet": f"the even-class ImageNet images after the first {LOW_BIT_SAMPLES}",
}


def held_out_split(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Calibration-pool images the calibration never sees, with their labels: where defaults are
    chosen, never on the evaluation split. CIFAR-10: train-1017[512:]; ImageNet: the even-class
    images after the LOW_BIT_SAMPLES refinement calibrates on."""
    if "cifar" in name:
        return cifar_split(1017).calib[512:], np.load(SHARED / "data/cifar10/train-1017.npz")["y"][512:]
    pool = imagenet_split()
    return pool.calib[LOW_BIT_SAMPLES:], np.arange(0, 2 * len(pool.calib), 2)[LOW_BIT_SAMPLES:]


HEADER = """# Benchmarks

Written by `tools/bench.py` (do not edit by hand; each suite rewrites its own section). Protocol:
../shared/data/README.md; evaluation on test-1017 (CIFAR-10) or the 500 odd-class imagenet-sample
images. All models run at onnxruntime's default optimization level. Latency: batch 1, 2 threads,
quantized over float, measured in the same run (compare ratios, not milliseconds, across runs);
sections written from 2026-11-30 on time float and quantized models side by side in interleaved
blocks (onnxq.speed), earlier ones one after another.
"""


def write_section(path: Path, suite: str, text: str, machine: str) -> None:
    """Replace this suite's section of the file (or append it), keeping the others."""
    begin, end = f"<!-- suite: {suite} -->", f"<!-- end suite: {suite} -->"
    section = f"{begin}\n{text}\nMachine: {machine}\n{end}"
    current = path.read_text() if path.exists() else HEADER
    if begin not in current and "<!-- suite:" not in current:
        current = HEADER  # an old single-table file: start over
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    updated = (
        pattern.sub(lambda _: section, current) if begin in current else current.rstrip() + "\n\n" + section
    )
    path.write_text(updated.rstrip() + "\n")


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


def _selected(label: str, wanted: list[str], exact: bool) -> bool:
    return label in wanted if exact else any(part in label for part in wanted)


def main() -> None:
    import bench_suites  # it imports this module's protocol: imported here, not at the top

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=sorted([*bench_suites.SUITES, "zoo"]))
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument(
        "--only", nargs="*", help="Run only the settings whose label contains one of these (own section)."
    )
    parser.add_argument("--exact", action="store_true", help="--only names whole labels.")
    args = parser.parse_args()
    if args.suite == "zoo":  # the zoo's own cache, not ../shared
        import zoo_bench  # it imports this module's helpers: imported here, not at the top

        zoo_bench.run_zoo(args.models, args.out)
        return
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} is missing: the benchmark needs ../shared")
    make_settings, samples, latency = bench_suites.SUITES[args.suite]
    models = args.models or bench_suites.DEFAULT_MODELS[args.suite]
    machine = machine_description()
    for name in models:  # each model's table is its own section, so suites can run model by model
        settings = make_settings(name)
        section = f"{args.suite}/{name}"
        if args.only:
            settings = {k: v for k, v in settings.items() if _selected(k, args.only, args.exact)}
            section += " (" + ", ".join(args.only) + ")"
        float_top1, rows = measure(name, settings, samples=samples, latency=latency)
        extra = bench_suites.fusion_check(name) if args.suite == "reparam" else ""
        if args.suite in ("refine", "rounding", "equalize", "sums", "zero-point"):
            extra, _ = bench_suites.refine_extra(name), bench_suites.HELD_OUT.clear()
        text = bench_suites.markdown(args.suite, section.split("/", 1)[1], float_top1, rows, samples, extra)
        write_section(args.out, section, text, machine)
        print("wrote", name, "to", args.out, flush=True)


if __name__ == "__main__":
    main()
