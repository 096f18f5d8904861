"""How long the fidelity fallback's layer ranking takes, with each branch finished in the float
model (onnxq.branching, since 3da1f92) and all through the tunable graph (before it).

The ranking (onnxq.sensitivity.layer_costs) runs each quantized layer's quantizers alone from
its cut to the outputs: most of a `--calib-method auto` run on a detector whose outputs fall
short. This tool quantizes each zoo model at its defaults (no speed check, so the plan does not
follow this machine's timings) on the first `--samples` calibration samples, records the
ranking's call as the pipeline makes it, then times that call both ways, interleaved, and says
whether both rank the layers alike. Models whose outputs never fall short run no ranking.

    python tools/ranking_speed.py [--models ...] [--samples 8] [--repeats 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import machine_description, write_section
from zoo_bench import zoo_dir, zoo_manifest, zoo_selection

import onnxq
from onnxq import branching, sensitivity

KINDS = ("detector", "segmentation")


def recorded_ranking(entry: dict, samples: int) -> tuple | None:
    """The arguments of the pipeline's first layer_costs call on this model, or None."""
    calls = []
    original = sensitivity.layer_costs  # onnxq.tune.fallback calls it through the module

    def record(*args):
        calls.append(args)
        return original(*args)

    zoo = zoo_dir()
    with np.load(zoo / entry["calib"]) as archive:
        data = {name: archive[name][:samples] for name in entry["inputs"]}
    sensitivity.layer_costs = record
    try:
        onnxq.quantize(zoo / entry["file"], data, onnxq.QuantConfig(speed_check=False))
    finally:
        sensitivity.layer_costs = original
    return calls[0] if calls else None


def timed(arguments: tuple, float_tail: bool) -> tuple[float, list[str]]:
    """Seconds of one ranking and the layers it ranked, costliest first."""
    compare = branching.compare_variants

    def tunable_only(*args, float_model=None, **kwargs):
        return compare(*args, **kwargs)

    sensitivity.compare_variants = compare if float_tail else tunable_only
    try:
        started = time.perf_counter()
        ranked = sensitivity.layer_costs(*arguments)
        return time.perf_counter() - started, [name for name, _ in ranked]
    finally:
        sensitivity.compare_variants = compare


def measure(entry: dict, samples: int, repeats: int) -> dict | None:
    arguments = recorded_ranking(entry, samples)
    if arguments is None:
        return None
    seconds: dict[bool, list[float]] = {True: [], False: []}
    rankings = {}
    for _ in range(repeats):
        for float_tail in (False, True):
            spent, rankings[float_tail] = timed(arguments, float_tail)
            seconds[float_tail].append(spent)
    return {
        "layers": len(rankings[True]),
        "before": seconds[False],
        "after": seconds[True],
        "same": rankings[True] == rankings[False],
        "same_top": rankings[True][:12] == rankings[False][:12],
    }


def markdown(results: dict[str, dict | None], samples: int, repeats: int) -> str:
    lines = [
        "## The fallback's layer ranking: branches finished in the float model (issue 13's calibration time)",
        "",
        f"`tools/ranking_speed.py`: each zoo detector and segmentation head quantized by `onnxq.quantize` at "
        f"its defaults without the speed check on its first {samples} calibration samples; the fidelity "
        "fallback's layer ranking (`onnxq.sensitivity.layer_costs`) recorded as the pipeline calls it, "
        f"then timed {repeats} times each way, interleaved: every branch through the tunable graph (before "
        "3da1f92) and each branch finished in the float model once its layer's quantizers have run (now). "
        "Seconds of each timing; same ranking: whether both order every layer alike.",
        "",
        "| model | layers ranked | tunable graph only, s | float model after the layer, s | speed-up "
        "| same ranking |",
        "| --- | ---: | --- | --- | ---: | --- |",
    ]
    for name, found in results.items():
        if found is None:
            lines.append(f"| {name} | no ranking (outputs above the warning threshold) |  |  |  |  |")
            continue
        before, after = found["before"], found["after"]
        speedup = np.median(before) / np.median(after)
        same = "yes" if found["same"] else ("top 12 alike" if found["same_top"] else "no")
        lines.append(
            f"| {name} | {found['layers']} | {' / '.join(f'{s:.1f}' for s in before)} | "
            f"{' / '.join(f'{s:.1f}' for s in after)} | {speedup:.2f}× | {same} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="zoo models (default: detectors and segmentation heads)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the markdown section here")
    args = parser.parse_args()
    manifest = zoo_manifest()
    chosen = zoo_selection(manifest, args.models, lambda entry: entry["kind"] in KINDS)
    results = {}
    for name in chosen:
        results[name] = measure(manifest[name], args.samples, args.repeats)
        print(name, results[name], flush=True)
    text = markdown(results, args.samples, args.repeats)
    print(text)
    if args.out:
        write_section(args.out, "ranking-speed", text, machine_description())


if __name__ == "__main__":
    main()
