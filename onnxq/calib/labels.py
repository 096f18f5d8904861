"""Labels for `onnxq eval`: a file of them, or what an image folder's layout implies."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onnxq.calib.disk_arrays import UNREADABLE
from onnxq.calib.images import image_files
from onnxq.errors import OnnxqError

LABEL_KEYS = ("y", "label", "labels")


def load_labels(path: str | Path) -> np.ndarray:
    """Integer labels from .npy, .txt (one per line) or .npz (key y / label / labels)."""
    path = Path(path)
    if not path.is_file():
        raise OnnxqError(f"labels file not found: {path}")
    try:
        if path.suffix == ".txt":
            return np.array([int(line.split()[-1]) for line in path.read_text().split("\n") if line.strip()])
        if path.suffix == ".npz":
            with np.load(path) as archive:
                key = next((k for k in LABEL_KEYS if k in archive.files), None)
                if key is None:
                    raise OnnxqError(f"{path} has no labels array (looked for {', '.join(LABEL_KEYS)})")
                return np.asarray(archive[key]).astype(np.int64).ravel()
        return np.load(path).astype(np.int64).ravel()
    except UNREADABLE as err:
        raise OnnxqError(f"cannot read labels from {path}: {err}") from None


def folder_labels(folder: str | Path) -> np.ndarray | None:
    """Labels implied by an image folder: class subfolders in sorted order, or labels.txt."""
    folder = Path(folder)
    if (folder / "labels.txt").is_file():
        return load_labels(folder / "labels.txt")
    files = image_files(folder)
    if not files or all(f.parent == folder for f in files):
        return None
    classes = sorted({f.parent.name for f in files})
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[f.parent.name] for f in files], dtype=np.int64)
