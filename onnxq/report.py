"""Tables for people: the float-versus-quantized comparison printed by `onnxq eval`."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from onnxq.evaluate import ModelReport


def print_reports(reports: list[ModelReport], console: Console | None = None) -> None:
    """One row per model; the first is the float reference."""
    console = console or Console(width=None if Console().is_terminal else 140)
    table = Table(title=f"onnxq eval ({reports[0].samples} samples)")
    for column in ("model", "top-1", "agreement", "KL", "SQNR dB", "size MB", "latency ms", "kernels"):
        table.add_column(column, justify="left" if column in ("model", "kernels") else "right")
    reference = reports[0]
    for index, report in enumerate(reports):
        first = index == 0
        table.add_row(
            report.name,
            "—" if report.top1 is None else f"{100 * report.top1:.2f} %",
            "—" if first else f"{100 * report.agreement:.2f} %",
            "—" if first else f"{report.kl:.4f}",
            "—" if first else f"{report.sqnr_db:.1f}",
            f"{report.size_bytes / 1e6:.2f}",
            f"{report.latency_ms:.2f}"
            + ("" if first else f" ({report.latency_ms / reference.latency_ms:.2f}×)"),
            report.kernels,
        )
    console.print(table)
