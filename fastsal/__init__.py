"""fastsal: fast, memory-frugal saliency maps for PyTorch CNNs.

Gradient (Simonyan et al.), DeconvNet (Zeiler & Fergus) and Guided Backpropagation
(Springenberg et al.) as fused Triton kernels behind autograd ops (:mod:`fastsal.ops`).
"""

from fastsal.rules import Rule, as_rule
from fastsal import ops
from fastsal.rewrite import RewriteReport, rewrite
from fastsal.api import *  # noqa: F401,F403  Captum-compatible classes, saliency, Explainer, visualize_feature, viz

from fastsal.jobs.store import Record, Results, load_results

from fastsal.exporter import export  # noqa: E402  fastsal.export(model, method, example): image -> (logits, map) graph

__version__ = "0.1.0"

__all__ = ["Rule", "as_rule", "ops", "rewrite", "RewriteReport", "load_results", "Results", "Record", "export", "__version__"]
__all__ += api.__all__  # noqa: F405  (the submodule fastsal.api, bound by the import above)
