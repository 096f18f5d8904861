"""Refinement's memory on large inputs: the zoo's detectors refined at W4 under each memory
budget, with their peak, time and output fidelity. Writes the section "refine-memory" of
BENCHMARKS.md.

Each model (tools/build_zoo.py's cache) is quantized by `onnxq quantize` in its own process at
W4 (8-bit activations), `--refine` at the given iterations per unit on the first `--samples`
calibration samples, without the speed check; once per `--budgets` entry (a `--refine-memory`
in GB, or `default` for none given). Fidelity: cosine and SQNR of every output and detector part
against float on the model's evaluation file.

    .venv/bin/python tools/bench_refine_memory.py [--models picodet_layout yolov8n_nudenet]
        [--iters 5] [--samples 16] [--budgets default 1] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # this checkout's onnxq: bench.py puts it first on the path
from zoo_bench import zoo_batch, zoo_dir, zoo_fidelity, zoo_inputs, zoo_manifest, zoo_outputs

SECTION = "refine-memory"
NOTES = {
    "refined": re.compile(r"refined (\d+ of \d+ units) .* in ([\d.]+) s"),
    "chunks": re.compile(r"(\d+) units learned each batch of (\d+) in chunks of ([\d-]+) samples"),
    "held": re.compile(r"learned on the first (\d+) of (\d+) samples"),
}


def _summary(notes: str) -> str:
    found = {key: pattern.search(notes) for key, pattern in NOTES.items()}
    parts = [
        f"{found['refined'][1]} in {found['refined'][2]} s" if found["refined"] else "no refinement line"
    ]
    if found["chunks"]:
        parts.append(f"{found['chunks'][1]} units in chunks of {found['chunks'][3]} of {found['chunks'][2]}")
    if found["held"]:
        parts.append(f"first {found['held'][1]} of {found['held'][2]} samples held")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["picodet_layout", "yolov8n_nudenet"])
    parser.add_argument("--iters", type=int, default=5, help="refinement iterations per unit")
    parser.add_argument("--samples", type=int, default=16, help="calibration samples")
    parser.add_argument(
        "--budgets", nargs="*", default=["default", "1"], help="--refine-memory GB or default"
    )
    parser.add_argument("--out", default=str(bench.ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    manifest = zoo_manifest()
    base = ["--w-bits", "4", "--refine", "--refine-iters", str(args.iters)]
    base += ["--max-samples", str(args.samples), "--no-speed-check"]
    rows = []
    for name in args.models:
        entry = manifest[name]
        path, calib = zoo_dir() / entry["file"], zoo_dir() / entry["calib"]
        feed = zoo_inputs(entry)
        float_model = onnx.load(path)
        names = [o.name for o in float_model.graph.output]
        batch = zoo_batch(entry, 8)
        reference = zoo_outputs(float_model, feed, batch, optimize=False)
        for budget in args.budgets:
            flags = base if budget == "default" else [*base, "--refine-memory", budget]
            print(f"  {name}, --refine-memory {budget}", flush=True)
            model, seconds, peak, notes = bench.run_onnxq_cli_notes(path, calib, flags)
            refined = _summary(notes)
            fidelity = zoo_fidelity(entry, names, reference, zoo_outputs(model, feed, batch))
            label, (cosine, sqnr) = min(fidelity.items(), key=lambda item: item[1][1])
            rows.append((name, budget, refined, seconds, peak, label, cosine, sqnr))
            print(f"    {peak:.0f} MB, {seconds:.0f} s, {refined}; lowest {label} {sqnr:.1f} dB", flush=True)
    lines = [
        "## Refinement's memory on large inputs (the zoo's detectors, W4A8)",
        "",
        f"`tools/bench_refine_memory.py --iters {args.iters} --samples {args.samples}`: `onnxq quantize "
        f"--w-bits 4 --refine --refine-iters {args.iters}` on the first {args.samples} calibration samples, "
        "without the speed check, once per `--refine-memory` (default: 2 GB); in its own process. "
        "calib. s is its wall time on 2 cores, peak MB its peak resident memory; fidelity is the "
        "lowest SQNR over the outputs and detector parts, against float on the model's evaluation file.",
        "",
        "| model | --refine-memory | refinement | calib. s | peak MB | lowest output | cosine | SQNR dB |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: |",
    ]
    lines += [
        f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.0f} | {r[5]} | {r[6]:.4f} | {r[7]:.1f} |"
        for r in rows
    ]
    bench.write_section(Path(args.out), SECTION, "\n".join(lines) + "\n", bench.machine_description())


if __name__ == "__main__":
    main()
