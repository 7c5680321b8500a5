"""fastsal: fast, memory-frugal saliency maps for PyTorch CNNs.

Gradient (Simonyan et al.), DeconvNet (Zeiler & Fergus) and Guided Backpropagation
(Springenberg et al.) as fused Triton kernels behind autograd ops (:mod:`fastsal.ops`).
"""

from fastsal.rules import Rule, as_rule
from fastsal import ops

__version__ = "0.1.0"

__all__ = ["Rule", "as_rule", "ops", "__version__"]
