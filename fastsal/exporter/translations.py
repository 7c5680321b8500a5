"""ONNX translations of backward ops that torch's ONNX exporter has none for.

``aten.silu_backward`` and ``aten.mish_backward`` are CompositeImplicitAutograd ops that
``ExportedProgram.run_decompositions`` keeps, so a decomposition cannot replace them; the
exporter takes these ONNX Script builders instead (its ``custom_translation_table``). They
appear where a SiLU or Mish keeps its ordinary gradient, or gets a rule with
``activations="all"``. Imported only when an ONNX file is written (needs onnxscript).
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op


def silu_backward(grad_output, self):
    """``R · σ(f) · (1 + f · (1 - σ(f)))``."""
    s = op.Sigmoid(self)
    one = op.CastLike(1.0, self)
    return op.Mul(grad_output, op.Mul(s, op.Add(one, op.Mul(self, op.Sub(one, s)))))


def mish_backward(grad_output, self):
    """``R · (tanh(softplus(f)) + f · σ(f) · (1 - tanh²(softplus(f))))``."""
    one = op.CastLike(1.0, self)
    t = op.Tanh(op.Softplus(self))
    return op.Mul(grad_output, op.Add(t, op.Mul(op.Mul(self, op.Sigmoid(self)), op.Sub(one, op.Mul(t, t)))))


def translation_table():
    return {torch.ops.aten.silu_backward.default: silu_backward, torch.ops.aten.mish_backward.default: mish_backward}


__all__ = ["translation_table"]
