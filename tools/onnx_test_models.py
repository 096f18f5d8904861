"""Every model onnx ships as backend test data through `onnxq quantize`: a sweep of exporters'
forms (Caffe2's IR version 3 files, torch's single-module and single-operator exports) in which
no run may end in a traceback or an internal error.

Each model is calibrated on 8 copies of its own test input, jittered by 10 % of its spread and
concatenated along the first axis (a fixed batch of N takes 8·N rows), or on normal noise where
the test input is missing. Settings: W8A8 at the defaults on every model; W4A8 mse on those W8A8
quantized; W2A4 with `--refine --refine-iters 20` on those too, without the Caffe2 ImageNet
models (minutes each). Every run is its own `onnxq quantize` process with `--no-speed-check`.
An outcome is "quantized" (exit 0 and a file), "refused" (exit 1 and one line naming the
problem; its text is listed) or a failure (a traceback, "internal error", or exit 0 without a
file).

Writes the "onnx-test-models" section of BENCHMARKS.md.

    python tools/onnx_test_models.py [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import zoo_bench

PROTOCOL = " ".join(__doc__.split("\n\n")[1].split())  # the docstring's second paragraph, one line
DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
GROUPS = ("light", "pytorch-converted", "pytorch-operator", "simple")
SAMPLES = 8
REFINED_LIGHT = {"light_squeezenet", "light_shufflenet"}  # the other Caffe2 models refine for minutes
SETTINGS = {
    "W8A8 (default)": [],
    "W4A8 mse": ["--w-bits", "4", "--calib-method", "mse"],
    "W2A4 --refine": ["--w-bits", "2", "--a-bits", "4", "--refine", "--refine-iters", "20"],
}


def test_models() -> list[tuple[str, Path, Path | None]]:
    """(name, model file, folder of its test inputs or None)."""
    found = [(path.stem, path, None) for path in sorted((DATA / "light").glob("*.onnx"))]
    for group in GROUPS[1:]:
        for folder in sorted((DATA / group).glob("*")):
            if (folder / "model.onnx").exists():
                found.append((f"{group}/{folder.name}", folder / "model.onnx", folder))
    return found


def calibration_data(path: Path, folder: Path | None) -> dict[str, np.ndarray]:
    model = onnx.load(path, load_external_data=False)
    stored = {t.name for t in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in stored]
    given = sorted((folder / "test_data_set_0").glob("input_*.pb")) if folder else []
    rng = np.random.default_rng(0)
    arrays = {}
    for index, value in enumerate(inputs):
        if index < len(given):
            example = numpy_helper.to_array(onnx.load_tensor(str(given[index])))
        else:
            dims = [d.dim_value if d.dim_value > 0 else 1 for d in value.type.tensor_type.shape.dim]
            example = rng.standard_normal(dims).astype(np.float32)
        arrays[value.name] = _copies(example, rng)
    return arrays


def _copies(example: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SAMPLES jittered copies along the first axis (integer and string inputs repeated)."""
    if example.ndim == 0:
        return example
    if example.dtype.kind != "f":
        return np.concatenate([example] * SAMPLES)
    spread = float(np.std(example)) + 1e-3 if example.size else 1.0
    noise = [0.1 * spread * rng.standard_normal(example.shape) for _ in range(SAMPLES)]
    return np.concatenate([(example + n).astype(example.dtype) for n in noise])


def run(path: Path, data: Path, arguments: list[str]) -> tuple[str, str]:
    """(outcome, the last line of stderr, its file paths and quoted names elided)."""
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "model.q.onnx"
        command = [sys.executable, "-m", "onnxq", "quantize", str(path), "-o", str(target)]
        done = subprocess.run(
            [*command, "--calib", str(data), "--no-speed-check", *arguments],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        written = target.exists()
    last = (done.stderr.strip().splitlines() or [""])[-1].replace(f"{data.parent}/", "")
    last = re.sub(r"'[^'\s]*'", "'…'", re.sub(r"\S+\.npz", "DATA.npz", last))
    if "Traceback" in done.stderr or "internal error" in last:
        return "failed", last
    if done.returncode == 0:
        return ("quantized", "") if written else ("failed", "exit 0 without a file")
    return "refused", last.removeprefix("onnxq: error: ")


def sweep(models, folder: Path) -> dict[str, dict[str, tuple[str, str]]]:
    outcomes: dict[str, dict[str, tuple[str, str]]] = {setting: {} for setting in SETTINGS}
    for name, path, tests in models:
        data = folder / (name.replace("/", "__") + ".npz")
        np.savez(data, **calibration_data(path, tests))
        for setting, arguments in SETTINGS.items():
            if setting != "W8A8 (default)" and outcomes["W8A8 (default)"][name][0] != "quantized":
                continue
            if setting == "W2A4 --refine" and name.startswith("light_") and name not in REFINED_LIGHT:
                continue
            outcomes[setting][name] = run(path, data, arguments)
            print(setting, name, *outcomes[setting][name], flush=True)
    return outcomes


def markdown(outcomes) -> str:
    lines = [
        "## onnx's own test models through onnxq (issue 13: every failure a one-line error)",
        "",
        f"`tools/onnx_test_models.py` at {zoo_bench.source_version()}, onnx {onnx.__version__}: {PROTOCOL}",
        "",
        "| setting | models | quantized | refused | failed |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for setting, found in outcomes.items():
        counts = Counter(outcome for outcome, _ in found.values())
        lines.append(
            f"| {setting} | {len(found)} | {counts['quantized']} | {counts['refused']} | {counts['failed']} |"
        )
    lines += ["", "Why runs were refused or failed (first words of the line, how many runs):", ""]
    reasons = Counter(
        f"{setting}, {outcome}: {line[:110]}"
        for setting, found in outcomes.items()
        for outcome, line in found.values()
        if outcome != "quantized"
    )
    lines += [f"- {reason} ({count})" for reason, count in sorted(reasons.items())]
    return "\n".join([*lines, "", CAUSES]) + "\n"


CAUSES = (
    '"Different numbers of samples": the sweep concatenates each input\'s copies along its first '
    "axis, and these single-operator models take operands of different first sizes (broadcasting), "
    'so they share no batch axis; none has a layer to quantize. "Object arrays": string inputs '
    '(StringNormalizer). "No samples": an input of size 0. The Caffe2 Inception v1 and VGG-19, '
    "whose constant weights take activations past 1e20, were refused at W4A8 mse while the "
    "searches scored squared errors in float32, which overflowed; they score them in float64 now."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=bench.ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        outcomes = sweep(test_models(), Path(folder))
    bench.write_section(args.out, "onnx-test-models", markdown(outcomes), bench.machine_description())


if __name__ == "__main__":
    main()
