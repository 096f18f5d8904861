"""The `onnxq` command: parses flags into config objects and calls the pipeline; no logic here.
One module per command (quantize, fuse, measure: eval and bench); errors.py turns every failure
into one line and an exit status."""

from __future__ import annotations

import click

from onnxq.cli.fuse import fuse
from onnxq.cli.measure import bench_command, evaluate_command
from onnxq.cli.quantize import quantize


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxq")
def main() -> None:
    """Post-training quantization of ONNX models into QDQ models for onnxruntime."""


for command in (quantize, fuse, evaluate_command, bench_command):
    main.add_command(command)

__all__ = ["main"]
