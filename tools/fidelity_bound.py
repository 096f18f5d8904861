"""How close to float 8-bit quantization can keep a zoo model's outputs, whatever the plan.

Issue 13 asks W8A8 to keep SQNR ≥ 30 dB on detector and segmentation outputs. This tool measures
what the two halves of W8A8 cost on their own, on each model's evaluation samples, against the
float model, with nothing float that W8A8 would quantize (no first/last exception, no fallback):

- weights only: every weighted layer's (Conv, ConvTranspose, Gemm, MatMul) constant weights
  rounded to nearest on 8-bit symmetric per-channel scales [-127, 127], activations float;
- activations only: every weighted layer's data input through an 8-bit per-tensor QDQ with the
  min-max range of the calibration samples, weights float;
- activations per channel: the same with one range per channel, the best any channel
  equalization could do with the calibration samples' ranges;
- both: weights and per-tensor activations (plain W8A8, min-max, nearest rounding);
- onnxq: `onnxq.quantize` at its defaults without the speed check.

The layers are those of the BatchNorm-folded graph onnxq plans (onnxq.fuse). Where the weights
alone fall below a target, no choice of activation ranges or float fallback within W8A8 reaches it.

    python tools/fidelity_bound.py [--models ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import machine_description
from zoo_bench import (
    THREADS,
    WEIGHTED_OPS,
    zoo_batch,
    zoo_dir,
    zoo_fidelity,
    zoo_inputs,
    zoo_manifest,
    zoo_outputs,
    zoo_quantized_default,
)

import onnxq
from onnxq.io import session, to_ir, to_proto
from onnxq.passes.graph_utils import constant, output_channel_axis, set_initializer
from onnxq.quant.primitives import (
    IntRange,
    affine_params,
    dequantize,
    quantize,
    symmetric_scale,
    weight_absmax,
)

KINDS = ("detector", "segmentation")  # the outputs issue 13's 30 dB target applies to
OBSERVE_BATCH = 2  # samples per run while observing ranges (a 640×640 FPN's inputs are large)
WEIGHTS = IntRange.signed(8)
ACTIVATIONS = IntRange.unsigned(8)
VARIANTS = ("weights only", "activations only", "activations per channel", "both", "onnxq W8A8 (default)")


def weighted_layers(model: onnx.ModelProto) -> list[tuple[ir.Node, str, str]]:
    """(node, data input, constant weight) of each weighted layer, read from an IR copy."""
    return _layers(to_ir(model).graph)


def _layers(graph: ir.Graph) -> list[tuple[ir.Node, str, str]]:
    layers = []
    for node in graph:
        if node.op_type not in WEIGHTED_OPS or len(node.inputs) < 2 or None in node.inputs[:2]:
            continue
        data, weight = node.inputs[0], node.inputs[1]
        if node.op_type == "MatMul" and constant(data) is not None and constant(weight) is None:
            data, weight = weight, data
        if constant(weight) is not None and constant(data) is None:
            layers.append((node, data.name, weight.name))
    return layers


def with_rounded_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every weighted layer's weights rounded to 8-bit per-channel integers."""
    graph_model = to_ir(model)
    for node, _, name in _layers(graph_model.graph):
        value = next(v for v in node.inputs if v is not None and v.name == name)
        weight = constant(value).astype(np.float32)
        axis = output_channel_axis(node, weight)
        scale = symmetric_scale(weight_absmax(weight, axis), WEIGHTS)
        zero = np.zeros_like(scale, dtype=np.int8)
        rounded = dequantize(quantize(weight, scale, zero, WEIGHTS, axis), scale, zero, axis)
        value.const_value = ir.tensor(rounded, name=name)  # nearest rounding is idempotent: shared weights
    return to_proto(graph_model)


def observed_ranges(
    model: onnx.ModelProto, calib: dict[str, np.ndarray], batch: int, per_channel: bool
) -> dict:
    """Min and max of each weighted layer's data input over the calibration samples, per tensor
    or per channel (axis 1), in one onnxruntime session run batch by batch."""
    names = sorted({data for _, data, _ in weighted_layers(model)})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    run = session(probe, threads=THREADS, optimize=False).run
    lows: dict[str, np.ndarray] = {}
    highs: dict[str, np.ndarray] = {}
    count = len(next(iter(calib.values())))
    for start in range(0, count, batch):
        values = run(names, {k: v[start : start + batch] for k, v in calib.items()})
        for name, value in zip(names, values, strict=True):
            axes = tuple(i for i in range(value.ndim) if i != 1) if per_channel and value.ndim > 1 else None
            low, high = value.min(axis=axes), value.max(axis=axes)
            lows[name] = np.minimum(lows.get(name, low), low)
            highs[name] = np.maximum(highs.get(name, high), high)
    return {name: (lows[name], highs[name]) for name in names}


def per_tensor(ranges: dict) -> dict:
    """Per-channel ranges folded into one range per tensor."""
    return {name: (np.min(low), np.max(high)) for name, (low, high) in ranges.items()}


def with_quantized_inputs(model: onnx.ModelProto, ranges: dict) -> onnx.ModelProto:
    """The model with a QuantizeLinear/DequantizeLinear pair (uint8) on each layer's data input."""
    graph_model = to_ir(model)
    graph = graph_model.graph
    values = {v.name: v for node in graph for v in node.outputs} | {v.name: v for v in graph.inputs}
    bounded = {}
    for name, (low, high) in ranges.items():
        per_channel = np.ndim(low) > 0
        params = [
            affine_params(lo, hi, ACTIVATIONS) for lo, hi in zip(np.ravel(low), np.ravel(high), strict=True)
        ]
        scale = np.array([s for s, _ in params], np.float32)
        zero = np.array([z for _, z in params], np.uint8)
        if not per_channel:
            scale, zero = scale.reshape(()), zero.reshape(())
        operands = [
            set_initializer(graph, f"{name}_bound_scale", scale),
            set_initializer(graph, f"{name}_bound_zero", zero),
        ]
        axis = [ir.AttrInt64("axis", 1)] if per_channel else []
        quantized = ir.Node("", "QuantizeLinear", [values[name], *operands], axis, name=f"{name}_bound_q")
        inputs = [quantized.outputs[0], *operands]
        dequantized = ir.Node("", "DequantizeLinear", inputs, axis, name=f"{name}_bound_dq")
        quantized.outputs[0].name, dequantized.outputs[0].name = f"{name}_bound_q", f"{name}_bound"
        graph.extend([quantized, dequantized])
        bounded[name] = dequantized.outputs[0]
    for node, data, _ in _layers(graph):
        if data in bounded:
            node.replace_input_with([v.name for v in node.inputs].index(data), bounded[data])
    graph.sort()
    return to_proto(graph_model)


def measure(entry: dict) -> tuple[dict[str, dict[str, tuple[float, float]]], float]:
    """Cosine and SQNR per output part for each variant; seconds taken."""
    started = time.perf_counter()
    zoo = zoo_dir()
    calib, held = zoo_inputs(entry, "calib"), zoo_inputs(entry)
    float_model = onnx.load(zoo / entry["file"])
    folded = onnxq.fuse(float_model, sample={k: v[:1] for k, v in calib.items()}).model
    batch = zoo_batch(entry, 4)
    names = [output.name for output in float_model.graph.output]
    reference = zoo_outputs(float_model, held, batch)
    rounded = with_rounded_weights(folded)
    per_channel = observed_ranges(folded, calib, zoo_batch(entry, OBSERVE_BATCH), per_channel=True)
    models = {
        "weights only": rounded,
        "activations only": with_quantized_inputs(folded, per_tensor(per_channel)),
        "activations per channel": with_quantized_inputs(folded, per_channel),
        "both": with_quantized_inputs(rounded, per_tensor(per_channel)),
        "onnxq W8A8 (default)": zoo_quantized_default(entry),
    }
    found = {}
    for label, model in models.items():
        outputs = zoo_outputs(model, held, batch, optimize=label.startswith("onnxq"))
        found[label] = zoo_fidelity(entry, names, reference, outputs)
    return found, time.perf_counter() - started


def markdown(results: dict[str, dict], seconds: float) -> str:
    lines = [
        "## What 8-bit quantization can keep: each half of W8A8 alone, on the zoo's detectors and "
        "segmentation heads",
        "",
        "`tools/fidelity_bound.py`: the BatchNorm-folded graph onnxq plans, every weighted layer "
        "quantized (no first/last exception, no fallback), scored against float on each model's "
        "evaluation samples. Weights: nearest rounding on 8-bit symmetric per-channel scales. "
        "Activations: each weighted layer's data input through an 8-bit QDQ with the calibration "
        "samples' min-max range, per tensor (what onnxruntime's integer kernels take) or per channel "
        "(the most channel equalization could give). onnxq: `onnxq.quantize` at its defaults, no speed "
        "check. Worst output part (boxes, scores) cosine / SQNR dB; the issue's target is 0.999 / 30 dB. "
        f"{seconds:.0f} s in all.",
        "",
        "| model | output | " + " | ".join(VARIANTS) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in VARIANTS) + " |",
    ]
    for model, found in results.items():
        for part in found[VARIANTS[0]]:
            cells = [f"{found[v][part][0]:.5f} / {found[v][part][1]:.1f}" for v in VARIANTS]
            lines.append(f"| {model} | {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="zoo models (default: detectors and segmentation heads)")
    parser.add_argument("--out", type=Path, help="also write the markdown section here")
    args = parser.parse_args()
    manifest = zoo_manifest()
    chosen = args.models or [name for name, entry in manifest.items() if entry["kind"] in KINDS]
    results, total = {}, 0.0
    for name in chosen:
        found, seconds = measure(manifest[name])
        results[name], total = found, total + seconds
        worst = {v: min(s for _, s in found[v].values()) for v in VARIANTS}
        print(name, " ".join(f"{v}: {worst[v]:.1f}" for v in VARIANTS), f"({seconds:.0f} s)", flush=True)
    text = markdown(results, total)
    print(text)
    print(machine_description())
    if args.out:
        args.out.write_text(text + "\n\nMachine: " + machine_description() + "\n")


if __name__ == "__main__":
    main()
