"""Tables for people: the float-versus-quantized comparison printed by `onnxq eval`."""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.table import Table

from onnxq.evaluate import ModelReport
from onnxq.latency import Latency
from onnxq.passes.fuse_branches import FuseReport
from onnxq.weight_stats import LayerWeights


def _console() -> Console:
    return Console(width=None if Console().is_terminal else 140)


def print_fuse_report(report: FuseReport, console: Console | None = None) -> None:
    """What `onnxq fuse` merged, branch by branch, and what it refused and why."""
    console = console or _console()
    if report.merged:
        table = Table(title="re-parameterized blocks")
        for column in ("block output", "branches", "parameters before", "after"):
            table.add_column(column, justify="right" if "param" in column or column == "after" else "left")
        for block in report.merged:
            table.add_row(
                block.output,
                " + ".join(block.branches),
                f"{block.parameters_before:,}",
                f"{block.parameters_after:,}",
            )
        table.add_row(
            "total",
            "",
            f"{sum(b.parameters_before for b in report.merged):,}",
            f"{sum(b.parameters_after for b in report.merged):,}",
        )
        console.print(table)
    else:
        console.print("no re-parameterized branches found to merge")
    for where, reason in report.refused.items():
        console.print(f"  not merged: {where} ({reason})")


def print_weight_statistics(stats: list[LayerWeights], console: Console | None = None) -> None:
    """Per-layer max|w|, worst channel's peak-to-std and the spread of peaks across channels."""
    console = console or _console()
    table = Table(title="weights per layer (large peak/std or spread: hard to quantize)")
    for column in ("layer", "op", "shape", "max |w|", "peak/std (worst channel)", "channel spread"):
        table.add_column(column, justify="left" if column in ("layer", "op", "shape") else "right")
    for row in stats:
        table.add_row(
            row.layer,
            row.op_type,
            "×".join(str(d) for d in row.shape),
            f"{row.absmax:.3g}",
            f"{row.peak_to_std:.1f}",
            f"{row.channel_spread:.1f}",
        )
    console.print(table)


def print_reports(reports: list[ModelReport], console: Console | None = None) -> None:
    """One row per model; the first is the float reference."""
    console = console or _console()
    table = Table(title=f"onnxq eval ({reports[0].samples} samples)")
    for column in ("model", "top-1", "agreement", "KL", "SQNR dB", "size MB", "latency ms", "kernels"):
        table.add_column(column, justify="left" if column in ("model", "kernels") else "right")
    reference = reports[0]
    for index, report in enumerate(reports):
        first = index == 0
        table.add_row(
            report.name,
            "—" if report.top1 is None else f"{100 * report.top1:.2f} %",
            "—" if report.agreement is None or first else f"{100 * report.agreement:.2f} %",
            "—" if report.kl is None or first else f"{report.kl:.4f}",
            "—" if report.sqnr_db is None else f"{report.sqnr_db:.1f}",
            f"{report.size_bytes / 1e6:.2f}",
            f"{report.latency_ms:.2f}"
            + ("" if first else f" ({report.latency_ms / reference.latency_ms:.2f}×)"),
            report.kernels,
        )
    console.print(table)
    for report in reports[1:]:
        if report.lowest_output:
            console.print(f"  {report.name}: lowest SQNR at {report.lowest_output}")


def print_latencies(rows: list[Latency], console: Console | None = None) -> None:
    """One row per model and batch size; ×first compares with the first model at that batch."""
    console = console or _console()
    table = Table(title="onnxq bench (interleaved runs, quieter half)")
    for column in ("model", "batch", "latency ms", "samples/s", "size MB", "kernels"):
        table.add_column(column, justify="left" if column in ("model", "kernels") else "right")
    reference: dict[int, float] = {}
    for row in rows:
        first = row.batch not in reference
        reference.setdefault(row.batch, row.milliseconds)
        ratio = "" if first else f" ({row.milliseconds / reference[row.batch]:.2f}×)"
        table.add_row(
            row.name,
            str(row.batch),
            f"{row.milliseconds:.2f}{ratio}",
            f"{row.samples_per_second:,.0f}",
            f"{row.size_bytes / 1e6:.2f}",
            row.kernels,
        )
    console.print(table)


def print_layer_errors(layers: list[tuple[str, float, float]], console: Console | None = None) -> None:
    """Per quantized layer, in graph order: the SQNR of its input (before its quantizer) and of
    its output against the float model, and what the layer takes off: its input's rounding and
    its weights' (a negative fall: the layer averages the noise it was given)."""
    console = console or _console()
    table = Table(title="per-layer error (SQNR against the float model)")
    for column in ("layer", "input dB", "output dB", "fall dB"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer, before, after in layers:
        fall = before - after if np.isfinite(before) and np.isfinite(after) else None
        table.add_row(layer, _db(before), _db(after), "—" if fall is None else f"{fall:.1f}")
    console.print(table)


def _db(value: float) -> str:
    return "exact" if value == float("inf") else f"{value:.1f}"
