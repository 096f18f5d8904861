"""How much of a detector's W8A8 output noise sits over letterbox padding rather than the image.

Letterboxed inputs carry large constant regions. Over them every layer's activations are the
same at every position, so each quantizer's rounding error is the same too: errors add up
coherently instead of averaging out, and a change of a scale by a fraction of a percent can move
the output noise there by several dB. The anchors over the padding are background; a detector's
real detections come from the image. For each zoo detector with YOLO-style anchor outputs
(one anchor per cell of strides 8, 16 and 32), `onnxq.quantize` at its defaults (without the
speed check) runs on the zoo's evaluation samples against float, and per output part the SQNR
is reported over all anchors and over the image's anchors only, with the padded anchors' share
of the anchors and of the noise. A cell is padding where every input pixel in it equals the
bottom-right pixel (where the zoo's letterboxes pad). Writes the "zoo-padding" section.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import zoo_bench
from noise_budget import db

STRIDES = (8, 16, 32)


def padded_anchors(images: np.ndarray) -> np.ndarray:
    """(samples, anchors) True where the anchor's whole input cell is the padding value."""
    pad = images[:, :, -1:, -1:]
    constant = np.all(images == pad, axis=1)  # (samples, height, width)
    cells = []
    for stride in STRIDES:
        rows, cols = constant.shape[1] // stride, constant.shape[2] // stride
        cropped = constant[:, : rows * stride, : cols * stride]
        blocks = cropped.reshape(len(images), rows, stride, cols, stride)
        cells.append(blocks.all(axis=(2, 4)).reshape(len(images), -1))
    return np.concatenate(cells, axis=1)


def anchor_first(view: np.ndarray, anchors: int) -> np.ndarray | None:
    """The view as (samples, anchors, values), or None where no axis has one entry per anchor."""
    axes = [axis for axis in range(1, view.ndim) if view.shape[axis] == anchors]
    if view.ndim != 3 or not axes:
        return None
    return np.moveaxis(view, axes[0], 1)


def sqnr(reference: np.ndarray, noise: np.ndarray) -> str:
    return db(float(np.square(noise).sum() / np.square(reference).sum()))


def rows_for(entry: dict) -> list[str]:
    zoo = zoo_bench.zoo_dir()
    name = next(iter(entry["inputs"]))
    with np.load(zoo / entry["eval"]) as archive:
        images = archive[name]
    batch = zoo_bench.zoo_batch(entry, 8)
    float_model = onnx.load(zoo / entry["file"])
    names = [o.name for o in float_model.graph.output]
    quantized = zoo_bench.zoo_quantized_default(entry)
    reference = zoo_bench.zoo_views(entry, names, zoo_bench.zoo_outputs(float_model, {name: images}, batch))
    got = zoo_bench.zoo_views(entry, names, zoo_bench.zoo_outputs(quantized, {name: images}, batch))
    padded = padded_anchors(images)
    rows = []
    for view, values in reference.items():
        wanted, seen = anchor_first(values, padded.shape[1]), anchor_first(got[view], padded.shape[1])
        if wanted is None or "[" not in view:
            continue
        noise = seen - wanted
        share = float(np.square(noise[padded]).sum() / np.square(noise).sum())
        rows.append(
            f"| {entry['name']} | {view} | {100 * padded.mean():.0f} | {sqnr(wanted, noise)} | "
            f"{sqnr(wanted[~padded], noise[~padded])} | {100 * share:.1f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    manifest, names, out = zoo_bench.zoo_command(
        __doc__.splitlines()[0], lambda entry: entry["kind"] == "detector"
    )
    lines = [
        "## Zoo: detector noise over letterbox padding and over the image (issue 13's 30 dB target)",
        "",
        "`tools/padding_noise.py`: each zoo detector with YOLO-style anchor outputs quantized by "
        "`onnxq quantize` at its defaults (`--no-speed-check`), run on all its evaluation samples "
        "(onnxruntime with its graph optimisations, as deployed) against float. An anchor is padded "
        "where its whole input cell (stride 8, 16 or 32) equals the bottom-right pixel, the "
        "letterbox's fill. Over constant padding every quantizer's rounding error repeats at every "
        "position and adds up instead of averaging out; those anchors are background. SQNR in dB. "
        f"Measured at {zoo_bench.source_version()}.",
        "",
        "| model | output part | padded anchors % | SQNR, all anchors | SQNR, image anchors | "
        "padded share of the noise % |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        lines += rows_for(manifest[name])
    bench.write_section(out, "zoo-padding", "\n".join(lines) + "\n", bench.machine_description())


if __name__ == "__main__":
    main()
