"""onnxsim, guarded: keep its result only when it computes what the original computes.

onnxsim folds the Shape/Gather/Constant sub-graphs exporters write, which lets later passes see
plain Conv → Relu → Add chains. It has been known to change results (constant folding of
non-deterministic or type-sensitive ops), so its output is compared with the original on a real
batch through onnxruntime without optimizations, and dropped with a note when they differ.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import onnx

from onnxq.io import session

TOLERANCE = 1e-4  # max |difference| relative to the largest output magnitude


def simplify(
    model: onnx.ModelProto, sample: dict[str, np.ndarray], expected: list[np.ndarray] | None = None
) -> tuple[onnx.ModelProto, str]:
    """Return (model, note): the simplified model when it is equivalent on `sample`, else the input.
    `expected`: the model's outputs on `sample` where the caller has run it already."""
    try:
        onnxsim = _import_onnxsim()
        # BatchNormalization is left to fold_bn, which keeps its statistics
        with _quiet_stderr():
            simplified, checked = onnxsim.simplify(model, skip_fuse_bn=True)
    except Exception as err:  # onnxsim surfaces C++ errors of many types
        return model, f"onnxsim failed ({str(err).splitlines()[0][:120]}); kept the model as is"
    if not checked:
        return model, "onnxsim could not verify its result; kept the model as is"
    try:
        if expected is None:
            expected = session(model, optimize=False).run(None, sample)
    except Exception as err:  # onnxruntime's Fail on shapes the sample does not fit
        return (
            model,
            "kept the model as is: onnxsim's result could not be checked, as the model does not "
            f"run on the check's sample ({_failure(err)})",
        )
    difference = relative_difference(expected, session(simplified, optimize=False).run(None, sample))
    if difference > TOLERANCE:
        return (
            model,
            f"onnxsim changed the outputs by {difference:.2e} (relative); kept the model as is",
        )
    before, after = len(model.graph.node), len(simplified.graph.node)
    return simplified, f"simplified: {before} → {after} nodes"


def _failure(err: Exception) -> str:
    """Which node onnxruntime failed in, from its message ("... while running Reshape node.
    Name:'p2o.Reshape.79' Status Message: /onnxruntime_src/..."), else the message's start."""
    found = re.search(r"running (\w+) node\. Name:'([^']*)'", str(err))
    if found:
        return f"its {found.group(1)} node {found.group(2)!r} fails on the sample's sizes"
    return str(err).splitlines()[0][:160] if str(err) else type(err).__name__


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Standard error at the file-descriptor level sent nowhere: onnxsim's C++ constant folding
    writes a "WARNING: failed to run ..." line to it for every node whose inputs are only known
    at run time (102 lines on a torchvision SSD export), which it then leaves as it was."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _import_onnxsim() -> ModuleType:
    """onnxsim, imported without torch. onnxsim 0.8 tries `import torch` when it is imported, for
    an optional PPQ integration onnxq never calls; where torch is installed (onnxq[refine]) that
    took 2 s and 190 MB of every run (`import onnxsim`: 3.6-4.0 s against 1.7-1.9 s, 311 against
    122 MB). torch is hidden for that one import, unless something imported it already."""
    if "onnxsim" in sys.modules or "torch" in sys.modules:
        import onnxsim

        return onnxsim
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        import onnxsim
    finally:
        del sys.modules["torch"]
    return onnxsim


def max_relative_difference(
    reference: onnx.ModelProto, candidate: onnx.ModelProto, sample: dict[str, np.ndarray]
) -> float:
    """Largest output difference over the largest reference magnitude, without ORT's rewrites."""
    expected = session(reference, optimize=False).run(None, sample)
    return relative_difference(expected, session(candidate, optimize=False).run(None, sample))


def relative_difference(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """Largest difference of `actual` from `expected`, output by output, over that output's
    largest magnitude; infinite where shapes differ."""
    worst = 0.0
    for want, got in zip(expected, actual, strict=False):
        if want.shape != got.shape:
            return float("inf")
        scale = max(float(np.abs(want).max(initial=0.0)), 1e-12)
        worst = max(worst, float(np.abs(want.astype(np.float64) - got).max(initial=0.0)) / scale)
    return worst
