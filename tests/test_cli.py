"""The command line: quantize and eval work, and bad input gives one line and exit status 1."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxq.cli import main


@pytest.fixture
def calib_file(tmp_path, calibration_data):
    path = tmp_path / "calib.npy"
    np.save(path, calibration_data)
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_quantize_then_eval(tmp_path, small_model_path, calib_file):
    out = tmp_path / "small.int8.onnx"
    result = run("quantize", small_model_path, "-o", out, "--calib", calib_file, "--calibration", "minmax")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "weights:" in result.output
    onnx.checker.check_model(onnx.load(out))
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros(48, np.int64))
    result = run("eval", small_model_path, out, "--data", calib_file, "--labels", labels)
    assert result.exit_code == 0, result.output
    assert "agreement" in result.output and "integer" in result.output


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("not_onnx", "is not a readable ONNX model"),
        ("missing_model", "model file not found"),
        ("missing_data", "data not found"),
        ("bad_shape", "has shape"),
        ("nan", "NaN"),
        ("bad_folder", "does not exist"),
    ],
)
def test_bad_input_gives_one_line_and_no_output(tmp_path, small_model_path, calib_file, setup, message):
    model, calib, out = small_model_path, calib_file, tmp_path / "out.onnx"
    if setup == "not_onnx":
        model = tmp_path / "text.onnx"
        model.write_text("hello")
    elif setup == "missing_model":
        model = tmp_path / "nope.onnx"
    elif setup == "missing_data":
        calib = tmp_path / "nope.npy"
    elif setup == "bad_shape":
        np.save(calib, np.zeros((4, 3, 5, 5), np.float32))
    elif setup == "nan":
        np.save(calib, np.full((4, 3, 16, 16), np.nan, np.float32))
    elif setup == "bad_folder":
        out = tmp_path / "no" / "such" / "out.onnx"
    result = CliRunner().invoke(main, ["quantize", str(model), "-o", str(out), "--calib", str(calib)])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()
    assert not list(tmp_path.glob(".out.onnx.*"))


def test_fuse_prints_what_it_merged_and_weight_statistics(tmp_path):
    torch = pytest.importorskip("torch")
    from tests.conftest import export, randomise_batchnorm
    from tests.passes.test_fuse_branches import family

    torch.manual_seed(0)
    module, example, _ = family("repvgg")
    randomise_batchnorm(module)
    source, out = tmp_path / "repvgg.onnx", tmp_path / "repvgg.fused.onnx"
    onnx.save(export(module, example, keep_bn=True), source)
    result = run("fuse", source, "-o", out)
    assert result.exit_code == 0, result.output
    assert "merged 3 branches into 1 Conv" in result.output
    assert "peak/std" in result.output and "wrote" in result.output
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Conv", "Relu"]


@pytest.mark.parametrize(("setup", "message"), [("not_onnx", "not a readable"), ("missing", "not found")])
def test_fuse_bad_input(tmp_path, setup, message):
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    if setup == "not_onnx":
        source.write_text("hello")
    result = run("fuse", source, "-o", out)
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out.onnx*"))


def test_low_bit_flags_and_overrides(tmp_path, small_model_path, calib_file):
    overrides = tmp_path / "mixed.toml"
    overrides.write_text('[[layer]]\nop = "Gemm"\nw_bits = 8\ngranularity = "tensor"\n')
    out = tmp_path / "small.w4a6.onnx"
    args = ["--w-bits", "4", "--a-bits", "6", "--granularity", "group:4", "--w-range", "mse"]
    result = run(
        "quantize", small_model_path, "-o", out, "--calib", calib_file, *args, "--overrides", overrides
    )
    assert result.exit_code == 0, result.output
    model = onnx.load(out)
    assert next(o.version for o in model.opset_import if o.domain == "") == 21
    types = {t.data_type for t in model.graph.initializer if t.name.endswith("_quantized")}
    assert onnx.TensorProto.INT4 in types and onnx.TensorProto.INT8 in types


def test_searched_calibration_reports_its_losses(tmp_path, small_model_path, calib_file):
    out = tmp_path / "small.w4a4.pd.onnx"
    args = ["--w-bits", "4", "--a-bits", "4", "--calib-method", "pd", "--seed", "1"]
    result = run("quantize", small_model_path, "-o", out, "--calib", calib_file, *args)
    assert result.exit_code == 0, result.output
    assert "prediction difference (KL): calibration before pd" in result.output
    assert "held-out" in result.output
    assert onnx.load(out).graph.node


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--granularity", "group"], "needs a size"),
        (["--w-range", "percentile:20"], "percentile"),
        (["--overrides", "missing.toml"], "override file not found"),
        (["--calib-method", "pd", "--holdout", "1.5"], "holdout must be in [0, 1)"),
        (["--calib-method", "mse", "--time-budget", "0"], "time budget must be positive"),
        (["--w-range", "outputs"], "weight range must be"),
    ],
)
def test_bad_low_bit_options_give_one_line(tmp_path, small_model_path, calib_file, args, message):
    out = tmp_path / "out.onnx"
    result = run("quantize", small_model_path, "-o", out, "--calib", calib_file, *args)
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
