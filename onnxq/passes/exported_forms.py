"""What exporters write in forms the passes cannot read, rewritten before anything else runs.

Each rewrite computes what the exported graph computed; each returns the model itself, with no
note, where it has nothing to do:
- onnxruntime's FusedConv written out as Conv and its activation (contrib.py);
- model-local functions inlined (inline_functions.py);
- CastLike to a known type written as Cast (static_casts.py);
- constant pieces of sequences written as constants (constant_sequences.py);
- Einsum of an activation and a constant that is a matrix product written as MatMul
  (einsum_matmul.py).
"""

from __future__ import annotations

import onnx

from onnxq.passes.constant_sequences import fold_constant_sequences
from onnxq.passes.contrib import standard_ops
from onnxq.passes.einsum_matmul import einsum_to_matmul
from onnxq.passes.inline_functions import inline_functions
from onnxq.passes.static_casts import static_casts

REWRITES = (standard_ops, inline_functions, static_casts, fold_constant_sequences, einsum_to_matmul)


def standard_forms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """`model` with every rewrite applied in order, and their notes."""
    notes = []
    for rewrite in REWRITES:
        model, note = rewrite(model)
        if note:
            notes.append(note)
    return model, notes
