"""Which compute kernels onnxruntime runs for a model after its own graph optimizations.

A QDQ layer runs on an integer kernel only where onnxruntime fuses its DequantizeLinear →
op → QuantizeLinear into QLinearConv, QGemm and the like; elsewhere it runs the float op
between Q/DQ round trips ("simulated"), which costs fidelity and buys no speed.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass

import onnx

from onnxq.io import session

INTEGER_OPS = (
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "ConvInteger",
    "MatMulInteger",
    "MatMulIntegerToFloat",
)
FLOAT_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul")


@dataclass(frozen=True)
class Kernels:
    """Compute layers onnxruntime runs on integer and on float kernels, and its Q/DQ left over."""

    integer: int
    floating: int
    dequantizers: int

    def summary(self) -> str:
        """One line for reports: integer, mixed, float, or float simulated through Q/DQ."""
        if self.integer and not self.floating:
            return f"integer ({self.integer} layers)"
        if self.integer:
            return f"mixed ({self.integer} integer, {self.floating} float layers)"
        return "float" if not self.dequantizers else f"float, simulated ({self.floating} layers)"


def count_kernels(model: onnx.ModelProto) -> Kernels:
    """The kernels of `model` as onnxruntime's CPU provider optimizes it at its default level."""
    with tempfile.TemporaryDirectory() as folder:
        optimized = os.path.join(folder, "optimized.onnx")
        session(model, optimized_path=optimized)
        # the node types only: a model whose session read its weights from a temporary file
        # (onnxq.io.session) is written referring to that file, gone once the session is made
        graph = onnx.load(optimized, load_external_data=False).graph
        counts = Counter(n.op_type for n in graph.node)
    return Kernels(
        integer=sum(counts[op] for op in INTEGER_OPS),
        floating=sum(counts[op] for op in FLOAT_COMPUTE_OPS),
        dequantizers=counts["DequantizeLinear"],
    )
