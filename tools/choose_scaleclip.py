"""Choose Scale-Clip's K (α = K·mean|W|) per weight bit width, on calibration data only.

For each model, width and candidate K, every Conv/Gemm weight except the first and last layer's
(which onnxq keeps at 8 bits) is quantized per output channel with the numpy reference and written
back as float, and the model's softmax on the calibration split is compared with the float
model's (mean KL divergence). BatchNormalization is folded and re-parameterized branches stay
unmerged, as onnxq quantizes them below 8 bits. Activations stay float, so the figure isolates
the weight rule. The K with the lowest mean log-KL across models wins; the evaluation split is
never read. Writes the "scaleclip" section of BENCHMARKS.md and prints the table to paste into
onnxq/layer_settings.py.

With --activations it chooses K of the activation rule (`--calib-method scaleclip`, α = K·mean|A|)
per activation width instead: each model is quantized by onnxq with 8-bit per-channel weights on
the first 256 images of its calibration pool, and the softmax KL from float is measured on the
rest of the pool (CIFAR-10 train-1017[256:], the other ImageNet calibration images). min-max and
the default percentile rule are the references. Writes the "scaleclip-activations" section.

    .venv/bin/python tools/choose_scaleclip.py [--activations] [--models resnet20_cifar10 ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench

import onnxq
from onnxq.config import Granularity, RangeRule
from onnxq.evaluate import kl_divergence
from onnxq.quant import primitives as P
from onnxq.quant.weights import WeightLayout, quantize_weight

CANDIDATES = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0)
WIDTHS = (2, 3, 4, 5, 6)
SAMPLES = 256
ACTIVATION_CANDIDATES = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
ACTIVATION_WIDTHS = (4, 6, 8)
REFERENCES = {"minmax": onnxq.CalibrationMethod.MINMAX, "percentile": onnxq.CalibrationMethod.PERCENTILE}


def fake_quantized(model: onnx.ModelProto, bits: int, rule: RangeRule) -> onnx.ModelProto:
    """The model with its inner Conv/Gemm weights replaced by their dequantized values."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    inner = {n.input[1] for n in layers[1:-1]}
    target = P.IntRange.signed(bits)
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name not in inner:
            continue
        weight = numpy_helper.to_array(tensor)
        layout = WeightLayout(0, 1)
        quantized = quantize_weight(weight, layout, Granularity.CHANNEL, rule, target).dequantize()
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(quantized, tensor.name))
    return model


def calibration_kl(name: str) -> dict[tuple[int, float], float]:
    split = bench.split_for(name, SAMPLES)
    model = onnxq.fuse(bench.model_path(name), merge_branches=False).model
    reference = bench.logits(model, split.calib)
    table = {}
    for bits in WIDTHS:
        for factor in (*CANDIDATES, None):
            rule = RangeRule("scaleclip", factor) if factor else RangeRule("minmax")
            out = bench.logits(fake_quantized(model, bits, rule), split.calib)
            table[bits, factor] = float(kl_divergence(reference, out).mean())
        print(name, bits, {k: round(v, 4) for (b, k), v in table.items() if b == bits}, flush=True)
    return table


def activation_kl(name: str) -> dict[tuple[int, object], float]:
    """Mean held-out KL per (activation width, K or reference rule name)."""
    pool = bench.split_for(name, 10**6).calib
    calib, held = pool[:SAMPLES], pool[SAMPLES:]
    path = bench.model_path(name)
    reference = bench.logits(onnx.load(path), held)
    table = {}
    for bits in ACTIVATION_WIDTHS:
        clipped = [(k, onnxq.CalibrationMethod.SCALECLIP) for k in ACTIVATION_CANDIDATES]
        rules = [*clipped, *REFERENCES.items()]
        for key, method in rules:
            k = key if method is onnxq.CalibrationMethod.SCALECLIP else None
            config = onnxq.QuantConfig(
                activation_bits=bits,
                calibration=method,
                activation_scaleclip=k,
                speed_check=False,
                fidelity_fallback=False,
            )
            model = onnxq.quantize(path, calib, config).model
            table[bits, key] = float(kl_divergence(reference, bench.logits(model, held)).mean())
        print(name, bits, {k: round(v, 4) for (b, k), v in table.items() if b == bits}, flush=True)
    return table


def choose_activations(models: list[str], out: Path) -> None:
    tables = {name: activation_kl(name) for name in models}
    chosen = {}
    lines = [
        "## Scale-Clip K per activation bit width (tools/choose_scaleclip.py --activations)",
        "",
        f"Mean KL of the quantized model's softmax from the float one on held-out calibration images "
        f"(the calibration pool after its first {SAMPLES}, which calibrate; never the evaluation "
        "split); 8-bit per-channel weights, activations at the row's width with `--calib-method "
        "scaleclip` and K as the column says, or the min-max and default percentile rules. Chosen: "
        "lowest mean log-KL over the models.",
        "",
    ]
    columns = [*ACTIVATION_CANDIDATES, *REFERENCES]
    for bits in ACTIVATION_WIDTHS:
        score = {
            k: float(np.mean([np.log(max(t[bits, k], 1e-12)) for t in tables.values()]))
            for k in ACTIVATION_CANDIDATES
        }
        chosen[bits] = min(score, key=score.get)
        lines += [
            f"### {bits}-bit activations (chosen K = {chosen[bits]:g})",
            "",
            "| model | " + " | ".join(f"K={k:g}" if isinstance(k, float) else k for k in columns) + " |",
            "| --- | " + " | ".join("---:" for _ in columns) + " |",
        ]
        for name, table in tables.items():
            lines.append(f"| {name} | " + " | ".join(f"{table[bits, k]:.4f}" for k in columns) + " |")
        lines.append("")
    bench.write_section(out, "scaleclip-activations", "\n".join(lines), bench.machine_description())
    print("ACTIVATION_SCALECLIP_K =", chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models = ["resnet20_cifar10", "mobilenet_v2", "repvgg_cifar10", "mobileone_cifar10"]
    parser.add_argument("--models", nargs="*", default=models)
    parser.add_argument("--activations", action="store_true", help="Choose K of the activation rule.")
    parser.add_argument("--out", type=Path, default=bench.ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    if args.activations:
        choose_activations(args.models, args.out)
        return
    tables = {name: calibration_kl(name) for name in args.models}
    chosen = {}
    lines = [
        "## Scale-Clip K per weight bit width (tools/choose_scaleclip.py)",
        "",
        f"Mean KL of the weight-only quantized model's softmax from the float one on {SAMPLES} "
        "calibration samples (never the evaluation split); per-channel symmetric weights, first and "
        "last layers float, activations float, re-parameterized branches unmerged (as quantized "
        "below 8 bits). minmax is the reference. Chosen: lowest mean log-KL.",
        "",
    ]
    for bits in WIDTHS:
        score = {
            k: float(np.mean([np.log(max(t[bits, k], 1e-12)) for t in tables.values()])) for k in CANDIDATES
        }
        chosen[bits] = min(score, key=score.get)
        lines += [
            f"### {bits}-bit weights (chosen K = {chosen[bits]:g})",
            "",
            "| model | minmax | " + " | ".join(f"K={k:g}" for k in CANDIDATES) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in CANDIDATES) + " |",
        ]
        for name, table in tables.items():
            cells = [f"{table[bits, None]:.4f}", *(f"{table[bits, k]:.4f}" for k in CANDIDATES)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    bench.write_section(args.out, "scaleclip", "\n".join(lines), bench.machine_description())
    print("SCALECLIP_K =", chosen)


if __name__ == "__main__":
    main()
