"""The flags of `onnxq quantize --refine` and of what runs with it (onnxq.refine, onnxq.correct)."""

from __future__ import annotations

import click

from onnxq.config import QuantConfig

REFINE_OPTIONS = [
    click.option(
        "--refine",
        is_flag=True,
        help="After calibration, learn weight rounding and activation steps by gradient, block by "
        "block (AdaRound/BRECQ with QDrop), starting from the calibrated scales. Needs "
        "pip install 'onnxq[refine]'.",
    ),
    click.option(
        "--refine-unit",
        default=QuantConfig.refine_unit,
        show_default=True,
        help="What is reconstructed at once: layer, block (cut where one tensor crosses) or window:K "
        "(K consecutive blocks).",
    ),
    click.option(
        "--refine-loss",
        type=click.Choice(["mse", "mae", "pd"]),
        default=QuantConfig.refine_loss,
        show_default=True,
        help="Reconstruction loss: the unit's output error (mse, mae) or pd, the prediction difference "
        "at the model output plus a feature regulariser (PD-Quant).",
    ),
    click.option(
        "--refine-iters",
        type=int,
        default=QuantConfig.refine_iters,
        show_default=True,
        help="Iterations per unit (fewer where --time-budget runs out).",
    ),
    click.option(
        "--refine-batch",
        type=int,
        default=QuantConfig.refine_batch,
        show_default=True,
        help="Samples per refinement iteration.",
    ),
    click.option(
        "--refine-pd-samples",
        type=int,
        default=QuantConfig.refine_pd_samples,
        show_default=True,
        help="Under --time-budget, in a pd unit whose whole batch would not reach --refine-iters in "
        "its share: samples of each batch that pd's prediction term is taken on (0: never narrow); "
        "the rest of the network runs in float on these only, the unit's feature term on all.",
    ),
    click.option(
        "--refine-memory",
        type=float,
        default=QuantConfig.refine_memory_gb,
        show_default=True,
        help="GB of activations refinement may hold for all samples at a unit's cuts (beyond it, it "
        "learns on fewer samples) and, apart, for one learning pass (beyond it, a batch learns in chunks).",
    ),
    click.option(
        "--refine-check/--no-refine-check",
        default=QuantConfig.refine_check,
        show_default=True,
        help="After refinement, measure the model without it too, and save that one where the scale "
        "search alone keeps the lowest output clearly (0.5 dB) closer to float.",
    ),
    click.option(
        "--qdrop",
        type=float,
        default=QuantConfig.qdrop,
        show_default=True,
        help="QDrop: probability that an activation stays float while rounding is learned.",
    ),
    click.option("--threads", type=int, help="CPU threads for refinement (default: torch's choice)."),
    click.option(
        "--refine-compile/--no-refine-compile",
        default=QuantConfig.refine_compile,
        show_default=True,
        help="Compile the fake quantizers' learning passes on large tensors with torch (MobileNetV2's "
        "learning 13 % faster; needs a C++ compiler, falls back to plain torch without one).",
    ),
    click.option(
        "--device",
        type=click.Choice(["cpu", "cuda"]),
        default=QuantConfig.device,
        show_default=True,
        help="Where refinement runs; the CPU is enough.",
    ),
    click.option(
        "--distribution-correction/--no-distribution-correction",
        default=QuantConfig.distribution_correction,
        show_default=True,
        help="With --refine, nudge the calibration inputs towards the BatchNorm statistics the model "
        "had before folding (PD-Quant's DC). Off by default: on held-out calibration images it left "
        "refined models further from float (tools/choose_dc.py).",
    ),
    click.option(
        "--correction-at",
        type=click.Choice(["inputs", "blocks"]),
        default=QuantConfig.correction_at,
        show_default=True,
        help="What --distribution-correction nudges: the calibration inputs once, before refinement, "
        "or each unit's float inputs before it learns, as PD-Quant does (the unit's float targets "
        "and QDrop's float side follow them; its quantized inputs and the pd target do not).",
    ),
    click.option(
        "--correction-statistics",
        type=click.Choice(["batch", "sample"]),
        default=QuantConfig.correction_statistics,
        show_default=True,
        help="With --correction-at blocks, whose per-channel mean and deviation are matched to "
        "BatchNorm's: each batch's, or each sample's own over its positions, as PD-Quant's code does.",
    ),
    click.option(
        "--qprep/--no-qprep",
        default=QuantConfig.qprep,
        show_default=True,
        help="With --refine, convs merged from re-parameterized branches also learn a per-channel "
        "scale and shift of their output (RepAPQ's QPRep), folded into their weight scales and bias.",
    ),
    click.option(
        "--refine-affine/--no-refine-affine",
        default=QuantConfig.refine_affine,
        show_default=True,
        help="With --refine, every refined layer learns that per-channel scale and shift (its shift "
        "mends the mean error of rounding where a unit has few iterations), folded in the same way.",
    ),
]


def refine_options(command):
    """`command` with the refinement flags, in the order --help lists them."""
    for option in reversed(REFINE_OPTIONS):
        command = option(command)
    return command
