"""Choose Scale-Clip's K (α = K·mean|W|) per weight bit width, on calibration data only.

For each model, width and candidate K, every Conv/Gemm weight except the first and last layer's
(which onnxq keeps at 8 bits) is quantized per output channel with the numpy reference and written
back as float, and the model's softmax on the calibration split is compared with the float
model's (mean KL divergence). BatchNormalization is folded and re-parameterized branches stay
unmerged, as onnxq quantizes them below 8 bits. Activations stay float, so the figure isolates
the weight rule. The K with the lowest mean log-KL across models wins; the evaluation split is
never read. Writes the "scaleclip" section of BENCHMARKS.md and prints the table to paste into
onnxq/config.py.

    .venv/bin/python tools/choose_scaleclip.py [--models resnet20_cifar10 mobilenet_v2 ...]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models = ["resnet20_cifar10", "mobilenet_v2", "repvgg_cifar10", "mobileone_cifar10"]
    parser.add_argument("--models", nargs="*", default=models)
    parser.add_argument("--out", type=Path, default=bench.ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
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
