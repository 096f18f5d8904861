"""What a HardSwish between two quantized layers costs in onnxruntime, as onnxq writes it and on
integer kernels.

onnxruntime has no integer HardSwish, so onnxq leaves it float between a DequantizeLinear and a
QuantizeLinear; onnxruntime expands it to HardSigmoid and Mul, four float passes over the tensor.
A float model pays nothing of the kind: onnxruntime fuses the HardSwish into the Conv before it.
This is why the zoo's HardSwish models (MobileNetV3, PP-LCNet, PP-OCR, PP-PicoDet) ran slower
quantized than float and were handed back float by the speed check.

The same function has an integer form that onnxruntime fuses from Q/DQ alone (onnxq writes it
at 8 bits since this tool measured it: onnxq.passes.integer_hardswish):
    h = Clip(x/6 + 0.5, 0, 1)   a DequantizeLinear of x's integers with scale s/6, an Add of 0.5,
                                and a QuantizeLinear with scale 1/255 and zero point 0, whose
                                saturation is the Clip → QLinearAdd
    y = x · h                   → QLinearMul
Each form runs between a QuantizeLinear of a float input and a DequantizeLinear of its output;
the table gives each form's time beyond that pair alone, timed side by side (onnxq.speed), and
the largest difference of the integer form's output from the float form's, in steps of the
output's scale. onnxruntime fuses the integer form only with uint8 activations (with int8 zero
points its Adds and Muls stay float: the op types after optimisation are checked and shown).

A second table takes the zoo's HardSwish classifiers (tools/build_zoo.py's cache; skipped where it
is absent) through `onnxq.quantize` at W8A8 without the speed check, with and without
equalization, and rewrites each DequantizeLinear → HardSwish → QuantizeLinear of the saved model
into the integer form after the fact (`integer_hardswish`): batch-1 latency against the exported
float model, side by side, and the worst output SQNR on the evaluation samples. Equalization's
Muls around a HardSwish (a rescaled conv output undone before it, a per-channel Mul after it)
leave no such chain to rewrite. Writes the "hardswish-kernels" section.

    .venv/bin/python tools/hardswish_kernels.py [--models mobilenet_v3_nhwc ...] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import zoo_bench

import onnxq
from onnxq import speed
from onnxq.io import to_ir, to_proto
from onnxq.passes.integer_hardswish import hardswish_on_integers

# Maps of the zoo's HardSwish models: MobileNetV3-Small's stem and late blocks at 224×224,
# PP-OCRv4's detector stem at 640×640
SHAPES = [(16, 112, 112), (96, 28, 28), (576, 7, 7), (32, 160, 160)]
OPSET = 14  # HardSwish's first opset; onnxq writes W8A8 models at 13-19
INPUT_SCALE, OUTPUT_SCALE = 0.05, 0.03  # x in about ±6.4, HardSwish(x) in [-0.375, 6.4]
OUTPUT_ZERO_POINT = 13  # uint8: the output range is [-0.39, 7.26]
FORMS = ("float between Q/DQ", "integer, uint8", "integer, int8 zero points")
ZOO_MODELS = ("mobilenet_v3_nhwc", "lcnet_orientation", "ppocr_cls_v2")
PLANS = ("default", "--no-equalize")


def _constants(zero_point_type: int) -> list[onnx.TensorProto]:
    unsigned = zero_point_type == TensorProto.UINT8
    dtype = np.uint8 if unsigned else np.int8
    return [
        numpy_helper.from_array(np.array(INPUT_SCALE, np.float32), "s"),
        numpy_helper.from_array(np.array(INPUT_SCALE / 6, np.float32), "s_sixth"),
        numpy_helper.from_array(np.array(OUTPUT_SCALE, np.float32), "s_out"),
        numpy_helper.from_array(np.array(128 if unsigned else 0, dtype), "z"),
        # HardSwish's output is at least -0.375: its range starts just below that
        numpy_helper.from_array(np.array(OUTPUT_ZERO_POINT - (0 if unsigned else 128), dtype), "z_out"),
        # h in [0, 1]: 256 steps of 1/255 from the range's low end
        numpy_helper.from_array(np.array(1 / 255, np.float32), "s_h"),
        numpy_helper.from_array(np.array(0 if unsigned else -128, dtype), "z_h"),
        # 0.5 exactly: 127 · (0.5/127)
        numpy_helper.from_array(np.array(127, dtype), "half_q"),
        numpy_helper.from_array(np.array(0.5 / 127, np.float32), "half_s"),
        numpy_helper.from_array(np.array(0, dtype), "half_z"),
    ]


def _middle(form: str) -> list[onnx.NodeProto]:
    """The nodes from x's integers ("x") to the output's integers ("y")."""
    node = helper.make_node
    if form is None:
        return [node("Identity", ["x"], ["y"])]
    if form == FORMS[0]:
        return [
            node("DequantizeLinear", ["x", "s", "z"], ["x_float"]),
            node("HardSwish", ["x_float"], ["y_float"]),
            node("QuantizeLinear", ["y_float", "s_out", "z_out"], ["y"]),
        ]
    return [
        node("DequantizeLinear", ["x", "s_sixth", "z"], ["x_sixth"]),
        node("DequantizeLinear", ["half_q", "half_s", "half_z"], ["half"]),
        node("Add", ["x_sixth", "half"], ["h_float"]),
        node("QuantizeLinear", ["h_float", "s_h", "z_h"], ["h"]),
        node("DequantizeLinear", ["h", "s_h", "z_h"], ["h_back"]),
        node("DequantizeLinear", ["x", "s", "z"], ["x_float"]),
        node("Mul", ["x_float", "h_back"], ["y_float"]),
        node("QuantizeLinear", ["y_float", "s_out", "z_out"], ["y"]),
    ]


def model(shape: tuple[int, ...], form: str | None) -> onnx.ModelProto:
    """Q(input) → the form (None: nothing) → DQ(output), float in and out."""
    zero_point_type = TensorProto.INT8 if form == FORMS[2] else TensorProto.UINT8
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "s", "z"], ["x"]),
        *_middle(form),
        helper.make_node("DequantizeLinear", ["y", "s_out", "z_out"], ["output"]),
    ]
    if form is None:  # the pair alone: the output reads x on x's own scale
        nodes[-1] = helper.make_node("DequantizeLinear", ["y", "s", "z"], ["output"])
    dims = [1, *shape]
    graph = helper.make_graph(
        nodes,
        "hardswish",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, dims)],
        _constants(zero_point_type),
    )
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    built.ir_version = 8
    return built


def fused_ops(built: onnx.ModelProto, path: Path) -> list[str]:
    """The op types onnxruntime runs after its optimisations (default level)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    ort.InferenceSession(built.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(path).graph.node]


def largest_step_difference(shape: tuple[int, ...], rng: np.random.Generator) -> float:
    """Largest |integer form − float form| over a normal input (sd 2), in output steps."""
    x = rng.normal(0, 2, (1, *shape)).astype(np.float32)
    outputs = []
    for form in FORMS[:2]:
        runner = ort.InferenceSession(
            model(shape, form).SerializeToString(), providers=["CPUExecutionProvider"]
        )
        outputs.append(runner.run(None, {"input": x})[0])
    return float(np.abs(outputs[0] - outputs[1]).max() / OUTPUT_SCALE)


def measure(scratch: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for shape in SHAPES:
        feed = {"input": rng.normal(0, 2, (1, *shape)).astype(np.float32)}
        pair, *times = speed.compare(
            [model(shape, None)] + [model(shape, form) for form in FORMS], feed, threads=2
        )
        rows.append(
            {
                "shape": shape,
                "ms": [max(ms - pair, 0.0) for ms in times],
                "ops": [fused_ops(model(shape, form), scratch / "optimized.onnx")[1:-1] for form in FORMS],
                "steps": largest_step_difference(shape, rng),
            }
        )
    return rows


def integer_hardswish(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model` (a copy) with onnxq's rewrite into the integer form applied after the fact
    (onnxq.passes.integer_hardswish), and how many HardSwishes it rewrote."""
    graph_model = to_ir(model)
    count = hardswish_on_integers(graph_model.graph)
    rewritten = to_proto(graph_model)
    rewritten.ir_version = model.ir_version
    return rewritten, count


def measure_zoo(names: list[str]) -> list[dict]:
    """Each zoo model's plans, as saved and with integer HardSwish: ×float and worst SQNR."""
    manifest = zoo_bench.zoo_manifest()
    rows = []
    for name in names:
        entry = manifest[name]
        path, calib = zoo_bench.zoo_dir() / entry["file"], str(zoo_bench.zoo_dir() / entry["calib"])
        float_model = onnx.load(path)
        feed = zoo_bench.zoo_inputs(entry)
        batch = zoo_bench.zoo_batch(entry, 16)
        outputs = [output.name for output in float_model.graph.output]
        reference = zoo_bench.zoo_outputs(float_model, feed, batch)
        variants = []
        for plan in PLANS:
            config = onnxq.QuantConfig(speed_check=False, equalize=plan == PLANS[0])
            saved = onnxq.quantize(path, calib, config).model
            rewritten, count = integer_hardswish(saved)
            variants += [(plan, saved, 0), (f"{plan}, integer HardSwish", rewritten, count)]
        sample = {key: value[:1] for key, value in feed.items()}
        float_ms, *times = speed.compare(
            [float_model] + [model for _, model, _ in variants], sample, threads=2
        )
        for (label, model, count), ms in zip(variants, times, strict=True):
            fidelity = zoo_bench.zoo_fidelity(
                entry, outputs, reference, zoo_bench.zoo_outputs(model, feed, batch)
            )
            worst = min(sqnr for _, sqnr in fidelity.values())
            rows.append(
                {"model": name, "plan": label, "rewritten": count, "ratio": ms / float_ms, "sqnr": worst}
            )
            print(
                f"  {name}: {label}: {count} rewritten, {ms / float_ms:.2f}× float, {worst:.1f} dB",
                flush=True,
            )
    return rows


def zoo_markdown(rows: list[dict]) -> str:
    lines = [
        "",
        "The zoo's HardSwish classifiers at W8A8 (`onnxq.quantize` without the speed check), each plan as "
        "saved and with its DequantizeLinear → HardSwish → QuantizeLinear chains rewritten into the integer "
        "form after the fact. ×float: batch-1 latency against the exported float model, all of one model's "
        "rows side by side. SQNR: worst output, evaluation samples.",
        "",
        "| model | plan | HardSwish rewritten | ×float | worst SQNR dB |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {row['model']} | {row['plan']} | {row['rewritten']} | {row['ratio']:.2f} | {row['sqnr']:.1f} |"
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict]) -> str:
    lines = [
        "## HardSwish on integer kernels: QLinearAdd and QLinearMul against float between Q/DQ (issue 13)",
        "",
        "`tools/hardswish_kernels.py`: one HardSwish between a QuantizeLinear of a float input and a "
        "DequantizeLinear of its output, batch 1, 2 threads, timed side by side (onnxq.speed). ms: each "
        "form's time beyond that pair alone. Ops: what onnxruntime runs between the pair after its "
        "optimisations. Steps: the integer form's largest difference from the float form, in steps of "
        "the output's scale (input normal, sd 2).",
        "",
        "| map (C×H×W) | "
        + " | ".join(f"{form} ms" for form in FORMS)
        + " | integer ÷ float | steps | "
        + " | ".join(f"{form} ops" for form in FORMS)
        + " |",
        "| --- | "
        + " | ".join("---:" for _ in FORMS)
        + " | ---: | ---: | "
        + " | ".join("---" for _ in FORMS)
        + " |",
    ]
    for row in rows:
        float_ms, integer_ms, _ = row["ms"]
        ratio = f"{integer_ms / float_ms:.2f}" if float_ms > 0 else ""
        lines.append(
            f"| {'×'.join(map(str, row['shape']))} | "
            + " | ".join(f"{ms:.3f}" for ms in row["ms"])
            + f" | {ratio} | {row['steps']:.0f} | "
            + " | ".join(", ".join(ops) for ops in row["ops"])
            + " |"
        )
    ratios = [row["ms"][1] / row["ms"][0] for row in rows if row["ms"][0] > 0]
    if ratios:
        lines += [
            "",
            f"The integer form takes {min(ratios):.2f}–{max(ratios):.2f}× the time of the float form "
            f"and moves no output by more than {max(row['steps'] for row in rows):.0f} step(s). "
            "onnxq writes it at 8 bits between two quantized tensors (onnxq.passes.integer_hardswish); "
            "the zoo rows below rewrite what onnxq saved, so a plan it already wrote leaves none.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=bench.ROOT / "BENCHMARKS.md")
    parser.add_argument("--models", nargs="*", default=list(ZOO_MODELS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        text = markdown(measure(Path(scratch)))
    if args.models and (zoo_bench.zoo_dir() / "zoo.json").exists():
        text += zoo_markdown(measure_zoo(args.models))
    print(text)
    bench.write_section(args.out, "hardswish-kernels", text, bench.machine_description())


if __name__ == "__main__":
    main()
