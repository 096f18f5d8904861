"""The zoo benchmark: real exported models of tools/build_zoo.py (its cache, not ../shared).

Each model at W8A8 (default), W8A8 mse and W4A8 mse, and onnxruntime's quantize_static where it
has weights: per-output cosine/SQNR (detector boxes and scores apart), top-1 where labelled,
float vs quantized latency, calibration time and peak memory. One section per model and a
summary against issue 13's targets. The noise tools (noise_budget.py, padding_noise.py) and
int8_range.py take its helpers.

    .venv/bin/python tools/zoo_bench.py [--models yolov8n_nudenet ...] [--out BENCHMARKS.md]

(`tools/bench.py zoo` runs the same.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (
    ROOT,
    THREADS,
    machine_description,
    run_onnxq_cli,
    run_onnxruntime,
    side_by_side_ms,
    write_section,
)

import onnxq
from onnxq.evaluate import kernel_summary
from onnxq.io import session


def zoo_dir() -> Path:
    """tools/build_zoo.py's cache: $ONNXQ_ZOO or ~/.cache/onnxq/zoo."""
    return Path(os.environ.get("ONNXQ_ZOO") or Path.home() / ".cache" / "onnxq" / "zoo").expanduser()


def zoo_manifest() -> dict[str, dict]:
    path = zoo_dir() / "zoo.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: build the zoo with tools/build_zoo.py")
    return {m["name"]: m for m in json.loads(path.read_text())["models"]}


ZOO_W8A8 = ("onnxq W8A8 (default)", [])
ZOO_W8A8_MSE = ("onnxq W8A8 mse", ["--calib-method", "mse"])
ZOO_W4A8 = ("onnxq W4A8 mse", ["--w-bits", "4", "--calib-method", "mse"])
# the peer a user of onnxruntime has at hand: its own quantizer at its defaults (MinMax), QDQ,
# per-channel weights, on the same calibration samples
ZOO_PEER = "onnxruntime quantize_static W8A8 MinMax"
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class ZooRow:
    setting: str
    error: str = ""
    fidelity: dict[str, tuple[float, float]] = field(default_factory=dict)  # output → (cosine, SQNR dB)
    top1: float | None = None
    agreement: float | None = None
    latency_ms: float | None = None
    calib_s: float | None = None
    peak_mb: float | None = None
    size_kb: float | None = None
    kernels: str = ""


def has_weights(model: onnx.ModelProto) -> bool:
    """A Conv/ConvTranspose/Gemm/MatMul whose second input is a stored tensor: weights to quantize."""
    stored = {t.name for t in model.graph.initializer}
    stored |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return any(
        n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in stored for n in model.graph.node
    )


def zoo_outputs(
    model: onnx.ModelProto, feed: dict[str, np.ndarray], batch: int, optimize: bool = True
) -> list[np.ndarray]:
    run = session(model, threads=THREADS, optimize=optimize).run
    count = len(next(iter(feed.values())))
    parts = [run(None, {k: v[i : i + batch] for k, v in feed.items()}) for i in range(0, count, batch)]
    return [np.concatenate(p) for p in zip(*parts, strict=True)]


def zoo_fidelity(entry: dict, names: list[str], reference, outputs) -> dict[str, tuple[float, float]]:
    """Cosine and SQNR per output and, for detector heads, per part (boxes, scores) of an output."""
    found = {}
    wanted, got = zoo_views(entry, names, reference), zoo_views(entry, names, outputs)
    for label, r in wanted.items():
        a, b = r.ravel(), got[label].ravel()
        noise = float(np.square(a - b).sum())
        cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
        sqnr = 10 * np.log10(float(np.square(a).sum()) / noise) if noise > 0 else float("inf")
        found[label] = (cosine, float(sqnr))
    return found


def zoo_views(entry: dict, names: list[str], values: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Each output and, for detector heads, each part of it (boxes, scores), as float64."""
    views = {}
    for name, value in zip(names, values, strict=True):
        views[name] = value.astype(np.float64)
        spec = entry.get("parts", {}).get(name)
        for part, (start, stop) in (spec or {}).get("parts", {}).items():
            index = [slice(None)] * value.ndim
            index[spec["axis"]] = slice(start, stop)
            views[f"{name}[{part}]"] = value[tuple(index)].astype(np.float64)
    return views


def zoo_inputs(entry: dict, kind: str = "eval") -> dict[str, np.ndarray]:
    """A zoo model's input arrays from its `kind` file ("calib" or "eval"), by input name."""
    with np.load(zoo_dir() / entry[kind]) as archive:
        return {name: archive[name] for name in entry["inputs"]}


def zoo_calibration_halves(entry: dict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A zoo model's calibration file split in two: the first half to quantize on, the second to
    score on (the tools/choose_*.py rows that never read the evaluation file)."""
    data = zoo_inputs(entry, "calib")
    count = len(next(iter(data.values())))
    return {k: v[: count // 2] for k, v in data.items()}, {k: v[count // 2 :] for k, v in data.items()}


def zoo_batch(entry: dict, default: int) -> int:
    """The batch a zoo model runs in: its fixed batch dimension, or `default` where it has none."""
    fixed = entry["inputs"][next(iter(entry["inputs"]))]["shape"][0]
    return fixed if isinstance(fixed, int) and fixed > 0 else default


def zoo_quantized_default(entry: dict) -> onnx.ModelProto:
    """`onnxq.quantize` at its defaults, without the speed check (its plan follows this machine's
    timings): the W8A8 model the noise tools take apart."""
    zoo = zoo_dir()
    config = onnxq.QuantConfig(speed_check=False)
    return onnxq.quantize(zoo / entry["file"], str(zoo / entry["calib"]), config).model


def zoo_measure(
    entry: dict, settings: list[tuple[str, list[str]]] | None = None, peer: bool = True
) -> list[ZooRow]:
    """Float and each setting (label, `onnxq quantize` flags; the suite's where None) on the zoo
    model's evaluation samples, with onnxruntime's quantizer beside where `peer`; `onnxq
    quantize` runs in its own process."""
    zoo = zoo_dir()
    path, calib = zoo / entry["file"], zoo / entry["calib"]
    with np.load(zoo / entry["eval"]) as archive:
        feed = {name: archive[name] for name in entry["inputs"]}
        labels = archive["y"] if "y" in archive.files else None
    batch = zoo_batch(entry, 16)
    float_model = onnx.load(path)
    names = [o.name for o in float_model.graph.output]
    sample = {k: v[:batch] if batch == 1 else v[:1] for k, v in feed.items()}
    reference = zoo_outputs(float_model, feed, batch)
    classifier = entry["kind"] in CLASS_SCORES

    def scored(row: ZooRow, model: onnx.ModelProto, outputs: list[np.ndarray]) -> ZooRow:
        row.fidelity = zoo_fidelity(entry, names, reference, outputs)
        if classifier:
            predicted, expected = _predictions(entry, outputs[0]), _predictions(entry, reference[0])
            row.agreement = float((predicted == expected).mean())
            row.top1 = float((predicted == labels).mean()) if labels is not None else None
        row.size_kb = len(model.SerializeToString()) / 1024
        summary = kernel_summary(model)
        row.kernels = summary + _weight_form(model, summary)
        return row

    rows, models = [scored(ZooRow("float"), float_model, reference)], [float_model]
    weighted = has_weights(float_model)
    if settings is None:
        settings = [ZOO_W8A8] + ([ZOO_W8A8_MSE, ZOO_W4A8] if weighted else [])
    runners = {label: lambda flags=flags: run_onnxq_cli(path, calib, flags) for label, flags in settings}
    if weighted and peer:
        runners[ZOO_PEER] = lambda: (*_onnxruntime_zoo(path, calib, list(entry["inputs"]), batch), None)
    for setting, quantize in runners.items():
        print(f"  {entry['name']}: {setting}", flush=True)
        try:
            model, seconds, peak = quantize()
            outputs = zoo_outputs(model, feed, batch)
        except Exception as err:  # a model a tool cannot quantize or run is a result: its error
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            print(f"    failed: {message[:200]}", flush=True)
            rows.append(ZooRow(setting, error=message))
            continue
        row = scored(ZooRow(setting, calib_s=seconds, peak_mb=peak), model, outputs)
        worst = min(row.fidelity.values())
        print(f"    worst cosine {worst[0]:.5f}, {seconds:.1f} s, {peak or 0:.0f} MB", flush=True)
        rows.append(row)
        models.append(model)
    timed = [row for row in rows if not row.error]
    for row, milliseconds in zip(timed, side_by_side_ms(models, sample), strict=True):
        row.latency_ms = milliseconds
    return rows


# kinds whose first output holds class scores: one row per sample, or one per position of a
# sequence (a CTC recognizer: its agreement is per character position)
CLASS_SCORES = ("classifier", "sequence")


def _predictions(entry: dict, scores: np.ndarray) -> np.ndarray:
    """Argmax class per sample (classifier) or per sample and position (sequence)."""
    if entry["kind"] == "sequence":
        return scores.argmax(-1)
    return scores.reshape(len(scores), -1).argmax(1)


def _onnxruntime_zoo(path: Path, calib: Path, inputs: list[str], batch: int) -> tuple[onnx.ModelProto, float]:
    """onnxruntime's quantize_static on all of a zoo model's calibration samples, after the
    pre-processing its documentation asks for (shape inference, graph optimisation) where that
    runs; the time includes it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with np.load(calib) as archive:
        feed = {name: archive[name] for name in inputs}
    # quant_pre_process leaves files in the working directory; both log advice and bias notes
    with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder), _quiet_logging():
        prepared = Path(folder) / "prepared.onnx"
        start = time.perf_counter()
        try:
            quant_pre_process(str(path), str(prepared))
        except Exception:  # the quantizer also runs without it, as a user would then run it
            prepared = path
        model, _ = run_onnxruntime(prepared, feed, "MinMax", batch=batch)
        return model, time.perf_counter() - start


@contextlib.contextmanager
def _quiet_logging():
    """Log records below ERROR dropped while inside; the root level as it was afterwards."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def source_version() -> str:
    """The commit the benchmark runs (`git describe`), marked where the work tree differs from it."""
    described = subprocess.run(
        ["git", "describe", "--always", "--dirty=, with uncommitted changes"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return described.stdout.strip() or "an unknown commit (not a git checkout)"


def zoo_markdown(entry: dict, rows: list[ZooRow]) -> str:
    with np.load(zoo_dir() / entry["calib"]) as archive:
        calib = {k: list(archive[k].shape) for k in archive.files}
    peer = ""
    if any(r.setting == ZOO_PEER for r in rows):
        peer = (
            f"; {ZOO_PEER}: onnxruntime's quantizer at its defaults with QDQ and per-channel weights, "
            "after its quant_pre_process, in this process, on the same samples"
        )
    shapes = "; ".join(
        f"`{k}` [{', '.join(map(str, v['shape']))}] {v['dtype']}" for k, v in entry["inputs"].items()
    )
    lines = [
        f"## Zoo: {entry['name']} ({entry['kind']}, opset {entry['opset']})",
        "",
        f"{entry['exporter']}. Origin: {entry['origin']}. Licence: {entry['licence']}. Input {shapes}: "
        f"{entry['layout']}. {entry['notes']}.",
        "",
        f"Calibration: {', '.join(f'{v[0]} samples of {v[1:]}' for v in calib.values())} "
        f"(`{entry['calib']}`, all of them, `onnxq quantize` otherwise at its defaults, in its own process: "
        f"calib. s is its wall time, peak MB its peak resident memory{peer}). Evaluation: "
        f"{next(iter(entry['samples']['eval'].values()))[0]} samples. "
        f"Latency: batch 1, {THREADS} threads, float and every setting timed side by side "
        f"in interleaved blocks once all are built (onnxq.speed). Measured at {source_version()}.",
        "",
    ]
    labels = list(dict.fromkeys(k for r in rows for k in r.fidelity))  # outputs, then their parts
    classifier = entry["kind"] in CLASS_SCORES
    header = ["setting"] + [f"{k} cosine / SQNR dB" for k in labels]
    header += ["top-1 %", "agreement %"] if classifier else []
    header += ["latency ms", "×float", "calib. s", "peak MB", "size KB", "kernels"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" + " ---: |" * (len(header) - 2) + " --- |"]
    float_ms = rows[0].latency_ms or float("nan")
    for r in rows:
        if r.error:
            cells = [f"{r.setting} (failed: {r.error})"] + [""] * (len(header) - 1)
        else:
            cells = [r.setting] + [
                f"{r.fidelity[k][0]:.5f} / {r.fidelity[k][1]:.1f}" if r.setting != "float" else "1 / ∞"
                for k in labels
            ]
            if classifier:
                cells += ["" if r.top1 is None else f"{100 * r.top1:.1f}", f"{100 * (r.agreement or 0):.1f}"]
            cells += [
                f"{r.latency_ms:.2f}",
                f"{r.latency_ms / float_ms:.2f}",
                "" if r.calib_s is None else f"{r.calib_s:.1f}",
                "" if r.peak_mb is None else f"{r.peak_mb:.0f}",
                f"{r.size_kb:.0f}",
                r.kernels,
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def zoo_summary(results: dict[str, tuple[dict, list[ZooRow]]]) -> str:
    """One line per model: worst output at each setting, against the issue's targets."""
    lines = [
        "## Zoo summary: real exported models at W8A8 (default), W8A8 mse and W4A8 mse, against "
        "onnxruntime's quantize_static",
        "",
        "Worst cosine / SQNR over each model's outputs and output parts (detector boxes and scores apart). "
        "Issue targets at W8A8: cosine ≥ 0.999 and SQNR ≥ 30 dB on detector and segmentation outputs, "
        "≤ 1 point of top-1 lost on classifiers. Each row is read back from its model's table below "
        "(rebuilt after every zoo run, whichever models it measured); each table says when it was measured.",
        "",
        "| model | kind | exporter | opset | W8A8 worst cos / SQNR | W8A8 top-1 Δ | W8A8 target | "
        "W8A8 mse worst cos / SQNR | W4A8 mse worst cos / SQNR | onnxruntime W8A8 worst cos / SQNR | "
        "float ms | W8A8 ms | W4A8 ms | onnxruntime W8A8 ms | W8A8 calib. s | W8A8 peak MB |",
        "| --- | --- | --- |" + " ---: |" * 3 + " --- |" + " ---: |" * 9,
    ]
    for name, (entry, rows) in results.items():
        by = {r.setting: r for r in rows}
        base, w8, w4 = by["float"], by.get(ZOO_W8A8[0]), by.get(ZOO_W4A8[0])
        w8_mse, peer = by.get(ZOO_W8A8_MSE[0]), by.get(ZOO_PEER)

        def worst(row):
            if row is None:
                return "—"
            if row.error:  # onnxruntime's messages end with the reason: "... Error <reason>"
                return f"failed: {row.error.rsplit('Error ', 1)[-1][:90]}"
            cos, sq = min(row.fidelity.values())[0], min(v[1] for v in row.fidelity.values())
            return f"{cos:.5f} / {sq:.1f}"

        def ms(row):
            return "" if row is None or row.error else f"{row.latency_ms:.2f}"

        delta, target = "", ""
        if w8 is not None and not w8.error:
            if entry["kind"] == "classifier" and w8.top1 is not None and base.top1 is not None:
                delta = f"{100 * (w8.top1 - base.top1):+.1f}"
                target = "met" if base.top1 - w8.top1 <= 0.01 else "missed"
            elif entry["kind"] in CLASS_SCORES:
                delta = f"agreement {100 * (w8.agreement or 0):.1f} %"
            else:
                ok = all(c >= 0.999 and s >= 30 for c, s in w8.fidelity.values())
                target = "met" if ok else "missed"
            if target and w8.kernels == "float":  # the speed check's fallback: nothing quantized
                target += " (float: nothing quantized)"
            elif target and w8.kernels.startswith("float"):  # a few Q/DQ pairs, no integer kernel
                target += " (float in effect: no integer kernel runs)"
        exporter = entry["exporter"].split(" (")[0].split(",")[0]
        lines.append(
            f"| {name} | {entry['kind']} | {exporter} | {entry['opset']} "
            f"| {worst(w8)} | {delta} | {target} | {worst(w8_mse)} | {worst(w4)} | {worst(peer)} "
            f"| {ms(base)} | {ms(w8)} | {ms(w4)} | {ms(peer)} "
            f"| {'' if w8 is None or w8.calib_s is None else f'{w8.calib_s:.1f}'} "
            f"| {'' if w8 is None or w8.peak_mb is None else f'{w8.peak_mb:.0f}'} |"
        )
    return "\n".join(lines) + "\n"


def zoo_selection(
    manifest: dict[str, dict], models: list[str] | None, wanted=lambda entry: True
) -> list[str]:
    """The models named (every one must be in the zoo), or those of the zoo `wanted` keeps."""
    unknown = [m for m in models or [] if m not in manifest]
    if unknown:
        raise SystemExit(f"not in the zoo: {', '.join(unknown)} (have: {', '.join(manifest)})")
    return list(models) if models else [name for name, entry in manifest.items() if wanted(entry)]


def zoo_command(description: str, wanted=lambda entry: True) -> tuple[dict[str, dict], list[str], Path]:
    """The zoo tools' command line (--models, --out): the manifest, the models selected
    (zoo_selection) and the file whose section the tool writes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    manifest = zoo_manifest()
    return manifest, zoo_selection(manifest, args.models, wanted), args.out


def zoo_rows_from_section(text: str) -> list[ZooRow]:
    """The rows of a zoo section's table (zoo_markdown), read back at the table's precision."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    if len(lines) < 3:
        return []
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    outputs = [h.removesuffix(" cosine / SQNR dB") for h in header if h.endswith(" cosine / SQNR dB")]
    rows = []
    for line in lines[2:]:
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
        setting = cells["setting"]
        if " (failed: " in setting:
            label, error = setting.split(" (failed: ", 1)
            rows.append(ZooRow(label, error=error.removesuffix(")")))
            continue
        row = ZooRow(setting, kernels=cells["kernels"])
        for name in outputs:
            cosine, sqnr = cells[f"{name} cosine / SQNR dB"].split(" / ")
            row.fidelity[name] = (float(cosine), float(sqnr.replace("∞", "inf")))
        row.top1 = _number(cells.get("top-1 %"), 0.01)
        row.agreement = _number(cells.get("agreement %"), 0.01)
        row.latency_ms, row.calib_s = _number(cells["latency ms"]), _number(cells["calib. s"])
        row.peak_mb, row.size_kb = _number(cells["peak MB"]), _number(cells["size KB"])
        rows.append(row)
    return rows


def _number(cell: str | None, unit: float = 1.0) -> float | None:
    return None if not cell else float(cell) * unit


def zoo_results_in(out: Path, manifest: dict[str, dict]) -> dict[str, tuple[dict, list[ZooRow]]]:
    """Every zoo model's rows as its section of `out` holds them, in the zoo's order."""
    text = out.read_text() if out.exists() else ""
    results = {}
    for name, entry in manifest.items():
        begin, end = f"<!-- suite: zoo/{name} -->", f"<!-- end suite: zoo/{name} -->"
        if begin in text and end in text:
            rows = zoo_rows_from_section(text.split(begin, 1)[1].split(end, 1)[0])
            if rows:
                results[name] = (entry, rows)
    return results


def _weight_form(model: onnx.ModelProto, kernels: str) -> str:
    """How onnxq stored 8-bit weights where kernels run (its metadata): ", uint8 weights" or
    ", 7-bit weights" (--int8-range auto chooses by timing where int8 kernels saturate);
    nothing where `kernels` (its kernel_summary) says no integer kernel runs."""
    meta = {p.key: p.value for p in model.metadata_props}.get("onnxq.weight_range", "")
    if kernels.startswith("float") or not meta:
        return ""
    if "uint8" in meta:
        return ", uint8 weights"
    return ", 7-bit weights" if meta.startswith("7-bit") else ""


def run_zoo(models: list[str] | None, out: Path) -> None:
    """Measures the models (the whole zoo by default) into their sections, then rebuilds the
    summary from every zoo section in `out`, so that a run over a few models updates it too."""
    manifest = zoo_manifest()
    names = zoo_selection(manifest, models)
    machine = machine_description()
    if "<!-- suite: zoo -->" not in (out.read_text() if out.exists() else ""):
        write_section(out, "zoo", "## Zoo summary\n\n(being measured)\n", machine)  # placed first
    for name in names:
        entry = manifest[name]
        rows = zoo_measure(entry)
        write_section(out, f"zoo/{name}", zoo_markdown(entry, rows), machine)
        print("wrote", name, "to", out, flush=True)
    write_section(out, "zoo", zoo_summary(zoo_results_in(out, manifest)), machine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    run_zoo(args.models, args.out)


if __name__ == "__main__":
    main()
