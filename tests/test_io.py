"""Sessions that also return inner tensors: the model they were built from is left as it was."""

from __future__ import annotations

import numpy as np

from onnxq.calib.runner import with_outputs
from onnxq.io import session


def test_a_session_returns_inner_tensors_as_a_copy_with_them_would_and_leaves_the_model_alone(
    small_model, calibration_data
):
    before = small_model.SerializeToString()
    inner = [node.output[0] for node in small_model.graph.node if node.op_type == "Conv"]
    names = [*inner, small_model.graph.output[0].name, inner[0]]  # an output and a repeat too
    feed = {"input": calibration_data[:4]}
    got = session(small_model, outputs=names, optimize=False).run(names, feed)
    want = session(with_outputs(small_model, names), optimize=False).run(names, feed)
    assert small_model.SerializeToString() == before
    assert len(got) == len(names)
    for actual, expected in zip(got, want, strict=True):
        np.testing.assert_array_equal(actual, expected)
