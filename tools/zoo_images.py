"""Images for the zoo's calibration and evaluation data: photos, ImageNet crops, letterboxes and
text drawn on them (tools/build_zoo.py).

Photos come from ../shared/data/imagenet-sample where present (calibration: even classes,
evaluation: odd classes), else from the 20 images of models/imagenet20 with seeded random crops
and flips. Text is drawn with Pillow's own font for the OCR models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
SHARED_IMAGES = ROOT.parent / "shared" / "data" / "imagenet-sample"
REPO_IMAGES = ROOT / "models" / "imagenet20"


def _photos(split: str) -> list[tuple[Image.Image, int]]:
    """(image, ImageNet label) for one split: imagenet-sample where present, else models/imagenet20."""
    if SHARED_IMAGES.is_dir():
        synsets = sorted(p.name for p in SHARED_IMAGES.iterdir() if p.is_dir())
        wanted = range(0 if split == "calib" else 1, len(synsets), 2)
        return [(_open(sorted((SHARED_IMAGES / synsets[i]).iterdir())[0]), i) for i in wanted]
    folder = REPO_IMAGES / split
    files = sorted(folder.glob("*.jpg"))
    labels = [int(line) for line in (folder / "labels.txt").read_text().split()]
    return [(_open(f), label) for f, label in zip(files, labels, strict=True)]


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def photos(split: str, count: int, seed: int) -> list[tuple[Image.Image, int]]:
    """`count` images of the split; beyond what exists, seeded random crops and flips of them."""
    base = _photos(split)
    rng = np.random.default_rng(seed)
    chosen = [base[i] for i in rng.permutation(len(base))[:count]]
    while len(chosen) < count:
        image, label = base[int(rng.integers(len(base)))]
        w, h = image.size
        scale = rng.uniform(0.5, 0.9)
        cw, ch = int(w * scale), int(h * scale)
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = image.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        chosen.append((crop, label))
    return chosen


def centre_crop(image: Image.Image, resize: int, crop: int) -> np.ndarray:
    """torchvision's ImageNet recipe: bilinear resize of the short side, centre crop; HWC uint8."""
    w, h = image.size
    s = resize / min(w, h)
    image = image.resize((max(crop, round(w * s)), max(crop, round(h * s))), Image.Resampling.BILINEAR)
    w, h = image.size
    left, top = (w - crop) // 2, (h - crop) // 2
    return np.asarray(image.crop((left, top, left + crop, top + crop)))


def letterbox(image: Image.Image, size: int, fill: int, centred: bool) -> np.ndarray:
    """Fit the long side to `size`, pad the rest with `fill` (centred or at the bottom/right)."""
    w, h = image.size
    r = size / max(w, h)
    resized = image.resize((max(1, round(w * r)), max(1, round(h * r))), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (size, size), (fill, fill, fill))
    offset = ((size - resized.width) // 2, (size - resized.height) // 2) if centred else (0, 0)
    canvas.paste(resized, offset)
    return np.asarray(canvas)


def normalised(hwc: list[np.ndarray], mean, std, *, scale: float = 1 / 255, bgr: bool = False, nhwc=False):
    """uint8 HWC images → float32 N×C×H×W (or N×H×W×C) with (x·scale − mean)/std."""
    x = np.stack(hwc).astype(np.float32)
    if bgr:
        x = x[..., ::-1]
    x = (x * scale - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x if nhwc else x.transpose(0, 3, 1, 2), dtype=np.float32)


TEXT = (
    "onnx quantize integer kernel scale zero point calibration tensor layer channel detector "
    "text line 2024 invoice total 38.50 EUR street 221B Baker open 9-17 exit STOP sale -40% "
    "hello world model paddle torch north south A1B2C3 menu coffee tea 7 days"
)
WORDS = TEXT.split()


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw_text(image: Image.Image, rng: np.random.Generator, lines: int) -> Image.Image:
    """Lines of words in random sizes, colours and places, some on a plain box (signs, labels)."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    w, h = image.size
    for _ in range(lines):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
        size = int(rng.integers(max(10, h // 40), max(12, h // 9)))
        x, y = int(rng.integers(0, max(1, w // 2))), int(rng.integers(0, max(1, h - size)))
        ink = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            box = draw.textbbox((x, y), text, font=font(size))
            paper = tuple(255 - v for v in ink)
            draw.rectangle((box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4), fill=paper)
        draw.text((x, y), text, fill=ink, font=font(size))
    return image


def text_crop(rng: np.random.Generator, background: Image.Image) -> Image.Image:
    """One text line as OCR's recognizers and angle classifiers see it: dark ink on a light strip."""
    text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
    size = int(rng.integers(20, 34))
    left, top, right, bottom = ImageDraw.Draw(background).textbbox((0, 0), text, font=font(size))
    w, h = right - left + 12, bottom - top + 10
    bg = background.resize((max(w, 8), max(h, 8)), Image.Resampling.BILINEAR)
    paper = Image.blend(bg, Image.new("RGB", bg.size, (235, 235, 228)), 0.75)
    ink = tuple(int(v) for v in rng.integers(0, 80, 3))
    ImageDraw.Draw(paper).text((6 - left, 5 - top), text, fill=ink, font=font(size))
    return paper


def document(rng: np.random.Generator, background: Image.Image) -> Image.Image:
    """A page of text lines: dark ink on paper with a faint photo behind it, as document
    orientation classifiers see scans and phone shots of pages."""
    w, h = int(rng.integers(480, 800)), int(rng.integers(640, 1000))
    paper = tuple(int(v) for v in rng.integers(215, 256, 3))
    page = Image.blend(background.convert("RGB").resize((w, h)), Image.new("RGB", (w, h), paper), 0.8)
    draw = ImageDraw.Draw(page)
    size = int(rng.integers(h // 40, h // 18))
    y = int(rng.integers(size, 3 * size))
    while y < h - 2 * size:
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))
        ink = tuple(int(v) for v in rng.integers(0, 90, 3))
        draw.text((int(rng.integers(size, 4 * size)), y), text, fill=ink, font=font(size))
        y += int(size * rng.uniform(1.4, 2.2))
    return page


def pad_line(image: Image.Image, height: int, width: int) -> np.ndarray:
    """PaddleOCR's recognizer/classifier input: resize to `height`, keep the ratio, pad right with 0."""
    w, h = image.size
    new_w = min(width, max(1, round(w * height / h)))
    canvas = np.zeros((height, width, 3), np.uint8)
    canvas[:, :new_w] = np.asarray(image.resize((new_w, height), Image.Resampling.BILINEAR))
    return canvas
