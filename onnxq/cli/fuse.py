"""`onnxq fuse`: BatchNormalization folded and re-parameterized branches merged, with a report."""

from __future__ import annotations

from pathlib import Path

import click

from onnxq.cli.errors import reports_errors


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Fused model path.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--all-layers", is_flag=True, help="Weight statistics for every layer, not only merged ones.")
@reports_errors
def fuse(model, output, no_simplify, all_layers):
    """Fold BatchNormalization and merge re-parameterized branches of MODEL into single Convs."""
    from onnxq.prepare import fuse_file
    from onnxq.report import print_fuse_report, print_weight_statistics
    from onnxq.weight_stats import weight_statistics

    result = fuse_file(model, output, simplify_first=not no_simplify)
    for note in result.notes:
        click.echo(f"  {note}")
    print_fuse_report(result.fused)
    merged = None if all_layers or not result.fused.merged else {b.conv for b in result.fused.merged}
    print_weight_statistics(weight_statistics(result.model, merged))
    click.echo(f"wrote {output}")
