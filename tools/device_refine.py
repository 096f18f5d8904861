"""Refinement of an ImageNet model on a lent GPU machine, scored here on the protocol's splits.

The device machine gets the working tree (at most 64 MiB) and not ../shared, and it has no
onnxsim. So `pack` writes, into a folder git ignores, what a run there needs: the protocol's 256
calibration images, resized and cropped here and stored as lossless WebP (the array rebuilt from
them equals bench.imagenet_split's bit for bit), and the model after onnxq's own simplify pass.
`run` (there) rebuilds the array and runs `onnxq quantize --no-simplify --device cuda` with the
flags given; `score` (here) scores what came back on the evaluation split and on held-out
calibration images.

    .venv/bin/python tools/device_refine.py pack --dir .gpu          # here; /.gpu/ in .git/info/exclude
    python3 tools/device_refine.py run --dir .gpu --out $OUT/q.onnx -- --w-bits 4 --a-bits 4 ...
    .venv/bin/python tools/device_refine.py score /work/.device/N/q.onnx

The middle line is the device call's command, with carry [".gpu"]: an ignored folder travels only
when carried. The packed folder holds about 31 MB; with the working tree it must stay under 64 MiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import onnxq
from onnxq.calib.images import load_image, resized_and_cropped

ROOT = Path(__file__).resolve().parent.parent

MODEL = "mobilenet_v2"
SAMPLES = 256  # bench.LOW_BIT_SAMPLES: the refine rows' calibration images


def cropped_preprocess() -> onnxq.Preprocess:
    """The ImageNet preset without its resize and crop, which the packed images already had."""
    return dataclasses.replace(onnxq.Preprocess.preset("imagenet"), resize=None, crop=None)


def pack(folder: Path) -> None:
    import onnx
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tools"))
    import bench

    from onnxq.passes.simplify import simplify

    pre = onnxq.Preprocess.preset("imagenet")
    root = bench.SHARED / "data/imagenet-sample"
    synsets = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [sorted((root / s).iterdir())[0] for s in synsets][0::2][:SAMPLES]  # imagenet_split's
    (folder / "calib").mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(files):
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        image = resized_and_cropped(image, pre, path)
        image.save(folder / "calib" / f"{index:03d}.webp", lossless=True, quality=100, method=6)
    rebuilt = calibration(folder)
    expected = bench.imagenet_split(SAMPLES).calib
    if not np.array_equal(rebuilt, expected):
        raise SystemExit("the packed images do not rebuild the protocol's calibration array")
    model = onnx.load(bench.model_path(MODEL))
    simplified, note = simplify(model, {model.graph.input[0].name: expected[:2]})
    onnx.save(simplified, folder / f"{MODEL}.onnx")
    print(f"packed {len(files)} images and {MODEL} ({note}) into {folder}")


def calibration(folder: Path) -> np.ndarray:
    files, pre = sorted((folder / "calib").glob("*.webp")), cropped_preprocess()
    return np.stack([load_image(f, pre) for f in files]).astype(np.float32)


def run(folder: Path, out: Path, flags: list[str]) -> int:
    data = Path("/tmp/device_refine_calib.npy")
    np.save(data, calibration(folder))
    command = [sys.executable, "-m", "onnxq", "quantize", str(folder / f"{MODEL}.onnx"), "--calib", str(data)]
    command += ["--no-simplify", "--device", "cuda", "-o", str(out), *flags]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=ROOT, env=environment, check=False).returncode


def score(path: Path) -> None:
    import onnx

    sys.path.insert(0, str(ROOT / "tools"))
    import bench

    model, split = onnx.load(path), bench.imagenet_split()
    reference = bench.logits(onnx.load(bench.model_path(MODEL)), split.x)
    top1, agreement, kl = bench.score(model, split, reference)
    held_x, held_y = bench.held_out_split(MODEL)
    held = float((bench.logits(model, held_x).argmax(1) == held_y).mean())
    scores = f"top-1 {100 * top1:.2f}, agreement {100 * agreement:.2f}, KL {kl:.4f}"
    print(f"{path}: {scores}; held-out calibration images {100 * held:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["pack", "run", "score"])
    parser.add_argument("model", nargs="?", type=Path, help="score: the quantized model")
    parser.add_argument("--dir", type=Path, default=ROOT / ".gpu")
    parser.add_argument("--out", type=Path, help="run: where the quantized model goes")
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1 :] if "--" in argv else []  # run: onnxq quantize's flags
    args = parser.parse_args(argv[: len(argv) - len(flags) - (1 if flags else 0)])
    if args.action == "pack":
        pack(args.dir)
    elif args.action == "run":
        raise SystemExit(run(args.dir, args.out, flags))
    else:
        score(args.model)


if __name__ == "__main__":
    main()
