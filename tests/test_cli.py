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
        ("corrupt_npz", "cannot read data"),
        ("zeros", "constant data"),
        ("output_is_input", "is the input model"),
        ("missing_external_data", "cannot read the weights"),
        ("fixed_batch", "do not fill batches of 4"),
        ("read_only_folder", "is not writable"),
        ("already_quantized", "the model is already quantized"),
    ],
)
def test_bad_input_gives_one_line_and_no_output(
    monkeypatch, tmp_path, small_model_path, calib_file, setup, message
):
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
    elif setup == "corrupt_npz":
        calib = tmp_path / "calib.npz"
        np.savez_compressed(calib, x=np.ones((4, 3, 16, 16), np.float32))
        calib.write_bytes(calib.read_bytes()[:-40])
    elif setup == "zeros":
        np.save(calib, np.zeros((8, 3, 16, 16), np.float32))
    elif setup == "output_is_input":
        out = model
    elif setup == "missing_external_data":
        model = tmp_path / "external.onnx"
        onnx.save(onnx.load(small_model_path), model, save_as_external_data=True, size_threshold=0)
        next(tmp_path.glob("external.onnx.data"), tmp_path / "external.onnx.data").unlink(missing_ok=True)
        for data in tmp_path.iterdir():
            if data.suffix not in (".onnx", ".npy"):
                data.unlink()
    elif setup == "fixed_batch":
        import torch

        from tests.conftest import export, small_cnn

        model = tmp_path / "fixed.onnx"
        onnx.save(export(small_cnn(), torch.zeros(4, 3, 16, 16), dynamic_batch=False), model)
        np.save(calib, np.random.default_rng(0).standard_normal((10, 3, 16, 16)).astype(np.float32))
    elif setup == "already_quantized":
        model = tmp_path / "quantized.onnx"
        run("quantize", small_model_path, "-o", model, "--calib", calib, "--calibration", "minmax")
    elif setup == "read_only_folder":  # root may write anywhere: the folder's answer is simulated
        monkeypatch.setattr("onnxq.io.writable", lambda folder: False)
    before = out.read_bytes() if out.exists() else None
    result = CliRunner().invoke(main, ["quantize", str(model), "-o", str(out), "--calib", str(calib)])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("onnxq:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert (out.read_bytes() if out.exists() else None) == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_saved_model_follows_the_umask(tmp_path, small_model_path, calib_file):
    import os

    out = tmp_path / "small.int8.onnx"
    previous = os.umask(0o022)
    try:
        result = run("quantize", small_model_path, "-o", out, "--calib", calib_file, "--max-samples", "8")
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == 0o644


def test_sigterm_while_writing_leaves_no_temporary_file(monkeypatch, tmp_path, small_model_path, calib_file):
    import os
    import signal
    from pathlib import Path

    write = Path.write_bytes

    def terminated_mid_write(path, data):
        write(path, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Path, "write_bytes", terminated_mid_write)
    out = tmp_path / "out.onnx"
    result = run("quantize", small_model_path, "-o", out, "--calib", calib_file, "--max-samples", "8")
    assert result.exit_code == 128 + signal.SIGTERM and "terminated" in result.output
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_eval_refuses_models_with_other_input_shapes(tmp_path, small_model_path, calib_file):
    import torch

    from tests.conftest import export, small_cnn

    other = tmp_path / "other" / "small.onnx"
    other.parent.mkdir()
    onnx.save(export(small_cnn(), torch.zeros(1, 3, 8, 8), dynamic_batch=False), other)
    result = run("eval", small_model_path, other, "--data", calib_file)
    assert result.exit_code == 1 and "cannot be compared" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_eval_tells_files_of_one_name_apart(tmp_path, small_model_path, calib_file):
    from onnxq.evaluate import display_names

    copy = tmp_path / "copy" / small_model_path.name
    copy.parent.mkdir()
    copy.write_bytes(small_model_path.read_bytes())
    assert display_names([small_model_path, copy]) == [
        f"{small_model_path.parent.name}/{small_model_path.name}",
        f"copy/{small_model_path.name}",
    ]
    result = run("eval", small_model_path, copy, "--data", calib_file, "--max-samples", "4")
    assert result.exit_code == 0 and "copy/" in result.output


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
    assert onnx.TensorProto.INT4 in types and onnx.TensorProto.INT8 in types  # W4A6: symmetric


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--w-bits", "4"], {onnx.TensorProto.UINT4, onnx.TensorProto.INT8}),
        (["--w-bits", "4", "--a-bits", "4"], {onnx.TensorProto.INT4, onnx.TensorProto.INT8}),
        (["--w-bits", "4", "--w-zero-point", "none"], {onnx.TensorProto.INT4, onnx.TensorProto.INT8}),
        (
            ["--w-bits", "4", "--a-bits", "4", "--w-zero-point", "narrow"],
            {onnx.TensorProto.UINT4, onnx.TensorProto.INT8},
        ),
        (
            ["--w-bits", "4", "--a-bits", "4", "--w-zero-point", "all"],
            {onnx.TensorProto.UINT4, onnx.TensorProto.UINT8},
        ),
        (["--w-bits", "4", "--a-bits", "4", "--w-asym"], {onnx.TensorProto.UINT4, onnx.TensorProto.UINT8}),
    ],
    ids=["default-W4A8", "default-W4A4", "none", "narrow", "all", "w-asym"],
)
def test_weight_zero_point_flags(tmp_path, small_model_path, calib_file, args, expected):
    """By default 4-bit weights get a zero point under 8-bit activations and stay signed under
    4-bit ones, and the 8-bit first and last layers stay signed;
    signed; --w-zero-point and --w-asym (all) override."""
    out = tmp_path / "small.zero_point.onnx"
    args = ["--calib", calib_file, "--calib-method", "minmax", *args]
    result = run("quantize", small_model_path, "-o", out, *args)
    assert result.exit_code == 0, result.output
    model = onnx.load(out)
    types = {t.data_type for t in model.graph.initializer if t.name.endswith("_quantized")}
    assert types - {onnx.TensorProto.INT32} == expected  # biases are int32 either way


def test_w_asym_with_another_zero_point_choice_is_refused(tmp_path, small_model_path, calib_file):
    out = tmp_path / "small.refused.onnx"
    args = ["--calib", calib_file, "--w-bits", "4", "--w-asym", "--w-zero-point", "none"]
    result = run("quantize", small_model_path, "-o", out, *args)
    assert result.exit_code == 1 and not out.exists()
    assert result.output.count("\n") == 1 and "contradicts --w-zero-point none" in result.output


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
        (["--overrides", "float-yes.toml"], "float must be true or false"),
        (["--calib-method", "pd", "--holdout", "1.5"], "holdout must be in [0, 1)"),
        (["--calib-method", "mse", "--time-budget", "0"], "time budget must be positive"),
        (["--w-range", "outputs"], "weight range must be"),
    ],
)
def test_bad_low_bit_options_give_one_line(tmp_path, small_model_path, calib_file, args, message):
    (tmp_path / "float-yes.toml").write_text('[[layer]]\nfloat = "yes"\n')
    args = [str(tmp_path / a) if a.endswith("-yes.toml") else a for a in args]
    out = tmp_path / "out.onnx"
    result = run("quantize", small_model_path, "-o", out, "--calib", calib_file, *args)
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def _quantize_with_overrides(tmp_path, model_path, calib_file, text: str):
    """`onnxq quantize` with an overrides file of `text`: the CLI result and the output path."""
    overrides = tmp_path / "overrides.toml"
    overrides.write_text(text)
    out = tmp_path / "out.onnx"
    return run("quantize", model_path, "-o", out, "--calib", calib_file, "--overrides", overrides), out


def test_an_override_keeps_layers_float(tmp_path, small_model_path, calib_file):
    text = '[[layer]]\nop = "Gemm"\nfloat = true\n'
    result, out = _quantize_with_overrides(tmp_path, small_model_path, calib_file, text)
    assert result.exit_code == 0, result.output
    model = onnx.load(out)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert gemm.input[1] not in dequantized and conv.input[1] in dequantized
    assert "kept float by --overrides" in result.output


def test_overrides_that_match_nothing_are_named(tmp_path, small_model_path, calib_file):
    text = '[[layer]]\nmatch = "/no/such/layer*"\nw_bits = 4\n'
    result, _ = _quantize_with_overrides(tmp_path, small_model_path, calib_file, text)
    assert result.exit_code == 0, result.output
    assert "override '/no/such/layer*' matches no layer" in result.output


def test_lstm_is_named_as_kept_in_float_and_sequences_are_not_called_samples(tmp_path):
    """An LSTM export with a fixed sequence length before a free batch axis: [steps, batch, features]."""
    import io

    import torch
    from torch import nn

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(8, 16)
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lstm(x)[0])

    buffer = io.BytesIO()
    torch.onnx.export(
        Tagger().eval(),
        (torch.zeros(12, 2, 8),),
        buffer,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {1: "batch"}, "y": {1: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    model, data, out = tmp_path / "tagger.onnx", tmp_path / "seq.npy", tmp_path / "tagger.q.onnx"
    model.write_bytes(buffer.getvalue())
    np.save(data, np.random.default_rng(0).standard_normal((12, 64, 8)).astype(np.float32))
    result = run("quantize", model, "-o", out, "--calib", data)
    assert result.exit_code == 0, result.output
    assert "kept in float" in result.output and "LSTM" in result.output
    assert "calibrated on 1 run of input 'x' (first axis fixed at 12)" in result.output
    # the calibration sweep cuts data along the first axis: refused before any work, nothing written
    swept = tmp_path / "tagger.mse.onnx"
    result = run("quantize", model, "-o", swept, "--calib", data, "--calib-method", "mse")
    assert result.exit_code == 1 and not swept.exists()
    assert "batch is not on the first axis" in result.output and "Traceback" not in result.output


def test_cifar10_preset_sizes_images_to_32(tmp_path):
    from PIL import Image

    from onnxq.calib.images import load_image
    from onnxq.config import Preprocess

    path = tmp_path / "big.png"
    Image.new("RGB", (96, 64), (128, 64, 32)).save(path)
    assert load_image(path, Preprocess.preset("cifar10")).shape == (3, 32, 32)


def test_bench_times_models_side_by_side_at_each_batch_size(tmp_path, small_model_path, calib_file):
    out = tmp_path / "small.int8.onnx"
    assert run("quantize", small_model_path, "-o", out, "--calib", calib_file).exit_code == 0
    result = run("bench", small_model_path, out, "--batch", "1", "--batch", "4")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "small" in line]
    assert len(rows) == 4 and sum("×)" in row for row in rows) == 2
    with_data = run("bench", small_model_path, out, "--data", calib_file, "--batch", "2")
    assert with_data.exit_code == 0, with_data.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shape", "input=1x3"], "--shape input=1x3 does not fit the model's ?×3×16×16"),
        (["--shape", "nope=1x2"], "--shape names no input of the model: nope"),
        (["--shape", "input=ax2"], "--shape takes name=1x3x224x224"),
        (["--batch", "0"], "batch sizes must be at least 1"),
    ],
)
def test_bench_bad_options_give_one_line(small_model_path, args, message):
    result = run("bench", small_model_path, *args)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("onnxq:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert message in errors[0]


def test_bench_asks_for_the_shape_of_free_dimensions(tmp_path):
    import torch

    from tests.conftest import export

    model = tmp_path / "spatial.onnx"
    exported = export(torch.nn.Conv2d(3, 4, 3), torch.zeros(1, 3, 8, 8))
    for dim in exported.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "side"
    onnx.save(exported, model)
    result = run("bench", model)
    assert result.exit_code == 1 and "--shape input=" in result.output
    assert run("bench", model, "--shape", "input=1x3x12x12").exit_code == 0


def test_a_failed_onnxruntime_run_is_one_line_without_onnxruntime_own_log(capfd):
    """onnxruntime logs a failed run on standard error before raising; onnxq's line says it."""
    from onnx import TensorProto, helper

    from onnxq.errors import OnnxqError
    from onnxq.io import run as run_model
    from onnxq.io import session

    graph = helper.make_graph(
        [helper.make_node("Concat", ["x", "c"], ["y"], axis=0)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("c", TensorProto.FLOAT, [1, 4], np.zeros(4))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(OnnxqError, match="cannot run the model on this data"):
        run_model(session(model), {"x": np.zeros((2, 3), np.float32)})
    assert "onnxruntime" not in capfd.readouterr().err
