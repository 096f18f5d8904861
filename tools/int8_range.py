"""How 8-bit weights should be stored on this machine: reduced, unsigned, or full int8.

On x86 CPUs without VNNI onnxruntime's u8×s8 GEMM kernels saturate with full-range int8 weights,
so `--int8-range auto` needs another form there: reduced (a 7-bit range, [-63, 63], for the layers
on those kernels; depthwise convolutions and ConvTranspose keep the full range where their own
kernels are exact), or
the full range stored as uint8 around zero point 128 (u8×u8 kernels: exact, but slower). Each zoo
model with weights is quantized at the default W8A8 with each form and scored against float on
its evaluation samples (worst output cosine / SQNR, top-1 where labelled), and timed at batch 1
beside float in one interleaved run. Full int8 is there to show what saturation does on a CPU
without VNNI (on one with VNNI it is the fastest exact form). Writes the "int8-range" section.

    .venv/bin/python tools/int8_range.py [--models yolov8n_nudenet ...] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
import zoo_bench

FORMS = [
    ("reduced", ["--int8-range", "reduced"]),
    ("unsigned", ["--int8-range", "unsigned"]),
    ("full int8", ["--int8-range", "full"]),
]


def cells(row: zoo_bench.ZooRow, float_row: zoo_bench.ZooRow) -> tuple[str, str]:
    """(worst cosine / SQNR and top-1 Δ where labelled, latency in ms) of one form."""
    if row.error:
        return f"failed: {row.error[:60]}", ""
    cosine = min(c for c, _ in row.fidelity.values())
    sqnr = min(s for _, s in row.fidelity.values())
    text = f"{cosine:.5f} / {sqnr:.1f}"
    if row.top1 is not None and float_row.top1 is not None:
        text += f" ({100 * (row.top1 - float_row.top1):+.1f})"
    return text, f"{row.latency_ms:.2f}"


def main() -> None:
    zoo = zoo_bench.zoo_dir()
    manifest, names, out = zoo_bench.zoo_command(
        __doc__.splitlines()[0],
        lambda entry: zoo_bench.has_weights(onnx.load(zoo / entry["file"], load_external_data=False)),
    )
    # The speed check stays off: where it leaves a model float (ppocr_det_v4 on an AVX2 EPYC
    # without VNNI at 37b0d93), every form would read as float and could not be compared.
    labels = [(f"onnxq W8A8, {form} weights", [*flags, "--no-speed-check"]) for form, flags in FORMS]
    lines = [
        "## 8-bit weights on a CPU without VNNI: reduced, unsigned, full int8 (tools/int8_range.py)",
        "",
        "Each zoo model with weights at the default W8A8, its 8-bit weights stored three ways: reduced "
        "(a 7-bit range, [-63, 63], except depthwise convolutions and ConvTranspose, whose kernels do "
        "not saturate), "
        "the full range as uint8 around zero point 128 (onnxruntime's u8×u8 "
        "kernels), and full int8 (u8×s8 kernels, which saturate on x86 without VNNI). Worst cosine / "
        "SQNR dB over the outputs and output parts on the evaluation samples (top-1 Δ where "
        "labelled); batch-1 ms on 2 threads, float and the three forms timed side by side. The "
        "speed check is off (`--no-speed-check`), so that every form is quantized even where the "
        "default would keep a model float on this CPU.",
        "",
        "| model | "
        + " | ".join(f"{form}: worst cos / SQNR" for form, _ in FORMS)
        + " | float ms | "
        + " | ".join(f"{form} ms" for form, _ in FORMS)
        + " |",
        "| --- |" + " ---: |" * (2 * len(FORMS) + 1),
    ]
    for name in names:
        print(name, flush=True)
        rows = zoo_bench.zoo_measure(manifest[name], settings=labels, peer=False)
        by = {row.setting: row for row in rows}
        scored = [cells(by[label], by["float"]) for label, _ in labels]
        lines.append(
            f"| {name} | "
            + " | ".join(text for text, _ in scored)
            + f" | {by['float'].latency_ms:.2f} | "
            + " | ".join(ms for _, ms in scored)
            + " |"
        )
    bench.write_section(out, "int8-range", "\n".join(lines) + "\n", bench.machine_description())
    print("wrote int8-range to", out)


if __name__ == "__main__":
    main()
