"""How many calibration images the zoo's detectors and segmentation heads need at W8A8: the
default plan on 16, 32, 64, 128 images, scored on the evaluation file. Writes the section
"calibration-size" of BENCHMARKS.md.

Each calibration set is made by the model's own pre-processing (tools/zoo_data.py's
CALIBRATION_IMAGES) from the even-class photos, so its first images are the zoo's calibration
file; the evaluation file (odd classes) is never calibrated on. `onnxq quantize` runs at its
defaults without the speed check (its plan would follow this machine's timings), in its own
process (calib. s: its wall time on 2 cores; peak MB: its peak resident memory). Below 64 images
the fidelity check holds none back, so its choices are made and checked on the calibration images.

    .venv/bin/python tools/calibration_size.py [--models yolov8n_nudenet ...] [--counts 16 32 64 128]
        [--out BENCHMARKS.md] [--label "at <commit>"]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # this checkout's onnxq: bench.py puts it first on the path
from zoo_bench import zoo_batch, zoo_dir, zoo_fidelity, zoo_inputs, zoo_manifest, zoo_outputs
from zoo_data import CALIBRATION_IMAGES, calibration_images

SECTION = "calibration-size"
RULE = re.compile(r"activation ranges: (min-max|percentile) \(")
KEPT_FLOAT = re.compile(r"fidelity: (\d+) layers? kept float")
SWITCHED = re.compile(r"activation ranges: (\d+) switched")


def calibration(name: str, count: int) -> dict[str, np.ndarray]:
    """`count` calibration images for a zoo model; refused where its first ones are not the zoo's."""
    data = calibration_images(name, count)
    zoo = zoo_inputs(zoo_manifest()[name], "calib")
    for key, values in data.items():
        shared = min(count, len(zoo[key]))
        if not np.array_equal(values[:shared], zoo[key][:shared]):
            raise SystemExit(
                f"{name}: the made calibration images differ from the zoo's file (rebuild the zoo)"
            )
    return data


def choices(notes: str) -> str:
    """What the default chose: the range rule, layers kept float, activations switched."""
    found = [match.group(1) for match in [RULE.search(notes)] if match]
    found += [f"{m.group(1)} float" for m in [KEPT_FLOAT.search(notes)] if m]
    found += [f"{m.group(1)} switched" for m in [SWITCHED.search(notes)] if m]
    return ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(CALIBRATION_IMAGES))
    parser.add_argument("--counts", nargs="*", type=int, default=[16, 32, 64, 128])
    parser.add_argument("--label", default="", help="what the rows were run at (a commit)")
    parser.add_argument("--out", default=str(bench.ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    manifest = zoo_manifest()
    rows = []
    for name in args.models:
        entry = manifest[name]
        path = zoo_dir() / entry["file"]
        float_model = onnx.load(path)
        names = [o.name for o in float_model.graph.output]
        feed, batch = zoo_inputs(entry), zoo_batch(entry, 8)
        reference = zoo_outputs(float_model, feed, batch, optimize=False)
        for count in args.counts:
            with tempfile.TemporaryDirectory() as folder:
                calib = Path(folder) / "calib.npz"
                np.savez(calib, **calibration(name, count))
                model, seconds, peak, notes = bench.run_onnxq_cli_notes(path, calib, ["--no-speed-check"])
            outputs = zoo_outputs(model, feed, batch, optimize=False)
            fidelity, chosen = zoo_fidelity(entry, names, reference, outputs), choices(notes)
            rows.append((name, count, chosen, fidelity, seconds, peak))
            print(f"  {name} on {count}: {chosen}; {fidelity}; {seconds:.0f} s", flush=True)
    bench.write_section(Path(args.out), SECTION, _table(rows, args), bench.machine_description())


def _table(rows: list, args) -> str:
    lines = [
        "## How many calibration images the zoo's detectors need at W8A8 (issue 13)",
        "",
        f"`tools/calibration_size.py --counts {' '.join(map(str, args.counts))}`"
        f"{' ' + args.label if args.label else ''}: `onnxq quantize` at its defaults without the speed "
        "check, calibrated on the first N even-class images as the model's own pre-processing makes them "
        "(the zoo's calibration file is the first 16 or 32), scored on the zoo's evaluation file. "
        "Choices: the range rule auto kept, layers the fidelity fallback kept float, activations "
        "switched to the other rule. Below 64 images nothing is held back for the fidelity check.",
        "",
        "| model | images | choices | output part | cosine | SQNR dB | calib. s | peak MB |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, count, chosen, fidelity, seconds, peak in rows:
        for label, (cosine, sqnr) in fidelity.items():
            cells = [name, count, chosen, label, f"{cosine:.5f}", f"{sqnr:.1f}", f"{seconds:.1f}"]
            lines.append("| " + " | ".join(map(str, cells)) + f" | {peak:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
