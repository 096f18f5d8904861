"""The flags that say how images or uint8 arrays become model input (quantize, eval, bench)."""

from __future__ import annotations

import click

from onnxq.preprocess import Preprocess


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def preprocess_options(command):
    """Options describing how images or uint8 arrays become model input."""
    options = [
        click.option(
            "--preset", type=click.Choice(["imagenet", "cifar10", "none"]), help="Preprocessing recipe."
        ),
        click.option("--resize", type=int, help="Resize the short side of images to this size (bilinear)."),
        click.option("--crop", type=int, help="Centre-crop images to this square size."),
        click.option("--mean", help="Per-channel mean after scaling, e.g. 0.485,0.456,0.406."),
        click.option("--std", help="Per-channel std after scaling, e.g. 0.229,0.224,0.225."),
        click.option("--scale", type=float, help="Multiply pixel values by this first (default 1/255)."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), help="Model input layout."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def build_preprocess(preset, resize, crop, mean, std, scale, layout) -> Preprocess | None:
    """A Preprocess from a preset overridden by explicit flags; None when nothing was given."""
    given = {"resize": resize, "crop": crop, "mean": _floats(mean), "std": _floats(std), "scale": scale}
    given["layout"] = layout
    given = {k: v for k, v in given.items() if v is not None}
    if preset is None and not given:
        return None
    base = Preprocess.preset(preset or "none")
    fields = {f: getattr(base, f) for f in ("resize", "crop", "scale", "mean", "std", "layout")}
    return Preprocess(**{**fields, **given})
