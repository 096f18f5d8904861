"""Where a W8A8 model's output noise comes from: weights against activations, and how it is spread
over the activation quantizers.

For each zoo detector and segmentation model, `onnxq.quantize` at its defaults (without the speed
check, so the plan does not follow this machine's timings) gives a QDQ model. Its Q/DQ pairs run
simulated in float (no graph optimisation) on the zoo's evaluation samples, against the float
model, per output part (a detector's boxes and scores apart):
- all quantizers, as built;
- weights only: every activation's Q/DQ pair replaced by a Clip to its range (onnxq absorbs
  Relu and Clip into the quantizer): no rounding, what no finer activation grid can beat;
- weights alone: the same, clipped only below at 0 where the range starts there (an absorbed
  Relu): no activation clipping either, what no activation range can beat at these weights;
- each activation pair alone, on top of the quantized weights: its own share of the activation
  noise (its noise power above the weights-only noise, over all pairs' total);
- the best any plan that keeps 10 % of the activation pairs float could do, were their noise
  simply additive: the total without the costliest tenth.
Writes the "zoo-noise" section of BENCHMARKS.md.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import zoo_bench

from onnxq.tune.fallback import FALLBACK_SHARE  # the fidelity fallback's share of layers kept float

KINDS = ("detector", "segmentation")
SAMPLES = 8  # evaluation samples each variant runs on
TARGET_DB = 30.0  # issue 13's W8A8 target for detector and segmentation outputs


@dataclass
class Pair:
    """An activation's QuantizeLinear and the DequantizeLinear nodes that read it, by their
    output tensors (exporters leave node names empty)."""

    source: str  # the float tensor quantized
    quantized: str  # the QuantizeLinear's output
    dequantized: list[str]  # the DequantizeLinear nodes' outputs
    bounds: tuple[float, float]  # the float range the quantizer can represent


def activation_pairs(model: onnx.ModelProto) -> list[Pair]:
    stored = {t.name for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    pairs = []
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in stored:
            dequantizers = [r for r in readers.get(node.output[0], []) if r.op_type == "DequantizeLinear"]
            outputs = [d.output[0] for d in dequantizers]
            pairs.append(Pair(node.input[0], node.output[0], outputs, _bounds(model, node)))
    return pairs


def _bounds(model: onnx.ModelProto, quantize: onnx.NodeProto) -> tuple[float, float]:
    wanted = set(quantize.input)
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in wanted}
    scale, zero = (constants[name].astype(np.float64) for name in quantize.input[1:3])
    info = np.iinfo(constants[quantize.input[2]].dtype)
    return float((info.min - zero) * scale), float((info.max - zero) * scale)


def unclipped(pair: Pair) -> Pair:
    """The pair with a range that clips nothing, but at 0 where it starts there (a Relu onnxq
    absorbed into the quantizer, or a tensor that never goes below 0)."""
    low = 0.0 if pair.bounds[0] == 0.0 else -np.inf
    return Pair(pair.source, pair.quantized, pair.dequantized, (low, np.inf))


def without_pairs(model: onnx.ModelProto, removed: list[Pair]) -> onnx.ModelProto:
    """The model with these activation pairs taken out: their readers read the float tensor,
    clipped to the quantizer's range (onnxq absorbs Relu and Clip into it): rounding noise goes,
    the clipping stays."""
    bypass = {out: f"{pair.source}::unrounded" for pair in removed for out in pair.dequantized}
    dropped = set(bypass) | {pair.quantized for pair in removed}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    clips = []
    for index, pair in enumerate(removed):
        low, high = (f"unrounded_{index}_{side}" for side in ("min", "max"))
        copy.graph.initializer.extend(
            numpy_helper.from_array(np.asarray(value, np.float32), name)
            for name, value in zip((low, high), pair.bounds, strict=True)
        )
        clips.append(helper.make_node("Clip", [pair.source, low, high], [f"{pair.source}::unrounded"]))
    kept = [node for node in copy.graph.node if node.output[0] not in dropped]
    kept = _ordered(kept, clips)
    for node in kept:
        for index, name in enumerate(node.input):
            node.input[index] = bypass.get(name, name)
    del copy.graph.node[:]
    copy.graph.node.extend(kept)
    return copy


def _ordered(nodes: list[onnx.NodeProto], clips: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """`nodes` with each Clip right after the node producing its input (or first)."""
    after: dict[str, list[onnx.NodeProto]] = {}
    for clip in clips:
        after.setdefault(clip.input[0], []).append(clip)
    produced = {out for node in nodes for out in node.output}
    ordered = [clip for name, group in after.items() if name not in produced for clip in group]
    for node in nodes:
        ordered.append(node)
        ordered += [clip for out in node.output for clip in after.get(out, [])]
    return ordered


def noise(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    """Noise power over signal power per view (SQNR = -10·log10 of it)."""
    return {k: float(np.square(r - got[k]).sum() / np.square(r).sum()) for k, r in reference.items()}


def db(ratio: float) -> str:
    return "∞" if ratio <= 0 else f"{-10 * np.log10(ratio):.1f}"


def pairs_for_target(full: float, weights: float, unrounded: float, costs: np.ndarray) -> str:
    """How many of the costliest activation pairs must stay float for TARGET_DB, were their noise
    additive: "none" where already met, "unreachable" where weights (and clipping) fall short."""
    target = 10 ** (-TARGET_DB / 10)
    if full <= target:
        return "none"
    if unrounded > target:
        return "unreachable (weights alone)"
    if weights > target:
        return "unreachable (weights, clipping)"
    needed = int(np.searchsorted(full - np.cumsum(costs) <= target, True)) + 1
    return f"{needed} of {len(costs)}" if needed <= len(costs) else "all"


def budget(entry: dict) -> list[str]:
    """Table rows for one zoo model: per output view, the noise split."""
    zoo = zoo_bench.zoo_dir()
    feed = {name: values[:SAMPLES] for name, values in zoo_bench.zoo_inputs(entry).items()}
    batch = zoo_bench.zoo_batch(entry, SAMPLES)
    float_model = onnx.load(zoo / entry["file"])
    names = [o.name for o in float_model.graph.output]
    quantized = zoo_bench.zoo_quantized_default(entry)

    def simulated(model: onnx.ModelProto) -> dict[str, np.ndarray]:
        """The outputs and their parts with every Q/DQ pair run in float (no int8 kernels)."""
        return zoo_bench.zoo_views(entry, names, zoo_bench.zoo_outputs(model, feed, batch, optimize=False))

    reference = simulated(float_model)

    def measured(model: onnx.ModelProto) -> dict[str, float]:
        return noise(reference, simulated(model))

    pairs = activation_pairs(quantized)
    full, weights = measured(quantized), measured(without_pairs(quantized, pairs))
    weights_alone = measured(without_pairs(quantized, [unclipped(pair) for pair in pairs]))
    alone = [measured(without_pairs(quantized, [p for p in pairs if p is not pair])) for pair in pairs]
    rows = []
    for view in reference:
        shares = np.array([max(a[view] - weights[view], 0.0) for a in alone])
        total = shares.sum()
        order = np.sort(shares)[::-1]
        top = order[: max(1, int(FALLBACK_SHARE * len(order)))].sum()
        spared = max(full[view] - top, weights[view]) if total > 0 else full[view]
        largest = f"{100 * order[0] / total:.1f}" if total > 0 else ""
        needed = pairs_for_target(full[view], weights[view], weights_alone[view], order)
        rows.append(
            f"| {entry['name']} | {view} | {db(full[view])} | {db(weights[view])} | "
            f"{db(weights_alone[view])} | {len(pairs)} | "
            f"{largest} | {db(spared)} | {needed} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    manifest, names, out = zoo_bench.zoo_command(
        __doc__.splitlines()[0], lambda entry: entry["kind"] in KINDS
    )
    lines = [
        "## Zoo: where the W8A8 output noise comes from (issue 13's 30 dB target)",
        "",
        f"`tools/noise_budget.py`: each zoo detector and segmentation model quantized by `onnxq "
        f"quantize` at its defaults (`--no-speed-check`); its Q/DQ pairs run simulated in float on "
        f"{SAMPLES} evaluation samples, against float. SQNR in dB per output and output part. "
        "*Weights only*: every activation Q/DQ pair replaced by a Clip to its range (onnxq absorbs "
        "Relu and Clip into the quantizer): rounding noise gone, clipping kept. *Weights alone*: "
        "the same Clips open (kept only at 0 where a range starts there, an absorbed Relu): what "
        "no choice of activation ranges or activation width can beat with these weights. "
        "*Largest pair %*: the share of the activation noise (noise above weights only) that the "
        "costliest single activation pair causes alone. *Costliest tenth float*: the SQNR were the "
        f"{100 * FALLBACK_SHARE:g} % costliest activation pairs kept float and the noise of the others "
        "simply added up (an optimistic bound for the fidelity fallback's share). *Float pairs for "
        f"{TARGET_DB:g} dB*: how many of the costliest activation pairs would have to stay float, on "
        f"the same additive bound. Measured at {zoo_bench.source_version()}.",
        "",
        "| model | output | all Q/DQ | weights only | weights alone | activation pairs | largest pair % | "
        f"costliest tenth float | float pairs for {TARGET_DB:g} dB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        lines += budget(manifest[name])
    bench.write_section(out, "zoo-noise", "\n".join(lines) + "\n", bench.machine_description())


if __name__ == "__main__":
    main()
