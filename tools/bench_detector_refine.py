"""Refinement on the zoo's detectors: every output part's fidelity (boxes and scores apart) at W4
(or `--w-bits`), with the scale search alone and with `--refine`. Writes the section
"detector-refine" of BENCHMARKS.md ("detector-refine-w8" and so on at other widths).

Each model (tools/build_zoo.py's cache) is quantized by `onnxq quantize` in its own process at
W4 or `--w-bits` (8-bit activations) on the first half of its calibration file, without the speed check, once
without and once with `--refine --refine-iters N`. Each result is scored against float per
output and detector part (tools/zoo_bench.py's parts) on the calibration file's second half,
which neither the search nor refinement sees (where defaults are chosen), and on the evaluation
file (reported only).

    .venv/bin/python tools/bench_detector_refine.py [--models yolov8n_nudenet yolox_ddddocr]
        [--iters 100] [--w-bits 4] [--only search refine] [--out BENCHMARKS.md] [--label "at <commit>"]
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
from zoo_bench import (
    zoo_batch,
    zoo_calibration_halves,
    zoo_dir,
    zoo_fidelity,
    zoo_inputs,
    zoo_manifest,
    zoo_outputs,
)

SECTION = "detector-refine"
REFINED = re.compile(r"refined (\d+ of \d+ units) .* in ([\d.]+) s")
CHECKED = re.compile(r"refinement (kept|undone)")


def _scores(
    entry: dict, model: onnx.ModelProto, names: list[str], references: dict
) -> dict[str, dict[str, float]]:
    """SQNR per output and part, on each scoring set (`references`: where → feed, float outputs)."""
    found = {}
    for where, (feed, reference) in references.items():
        outputs = zoo_outputs(model, feed, zoo_batch(entry, 8))
        fidelity = zoo_fidelity(entry, names, reference, outputs)
        found[where] = {label: sqnr for label, (_, sqnr) in fidelity.items()}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["yolov8n_nudenet", "yolox_ddddocr"])
    parser.add_argument("--iters", type=int, default=100, help="refinement iterations per unit")
    parser.add_argument("--w-bits", type=int, default=4, help="weight bit width (activations: 8)")
    parser.add_argument("--only", nargs="*", choices=["search", "refine"], default=["search", "refine"])
    parser.add_argument("--label", default="", help="what the rows were run at (a commit)")
    parser.add_argument("--out", default=str(bench.ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    manifest = zoo_manifest()
    width = f"W{args.w_bits}"
    search = ["--w-bits", str(args.w_bits), "--no-speed-check"]
    refine = [*search, "--refine", "--refine-iters", str(args.iters)]
    choices = {
        "search": (f"{width} search", search),
        "refine": (f"{width} --refine ({args.iters} it.)", refine),
    }
    settings = dict(choices[key] for key in args.only)
    rows = []
    for name in args.models:
        entry = manifest[name]
        path = zoo_dir() / entry["file"]
        first, second = zoo_calibration_halves(entry)
        float_model = onnx.load(path)
        names = [o.name for o in float_model.graph.output]
        references = {
            where: (feed, zoo_outputs(float_model, feed, zoo_batch(entry, 8), optimize=False))
            for where, feed in (("held-out", second), ("eval", zoo_inputs(entry)))
        }
        with tempfile.TemporaryDirectory() as folder:
            calib = Path(folder) / "first_half.npz"
            np.savez(calib, **first)
            for setting, flags in settings.items():
                print(f"  {name}: {setting}", flush=True)
                model, seconds, peak, notes = bench.run_onnxq_cli_notes(path, calib, flags)
                refined, checked = REFINED.search(notes), CHECKED.search(notes)
                scores = _scores(entry, model, names, references)
                summary = ", ".join(found[i] for found, i in ((refined, 1), (checked, 0)) if found)
                rows.append((name, setting, summary, seconds, peak, scores))
                print(f"    {seconds:.0f} s, {peak:.0f} MB, {scores}", flush=True)
    section = SECTION if args.w_bits == 4 else f"{SECTION}-w{args.w_bits}"
    bench.write_section(Path(args.out), section, _table(rows, args), bench.machine_description())


def _table(rows: list, args) -> str:
    lines = [
        f"## Refinement on the zoo's detectors: boxes and scores apart (W{args.w_bits}A8)",
        "",
        f"`tools/bench_detector_refine.py --iters {args.iters} --w-bits {args.w_bits}`"
        f"{' ' + args.label if args.label else ''}: "
        f"`onnxq quantize --w-bits {args.w_bits}` on the first half of each model's calibration file, "
        "without the speed check, with the scale search alone and with "
        f"`--refine --refine-iters {args.iters}`; in its own process (calib. s its wall time on 2 "
        "cores, peak MB its peak resident memory). SQNR (dB) "
        "against float per output part, on the calibration file's second half (held out: where "
        "defaults are chosen) and on the evaluation file.",
        "",
        "| model | setting | units refined | output part | held-out SQNR | eval SQNR | calib. s | peak MB |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, setting, refined, seconds, peak, scores in rows:
        for label in scores["eval"]:
            lines.append(
                f"| {name} | {setting} | {refined} | {label} | {scores['held-out'][label]:.1f} | "
                f"{scores['eval'][label]:.1f} | {seconds:.1f} | {peak:.0f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
