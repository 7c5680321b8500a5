"""``fastsal.export`` (this package's :func:`export`): a model and a saliency method as one graph,
image → (logits, saliency map), for runtimes that cannot run autograd (ONNX Runtime, TensorRT, Triton Inference Server).

* :mod:`.api` -- :func:`export`, the entry point;
* :mod:`.graph` -- the module ``torch.export`` traces (forward, target, ``autograd.grad``);
* :mod:`.decompositions` -- the two pooling backward ops torch has no decomposition for;
* :mod:`.check` -- the ONNX Runtime run after export, compared with fastsal eager;
* :mod:`.command` -- ``fastsal export`` on the command line.

The ops' export mode (bool masks, pool indices) lives beside the ops, in ``fastsal._export_ops``.
The package is not called ``fastsal.export``: that name is the function, and a package of the
same name would make ``import fastsal.export.check`` fail.
"""

from fastsal.exporter.api import TARGETS, ExportCheckError, export
from fastsal.exporter.check import ExportCheck, check_onnx, run_onnx
from fastsal.exporter.decompositions import decomposition_table
from fastsal.exporter.graph import SaliencyGraph

__all__ = ["export", "ExportCheck", "ExportCheckError", "SaliencyGraph", "check_onnx", "run_onnx",
           "decomposition_table", "TARGETS"]
