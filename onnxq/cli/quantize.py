"""`onnxq quantize`: its flags into a QuantConfig, the pipeline, and what it printed."""

from __future__ import annotations

from pathlib import Path

import click

from onnxq.cli.errors import reports_errors
from onnxq.cli.preprocess import build_preprocess, preprocess_options
from onnxq.cli.refine_options import refine_options
from onnxq.config import (
    WEIGHT_ROUNDINGS,
    CalibrationMethod,
    Granularity,
    QuantConfig,
    RangeRule,
    WeightRange,
    load_overrides,
)
from onnxq.errors import OnnxqError


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Quantized model path.")
@click.option(
    "--calib",
    "calib",
    required=True,
    help="Calibration data: .npy, .npz or a folder of images; or bn-stats: no data, inputs "
    "synthesised from the model's BatchNormalization statistics (needs onnxq[refine]).",
)
@click.option("--w-bits", type=click.IntRange(2, 8), default=8, show_default=True, help="Weight bits.")
@click.option(
    "--a-bits",
    type=click.IntRange(2, 8),
    default=8,
    show_default=True,
    help="Activation bits: the inputs of every weighted layer.",
)
@click.option(
    "--addend-bits",
    type=click.IntRange(2, 8),
    default=8,
    show_default=True,
    help="At least this many bits for tensors only Add reads (a residual branch before its sum), "
    "as BRECQ and QDrop leave them unquantized; set it to --a-bits for one width everywhere.",
)
@click.option(
    "--split-sums/--no-split-sums",
    default=True,
    show_default=True,
    help="Where an Add and a layer read the same tensor (a residual block's input), the Add reads "
    "it at --addend-bits and the layer through a quantizer of its own at --a-bits; "
    "--no-split-sums quantizes it once, at --a-bits, for both.",
)
@click.option(
    "--granularity",
    default="channel",
    show_default=True,
    help="Weight scales: tensor, channel, group:G (G output channels share one) or block:B "
    "(blocks of B input channels).",
)
@click.option(
    "--w-range",
    default="minmax",
    show_default=True,
    help="Weight clipping per scale group: minmax, percentile:P, mse, mae, scaleclip[:K], or "
    "output (by the layer's output error on the calibration data).",
)
@click.option(
    "--w-zero-point",
    type=click.Choice(["auto", "none", "narrow", "all"]),
    default="auto",
    show_default=True,
    help="Which weights are unsigned with a zero point (the others symmetric): none, narrow (below "
    "8 bits), all; auto: narrow with 8-bit activations or weights below 4 bits, else none.",
)
@click.option("--w-asym", is_flag=True, help="Every weight unsigned with a zero point (--w-zero-point all).")
@click.option("--a-sym", is_flag=True, help="Signed activations with zero point 0 (default: asymmetric).")
@click.option(
    "--quantize-first-last", is_flag=True, help="Give the first and last layers the low widths too."
)
@click.option(
    "--overrides",
    type=click.Path(path_type=Path),
    help="TOML file of per-layer settings ([[layer]] match/op → w_bits, a_bits, granularity, w_range).",
)
@click.option(
    "--calib-method",
    "--calibration",
    "calibration",
    type=click.Choice([m.value for m in CalibrationMethod]),
    default=QuantConfig.calibration.value,
    show_default=True,
    help="How scales are chosen: minmax/percentile statistics; auto, whichever of the two keeps "
    "the outputs closer to float (percentile where bias correction or --refine follows); scaleclip "
    "(activations clipped at K·mean|A|, GDRQ); or searched by the error they cause (mse, mae) or "
    "by the prediction difference at the output (pd), whose activation ranges with 8-bit "
    "activations then meet the min-max ones as auto's do.",
)
@click.option(
    "--a-scaleclip",
    "activation_scaleclip",
    type=float,
    help="K of --calib-method scaleclip (α = K·mean|A|) [default: chosen per activation width].",
)
@click.option(
    "--bias-correction/--no-bias-correction",
    default=None,
    help="Correct each layer's bias by its mean output error [default: on with auto/minmax/"
    "percentile below 8-bit weights, off for mse, mae, pd].",
)
@click.option(
    "--weight-rounding",
    type=click.Choice(list(WEIGHT_ROUNDINGS)),
    default=QuantConfig.weight_rounding,
    show_default=True,
    help="Weight integers: nearest rounding, or gptq, which rounds each layer's weights column by "
    "column so that their errors cancel on the calibration inputs (GPTQ; numpy, no torch); auto: "
    "gptq at every width (8-bit weights on float inputs, in the observation pass); with --refine, "
    "below 4-bit weights, or below 8-bit weights with 8-bit activations, where refinement starts "
    "from GPTQ's integers.",
)
@click.option("--seed", type=int, default=QuantConfig.seed, show_default=True, help="Seed of the search.")
@click.option(
    "--holdout",
    type=float,
    default=QuantConfig.holdout,
    show_default=True,
    help="Part of the calibration data pd keeps out of its search, to report over-fitting.",
)
@click.option(
    "--pd-lambda",
    type=float,
    default=QuantConfig.pd_lambda,
    show_default=True,
    help="Weight of pd's regulariser (the item's own output error) against the KL at the output.",
)
@click.option(
    "--time-budget",
    type=float,
    help="Seconds for the search and refinement together; what is left over keeps min-max ranges "
    "(search) or fewer iterations (refinement, spread over its units).",
)
@click.option(
    "--search-memory",
    type=float,
    default=QuantConfig.search_memory_gb,
    show_default=True,
    help="GB of activations the mse/mae/pd search may cache; beyond it, it uses fewer samples.",
)
@click.option(
    "--search-cache",
    type=click.Choice(["float16", "float32"]),
    default="float16" if QuantConfig.search_cache_half else "float32",
    show_default=True,
    help="Precision of the search's cached activations (float16: twice the samples per GB).",
)
@click.option(
    "--percentile",
    type=float,
    default=QuantConfig.percentile,
    show_default=True,
    help="Percentile of |activation| that sets the range with --calib-method percentile.",
)
@click.option(
    "--int8-range",
    type=click.Choice([w.value for w in WeightRange]),
    default=QuantConfig.weight_range.value,
    show_default=True,
    help="8-bit weights: auto uses [-63, 63] where onnxruntime's int8 kernels would saturate "
    "(x86 without VNNI), or unsigned where that runs clearly faster than float (timed); unsigned keeps the "
    "full range as uint8 around zero point 128, which onnxruntime's u8×u8 kernels run exactly "
    "on every CPU.",
)
@click.option(
    "--max-samples",
    type=int,
    default=QuantConfig.max_samples,
    show_default=True,
    help="Calibration samples read at most (the rest of --calib is ignored).",
)
@click.option(
    "--batch-size",
    type=int,
    default=QuantConfig.batch_size,
    show_default=True,
    help="Samples per onnxruntime run while calibrating (memory grows with it).",
)
@click.option(
    "--min-sqnr",
    type=float,
    help="Fail (exit 1, nothing written) when an output's SQNR against the float model on "
    "held-back calibration samples is below this many dB.",
)
@click.option(
    "--layer-report",
    is_flag=True,
    help="Print every quantized layer's input and output SQNR against the float model on the "
    "fidelity check's samples: where the error enters and how it grows.",
)
@click.option(
    "--fidelity-fallback/--no-fidelity-fallback",
    default=QuantConfig.fidelity_fallback,
    show_default=True,
    help="Where outputs fall below the warning threshold, keep the layers that lose most float "
    "(up to a tenth of them) while that helps.",
)
@click.option(
    "--speed-check/--no-speed-check",
    default=QuantConfig.speed_check,
    show_default=True,
    help="At 8 bits, time the quantized model against float at batch 1 and keep layers float where "
    "that runs faster (the choice follows this machine's timings: turn it off for reproducible "
    "files). Narrower widths run simulated in onnxruntime and are not timed.",
)
@click.option(
    "--equalize/--no-equalize",
    default=None,
    help="Cross-layer equalization: where a layer's output reaches a depthwise conv through Relu, "
    "ReLU6 or nothing, move its channels' range differences into the two layers' per-channel "
    "weights, so that one activation scale serves every channel (at 4-bit activations and below "
    "lined up by where each channel is best clipped at that width, by maxima otherwise) "
    "[default: on below 8-bit activations with per-channel weights]. The moves across a float "
    "op (a conv output read only by float ops such as HardSwish, a depthwise conv's input "
    "behind a Mul/Div by a constant or a float activation; not a SiLU at 8 bits, which runs on "
    "integer kernels) are made at every width unless --no-equalize.",
)
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option(
    "--fuse-branches/--no-fuse-branches",
    default=None,
    help="Merge re-parameterized branches before quantizing [default: only when all weights are "
    "8-bit; below that each branch keeps its own scale, which is far more accurate].",
)
@refine_options
@preprocess_options
@reports_errors
def quantize(model, output, calib, **options):
    """Quantize MODEL to QDQ (W8A8 by default), calibrated on --calib data."""
    from onnxq.pipeline import quantize_file
    from onnxq.progress import RichProgress

    config = QuantConfig(
        weight_bits=options.pop("w_bits"),
        activation_bits=options.pop("a_bits"),
        addend_bits=options.pop("addend_bits"),
        split_sums=options.pop("split_sums"),
        granularity=Granularity.parse(options.pop("granularity")),
        weight_rule=RangeRule.parse(options.pop("w_range")),
        weight_zero_point=_weight_zero_point(options.pop("w_zero_point"), options.pop("w_asym")),
        activation_symmetric=options.pop("a_sym"),
        first_last_8bit=not options.pop("quantize_first_last"),
        overrides=load_overrides(overrides) if (overrides := options.pop("overrides")) else (),
        calibration=CalibrationMethod(options.pop("calibration")),
        percentile=options.pop("percentile"),
        activation_scaleclip=options.pop("activation_scaleclip"),
        weight_range=WeightRange(options.pop("int8_range")),
        max_samples=options.pop("max_samples"),
        batch_size=options.pop("batch_size"),
        simplify=not options.pop("no_simplify"),
        fuse_branches=options.pop("fuse_branches"),
        bias_correction=options.pop("bias_correction"),
        weight_rounding=options.pop("weight_rounding"),
        seed=options.pop("seed"),
        holdout=options.pop("holdout"),
        pd_lambda=options.pop("pd_lambda"),
        time_budget=options.pop("time_budget"),
        search_memory_gb=options.pop("search_memory"),
        search_cache_half=options.pop("search_cache") == "float16",
        min_sqnr=options.pop("min_sqnr"),
        layer_report=options.pop("layer_report"),
        fidelity_fallback=options.pop("fidelity_fallback"),
        speed_check=options.pop("speed_check"),
        refine=options.pop("refine"),
        refine_unit=options.pop("refine_unit"),
        refine_loss=options.pop("refine_loss"),
        refine_iters=options.pop("refine_iters"),
        refine_batch=options.pop("refine_batch"),
        refine_pd_samples=options.pop("refine_pd_samples"),
        refine_memory_gb=options.pop("refine_memory"),
        refine_check=options.pop("refine_check"),
        qdrop=options.pop("qdrop"),
        threads=options.pop("threads"),
        refine_compile=options.pop("refine_compile"),
        device=options.pop("device"),
        distribution_correction=options.pop("distribution_correction"),
        correction_at=options.pop("correction_at"),
        correction_statistics=options.pop("correction_statistics"),
        qprep=options.pop("qprep"),
        refine_affine=options.pop("refine_affine"),
        equalize=options.pop("equalize"),
    )
    preprocess = build_preprocess(**options)
    with RichProgress() as progress:
        result = quantize_file(model, output, calib, config, preprocess=preprocess, progress=progress)
    for note in result.notes:
        click.echo(f"  {note}")
    click.echo(f"  8-bit weights: {result.weight_range}")
    noun = "node" if result.quantized_nodes == 1 else "nodes"
    click.echo(f"  calibrated on {result.samples_text}; {result.quantized_nodes} {noun} quantized")
    for reason, nodes in _by_reason(result.float_nodes).items():
        listed = ", ".join(nodes[:FLOAT_NODES_LISTED]) + (" ..." if len(nodes) > FLOAT_NODES_LISTED else "")
        count = f"{len(nodes)} nodes: " if len(nodes) > 1 else ""
        click.echo(f"  kept in float ({reason}): {count}{listed}")
    if config.layer_report and result.fidelity is not None:
        from onnxq.report import print_layer_errors

        print_layer_errors(result.fidelity.layers)
    click.echo(f"wrote {output} ({_megabytes(output)}; the float model {_megabytes(model)})")


def _megabytes(path: Path) -> str:
    from onnxq.evaluate import file_size

    return f"{file_size(Path(path)) / 1e6:.2f} MB"


FLOAT_NODES_LISTED = 4  # names shown per reason; a paddle2onnx graph has dozens of constant Adds


def _by_reason(float_nodes: dict[str, str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for node, reason in float_nodes.items():
        grouped.setdefault(reason, []).append(node)
    return grouped


def _weight_zero_point(chosen: str, asym: bool) -> str:
    """--w-asym, the older flag, means --w-zero-point all; with another choice it is refused."""
    if asym and chosen not in ("auto", "all"):
        raise OnnxqError(f"--w-asym means --w-zero-point all; it contradicts --w-zero-point {chosen}")
    return "all" if asym else chosen
