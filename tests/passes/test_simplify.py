"""onnxsim's own chatter on standard error stays out of onnxq's output."""

from __future__ import annotations

import os
import sys

import numpy as np

from onnxq.passes import simplify as simplify_pass
from tests.conftest import export, small_cnn


def test_what_onnxsim_writes_to_standard_error_is_not_shown(monkeypatch, capfd):
    """onnxsim's C++ writes "WARNING: failed to run ..." straight to file descriptor 2 for every
    node it cannot fold (102 lines on a torchvision SSD export)."""
    import torch

    model = export(small_cnn(), torch.zeros(1, 3, 16, 16))
    onnxsim = simplify_pass._import_onnxsim()

    def chatty(given, **_):
        os.write(2, b'WARNING: failed to run "Reshape" op, skip...\n')
        return given, True

    monkeypatch.setattr(onnxsim, "simplify", chatty)
    sample = {"input": np.zeros((1, 3, 16, 16), np.float32)}
    simplified, note = simplify_pass.simplify(model, sample)
    print("after", file=sys.stderr)
    captured = capfd.readouterr()
    assert "failed to run" not in captured.err
    assert "after" in captured.err  # standard error works again afterwards
    assert simplified is model and note.startswith("simplified")
