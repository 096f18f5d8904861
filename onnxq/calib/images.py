"""Images as a model reads them: decoded by Pillow and preprocessed like torchvision.

A folder of images is calibration (or evaluation) data once each file is decoded to RGB, resized
on its short side (bilinear), centre-cropped, scaled and normalised by a `Preprocess`; a preset
names the usual recipes. Pillow is imported only when an image is read.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from onnxq.errors import OnnxqError
from onnxq.preprocess import Preprocess

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def image_files(folder: Path) -> list[Path]:
    """Every image file under `folder`, in sorted order (the order labels follow)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_image(path: Path, pre: Preprocess) -> np.ndarray:
    """Decode one image with Pillow and preprocess it like torchvision (bilinear resize, centre crop)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise OnnxqError(f"cannot decode image {path}: {err}") from None
    image = resized_and_cropped(image, pre, path)
    array = np.asarray(image, dtype=np.float32) * pre.scale  # H, W, C
    array = normalise(array, pre, axis=-1)
    return array.transpose(2, 0, 1) if pre.layout == "NCHW" else array


def resized_and_cropped(image, pre: Preprocess, path: Path):
    """The Pillow image after `pre`'s resize (short side, bilinear) and centre crop."""
    from PIL import Image

    if pre.resize:
        w, h = image.size
        short = min(w, h)
        size = (pre.resize, int(pre.resize * h / w)) if w == short else (int(pre.resize * w / h), pre.resize)
        image = image.resize(size, Image.BILINEAR)
    if pre.crop:
        w, h = image.size
        if pre.crop > min(w, h):
            raise OnnxqError(f"crop {pre.crop} is larger than image {path} ({w}×{h}); add --resize")
        left, top = round((w - pre.crop) / 2.0), round((h - pre.crop) / 2.0)
        image = image.crop((left, top, left + pre.crop, top + pre.crop))
    return image


def channel_axis(pre: Preprocess) -> int:
    """The channel axis of an image array laid out as `pre` says (batch first)."""
    return 1 if pre.layout == "NCHW" else -1


def normalise(array: np.ndarray, pre: Preprocess, axis: int) -> np.ndarray:
    """(array − mean) / std per channel along `axis`, where `pre` has a mean; its channel count
    must match."""
    if not pre.mean:
        return array
    shape = [1] * array.ndim
    shape[axis] = len(pre.mean)
    if array.shape[axis] != len(pre.mean):
        raise OnnxqError(f"mean/std have {len(pre.mean)} channels but the data has {array.shape[axis]}")
    mean = np.asarray(pre.mean, np.float32).reshape(shape)
    std = np.asarray(pre.std, np.float32).reshape(shape)
    return (array - mean) / std


def fitted_to_input(pre: Preprocess, dims: tuple[int | None, ...], dtype: np.dtype) -> Preprocess:
    """`pre` as a model's image input of shape `dims` and `dtype` needs it: laid out as the shape
    says where that is plain (three or one channels last, and not second: a Keras or tf2onnx
    export's [N, H, W, 3], which images laid out NCHW by default never fit), and, for an integer
    input (uint8 pixels, normalised inside the graph), raw pixels: no scale, no mean and std,
    which cast to uint8 would have left every pixel 0 or 1."""
    if len(dims) == 4 and dims[3] in (1, 3) and dims[1] not in (1, 3):
        pre = replace(pre, layout="NHWC")
    elif len(dims) == 4 and dims[1] in (1, 3) and dims[3] not in (1, 3):
        pre = replace(pre, layout="NCHW")
    if dtype.kind in "ui":
        pre = replace(pre, scale=1.0, mean=(), std=())
    return pre


def square_side(dims: tuple[int | None, ...], pre: Preprocess) -> int | None:
    """The side of the square images a 4-D input with fixed, equal height and width takes."""
    if len(dims) != 4:
        return None
    height, width = dims[1:3] if pre.layout == "NHWC" else dims[2:4]
    return height if height is not None and height == width else None
