"""Models exported without a batch axis (torchvision's detectors take one [3, H, W] image per run)
are lent one while they are quantized and saved as exported."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxq
from onnxq.calib.data import InputSpec, batches
from onnxq.errors import OnnxqError
from onnxq.evaluate import evaluate
from onnxq.io import session
from onnxq.passes.batch_axis import add_batch_axis, remove_batch_axis
from tests.conftest import export


def _unbatched_model(opset: int, normalise: bool = False) -> onnx.ModelProto:
    """One [3, 16, 16] image in, its boxes' scores out, as a detector without a batch axis: the
    batch of one is made and dropped inside the graph (`normalise`: after a normalisation of the
    image, as torchvision's detectors do first)."""
    import torch
    from torch import nn

    class OneImage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)
            )

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            if normalise:
                image = (image - 0.5) / 0.25
            return self.body(image.unsqueeze(0))[0].flatten(1).transpose(0, 1)

    torch.manual_seed(0)
    return export(OneImage(), torch.zeros(3, 16, 16), dynamic_batch=False, opset=opset, outputs=("scores",))


def _images(count: int) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((count, 3, 16, 16)).astype(np.float32)


def _dims(value: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("opset", [11, 17])  # Squeeze's axes: an attribute, then an input
def test_the_lent_axis_computes_the_same_and_is_taken_back(opset):
    model = _unbatched_model(opset)
    image = _images(1)
    lent = add_batch_axis(model, ["input"])
    assert _dims(lent.graph.input[0]) == [1, 3, 16, 16]
    onnx.checker.check_model(lent)
    (want,) = session(model).run(None, {"input": image[0]})
    (got,) = session(lent).run(None, {"input": image})
    np.testing.assert_array_equal(got, want)
    restored = remove_batch_axis(lent, ["input"])
    onnx.checker.check_model(restored)
    assert _dims(restored.graph.input[0]) == [3, 16, 16]
    assert len(restored.graph.node) == len(model.graph.node)
    assert len(restored.graph.initializer) == len(model.graph.initializer)
    (again,) = session(restored).run(None, {"input": image[0]})
    np.testing.assert_array_equal(again, want)


def test_stacked_samples_are_batched_one_at_a_time_when_the_caller_lends_the_axis():
    spec = [InputSpec("image", np.dtype(np.float32), (3, 8, 8))]
    lent: list[str] = []
    stream = batches(np.ones((5, 3, 8, 8), np.float32), spec, unbatched=lent)
    shapes = [batch["image"].shape for batch in stream]
    assert lent == ["image"]
    assert shapes == [(1, 3, 8, 8)] * 5


def test_data_of_the_model_own_shape_lends_nothing():
    spec = [InputSpec("image", np.dtype(np.float32), (2, 8, 8))]
    lent: list[str] = []
    shapes = [batch["image"].shape for batch in batches(np.ones((4, 8, 8), np.float32), spec, unbatched=lent)]
    assert lent == []
    assert shapes == [(2, 8, 8)] * 2


@pytest.mark.parametrize("normalise", [False, True])  # the lent Squeeze merged away, or kept
def test_a_model_without_a_batch_axis_quantizes_and_keeps_its_input(tmp_path, normalise):
    model = _unbatched_model(13, normalise)
    source, target = tmp_path / "one_image.onnx", tmp_path / "one_image.int8.onnx"
    onnx.save(model, source)
    images = _images(24)
    config = onnxq.QuantConfig(max_samples=24, speed_check=False)  # quantized whatever the CPU
    result = onnxq.pipeline.quantize_file(source, target, images, config)
    saved = onnx.load(target)
    assert _dims(saved.graph.input[0]) == [3, 16, 16]
    assert any(node.op_type == "QuantizeLinear" for node in saved.graph.node)
    assert any("without a leading batch axis" in note for note in result.notes)
    assert not any("onnxq_lent" in node for node in result.float_nodes)  # the saved model has none
    float_run, quantized_run = session(model), session(saved)
    for image in images[:4]:
        (want,) = float_run.run(None, {"input": image})
        (got,) = quantized_run.run(None, {"input": image})
        assert got.shape == want.shape
        noise = np.square(got - want).sum()
        assert 10 * np.log10(np.square(want).sum() / noise) > 25


def test_eval_runs_models_without_a_batch_axis_on_stacked_samples(tmp_path):
    model = _unbatched_model(13)
    source, target = tmp_path / "one_image.onnx", tmp_path / "one_image.int8.onnx"
    onnx.save(model, source)
    images = _images(12)
    onnxq.pipeline.quantize_file(source, target, images, onnxq.QuantConfig(speed_check=False))
    reports = evaluate(source, [target], images)
    assert [report.samples for report in reports] == [12, 12]
    assert reports[1].sqnr_db > 25


def test_bench_feeds_a_model_without_a_batch_axis_one_sample(tmp_path):
    from onnxq.errors import OnnxqError
    from onnxq.latency import bench

    source = tmp_path / "one_image.onnx"
    onnx.save(_unbatched_model(13), source)
    (row,) = bench([source], data=_images(4))
    assert row.batch == 1 and row.milliseconds > 0
    with pytest.raises(OnnxqError):
        bench([source], data=_images(4), batch_sizes=(2,))


def _stateful_model() -> onnx.ModelProto:
    """A stateful audio model as silero-vad exports it: a window [batch, 64], a recurrent state
    [2, batch, 16] whose batch axis is its second, and a scalar int64 sample rate that picks a
    branch of the graph."""
    import torch
    from torch import nn

    class Stateful(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encode = nn.Sequential(
                nn.Conv1d(1, 16, 5, 2, 2), nn.ReLU(), nn.Conv1d(16, 16, 3, 2, 1), nn.ReLU()
            )
            self.mix = nn.Linear(32, 16)

        def forward(self, window, state, rate):
            features = self.encode(window.unsqueeze(1)).mean(-1)
            features = torch.where(rate == 16000, features, -features)
            new_state = torch.tanh(self.mix(torch.cat([features, state[0]], 1)))
            return torch.sigmoid(new_state.sum(1, keepdim=True)), torch.stack([new_state, state[1]])

    torch.manual_seed(0)
    example = (torch.zeros(2, 64), torch.zeros(2, 2, 16), torch.tensor(16000))
    return export(
        Stateful(),
        example,
        inputs=("input", "state", "sr"),
        outputs=("output", "stateN"),
        dynamic_axes={
            "input": {0: "batch"},
            "state": {1: "batch"},
            "output": {0: "batch"},
            "stateN": {1: "batch"},
        },
    )


@pytest.mark.parametrize("rate_per_sample", [False, True])
def test_a_scalar_input_and_a_state_batched_on_its_second_axis_quantize(tmp_path, rate_per_sample):
    """Each sample's state [2, 1, 16] and rate (one value for all, or one per sample) are fed one
    sample per run on a lent leading axis; the saved model takes its inputs as exported."""
    model = _stateful_model()
    rng = np.random.default_rng(0)
    count = 32
    windows = np.sin(np.linspace(0, 40, 64))[None] * rng.uniform(0.2, 1, (count, 1)) + 0.1 * rng.normal(
        size=(count, 64)
    )
    data = {
        "input": windows.astype(np.float32),
        "state": rng.normal(0, 0.5, (count, 2, 1, 16)).astype(np.float32),
        "sr": np.full(count, 16000, np.int64) if rate_per_sample else np.array(16000, np.int64),
    }
    source, target = tmp_path / "vad.onnx", tmp_path / "vad.int8.onnx"
    onnx.save(model, source)
    config = onnxq.QuantConfig(speed_check=False)  # quantized whatever the CPU
    result = onnxq.pipeline.quantize_file(source, target, data, config)
    saved = onnx.load(target)
    assert [_dims(value) for value in saved.graph.input] == [_dims(value) for value in model.graph.input]
    assert any(node.op_type == "QuantizeLinear" for node in saved.graph.node)
    assert any("without a leading batch axis" in note for note in result.notes)
    feed = {
        "input": data["input"][:5],
        "state": data["state"][:5, :, 0].transpose(1, 0, 2),
        "sr": np.array(16000),
    }
    want, got = session(model).run(None, feed), session(saved).run(None, feed)
    for expected, actual in zip(want, got, strict=True):
        assert actual.shape == expected.shape
        assert 10 * np.log10(np.square(expected).sum() / np.square(actual - expected).sum()) > 25


def test_a_scalar_input_without_a_caller_that_lends_axes_is_refused():
    spec = [
        InputSpec("x", np.dtype(np.float32), (None, 4)),
        InputSpec("gain", np.dtype(np.float32), (), True),
    ]
    data = {"x": np.ones((3, 4), np.float32), "gain": np.array(2.0, np.float32)}
    with pytest.raises(OnnxqError, match="model input 'gain' is a scalar"):
        list(batches(data, spec))
    lent: list[str] = []
    runs = list(batches(data, spec, unbatched=lent))
    assert lent == ["gain"] and [run["gain"].tolist() for run in runs] == [[2.0]] * 3


@pytest.mark.parametrize(
    "state_shape",
    [
        (2, 6, 16),  # as the model takes a batch of 6: two samples counted against six windows
        (6, 2, 16),  # read as 6 samples of [2, 16]
    ],
)
@pytest.mark.parametrize("in_a_file", [False, True])
def test_a_state_given_as_the_model_lays_it_out_is_refused_with_the_layout_to_use(
    tmp_path, state_shape, in_a_file
):
    """Arrays in a .npz file are counted before they are batched: the count's error names the
    layout too."""
    rng = np.random.default_rng(2)
    data = {
        "input": rng.normal(size=(6, 64)).astype(np.float32),
        "state": rng.normal(size=state_shape).astype(np.float32),
        "sr": np.array(16000, np.int64),
    }
    if in_a_file:
        np.savez(tmp_path / "vad.npz", **data)
        data = tmp_path / "vad.npz"
    with pytest.raises(OnnxqError, match=r"'state' is \[2, batch, 16\].* new first axis \(N×2×1×16\)"):
        onnxq.quantize(_stateful_model(), data, onnxq.QuantConfig(speed_check=False))


def test_onnxruntime_detail_lines_stay_in_the_one_line_error():
    from onnxq.errors import runtime_detail

    message = (
        "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: state for the "
        "following indices\n index: 0 Got: 1 Expected: 2\n Please fix either the inputs/outputs or the model."
    )
    assert runtime_detail(RuntimeError(message)).endswith("following indices; index: 0 Got: 1 Expected: 2")
    assert runtime_detail(RuntimeError("one line")) == "one line"
    assert runtime_detail(RuntimeError("")) == "RuntimeError"
