"""`onnxq eval` and `onnxq bench`: quantized models against their float model, as deployed."""

from __future__ import annotations

from pathlib import Path

import click

from onnxq.cli.errors import reports_errors
from onnxq.cli.preprocess import build_preprocess, preprocess_options


@click.command(name="eval")
@click.argument("float_model", type=click.Path(path_type=Path))
@click.argument("quantized", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", required=True, help="Evaluation data: .npy, .npz or a folder of images.")
@click.option("--labels", help="Labels: .npy, .txt or .npz (y); image folders supply their own.")
@click.option("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its default).")
@click.option("--max-samples", type=int, help="Evaluate on the first N samples only.")
@preprocess_options
@reports_errors
def evaluate_command(float_model, quantized, data, labels, threads, max_samples, **rest):
    """Compare QUANTIZED models with FLOAT_MODEL: accuracy, agreement, KL, SQNR, size, latency."""
    from onnxq.calib.labels import folder_labels, load_labels
    from onnxq.evaluate import evaluate
    from onnxq.report import print_reports

    label_array = load_labels(labels) if labels else None
    if label_array is None and Path(data).is_dir():
        label_array = folder_labels(data)
    reports = evaluate(
        float_model,
        list(quantized),
        data,
        labels=label_array,
        preprocess=build_preprocess(**rest),
        threads=threads,
        max_samples=max_samples,
    )
    print_reports(reports)


@click.command(name="bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--batch", "batch_sizes", type=int, multiple=True, help="Batch size (repeat for several; default 1)."
)
@click.option("--data", help="Input data (.npy, .npz or a folder of images); random values when absent.")
@click.option("--shape", "shapes", multiple=True, help="name=1x3x224x224 for an input with free dimensions.")
@click.option("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its default).")
@preprocess_options
@reports_errors
def bench_command(models, batch_sizes, data, shapes, threads, **rest):
    """Latency and throughput of MODELS side by side (the first is the reference), as deployed."""
    from onnxq.latency import bench, parse_shapes
    from onnxq.report import print_latencies

    rows = bench(
        list(models),
        batch_sizes=batch_sizes or (1,),
        data=data,
        shapes=parse_shapes(shapes),
        preprocess=build_preprocess(**rest),
        threads=threads,
    )
    print_latencies(rows)
