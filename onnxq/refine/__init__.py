"""Rounding refinement: learn weight rounding and activation steps by gradient in a torch mirror.

The stage sits between calibration and Q/DQ insertion. It starts from the calibrated scales and
nearest rounding, reconstructs the model unit by unit (blocks.py, reconstruct.py,
unit_learning.py) and hands back integers and scales in the form insert_qdq writes (export.py),
so the saved model is plain QDQ.
torch is an optional extra: `pip install 'onnxq[refine]'`.
"""

from __future__ import annotations

import importlib.util

from onnxq.errors import OnnxqError

INSTALL_HINT = "pip install 'onnxq[refine]'"


def require_torch() -> None:
    """Stop with one line when torch is missing: only refinement needs it."""
    if importlib.util.find_spec("torch") is None:
        raise OnnxqError(f"--refine needs PyTorch, which is not installed: {INSTALL_HINT}")


def require_refinement(device: str) -> None:
    """torch present and the device usable: checked before calibration, not after it."""
    require_torch()
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise OnnxqError("--device cuda: this torch build or machine has no CUDA device (use --device cpu)")


def refine(*args, **kwargs):
    """See onnxq.refine.export.refine (imported lazily, so `import onnxq` never imports torch)."""
    require_torch()
    from onnxq.refine.export import refine as run

    return run(*args, **kwargs)
