"""Repeat chosen benchmark settings over several random calibration draws; writes one BENCHMARKS.md section.

One calibration set gives figures whose differences of a few test images are noise: on test-1017
one image is 0.1 point of top-1. This script builds the chosen settings of a bench.py suite on N
seeded random calibration sets, each drawn without replacement from the protocol's calibration
pool (train-1017.npz for CIFAR-10, the 500 even-class imagenet-sample images), and scores every
model on the same evaluation split. The table gives the mean and sample standard deviation of
top-1, agreement and KL over the draws, each draw's top-1, and, paired by draw, how often each
setting's top-1 beat, tied or lost to the first setting's (the reference).

    .venv/bin/python tools/bench_draws.py calib --models repvgg_cifar10 --draws 5 \\
        --only "onnxq W4A8 minmax" "onnxq W4A8 mse" "onnxq W4A8 mae"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench
import bench_suites

WHOLE_POOL = 10**6  # bench.split_for keeps the first N calibration images: all of them


def draw(pool: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """`samples` images of `pool`, chosen at random by `seed`, in pool order."""
    picks = np.random.default_rng(seed).choice(len(pool), size=min(samples, len(pool)), replace=False)
    return pool[np.sort(picks)]


def measure_draws(
    name: str, suite: str, labels: list[str], draws: int, after_draw: Callable | None = None
) -> tuple[float, dict[str, list]]:
    """Every chosen setting on every draw: {label: [Row per draw]}. `after_draw(float_top1, rows)`
    runs after each draw, so that a long run keeps the draws it finished."""
    make_settings, samples, _ = bench_suites.SUITES[suite]
    settings = make_settings(name)
    missing = [label for label in labels if label not in settings]
    if missing:
        raise SystemExit(f"{name}: no setting called {missing[0]!r} in the {suite} suite")
    chosen = {label: settings[label] for label in labels}
    pool = bench.split_for(name, WHOLE_POOL)
    rows: dict[str, list] = {label: [] for label in labels}
    float_top1 = float("nan")
    for seed in range(1, draws + 1):
        print(f"{name}: draw {seed} of {draws}", flush=True)
        split = bench.Split(draw(pool.calib, samples, seed), pool.x, pool.y)
        float_top1, measured = bench.measure(name, chosen, samples=samples, latency=False, split=split)
        for label, row in zip(labels, measured, strict=True):
            if row.setting != label:
                raise SystemExit(f"{name}: {row.setting}")
            rows[label].append(row)
        if after_draw is not None:
            after_draw(float_top1, rows)
    return float_top1, rows


def markdown(
    suite: str, name: str, float_top1: float, rows: dict[str, list], draws: int, planned: int | None = None
) -> str:
    """The section for `draws` finished draws (of `planned`, where the run is not through)."""
    samples = bench_suites.SUITES[suite][1]
    unfinished = f" ({draws} of the {planned} planned: the run did not get further)" if planned else ""
    reference = [r.top1 for r in next(iter(rows.values()))]
    lines = [
        f"## {bench_suites.SUITE_TITLES[suite]}, over {draws} calibration draws{unfinished}: {name} "
        f"(float top-1 {100 * float_top1:.2f} %)",
        "",
        f"Each draw: {samples} calibration images chosen at random (seeds 1 to {draws}) from the "
        "protocol's calibration pool; the same evaluation split for all. Mean ± sample standard "
        "deviation over draws. vs first row: draws on which the setting's top-1 was higher / equal / "
        "lower than the first row's on the same draw. calib. s and peak MB: mean over draws of the "
        "process's wall time and peak resident memory, where the setting runs `onnxq quantize` in its "
        "own process. Settings as in the suite's own table"
        + (
            f", with `--time-budget {bench_suites.SEEDS_BUDGET_S}` on the refinement rows."
            if suite == "seeds" and bench_suites.seeds_budget(name)
            else "."
        ),
        "",
        "| setting | top-1 % | top-1 per draw | agreement % | KL | vs first row | calib. s | peak MB |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, measured in rows.items():
        top1 = np.array([r.top1 for r in measured]) * 100
        agreement = np.array([r.agreement for r in measured]) * 100
        kl = np.array([r.kl for r in measured])
        paired = np.sign(top1 - np.array(reference) * 100)
        versus = f"{(paired > 0).sum()} / {(paired == 0).sum()} / {(paired < 0).sum()}"
        cells = [
            label,
            f"{top1.mean():.2f} ± {top1.std(ddof=1):.2f}",
            ", ".join(f"{v:.2f}" for v in top1),
            f"{agreement.mean():.2f} ± {agreement.std(ddof=1):.2f}",
            f"{kl.mean():.4f} ± {kl.std(ddof=1):.4f}",
            versus,
            _mean_cell([r.calib_s for r in measured], "{:.1f}"),
            _mean_cell([r.peak_mb for r in measured], "{:.0f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_cell(values: list[float | None], form: str) -> str:
    """The mean of a per-draw measure, or a dash where a setting does not record it."""
    known = [v for v in values if v is not None]
    return form.format(float(np.mean(known))) if known else "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=sorted(bench_suites.SUITES))
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument(
        "--only", nargs="+", required=True, help="Whole setting labels; the first is the reference."
    )
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--out", type=Path, default=bench.ROOT / "BENCHMARKS.md")
    parser.add_argument(
        "--seeds-budget",
        type=int,
        default=bench_suites.SEEDS_BUDGET_S,
        help="--time-budget (s) of the seeds suite's ImageNet refinement rows.",
    )
    args = parser.parse_args()
    bench_suites.SEEDS_BUDGET_S = args.seeds_budget
    if args.draws < 2:
        raise SystemExit("--draws must be at least 2 (a spread needs two draws)")
    if not bench.SHARED.is_dir():
        raise SystemExit(f"{bench.SHARED} is missing: the benchmark needs ../shared")
    machine = bench.machine_description()
    for name in args.models:
        section = f"draws/{args.suite}/{name}: " + ", ".join(args.only)

        def write(float_top1: float, rows: dict[str, list], section=section, name=name) -> None:
            done = len(next(iter(rows.values())))
            if done >= 2:  # a spread needs two draws
                planned = args.draws if done < args.draws else None
                text = markdown(args.suite, name, float_top1, rows, done, planned)
                bench.write_section(args.out, section, text, machine)

        measure_draws(name, args.suite, args.only, args.draws, after_draw=write)
        print("wrote", name, "to", args.out, flush=True)


if __name__ == "__main__":
    main()
