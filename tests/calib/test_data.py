"""Every data source yields checked batches; bad data is refused with a message naming it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from onnxq.calib.data import InputSpec, batches, folder_labels, load_labels, peek_samples
from onnxq.calib.sample_axes import sequence_first
from onnxq.config import Preprocess
from onnxq.errors import OnnxqError

SPEC = [InputSpec("input", np.dtype(np.float32), (None, 3, 8, 8))]


def collect(source, **kwargs):
    return list(batches(source, SPEC, **kwargs))


def test_arrays_are_batched_and_limited():
    data = np.zeros((20, 3, 8, 8), np.float32)
    out = collect(data, batch_size=8, max_samples=18)
    assert [len(b["input"]) for b in out] == [8, 8, 2]


def test_npz_by_input_name_or_single_array(tmp_path):
    np.savez(tmp_path / "named.npz", input=np.ones((4, 3, 8, 8), np.float32))
    np.savez(tmp_path / "xy.npz", x=np.ones((4, 3, 8, 8), np.uint8), y=np.arange(4))
    assert collect(tmp_path / "named.npz")[0]["input"].shape == (4, 3, 8, 8)
    converted = collect(tmp_path / "xy.npz", preprocess=Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3))
    np.testing.assert_allclose(converted[0]["input"], (1 / 255 - 0.5) / 0.5, rtol=1e-6)
    np.testing.assert_array_equal(load_labels(tmp_path / "xy.npz"), np.arange(4))


def test_calibration_data_reader_of_onnxruntime():
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": np.ones((1, 3, 8, 8), np.float32)}] * 5)

        def get_next(self):
            return next(self.items, None)

    assert [len(b["input"]) for b in collect(Reader(), batch_size=2)] == [2, 2, 1]


def test_image_folder_with_class_subfolders(tmp_path):
    for cls, color in (("a_cat", 10), ("b_dog", 200)):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (12, 10), (color, color, color)).save(tmp_path / cls / "img.png")
    pre = Preprocess(resize=9, crop=8)
    (batch,) = collect(tmp_path, preprocess=pre, batch_size=4)
    assert batch["input"].shape == (2, 3, 8, 8)
    np.testing.assert_allclose(batch["input"][1], 200 / 255, rtol=1e-6)
    np.testing.assert_array_equal(folder_labels(tmp_path), [0, 1])


@pytest.mark.parametrize(
    ("shape", "dtype", "layout", "expected"),
    [
        ((None, 8, 8, 3), np.float32, "NHWC", 200 / 255),  # a Keras export: channels last
        ((None, 3, 8, 8), np.float32, "NCHW", 200 / 255),
        ((None, 8, 8, 3), np.uint8, "NHWC", 200),  # uint8 pixels, normalised in the graph
        ((None, 8, 8, 8), np.float32, "NCHW", None),  # no plain layout: as given (NCHW by default)
    ],
)
def test_images_are_laid_out_and_scaled_as_the_models_input_says(tmp_path, shape, dtype, layout, expected):
    """Before, images came NCHW whatever the model's shape said, and a uint8 input got the
    images scaled to 0..1 and cast: every pixel 0 or 1."""
    Image.new("RGB", (12, 10), (200, 200, 200)).save(tmp_path / "img.png")
    spec = [InputSpec("input", np.dtype(dtype), shape)]
    pre = Preprocess(resize=9, crop=8, mean=(0.5,) * 3, std=(0.25,) * 3) if dtype == np.uint8 else None
    pre = pre or Preprocess(resize=9, crop=8)
    if expected is None:
        with pytest.raises(OnnxqError, match="has shape"):
            list(batches(tmp_path, spec, preprocess=pre))
        return
    (batch,) = batches(tmp_path, spec, preprocess=pre)
    image = batch["input"]
    assert image.dtype == dtype
    assert image.shape == ((1, 8, 8, 3) if layout == "NHWC" else (1, 3, 8, 8))
    np.testing.assert_allclose(image, expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.zeros((2, 3, 9, 8), np.float32), "has shape [2, 3, 9, 8], the model expects ?×3×8×8"),
        (np.zeros((2, 3, 8, 8), np.int64), "is int64, the model expects float32"),
        (np.zeros((2, 3, 8, 8), np.uint8), "--preset"),
        (np.full((2, 3, 8, 8), np.nan, np.float32), "NaN"),
        (np.zeros((0, 3, 8, 8), np.float32), "no samples"),
    ],
)
def test_bad_arrays_are_refused(data, message):
    with pytest.raises(OnnxqError, match=None) as err:
        collect(data)
    assert message in str(err.value)


def test_float64_data_is_taken_as_the_models_float32():
    """numpy's default float64 (np.random.rand) is what a user most often saves."""
    data = np.random.default_rng(0).random((3, 3, 8, 8))
    (batch,) = collect(data, batch_size=4)
    assert batch["input"].dtype == np.float32
    np.testing.assert_array_equal(batch["input"], data.astype(np.float32))


def test_inputs_with_different_sample_counts_are_refused(tmp_path):
    """Samples pair up across inputs: 8 of one and 6 of the other cannot be calibrated on (the
    extra 2 were dropped without a word)."""
    from onnx import TensorProto, helper

    from onnxq.calib.data import batches, model_inputs

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    inputs = model_inputs(helper.make_model(graph))
    path = tmp_path / "pairs.npz"
    np.savez(path, a=np.ones((8, 4), np.float32), b=np.ones((6, 4), np.float32))
    with pytest.raises(OnnxqError, match=r"different numbers of samples \('a' 8, 'b' 6\)"):
        list(batches(path, inputs))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(OnnxqError, match="not found"):
        collect(tmp_path / "missing.npy")
    (tmp_path / "bad.npy").write_text("not numpy")
    with pytest.raises(OnnxqError, match="cannot read"):
        collect(tmp_path / "bad.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OnnxqError, match="no images"):
        collect(tmp_path / "empty")


def test_a_batch_dimension_written_as_minus_one_is_free():
    """paddle2onnx writes dynamic sizes as -1: they fix nothing."""
    import onnx
    from onnx import TensorProto, helper

    from onnxq.calib.data import model_inputs

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 0, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    (spec,) = model_inputs(helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    assert spec.shape == (None, 3, None, 8)


def test_samples_stacked_for_a_model_without_a_batch_axis_are_refused_with_the_reason():
    """A model taking one [3, 8, 8] image per run (as torchvision's detectors export)."""
    spec = [InputSpec("image", np.dtype(np.float32), (3, 8, 8))]
    with pytest.raises(OnnxqError) as err:
        list(batches(np.zeros((5, 3, 8, 8), np.float32), spec))
    assert "without a batch axis (3×8×8)" in str(err.value)


def test_a_scalar_model_input_is_refused_with_the_reason_and_a_shapeless_one_is_not():
    import onnx
    from onnx import TensorProto, helper

    from onnxq.calib.data import model_inputs

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "threshold"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3]),
            helper.make_tensor_value_info("threshold", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    specs = model_inputs(helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    data = {"x": np.ones((4, 3), np.float32), "threshold": np.float32(0.5)}
    with pytest.raises(OnnxqError, match="model input 'threshold' is a scalar"):
        list(batches(data, specs))
    shapeless = InputSpec("x", np.dtype(np.float32), ())
    assert len(list(batches(np.ones((4, 3), np.float32), [shapeless]))) == 1


def test_peeked_samples_stay_in_the_stream_and_respect_the_byte_cap():
    chunks = [{"input": np.full((4, 2), float(i), np.float32)} for i in range(5)]
    peeked, stream = peek_samples(iter(chunks), 10)
    assert len(peeked) == 3  # 12 samples: the first batches holding at least 10
    assert [float(batch["input"][0, 0]) for batch in stream] == [0, 1, 2, 3, 4]
    peeked, _ = peek_samples(iter(chunks), 10, max_bytes=40)  # one batch is 32 bytes
    assert len(peeked) == 2
    peeked, stream = peek_samples(iter(chunks[:1]), 10)
    assert len(peeked) == 1 and len(list(stream)) == 1


@pytest.mark.parametrize(
    ("shape", "sequence"),
    [
        ((12, None, 8), True),  # an LSTM export: 12 time steps, then the batch
        ((1, 3, None, None), False),  # a fixed batch of 1 before free spatial axes
        ((None, 3, 224, 224), False),
        ((4, 3, None, None), False),
        ((12,), False),
    ],
)
def test_only_a_fixed_first_axis_before_a_free_one_is_taken_for_time_steps(shape, sequence):
    spec = [InputSpec("x", np.dtype(np.float32), shape)]
    assert (sequence_first(spec) is not None) is sequence


@pytest.mark.parametrize(
    ("shape", "preset", "hint"),
    [
        ((None, 3, 8, 8), None, "the model takes 8×8 images: add --resize 8 --crop 8)"),
        ((None, 3, 224, 224), None, "the model takes 224×224 images: add --preset imagenet, or --resize 224"),
        ((None, 96, 96, 3), "imagenet", "the model takes 96×96 images: add --resize 96 --crop 96)"),
    ],
)
def test_images_of_the_wrong_size_get_the_flags_that_fit_the_model(tmp_path, shape, preset, hint):
    Image.new("RGB", (300, 260), (9, 9, 9)).save(tmp_path / "img.png")
    spec = [InputSpec("input", np.dtype(np.float32), shape)]
    with pytest.raises(OnnxqError) as err:
        list(batches(tmp_path, spec, preprocess=Preprocess.preset(preset) if preset else None))
    assert hint in str(err.value)


def test_a_free_image_size_gets_the_general_hint(tmp_path):
    from onnxq.calib.data import _image_hint

    free = [InputSpec("input", np.dtype(np.float32), (None, 3, None, None))]
    assert "images are used at their own size: add --preset imagenet" in _image_hint(tmp_path, None, free)
    assert _image_hint(tmp_path, Preprocess.preset("imagenet"), free) == ""
