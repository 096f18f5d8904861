"""The tools/choose_*.py scripts' table machinery: a killed run resumes from the rows it printed,
and rows it did not print are measured."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import held_out

LOG = """\
choosing the start on held-out calibration images
| model | width | start | KL held-out | agreement % | top-1 % | s |
| --- | --- | --- | ---: | ---: | ---: | ---: |
| resnet20_cifar10 | W4A4 | nearest | 0.0351 | 95.10 | 93.27 | 388 |
| resnet20_cifar10 | W4A4 | gptq | 0.0158 | 96.30 | 93.66 |
  resnet20_cifar10 W2A4: refining 3/19
"""


def test_a_killed_run_resumes_from_its_complete_printed_rows(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(LOG)
    rows = held_out.printed_rows(log, ("nearest", "gptq"))
    key = "| resnet20_cifar10 | W4A4 | nearest |"
    assert list(rows) == [key]  # the gptq row was cut short by the kill; the header is no row
    assert rows[key] == (LOG.splitlines()[3], 0.0351)


def test_a_row_is_reused_when_printed_and_measured_otherwise():
    key = "| resnet20_cifar10 | W4A4 | nearest |"
    done = {key: ("the printed row", 0.0351)}
    calls = []

    def measure():
        calls.append(True)
        return {"kl": 0.01584, "agreement": 0.963, "top1": 0.93664, "seconds": 391.6}

    assert held_out.table_row(key, done, measure) == ("the printed row", 0.0351)
    assert not calls
    other = "| resnet20_cifar10 | W4A4 | gptq |"
    line, kl = held_out.table_row(other, done, measure)
    assert calls and kl == 0.01584
    assert line == f"{other} 0.0158 | 96.30 | 93.66 | 392 |"


def test_the_fidelity_bound_quantizes_as_the_numpy_reference(small_model, calibration_data):
    """tools/fidelity_bound.py: each layer's weights land on 8-bit per-channel levels (nearest,
    the numpy reference's), and each layer's data input goes through the min-max QDQ it states."""
    import numpy as np
    import onnx
    from fidelity_bound import observed_ranges, weighted_layers, with_quantized_inputs, with_rounded_weights
    from onnx import numpy_helper

    from onnxq.io import session
    from onnxq.quant.primitives import IntRange, affine_params, dequantize, quantize

    layers = weighted_layers(small_model)
    assert [node.op_type for node, _, _ in layers] == ["Conv", "Conv", "Conv", "Gemm"]
    stored = {i.name: numpy_helper.to_array(i) for i in small_model.graph.initializer}
    rounded = {i.name: numpy_helper.to_array(i) for i in with_rounded_weights(small_model).graph.initializer}
    weight = stored[layers[0][2]]
    scale = np.abs(weight).reshape(len(weight), -1).max(1) / 127
    levels = rounded[layers[0][2]] / scale[:, None, None, None]
    np.testing.assert_allclose(levels, np.rint(weight / scale[:, None, None, None]), atol=1e-3)

    feed = {"input": calibration_data[:8]}
    ranges = observed_ranges(small_model, feed, 4, per_channel=False)
    data = layers[1][1]
    low, high = ranges[data]
    quantized = with_quantized_inputs(small_model, ranges)
    probe = onnx.ModelProto()
    probe.CopyFrom(quantized)
    probe.graph.output.extend([onnx.ValueInfoProto(name=data), onnx.ValueInfoProto(name=f"{data}_bound")])
    value, got = session(probe, optimize=False).run([data, f"{data}_bound"], feed)
    target = IntRange.unsigned(8)
    s, z = affine_params(low, high, target)
    np.testing.assert_allclose(got, dequantize(quantize(value, s, z, target), s, z), atol=1e-6)


def test_the_zoo_summary_reads_every_models_table_back(tmp_path, monkeypatch):
    """tools/zoo_bench.py: a zoo run over one model rebuilds the summary from every model's
    table, so the summary never keeps figures an earlier run measured over the whole zoo."""
    import numpy as np
    import zoo_bench
    from zoo_bench import ZooRow

    monkeypatch.setenv("ONNXQ_ZOO", str(tmp_path))
    np.savez(tmp_path / "det.calib.npz", images=np.zeros((4, 3, 8, 8), np.float32))
    entry = {
        "name": "det", "kind": "detector", "opset": 17, "exporter": "an exporter (details)",
        "origin": "here", "licence": "MIT", "layout": "NCHW", "notes": "a detector", "calib": "det.calib.npz",
        "inputs": {"images": {"shape": [1, 3, 8, 8], "dtype": "float32"}},
        "samples": {"eval": {"images": [2, 3, 8, 8]}},
    }  # fmt: skip
    parts = ("output0[boxes]", "output0[scores]")
    rows = [
        ZooRow(
            "float",
            fidelity=dict.fromkeys(parts, (1.0, float("inf"))),
            latency_ms=8.0,
            size_kb=100,
            kernels="float",
        ),
        ZooRow(
            zoo_bench.ZOO_W8A8[0],
            fidelity={parts[0]: (0.99991, 37.2), parts[1]: (0.99742, 22.9)},
            latency_ms=7.1,
            calib_s=32.3,
            peak_mb=902,
            size_kb=30,
            kernels="mixed (53 integer, 11 float layers)",
        ),
        ZooRow(
            zoo_bench.ZOO_PEER,
            error="onnxruntime cannot run the model: ... Error Unrecognized attribute: axis",
        ),
    ]
    out = tmp_path / "BENCHMARKS.md"
    zoo_bench.write_section(out, "zoo/det", zoo_bench.zoo_markdown(entry, rows), "a machine")

    (_, read), *others = zoo_bench.zoo_results_in(out, {"det": entry, "absent": {}}).values()
    assert not others  # a model without a section has no row
    assert [r.setting for r in read] == [r.setting for r in rows]
    assert read[1].fidelity == rows[1].fidelity and read[1].latency_ms == 7.1 and read[1].peak_mb == 902
    assert read[2].error == rows[2].error
    summary = zoo_bench.zoo_summary({"det": (entry, read)})
    assert "| det | detector | an exporter | 17 | 0.99742 / 22.9 |  | missed |" in summary
    assert "failed: Unrecognized attribute: axis" in summary


def test_a_draws_section_written_before_the_last_draw_says_how_many_it_holds():
    """tools/bench_draws.py writes its section after every draw from the second on, so that a run
    stopped early keeps them; until the last, the title says how many of the planned draws it
    holds, and each setting's mean and spread are over those."""
    import bench
    import bench_draws

    def row(setting, top1):
        return bench.Row(setting, top1, 0.9, 0.05, 100.0, calib_s=10.0)

    rows = {"a": [row("a", 0.60), row("a", 0.62)], "b": [row("b", 0.58), row("b", 0.61)]}
    partial = bench_draws.markdown("seeds", "resnet20_cifar10_bn", 0.9164, rows, 2, planned=3)
    assert "over 2 calibration draws (2 of the 3 planned" in partial
    assert "| a | 61.00 ± 1.41 | 60.00, 62.00 |" in partial
    assert "| b | 59.50 ± 2.12 | 58.00, 61.00 |" in partial and "| 0 / 0 / 2 |" in partial
    whole = bench_draws.markdown("seeds", "resnet20_cifar10_bn", 0.9164, rows, 2)
    assert "planned" not in whole


def test_device_refine_packs_images_that_rebuild_the_preset_array_exactly(tmp_path):
    """tools/device_refine.py resizes and crops here and stores lossless WebP, so the array a GPU
    machine rebuilds with the preset's normalisation alone equals what load_image gives on the
    original file, portrait, landscape and square."""
    import numpy as np
    from device_refine import cropped_preprocess
    from PIL import Image

    import onnxq
    from onnxq.calib.images import load_image, resized_and_cropped

    pre = onnxq.Preprocess.preset("imagenet")
    rng = np.random.default_rng(0)
    for index, size in enumerate([(300, 257), (257, 300), (260, 260)]):
        original = tmp_path / f"{index}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(original)
        packed = tmp_path / f"{index}.webp"
        with Image.open(original) as image:
            cropped = resized_and_cropped(image.convert("RGB"), pre, original)
        cropped.save(packed, lossless=True, quality=100)
        assert np.array_equal(load_image(packed, cropped_preprocess()), load_image(original, pre))


def test_the_integer_hardswish_runs_on_integer_kernels_within_one_step_of_float(tmp_path):
    """tools/hardswish_kernels.py's integer form: onnxruntime fuses it into QLinearAdd and
    QLinearMul (with uint8 activations; int8 zero points leave it float), and its output is
    within one output step of the numpy HardSwish of the same quantized input."""
    import hardswish_kernels

    shape = (8, 6, 6)
    integer = hardswish_kernels.model(shape, hardswish_kernels.FORMS[1])
    assert hardswish_kernels.fused_ops(integer, tmp_path / "a.onnx")[1:-1] == ["QLinearAdd", "QLinearMul"]
    int8 = hardswish_kernels.model(shape, hardswish_kernels.FORMS[2])
    assert "QLinearAdd" not in hardswish_kernels.fused_ops(int8, tmp_path / "b.onnx")

    x = np.random.default_rng(0).normal(0, 2, (1, *shape)).astype(np.float32)
    (y,) = onnxruntime.InferenceSession(integer.SerializeToString()).run(None, {"input": x})
    scale = hardswish_kernels.INPUT_SCALE
    rounded = (np.clip(np.round(x / scale) + 128, 0, 255) - 128) * scale
    reference = rounded * np.clip(rounded / 6 + 0.5, 0, 1)
    assert np.abs(y - reference).max() <= hardswish_kernels.OUTPUT_SCALE * 1.0001


def test_the_zoo_rewrite_turns_a_float_hardswish_between_q_dq_into_the_integer_form(tmp_path):
    import hardswish_kernels

    shape = (4, 5, 5)
    float_form = hardswish_kernels.model(shape, hardswish_kernels.FORMS[0])
    rewritten, count = hardswish_kernels.integer_hardswish(float_form)
    assert count == 1
    assert hardswish_kernels.fused_ops(rewritten, tmp_path / "a.onnx")[1:-1] == ["QLinearAdd", "QLinearMul"]
    x = {"input": np.random.default_rng(1).normal(0, 2, (1, *shape)).astype(np.float32)}
    (before,) = onnxruntime.InferenceSession(float_form.SerializeToString()).run(None, x)
    (after,) = onnxruntime.InferenceSession(rewritten.SerializeToString()).run(None, x)
    assert np.abs(after - before).max() <= hardswish_kernels.OUTPUT_SCALE * 1.0001


NOTES_16_IMAGES = """\
  activation ranges: percentile (lowest output SQNR 10.4 dB with percentile ranges, 9.7 dB with min-max)
  fidelity: 4 layers kept float lift the lowest output SQNR 10.4 → 17.5 dB
  activation ranges: 6 switched to the other rule's ranges, lifting the lowest output SQNR 17.5 → 20.0 dB
  fidelity on 16 calibration samples (too few to hold any back): output 'output0': SQNR 38.6 dB
"""


def test_the_calibration_size_table_names_what_the_default_chose():
    import calibration_size

    assert calibration_size.choices(NOTES_16_IMAGES) == "percentile, 4 float, 6 switched"
    assert calibration_size.choices("  fidelity on 16 held-back samples: output 'y': SQNR 41.0 dB") == ""


def _zoo_models_with_calibration_images():
    import zoo_bench
    from zoo_data import CALIBRATION_IMAGES

    manifest = zoo_bench.zoo_dir() / "zoo.json"
    if not manifest.exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason="no zoo (tools/build_zoo.py)"))]
    return list(CALIBRATION_IMAGES)


@pytest.mark.parametrize("name", _zoo_models_with_calibration_images())
def test_calibration_images_of_any_count_begin_with_the_zoo_file(name):
    """tools/calibration_size.py calibrates on N images whose first ones are the zoo's file, so its
    rows at the file's own count are the zoo's calibration."""
    import calibration_size

    data = calibration_size.calibration(name, 3)  # refuses (SystemExit) where they differ
    assert all(len(values) == 3 for values in data.values())
