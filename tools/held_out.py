"""The tools/choose_*.py scripts' rows: a setting quantized on the protocol's 256 calibration
images and scored against float on held-out calibration images (`bench.held_out_split`, never the
evaluation split), one table row each, and the rows a killed run printed, to resume it."""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

import onnxq


def mse_config(widths: tuple[int, int], **changes) -> onnxq.QuantConfig:
    """The tools/choose_*.py base: W/A bits, the mse scale search on the protocol's sample count,
    no speed check (it would time the model on shared cores), and the setting's `changes`."""
    return onnxq.QuantConfig(
        weight_bits=widths[0],
        activation_bits=widths[1],
        calibration=onnxq.CalibrationMethod.MSE,
        max_samples=bench.LOW_BIT_SAMPLES,
        speed_check=False,
        **changes,
    )


def row(name: str, config: onnxq.QuantConfig, held: tuple, reference: np.ndarray) -> dict:
    """`onnxq.quantize` on the protocol's 256 calibration images, timed, scored against float on
    held-out calibration images (the tools/choose_*.py rows)."""
    calib = bench.split_for(name, bench.LOW_BIT_SAMPLES).calib
    start = time.perf_counter()
    result = onnxq.quantize(bench.model_path(name), calib, config)
    seconds = time.perf_counter() - start
    top1, agreement, kl = bench.score(result.model, bench.Split(calib, *held), reference)
    return {"kl": kl, "agreement": agreement, "top1": top1, "seconds": seconds}


def printed_rows(log: Path, labels: Iterable[str]) -> dict[str, tuple[str, float]]:
    """Rows of a tools/choose_*.py table a killed run printed, whose third cell is one of
    `labels`: their key ("| model | setting | label |") → (the row, its held-out KL)."""
    rows = {}
    for line in log.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[2] in labels:
            rows[f"| {cells[0]} | {cells[1]} | {cells[2]} |"] = (line.strip(), float(cells[3]))
    return rows


def table_row(key: str, done: dict[str, tuple[str, float]], measure: Callable[[], dict]):
    """(row, held-out KL) of a tools/choose_*.py table: reused from `done` (printed_rows)
    or measured now by `measure` (a `row`)."""
    if key in done:
        return done[key]
    result = measure()
    line = (
        f"{key} {result['kl']:.4f} | {100 * result['agreement']:.2f} | "
        f"{100 * result['top1']:.2f} | {result['seconds']:.0f} |"
    )
    return line, result["kl"]


def arguments(description: str, models: Iterable[str]) -> argparse.Namespace:
    """--out, --models and --resume, the arguments every tools/choose_*.py script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=bench.ROOT / "BENCHMARKS.md")
    parser.add_argument("--models", nargs="+", default=list(models))
    parser.add_argument("--resume", type=Path, help="a log of this tool's printed rows to reuse")
    return parser.parse_args()


def partial_run(models: list[str], settings: dict[str, list]) -> list[str]:
    """A header's closing lines: blank, or, where `models` leaves some of `settings` out, a line
    saying that the tool's verdict covers these rows only (it is not the default's)."""
    left = [name for name in settings if name not in models]
    if not left:
        return [""]
    return [
        "",
        f"Partial run (`--models {' '.join(models)}`; not run: {', '.join(left)}): the verdict below "
        "covers these rows only; the default is decided over every model in SETTINGS.",
        "",
    ]


def grouped_log_kls(
    rows: Iterable[tuple[str, object, object, str, float]], group: Callable[[object], object]
) -> tuple[list[str], dict[object, dict[object, list[float]]]]:
    """The table lines of `choice_rows`, and per group of settings (`group(setting)`: the class a
    default is decided for) each choice's log held-out KL, in row order."""
    lines: list[str] = []
    logs: dict[object, dict[object, list[float]]] = {}
    for _, setting, choice, line, loss in rows:
        lines.append(line)
        logs.setdefault(group(setting), {}).setdefault(choice, []).append(float(np.log(loss)))
    return lines, logs


def wins(logs: dict[object, list[float]], base: object, candidate: object) -> int:
    """The rows on which `candidate` has a lower held-out KL than `base` (the pair's rows)."""
    return sum(c < b for b, c in zip(logs[base], logs[candidate], strict=True))


def choice_rows(
    models: Iterable[str],
    settings: dict[str, list],
    choices: Iterable,
    key: Callable[[str, object, object], str],
    measure: Callable[..., dict],
    done: dict[str, tuple[str, float]],
) -> Iterator[tuple[str, object, object, str, float]]:
    """(model, setting, choice, row, held-out KL) for every setting of every model and every
    choice, printed as it comes: reused from `done` (printed_rows) by its `key(model, setting,
    choice)` ("| model | setting | choice |"), or measured by `measure(model, setting, choice, held,
    reference)` (a `row`) on the model's held-out split."""
    choices = list(choices)
    for name in models:
        held = bench.held_out_split(name)
        reference = bench.logits(onnx.load(bench.model_path(name)), held[0])
        for setting in settings[name]:
            for choice in choices:
                scores = functools.partial(measure, name, setting, choice, held, reference)
                line, kl = table_row(key(name, setting, choice), done, scores)
                print(line, flush=True)
                yield name, setting, choice, line, kl


def two_way_choice(
    args: argparse.Namespace,
    settings: dict[str, list],
    choices: tuple[str, str],
    measure: Callable[..., dict],
    header: list[str],
    section: str,
    change: str,
) -> None:
    """A tools/choose_*.py run between a base and a candidate (`choices`) over `settings` (mse
    rows, W/A widths): the table after `header`, and the candidate chosen where it lowers the mean
    log held-out KL (`change` names it in the verdict), written to `section` of BENCHMARKS.md."""
    base, candidate = choices
    done = printed_rows(args.resume, choices) if args.resume else {}

    def key(name: str, widths: tuple[int, int], label: str) -> str:
        return f"| {name} | W{widths[0]}A{widths[1]} mse | {label} |"

    rows = choice_rows(args.models, settings, choices, key, measure, done)
    table, grouped = grouped_log_kls(rows, lambda widths: "all")
    logs = grouped["all"]
    means = {label: float(np.mean(values)) for label, values in logs.items()}
    chosen = candidate if means[candidate] < means[base] else base
    verdict = (
        f"{change} lowers the held-out KL on {wins(logs, base, candidate)} of {len(logs[candidate])} rows; "
        f"mean log held-out KL {means[base]:.2f} {base}, {means[candidate]:.2f} {candidate}: "
        f"{chosen} by default."
    )
    text = "\n".join([*header, *table, "", verdict]) + "\n"
    bench.write_section(args.out, section, text, bench.machine_description())
    print(verdict)
