"""The zoo of real exported models (tools/build_zoo.py) quantized at W8A8 by `onnxq quantize`.

Each model of the zoo's manifest (those in SLOW only with ONNXQ_ZOO_SLOW=1) is quantized with
the default settings on a few of its calibration samples, must load and run in onnxruntime with
the float model's output names, shapes and dtypes, and must keep a fidelity floor (cosine
similarity and SQNR against the float model on evaluation samples, per output and per part of
detector outputs). The floors are what
the quantizer reaches today, a little below; the issue's targets (cosine ≥ 0.999, SQNR ≥ 30 dB)
are in TARGETS and BENCHMARKS.md tells which models miss them. The measured figures are printed
at the end of the run. Skips cleanly when the zoo has not been built (`tools/build_zoo.py`;
`make test` builds it).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxq.cli import main
from onnxq.io import session

ZOO = Path(os.environ.get("ONNXQ_ZOO") or Path.home() / ".cache" / "onnxq" / "zoo").expanduser()
MANIFEST = ZOO / "zoo.json"
CALIBRATION_SAMPLES = 8  # also --max-samples below
# Models whose W8A8 test takes over a minute on 2 cores, run only with ONNXQ_ZOO_SLOW=1 (the suite
# keeps to 10 minutes; tools/zoo_bench.py measures them): PP-PicoDet, 800×608 at batch 1, 82 s on
# an AVX-512 EPYC, most of it the fidelity fallback's per-layer costs and the range scan over 102
# layers, which run because it stays below the warning threshold (fewer samples: 72 s, 9.1 dB)
SLOW = ("picodet_layout",)
EVALUATION_SAMPLES = 16
SMALL_SIDE = 320  # models with dynamic height and width are tested at this size (fewer pixels, faster)
TARGETS = (0.999, 30.0)  # the W8A8 targets for detector and segmentation outputs

# Lowest (cosine, SQNR dB) per model at W8A8 default, on the test's samples: measured, then rounded
# down with a margin. Raise them as the quantizer improves; never lower them to make a test pass.
FLOORS: dict[str, tuple[float, float]] = {
    "ppocr_det_v4": (0.985, 16.0),  # measured 0.990 / 17.1; 0.994 / 19.1 with moves across float ops
    "picodet_layout": (0.95, 10.0),  # 0.965 / 11.5 (scores of the first stride); run in SLOW only
    "ppocr_rec_v4": (0.97, 12.0),  # 0.982 / 14.3, 97 % of character positions agree
    "ppocr_cls_v2": (0.999, 30.0),  # 1.00000 / 73.9
    "lcnet_orientation": (0.999, 45.0),  # 1.00000 / 53.0 (softmax output, 0.92 confidence on average)
    "yolov8n_nudenet": (0.93, 7.0),  # scores 0.951 / 9.1, boxes 0.9992 / 27.9
    "yolox_ddddocr": (0.975, 14.0),  # boxes 0.987 / 15.9, scores 0.996 / 21.0
    # 0.98975 / 16.9 (7-bit weights, x86 without VNNI), 0.99346 / 18.8 with full int8 weights, on
    # files of Python's standard library; 0.99965 / 31.6 was on files of one machine's /etc and
    # packages, which gave 0.99409 / 19.2 on another: 8 calibration files cover few of its types
    "magika_v3_3": (0.985, 15.0),
    "efficientnet_lite0": (0.985, 16.0),  # 0.993 / 18.4
    "mobilenet_v3_nhwc": (0.65, 1.0),  # 0.747 / 2.2: a few images with large logits lose most
    "yolov8_style_op12": (0.5, 0.5),  # scores 0.586 / 1.6 (same: a few images), boxes 0.9986 / 25.6
    "dbnet_640": (0.99, 17.0),  # 0.9946 / 19.7
}
DEFAULT_FLOOR = (0.95, 10.0)  # a model added to the zoo before its floor is measured
CLASS_SCORES = ("classifier", "sequence")  # kinds scored by agreement (a sequence: per position)

# Models onnxq cannot quantize yet: name → a pattern of its one-line error. The test expects the
# failure while it happens and checks the floor once it is fixed. (ppocr_cls_v2, whose batch
# paddle2onnx writes as -1, was one until 4287832.)
KNOWN_FAILURES: dict[str, str] = {}


def _manifest() -> list[dict]:
    if not MANIFEST.exists():
        return []
    return json.loads(MANIFEST.read_text())["models"]


def _params(only: tuple[str, ...] = ()):
    """The manifest's models (those named in `only`, when given), or one skipped parameter."""
    models = [m for m in _manifest() if not only or m["name"] in only]
    if not models:
        reason = f"no {'/'.join(only) or 'zoo'} at {ZOO} (build it with tools/build_zoo.py)"
        return [pytest.param(None, id="zoo", marks=pytest.mark.skip(reason=reason))]
    slow = pytest.mark.skipif(not os.environ.get("ONNXQ_ZOO_SLOW"), reason="over a minute: ONNXQ_ZOO_SLOW=1")
    return [pytest.param(m, id=m["name"], marks=[slow] if m["name"] in SLOW else []) for m in models]


@pytest.fixture(scope="module")
def report(request):
    """Fidelity of every model, printed after the module's tests (pytest -q captures prints)."""
    lines: list[str] = []
    yield lines
    terminal = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if lines and terminal is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            terminal.write_line("")
            terminal.write_line("zoo W8A8 (default) vs float: cosine / SQNR dB per output")
            for line in lines:
                terminal.write_line("  " + line)


def _smaller(array: np.ndarray, spec: dict) -> np.ndarray:
    """Every other pixel of NCHW images when the model takes any height and width."""
    shape = spec["shape"]
    dynamic = len(shape) == 4 and not isinstance(shape[2], int) and not isinstance(shape[3], int)
    if dynamic and array.shape[2] >= 2 * SMALL_SIDE:
        step = array.shape[2] // SMALL_SIDE
        return np.ascontiguousarray(array[:, :, ::step, ::step])
    return array


def _inputs(entry: dict, which: str, count: int) -> dict[str, np.ndarray]:
    with np.load(ZOO / entry[which]) as archive:
        return {name: _smaller(archive[name][:count], spec) for name, spec in entry["inputs"].items()}


def _run(model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Batch 1 at a time (some models have a fixed batch of 1), concatenated."""
    run = session(model, threads=2).run
    count = len(next(iter(feed.values())))
    outputs = [run(None, {k: v[i : i + 1] for k, v in feed.items()}) for i in range(count)]
    return [np.concatenate(parts) for parts in zip(*outputs, strict=True)]


def fidelity(reference: np.ndarray, quantized: np.ndarray) -> tuple[float, float]:
    """(cosine similarity, SQNR in dB) of the quantized output against the float one."""
    a, b = reference.astype(np.float64).ravel(), quantized.astype(np.float64).ravel()
    noise = float(np.square(a - b).sum())
    cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    sqnr = 10 * np.log10(float(np.square(a).sum()) / noise) if noise > 0 else float("inf")
    return cosine, float(sqnr)


def parts_of(entry: dict, name: str, output: np.ndarray) -> dict[str, np.ndarray]:
    """The output itself and, for detector heads, its box and score channels apart."""
    found = {name: output}
    spec = entry.get("parts", {}).get(name)
    if spec:
        for part, (start, stop) in spec["parts"].items():
            index = [slice(None)] * output.ndim
            index[spec["axis"]] = slice(start, stop)
            found[f"{name}[{part}]"] = output[tuple(index)]
    return found


@pytest.mark.parametrize("entry", _params())
def test_w8a8_default_runs_and_keeps_fidelity(entry, tmp_path, report):
    source = ZOO / entry["file"]
    if not source.exists() or not (ZOO / entry["calib"]).exists() or not (ZOO / entry["eval"]).exists():
        pytest.skip(f"{entry['name']} is listed in {MANIFEST} but its files are missing")
    calib = tmp_path / "calib.npz"
    np.savez(calib, **_inputs(entry, "calib", CALIBRATION_SAMPLES))
    out = tmp_path / f"{entry['name']}.w8a8.onnx"
    result = CliRunner().invoke(
        main,
        # --no-speed-check: the floors hold for a plan made from the data alone; the speed check
        # decides from timings, noisy in a loaded suite (yolox's boxes: 12.7 dB in one full run,
        # 21.1 alone; its plan alone, without the check, 21.0 whatever the range scan's reach)
        [
            "quantize",
            str(source),
            "-o",
            str(out),
            "--calib",
            str(calib),
            "--max-samples",
            "8",
            "--no-speed-check",
        ],
    )
    known = KNOWN_FAILURES.get(entry["name"])
    if result.exit_code != 0 and known and re.search(known, result.output):
        report.append(f"{entry['name']}: fails to quantize (known): {result.output.strip()[:160]}")
        pytest.xfail(f"known onnxq failure: {result.output.strip()}")
    assert result.exit_code == 0, result.output
    assert out.exists()

    float_model, quantized = onnx.load(source), onnx.load(out)
    ops = {n.op_type for n in quantized.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, "no Q/DQ pair was inserted"
    for got, want in zip(quantized.graph.output, float_model.graph.output, strict=True):
        assert got.name == want.name and got.type.tensor_type.elem_type == want.type.tensor_type.elem_type

    feed = _inputs(entry, "eval", EVALUATION_SAMPLES)
    reference, outputs = _run(float_model, feed), _run(quantized, feed)
    floor = FLOORS.get(entry["name"], DEFAULT_FLOOR)
    measured = []
    for output, ref, got in zip(float_model.graph.output, reference, outputs, strict=True):
        assert got.shape == ref.shape and got.dtype == ref.dtype, output.name
        assert np.isfinite(got).all(), output.name
        for label, (r, q) in {
            k: (v, parts_of(entry, output.name, got)[k]) for k, v in parts_of(entry, output.name, ref).items()
        }.items():
            cosine, sqnr = fidelity(r, q)
            measured.append((label, cosine, sqnr))
    if entry["kind"] in CLASS_SCORES:
        agreement = float((reference[0].argmax(-1) == outputs[0].argmax(-1)).mean())
        measured_text = f" top-1 agreement {100 * agreement:.0f} %"
    else:
        measured_text = ""
    text = "; ".join(f"{label} {c:.5f} / {s:.1f}" for label, c, s in measured)
    met = entry["kind"] in CLASS_SCORES or all(c >= TARGETS[0] and s >= TARGETS[1] for _, c, s in measured)
    miss = "" if met else "  (below the issue's target)"
    report.append(f"{entry['name']}: {text}{measured_text}{miss}")
    for label, cosine, sqnr in measured:
        assert cosine >= floor[0], f"{label}: cosine {cosine:.5f} < floor {floor[0]}"
        assert sqnr >= floor[1], f"{label}: SQNR {sqnr:.2f} dB < floor {floor[1]}"


REFINED = ("yolov8n_nudenet",)  # an ultralytics head: ConstantOfShape anchors, parallel branches


@pytest.mark.parametrize("entry", _params(REFINED))
def test_refinement_runs_on_a_detector_head(entry, tmp_path):
    """`--refine` through a real detector's head, briefly: it once stopped on ConstantOfShape's
    tensor attribute and on a head with no single-tensor cut between its branches."""
    pytest.importorskip("torch")
    if not (ZOO / entry["file"]).exists():
        pytest.skip(f"{entry['name']} is listed in {MANIFEST} but its files are missing")
    calib = tmp_path / "calib.npz"
    np.savez(calib, **_inputs(entry, "calib", 4))
    out = tmp_path / "refined.onnx"
    arguments = ["quantize", str(ZOO / entry["file"]), "-o", str(out), "--calib", str(calib)]
    arguments += [
        "--w-bits",
        "4",
        "--refine",
        "--refine-iters",
        "2",
        "--no-speed-check",
        "--no-fidelity-fallback",
    ]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    assert re.search(r"refined (\d+) of \1 units", result.output), result.output
    feed = _inputs(entry, "eval", 2)
    assert all(np.isfinite(o).all() for o in _run(onnx.load(out), feed))
