"""What each suite of tools/bench.py runs: the settings per model, the table's note, the table.

A suite is (settings, calibration samples, latency): `settings(name)` maps each row's label to a
function (model path, calibration array) → (model, seconds[, peak MB]); bench.measure scores
them on the evaluation split and `markdown` writes the model's table. The protocol itself (data
splits, runners, scoring, writing BENCHMARKS.md) is tools/bench.py's.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from bench import (
    CALIBRATION_SAMPLES,
    HELD_OUT_NAMES,
    LOW_BIT_SAMPLES,
    ROOT,
    Row,
    Split,
    held_out_split,
    logits,
    model_path,
    run_onnxq,
    run_onnxq_cli,
    run_onnxruntime,
    score,
    split_for,
)

import onnxq
from onnxq.config import Granularity, RangeRule

# ----------------------------------------------------------------------------- suites


def w8a8_settings(name: str) -> dict[str, Callable]:
    # onnxruntime's histogram calibrator keeps every activation of every sample: with the 500
    # ImageNet images it exhausts this machine's 24 GB on MobileNetV2 (killed, measured), so it
    # gets 128 of them there. onnxq streams and calibrates on all of them.
    few = "cifar" not in name
    percentile_label = "onnxruntime quantize_static Percentile" + (" (128 calibration images)" if few else "")
    return {
        "onnxq W8A8 auto (default)": lambda p, c: run_onnxq(p, c, onnxq.QuantConfig()),
        "onnxq W8A8 percentile": lambda p, c: run_onnxq(
            p, c, onnxq.QuantConfig(calibration=onnxq.CalibrationMethod.PERCENTILE)
        ),
        "onnxq W8A8 minmax": lambda p, c: run_onnxq(
            p, c, onnxq.QuantConfig(calibration=onnxq.CalibrationMethod.MINMAX)
        ),
        "onnxq W8A8 auto, reduced 8-bit weights": lambda p, c: run_onnxq(
            p, c, onnxq.QuantConfig(weight_range=onnxq.WeightRange.REDUCED)
        ),
        "onnxq W8A8 auto, unsigned 8-bit weights": lambda p, c: run_onnxq(
            p, c, onnxq.QuantConfig(weight_range=onnxq.WeightRange.UNSIGNED)
        ),
        "onnxruntime quantize_static MinMax": lambda p, c: run_onnxruntime(p, c, "MinMax"),
        percentile_label: lambda p, c: run_onnxruntime(p, c[:128] if few else c, "Percentile"),
    }


def reparam_settings(name: str) -> dict[str, Callable]:
    def fused(path, calib):
        start = time.perf_counter()
        return onnxq.fuse(path).model, time.perf_counter() - start

    def quantize_fused(path, calib):
        return run_onnxq(onnxq.fuse(path).model, calib, onnxq.QuantConfig())

    settings = {
        "fused float (onnxq fuse)": fused,
        "onnxq W8A8 (default), unfused input": lambda p, c: run_onnxq(p, c, onnxq.QuantConfig()),
        "onnxq W8A8 (default), input fused by onnxq fuse": quantize_fused,
    }
    deployed = ROOT / "build" / f"{name}_deployed.onnx"  # torch's own re-parameterization
    if deployed.exists():
        settings["torch's deployed export (float)"] = lambda p, c: (onnx.load(deployed), 0.0)
        settings["onnxq W8A8 (default), torch's deployed export"] = lambda p, c: run_onnxq(
            deployed, c, onnxq.QuantConfig()
        )
    settings["onnxruntime quantize_static MinMax, unfused input"] = lambda p, c: run_onnxruntime(
        p, c, "MinMax"
    )
    return settings


# the weights of the low-bit suites (symmetric before the zero-point suite; auto since)
WEIGHTS = "per-channel weights (`--w-zero-point auto`)"
LOW_BIT_WIDTHS = [(8, 8), (6, 6), (4, 8), (4, 4), (3, 3), (2, 4)]
RULES_AT_W4A8 = ["mse", "mae", "scaleclip", "percentile:99.9", "output"]


def lowbit_config(w: int, a: int, granularity: str, rule: str, symmetric: bool = True) -> onnxq.QuantConfig:
    return onnxq.QuantConfig(
        weight_bits=w,
        activation_bits=a,
        granularity=Granularity.parse(granularity),
        weight_rule=RangeRule.parse(rule),
        weight_zero_point="none" if symmetric else "all",
        calibration=onnxq.CalibrationMethod.MINMAX,
        bias_correction=False,  # the issue-4 baseline: ranges only (calib suite has the rest)
    )


def lowbit_settings(name: str) -> dict[str, Callable]:
    settings = {}
    for w, a in LOW_BIT_WIDTHS:
        rules = ["minmax", *RULES_AT_W4A8] if (w, a) == (4, 8) else ["minmax", "mse", "scaleclip"]
        for granularity in ("channel", "group:8"):
            for rule in rules if granularity == "channel" else ["minmax"]:
                config = lowbit_config(w, a, granularity, rule)
                label = f"onnxq W{w}A{a} {granularity} {rule}"
                settings[label] = lambda p, c, config=config: run_onnxq(p, c, config)
        if (w, a) == (4, 8):
            for rule in ("minmax", "mse", "scaleclip"):
                config = lowbit_config(w, a, "channel", rule, symmetric=False)
                label = f"onnxq W{w}A{a} channel {rule}, asymmetric weights"
                settings[label] = lambda p, c, config=config: run_onnxq(p, c, config)
    for weight_type, activation_type, label in [
        ("QInt4", "QUInt8", "W4A8"),
        ("QInt4", "QUInt4", "W4A4"),
    ]:
        settings[f"onnxruntime quantize_static MinMax {label} (per-channel)"] = (
            lambda p, c, w=weight_type, a=activation_type: run_onnxruntime(p, c, "MinMax", w, a)
        )
    return settings


CALIB_WIDTHS = {
    "resnet20_cifar10": [(8, 8), (4, 8), (4, 4), (2, 4)],
    "resnet56_cifar10": [(4, 8), (4, 4)],
    "mobilenet_v2": [(8, 8), (4, 8)],
    "repvgg_cifar10": [(4, 8)],
    "mobileone_cifar10": [(4, 8)],
}
CALIB_METHODS = [
    ("minmax", False),
    ("minmax", True),
    ("mse", False),
    ("mse", True),
    ("mae", False),
    ("mae", True),
    ("pd", False),
    ("pd", True),
]
CACHE_WIDTHS = {"resnet20_cifar10": (4, 4), "mobilenet_v2": (4, 8)}
ORT_TYPES = {(8, 8): ("QInt8", "QUInt8"), (4, 8): ("QInt4", "QUInt8"), (4, 4): ("QInt4", "QUInt4")}


def calib_settings(name: str) -> dict[str, Callable]:
    settings = {}
    for w, a in CALIB_WIDTHS.get(name, [(4, 8), (4, 4)]):
        for method, corrected in CALIB_METHODS:
            flags = ["--w-bits", str(w), "--a-bits", str(a), "--calib-method", method, "--max-samples", "256"]
            flags.append("--bias-correction" if corrected else "--no-bias-correction")
            label = f"onnxq W{w}A{a} {method}" + (", bias correction" if corrected else "")
            settings[label] = lambda p, c, flags=flags: run_onnxq_cli(p, c, flags)
        if w < 8 and name in DEFAULT_MODELS["reparam"]:  # branches merged first (the 8-bit default)
            for method in ("mse", "mae"):
                flags = ["--w-bits", str(w), "--a-bits", str(a), "--calib-method", method, "--fuse-branches"]
                settings[f"onnxq W{w}A{a} {method}, branches merged"] = lambda p, c, flags=flags: (
                    run_onnxq_cli(p, c, [*flags, "--max-samples", "256"])
                )
        if (w, a) == CACHE_WIDTHS.get(name):  # what the float16 search cache costs, same samples
            for cache in ("float16", "float32"):
                flags = ["--w-bits", str(w), "--a-bits", str(a), "--calib-method", "mse"]
                flags += ["--search-cache", cache, "--search-memory", "8", "--max-samples", "256"]
                settings[f"onnxq W{w}A{a} mse, {cache} search cache (8 GB)"] = lambda p, c, flags=flags: (
                    run_onnxq_cli(p, c, flags)
                )
        if (w, a) in ORT_TYPES:
            weight_type, activation_type = ORT_TYPES[(w, a)]
            for method in ("MinMax", "Percentile"):
                few = method == "Percentile" and "cifar" not in name  # its histograms exhaust memory
                label = f"onnxruntime quantize_static {method} W{w}A{a}" + (" (128 images)" if few else "")
                settings[label] = lambda p, c, m=method, wt=weight_type, at=activation_type, few=few: (
                    run_onnxruntime(p, c[:128] if few else c, m, wt, at)
                )
    return settings


REFINE_WIDTHS = {
    "resnet20_cifar10": [(4, 4), (2, 4)],
    "resnet56_cifar10": [(4, 4)],
    "mobilenet_v2": [(4, 8), (6, 6), (4, 4)],
    "repvgg_cifar10": [(4, 4)],
    "mobileone_cifar10": [(4, 4)],
}
# mse beside the default pd: on resnet20 (where the default was chosen) and on mobilenet_v2, where pd's
# float remainder through the whole network leaves the first units few iterations of the budget
REFINE_LOSSES = {"resnet20_cifar10": ["mse", "pd"], "mobilenet_v2": ["pd", "mse"]}
# --time-budget (search and refinement together) where full refinement would take too long on 2 cores:
# issue 14 allows MobileNetV2 30 minutes; ResNet-56's pd refinement alone took over an hour.
REFINE_BUDGETS = {"mobilenet_v2": "1800", "resnet56_cifar10": "900"}
# setting → (top-1, KL from float) on held-out calibration images (never the evaluation split)
HELD_OUT: dict[str, tuple[float, float]] = {}


@functools.cache
def held_out_scoring(name: str) -> tuple[Split, np.ndarray]:
    """`name`'s held-out calibration images (as the split bench.score reads) and the float model's
    logits on them: decoded and run once for every setting a suite scores."""
    x, y = held_out_split(name)
    return Split(x[:0], x, y), logits(onnx.load(model_path(name)), x)


def held_out_scored(name: str, label: str, flags: list[str]) -> Callable:
    """A setting run by `onnxq quantize` with `flags` that also records its top-1 and its mean KL
    from float on `name`'s held-out calibration images in HELD_OUT: top-1 on a few hundred images
    moves by a few images between runs, where the KL, which every choose tool follows, does not."""

    def build(path, calib):
        model, seconds, peak = run_onnxq_cli(path, calib, flags)
        top1, _, kl = score(model, *held_out_scoring(name))
        HELD_OUT[label] = (top1, kl)
        return model, seconds, peak

    return build


def refine_settings(name: str) -> dict[str, Callable]:
    scored = functools.partial(held_out_scored, name)
    settings = {}
    for w, a in REFINE_WIDTHS.get(name, [(4, 4)]):
        base = ["--w-bits", str(w), "--a-bits", str(a), "--max-samples", "256", "--no-speed-check"]
        for method in ("mse", "pd") if name == "resnet20_cifar10" else ("mse",):
            label = f"onnxq W{w}A{a} {method} (scale search only)"
            settings[label] = scored(label, [*base, "--calib-method", method])
        for loss in REFINE_LOSSES.get(name, [onnxq.QuantConfig.refine_loss]):
            label = f"onnxq W{w}A{a} mse + --refine ({loss} loss)"
            flags = [*base, "--calib-method", "mse", "--refine", "--refine-loss", loss]
            if name in REFINE_BUDGETS:
                settings[f"{label}, no time budget"] = scored(f"{label}, no time budget", flags)
                flags += ["--time-budget", REFINE_BUDGETS[name]]
            settings[label] = scored(label, flags)
            if loss == onnxq.QuantConfig.refine_loss:  # every refined layer learns an affine too
                affine = f"onnxq W{w}A{a} mse + --refine --refine-affine ({loss} loss)"
                settings[affine] = scored(affine, [*flags, "--refine-affine"])
    return settings


def rounding_settings(name: str) -> dict[str, Callable]:
    """GPTQ against nearest rounding at refinement's widths: the mse scale search and the default
    calibration, each with both roundings, everything else equal; top-1 on held-out calibration
    images beside (where the default is chosen)."""
    scored = functools.partial(held_out_scored, name)
    settings = {}
    for w, a in REFINE_WIDTHS.get(name, [(4, 4)]):
        base = ["--w-bits", str(w), "--a-bits", str(a), "--max-samples", "256", "--no-speed-check"]
        for method in ("auto", "mse") if "cifar" in name else ("mse",):  # MobileNetV2: 5 min a row
            for rounding in ("nearest", "gptq"):
                label = f"onnxq W{w}A{a} {method}, {rounding} rounding"
                flags = [*base, "--calib-method", method, "--weight-rounding", rounding]
                settings[label] = scored(label, flags)
    return settings


def flag_pair_settings(
    name: str, choices: tuple[tuple[tuple[str, ...], str], ...], widths: Callable[[int, int], bool]
) -> dict[str, Callable]:
    """One setting against another (`choices`: (flags, what the label calls it)) at refinement's widths
    that `widths(w, a)` keeps, with the mse scale search and its default GPTQ rounding, everything
    else equal; top-1 on held-out calibration images beside."""
    scored = functools.partial(held_out_scored, name)
    settings = {}
    for w, a in [(w, a) for w, a in REFINE_WIDTHS.get(name, [(4, 4)]) if widths(w, a)]:
        base = ["--w-bits", str(w), "--a-bits", str(a), "--max-samples", "256", "--no-speed-check"]
        for flags, what in choices:
            label = f"onnxq W{w}A{a} mse, {what}"
            settings[label] = scored(label, [*base, "--calib-method", "mse", *flags])
    return settings


def below_8bit_activations(w: int, a: int) -> bool:
    return a < 8


def equalize_settings(name: str) -> dict[str, Callable]:
    """Cross-layer equalization against none below 8-bit activations, where it is the default."""
    choices = ((("--no-equalize",), "--no-equalize"), (("--equalize",), "--equalize"))
    return flag_pair_settings(name, choices, below_8bit_activations)


def sums_settings(name: str) -> dict[str, Callable]:
    """Residual sums quantized once at the activation width against split (the Add at 8 bits, the
    layer through its own quantizer) below 8-bit activations."""
    choices = ((("--no-split-sums",), "one quantizer per sum"), (("--split-sums",), "split sums"))
    return flag_pair_settings(name, choices, below_8bit_activations)


def zero_point_settings(name: str) -> dict[str, Callable]:
    """Every weight symmetric against a zero point on those below 8 bits, at every refinement width
    (each has weights below 8 bits)."""
    choices = (
        (("--w-zero-point", "none"), "symmetric weights"),
        (("--w-zero-point", "narrow"), "weights below 8 bits with a zero point"),
    )
    return flag_pair_settings(name, choices, lambda w, a: True)


def refine_extra(name: str) -> str:
    if not HELD_OUT:
        return ""
    cells = "; ".join(f"{label}: {100 * top1:.2f} %, KL {kl:.4f}" for label, (top1, kl) in HELD_OUT.items())
    held = HELD_OUT_NAMES["cifar" if "cifar" in name else "imagenet"]
    what = f"Top-1 and mean KL from float on held-out calibration images ({held}, where defaults are chosen)"
    return f"{what}: {cells}."


SEEDS_MODELS = ["resnet20_cifar10_bn", "mobilenet_v2_bn"]
DATA_FREE = Path(onnxq.correct.DATA_FREE)  # `--calib bn-stats`: inputs synthesised from BatchNorm statistics
# --time-budget of the ImageNet refinement rows (issue 14's 30 minutes); tools/bench_draws.py
# --seeds-budget lowers it where three draws of both rows must fit in a session
SEEDS_BUDGET_S = 1800


def seeds_budget(name: str) -> list[str]:
    """The seeds suite's refinement flags for a time budget: none on CIFAR, SEEDS_BUDGET_S on ImageNet."""
    return [] if "cifar" in name else ["--time-budget", str(SEEDS_BUDGET_S)]


def seeds_settings(name: str) -> dict[str, Callable]:
    """Issue 15's pieces with and without, everything else equal: data-free calibration against
    real data at W8A8 and W4A8, activation Scale-Clip against percentile ranges at A4 and A6,
    refinement with and without distribution correction at W4A4."""
    synthesised = "64"  # a forward and backward pass per sample and step: MobileNetV2 about 24 min
    refine = ["--w-bits", "4", "--a-bits", "4", "--calib-method", "mse", "--no-speed-check", "--refine"]
    refine += seeds_budget(name)
    settings = {}
    for w in (8, 4):
        widths = ["--w-bits", str(w), "--no-speed-check"]
        settings[f"onnxq W{w}A8, real data"] = lambda p, c, f=widths: run_onnxq_cli(p, c, f)
        settings[f"onnxq W{w}A8, data-free ({synthesised} synthesised)"] = lambda p, c, f=widths: (
            run_onnxq_cli(p, DATA_FREE, [*f, "--max-samples", synthesised])
        )
    for a in (4, 6):  # GDRQ's activation Scale-Clip against the percentile rule it would replace
        for rule in ("percentile", "scaleclip"):
            flags = ["--a-bits", str(a), "--calib-method", rule, "--no-speed-check"]
            settings[f"onnxq W8A{a}, {rule} activations"] = lambda p, c, f=flags: run_onnxq_cli(p, c, f)
    settings["onnxq W4A4 mse + --refine, no DC"] = lambda p, c: run_onnxq_cli(
        p, c, [*refine, "--no-distribution-correction"]
    )
    settings["onnxq W4A4 mse + --refine + DC"] = lambda p, c: run_onnxq_cli(
        p, c, [*refine, "--distribution-correction"]
    )
    return settings


QPREP_WIDTHS = [(8, 8), (6, 6), (4, 8)]
ABC_WINDOW = "window:2"  # RepAPQ's across-block calibration: two consecutive blocks reconstructed together


def qprep_settings(name: str) -> dict[str, Callable]:
    """Merged (deployable) re-parameterized models: plain PTQ, refinement, refinement + QPRep, and
    RepAPQ's whole recipe (QPRep with across-block MAE reconstruction), beside the unmerged path."""
    settings = {}
    for w, a in QPREP_WIDTHS:
        widths = ["--w-bits", str(w), "--a-bits", str(a), "--calib-method", "mse"]
        widths += ["--no-speed-check", "--threads", "1"]
        base = [*widths, "--fuse-branches"]
        settings[f"onnxq W{w}A{a} unmerged, mse"] = lambda p, c, f=widths: run_onnxq_cli(p, c, f)
        settings[f"onnxq W{w}A{a} merged, mse"] = lambda p, c, f=base: run_onnxq_cli(p, c, f)
        settings[f"onnxq W{w}A{a} merged, mse + --refine --no-qprep"] = lambda p, c, f=base: run_onnxq_cli(
            p, c, [*f, "--refine", "--no-qprep"]
        )
        settings[f"onnxq W{w}A{a} merged, mse + --refine --qprep"] = lambda p, c, f=base: run_onnxq_cli(
            p, c, [*f, "--refine", "--qprep"]
        )
        abc = ["--refine", "--qprep", "--refine-loss", "mae", "--refine-unit", ABC_WINDOW]
        settings[f"onnxq W{w}A{a} merged, mse + --refine --qprep, ABC ({ABC_WINDOW}, mae)"] = (
            lambda p, c, f=[*base, *abc]: run_onnxq_cli(p, c, f)
        )
    return settings


SUITES = {
    "calib": (calib_settings, LOW_BIT_SAMPLES, False),
    "w8a8": (w8a8_settings, CALIBRATION_SAMPLES, True),
    "reparam": (reparam_settings, CALIBRATION_SAMPLES, True),
    "lowbit": (lowbit_settings, LOW_BIT_SAMPLES, False),
    "refine": (refine_settings, LOW_BIT_SAMPLES, False),
    "seeds": (seeds_settings, LOW_BIT_SAMPLES, False),
    "qprep": (qprep_settings, LOW_BIT_SAMPLES, False),
    "rounding": (rounding_settings, LOW_BIT_SAMPLES, False),
    "equalize": (equalize_settings, LOW_BIT_SAMPLES, False),
    "sums": (sums_settings, LOW_BIT_SAMPLES, False),
    "zero-point": (zero_point_settings, LOW_BIT_SAMPLES, False),
}
DEFAULT_MODELS = {
    "w8a8": [
        "mobilenet_v2",
        "mobilenet_v2_bn",
        "resnet20_cifar10",
        "resnet20_cifar10_bn",
        "resnet56_cifar10",
        "resnet56_cifar10_bn",
    ],
    "reparam": ["repvgg_cifar10", "mobileone_cifar10"],
    "lowbit": ["resnet20_cifar10", "mobilenet_v2", "repvgg_cifar10", "mobileone_cifar10"],
    "calib": list(CALIB_WIDTHS),
    "refine": list(REFINE_WIDTHS),
    "seeds": SEEDS_MODELS,
    "qprep": ["repvgg_cifar10", "mobileone_cifar10"],
    "rounding": list(REFINE_WIDTHS),
    "equalize": list(REFINE_WIDTHS),
    "sums": list(REFINE_WIDTHS),
    "zero-point": list(REFINE_WIDTHS),
}
# rows run `onnxq quantize` in its own process
PEAK_MB_SUITES = ("calib", "refine", "seeds", "qprep", "rounding", "equalize", "sums", "zero-point")
SUITE_TITLES = {
    "w8a8": "W8A8 against onnxruntime (issue 2)",
    "reparam": "Re-parameterized models: unfused, fused, W8A8 (issue 3)",
    "lowbit": "Low bit widths, granularity and weight range rules (issue 4)",
    "calib": "Scales chosen by error: mse, mae, pd, bias correction (issue 5)",
    "refine": "Rounding refinement: learned rounding and activation steps (issue 14)",
    "seeds": "BatchNorm statistics: data-free calibration and distribution correction (issue 15)",
    "qprep": "Merged re-parameterized models: refinement and QPRep (issue 15)",
    "rounding": "GPTQ weight rounding against nearest rounding (issue 14)",
    "equalize": "Cross-layer equalization against none (issues 13 and 14)",
    "sums": "Residual sums with a second quantizer against one (issue 14)",
    "zero-point": "Weights below 8 bits with a zero point against symmetric ones (issue 14)",
}


# ----------------------------------------------------------------------------- markdown


def fusion_check(name: str) -> str:
    """How far onnxq fuse moves the logits on the evaluation split, and what it did to the graph."""
    path = model_path(name)
    split = split_for(name, CALIBRATION_SAMPLES)
    original = onnx.load(path)
    result = onnxq.fuse(path)
    before = logits(original, split.x)
    after = logits(result.model, split.x)
    relative = float(np.abs(after - before).max() / np.abs(before).max())
    same = bool((after.argmax(1) == before.argmax(1)).all())
    ops = ", ".join(
        f"{op} {sum(n.op_type == op for n in original.graph.node)} → "
        f"{sum(n.op_type == op for n in result.model.graph.node)}"
        for op in ("Conv", "BatchNormalization", "Add")
    )
    return (
        f"onnxq fuse: {result.fused.branches_merged} branches merged into {len(result.fused.merged)} Conv "
        f"nodes ({ops}); max |fused − unfused| over max |unfused| logits on the evaluation split: "
        f"{relative:.1e}; top-1 identical on every image: {'yes' if same else 'NO'}."
    )


def markdown(suite: str, name: str, float_top1: float, rows: list[Row], samples: int, extra: str) -> str:
    """One model's table for one suite."""
    notes = {
        "w8a8": f"Calibration: {samples} CIFAR-10 training images or the 500 even-class ImageNet images.",
        "reparam": f"Calibration: {samples} CIFAR-10 training images. Fused rows must equal the float model.",
        "lowbit": f"Calibration: {samples} CIFAR-10 training images or {samples} even-class ImageNet "
        "images; activation ranges min-max. First and last layers stay at 8 bits.",
        "calib": f"Calibration: {samples} CIFAR-10 training images or {samples} even-class ImageNet images; "
        f"{WEIGHTS}, first and last layers at 8 bits. onnxq rows run `onnxq quantize` "
        "in its own process: calib. s is that process's wall time (imports and saving included) and "
        "peak MB its peak resident memory. pd keeps 20 % of the calibration images out of its search. "
        "Re-parameterized models: below 8 bits branches are quantized one by one unless merged.",
        "refine": f"Calibration: {samples} CIFAR-10 training images or {samples} even-class ImageNet images; "
        f"{WEIGHTS}, first and last layers at 8 bits, tensors only Add reads at 8 bits "
        "(`--addend-bits`), branches of re-parameterized models unmerged. `--refine` starts from the "
        "mse scale search and runs its defaults (block units, "
        "QDrop 0.5, 500 iterations per block, batch 32, seed 0; the loss as the row says); "
        f"{', '.join(f'{m} with --time-budget {s}' for m, s in REFINE_BUDGETS.items())} (search and "
        "refinement together; fewer iterations per block). One calibration draw. calib. s is the "
        "`onnxq quantize` process's wall time on 2 cores and peak MB its peak resident memory.",
        "seeds": f"Calibration: {samples} CIFAR-10 training images or {samples} even-class ImageNet images "
        "where data is used; data-free rows see no image and synthesise their inputs from the BatchNorm "
        "statistics (`--calib bn-stats`). Refinement rows: mse scale search, then `--refine` at its "
        "defaults, with or without distribution correction, everything else equal; one calibration "
        "draw. calib. s is the `onnxq quantize` process's wall time on 2 cores and peak MB its peak "
        "resident memory.",
        "qprep": f"Calibration: {samples} CIFAR-10 training images. Branches merged by `--fuse-branches` "
        "(the deployable form), mse scale search, then `--refine` at its defaults with and without "
        "`--qprep`, and RepAPQ's recipe (`--qprep` with `--refine-loss mae --refine-unit "
        f"{ABC_WINDOW}`); unmerged rows quantize the branches one by one with the same search. One "
        "torch thread; one calibration draw. calib. s is the `onnxq quantize` process's wall time and "
        "peak MB its peak resident memory.",
        "rounding": f"Calibration: {samples} CIFAR-10 training images or {samples} even-class ImageNet "
        f"images; {WEIGHTS}, first and last layers at 8 bits, tensors only Add reads at "
        "8 bits, branches of re-parameterized models unmerged. auto: ranges from statistics with bias "
        "correction; mse: the scale search. nearest: every weight rounded to its nearest integer; gptq: "
        "`--weight-rounding gptq` (onnxq/calib/rounding.py), the same scales. One calibration draw. "
        "calib. s is the `onnxq quantize` process's wall time on 2 cores and peak MB its peak resident "
        "memory.",
        "sums": f"Calibration: {samples} CIFAR-10 training images or {samples} even-class ImageNet "
        f"images; {WEIGHTS}, first and last layers at 8 bits, tensors only Add reads at "
        "8 bits, mse scale search with GPTQ rounding (the default below 8-bit weights). One quantizer "
        "per sum (`--no-split-sums`): a tensor an Add and a layer both read (a residual block's input) "
        "is quantized once, at the activation width; split sums (`--split-sums`): the Add reads it at "
        "8 bits, the layer through a quantizer of its own at the activation width "
        "(onnxq/passes/split_addend_reads.py). One calibration draw. calib. s is the `onnxq quantize` "
        "process's wall time on 2 cores and peak MB its peak resident memory.",
        "zero-point": f"Calibration: {samples} CIFAR-10 training images or {samples} even-class ImageNet "
        "images; first and last layers at 8 bits, tensors only Add reads at 8 bits, residual sums split, "
        "mse scale search with GPTQ rounding (the default below 8-bit weights). Symmetric weights "
        "(`--w-zero-point none`): signed, zero point 0; with a zero point (`--w-zero-point narrow`): "
        "weights narrower than 8 bits unsigned with a zero point per channel, 8-bit ones symmetric. "
        "One calibration draw. calib. s is the `onnxq quantize` process's wall time on 2 cores and "
        "peak MB its peak resident memory.",
        "equalize": f"Calibration: {samples} CIFAR-10 training images or {samples} even-class ImageNet "
        f"images; {WEIGHTS}, first and last layers at 8 bits, tensors only Add reads at "
        "8 bits, mse scale search with GPTQ rounding (the default below 8-bit weights). --equalize: "
        "cross-layer equalization (onnxq/passes/equalize.py) before planning; --no-equalize: none. One "
        "calibration draw. calib. s is the `onnxq quantize` process's wall time on 2 cores and peak MB "
        "its peak resident memory.",
    }
    latency = SUITES[suite][2]
    lines = [f"## {SUITE_TITLES[suite]}: {name} (float top-1 {100 * float_top1:.2f} %)", "", notes[suite], ""]
    lines += [extra, ""] if extra else []
    header = "| setting | top-1 % | Δ float | agreement % | KL | size KB | calib. s |"
    rule = "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    if suite in PEAK_MB_SUITES:
        header += " peak MB |"
        rule += " ---: |"
    if latency:
        header += " latency ×float |"
        rule += " ---: |"
    lines += [header + " kernels |", rule + " --- |"]
    for r in rows:
        cells = [
            r.setting,
            f"{100 * r.top1:.2f}",
            f"{100 * (r.top1 - float_top1):+.2f}",
            f"{100 * r.agreement:.2f}",
            f"{r.kl:.4f}",
            f"{r.size_kb:.0f}",
            "" if r.calib_s is None else f"{r.calib_s:.1f}",
        ]
        if suite in PEAK_MB_SUITES:
            cells.append("" if r.peak_mb is None else f"{r.peak_mb:.0f}")
        if latency:
            cells.append("" if r.latency_ratio is None else f"{r.latency_ratio:.2f}")
        cells.append(r.kernels)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
