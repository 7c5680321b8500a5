"""``fastsal.export``: a model and a saliency method as one graph, image → (logits, saliency map).

The graph holds the forward and the rule's backward (the ops' export mode: bool masks,
torch's pool indices, transposed convolutions), so runtimes that cannot run autograd (ONNX
Runtime, TensorRT, Triton Inference Server) compute the maps.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from fastsal.exporter.check import INPUT_NAMES, OUTPUT_NAMES, ExportCheck, check_onnx
from fastsal.exporter.decompositions import decomposition_table
from fastsal.exporter.graph import SaliencyGraph
from fastsal.reductions import Reduction, get_reduction
from fastsal.rewrite import rewrite
from fastsal.rules import RuleLike, as_rule

TARGETS = ("predicted", "input")
CHECKS = ("error", "warn", "skip")
MIN_OPSET = 18  # torch's ONNX exporter starts there; ScatterElements' reduction="add" needs 16


class ExportCheckError(RuntimeError):
    """The exported file's results differ from fastsal's eager ones beyond the tolerance."""


def _check_options(target, dynamic_batch, dynamic_size, opset, check, path) -> None:
    if target not in TARGETS:
        raise ValueError(
            f"target must be 'predicted' (the graph takes the image and explains its argmax) or 'input' (it also "
            f"takes one class index per image), got {target!r}"
        )
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch must be True or False, got {dynamic_batch!r}")
    if dynamic_size:
        raise ValueError(
            "a dynamic image height and width cannot be exported: the transposed convolutions that undo strided "
            "convolutions take their output padding, and the unpools their sizes, from the example image, so the "
            "graph is made for one image size. Export once per size you serve (the batch size may vary)"
        )
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET):
        raise ValueError(f"opset must be None (torch's default) or an int >= {MIN_OPSET}, got {opset!r}")
    if check not in CHECKS:
        raise ValueError(f"check must be one of {', '.join(map(repr, CHECKS))}, got {check!r}")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or os.PathLike) or None, got {type(path).__name__}")


def _split_inputs(example_inputs, target: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    given = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    want = 2 if target == "input" else 1
    if len(given) != want:
        shape = "(image, target)" if want == 2 else "image (or (image,))"
        raise ValueError(
            f"with target={target!r} example_inputs must be {shape}, got {len(given)} item(s)"
            + ("; target='input' graphs take a class index per image as their second input" if want == 2 else
               "; pass target='input' for a graph that takes the classes to explain")
        )
    image = given[0]
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or not image.dtype.is_floating_point:
        what = f"a {image.dim()}-D {image.dtype} tensor" if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"the example image must be a 4-D floating-point tensor (N, C, H, W), got {what}")
    if image.shape[0] < 1:
        raise ValueError("the example image batch is empty; give at least one image")
    if not bool(torch.isfinite(image).all()):
        raise ValueError("the example image holds NaN or Inf values; give a real image (or random values)")
    classes = None
    if want == 2:
        classes = torch.as_tensor(given[1], device=image.device)
        if classes.dtype.is_floating_point or classes.dtype == torch.bool or classes.dim() > 1:
            raise ValueError(f"the example target must be integer class indices, one per image, got {given[1]!r}")
        classes = classes.reshape(-1).to(torch.int64)
        if classes.numel() == 1 and image.shape[0] > 1:
            classes = classes.expand(image.shape[0]).clone()
        if classes.numel() != image.shape[0]:
            raise ValueError(f"the example target has {classes.numel()} class indices for {image.shape[0]} images")
    return image, classes


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastsal.export expects a torch.nn.Module, got {type(model).__name__}")
    training = [name or "<root>" for name, m in model.named_modules() if m.training and (
        isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)))]
    if training:
        raise ValueError(
            f"the model is in training mode ({', '.join(training[:3])}{', ...' if len(training) > 3 else ''}): an "
            "exported graph would use batch statistics or random dropout; call model.eval() first"
        )


def _need_onnx() -> None:
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"writing an ONNX file needs {' and '.join(missing)}: pip install 'fastsal[export]' "
            "(or call fastsal.export without path= for the torch.export program alone)"
        )


def _trace(graph: SaliencyGraph, args: tuple, dynamic_batch: bool):
    """``torch.export`` of the graph; with a dynamic batch, traced at batch >= 2 (torch would
    fix a batch of 1) and checked to stay free."""
    if dynamic_batch and args[0].shape[0] == 1:
        args = tuple(a.expand(2, *a.shape[1:]).clone() for a in args)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} for _ in args)
    try:
        with torch.inference_mode(False):
            program = torch.export.export(graph, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as err:  # torch raises UserError (constraint violation) from several layers
        if "fake tensor in the exported program constant" in str(err):
            raise ValueError(
                "torch.export cannot trace this model's backward: an op whose backward reuses its own output "
                "(torch.sigmoid, torch.tanh, e.g. a squeeze-excitation gate) keeps its ordinary gradient here, and "
                "torch.export fails on that inside the graph. Models with such gates cannot be exported yet"
            ) from err
        if dynamic_batch and "Constraints violated (batch)" in str(err):
            raise ValueError(
                "the model fixes its batch size (its forward specializes dimension 0, e.g. x.view(8, -1)): export "
                "with dynamic_batch=False, or use x.flatten(1) / x.view(x.shape[0], -1) in the model"
            ) from err
        raise
    return program.run_decompositions(decomposition_table()), args


def export(
    model: nn.Module,
    method: RuleLike,
    example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
    *,
    target: str = "predicted",
    reduce: Reduction = "abs_max",
    dynamic_batch: bool = True,
    path: Optional[Union[str, os.PathLike]] = None,
    opset: Optional[int] = None,
    strict: bool = False,
    activations: str = "relu",
    check: str = "error",
    dynamic_size: bool = False,
):
    """Export ``model`` and a saliency ``method`` as one graph: image → (logits, saliency map).

    Args:
        model: an ``nn.Module`` in eval mode returning logits ``(N, C)``; it is not modified.
        method: ``"gradient"``, ``"deconvnet"`` or ``"guided"``.
        example_inputs: the image ``(N, C, H, W)``; with ``target="input"``, ``(image, classes)``
            with one class index per image. The graph is made for this height and width.
        target: ``"predicted"``: the graph takes the image only and explains each image's argmax
            (the class is ``argmax(logits)``); ``"input"``: it takes an int64 class index per image
            as a second input, ``target`` (picked by comparison: an index outside ``0..C-1`` gives
            an all-zero map, since a graph cannot raise).
        reduce: ``"abs_max"`` (``max_c |g_c|``: maps ``(N, H, W)``), another name of
            :data:`fastsal.reductions.REDUCTIONS`, or None for the raw gradient ``(N, C, H, W)``;
            it runs in the graph.
        dynamic_batch: whether the batch size of the graph's inputs may vary (an example of one
            image is fine). Height and width are fixed; ``dynamic_size=True`` raises.
        path: where to write the ``.onnx`` file (inputs ``image`` [, ``target``], outputs ``logits``,
            ``saliency``); None writes nothing. Needs ``onnx`` and ``onnxscript``.
        opset: the ONNX opset (>= 18); None for torch's default.
        strict: raise, as :func:`fastsal.rewrite` does, instead of leaving a ReLU-like site with its
            ordinary gradient (functional sites are checked as the example runs).
        activations: which activations get the rule, as for :func:`fastsal.rewrite`: ``"relu"`` (the
            ReLU family) or ``"all"`` (also SiLU, GELU, ...).
        check: with ``path``, when onnxruntime is installed, the file is run on the example and its
            outputs compared with fastsal's eager ones (tolerances in :mod:`fastsal.exporter.check`):
            ``"error"`` raises :class:`ExportCheckError` on a mismatch (the file is kept, for
            inspection), ``"warn"`` warns, ``"skip"`` does not run it.

    Returns:
        The ``torch.export.ExportedProgram`` (core ATen, fastsal's decompositions applied) with
        ``fastsal_check`` (an :class:`ExportCheck`: ran, passed, errors, tolerances),
        ``fastsal_report`` (the rewrite report) and ``fastsal_path`` attributes.

    Limits: a fixed image size; inside the graph masks take 1 byte per element and pool
    indices 8 (not fastsal's bits and int8 switches); an in-place ReLU is computed out of place.
    """
    _check_model(model)
    rule = as_rule(method)
    _check_options(target, dynamic_batch, dynamic_size, opset, check, path)
    reduce_fn = get_reduction(reduce)
    image, classes = _split_inputs(example_inputs, target)
    if path is not None:
        _need_onnx()

    with torch.inference_mode(False), torch.no_grad():  # as fastsal's twin cache: folded weights need no graph
        twin = rewrite(model, rule, strict=strict, activations=activations)
    graph = SaliencyGraph(twin, reduce_fn, given_target=target == "input").eval()
    args = (image,) if classes is None else (image, classes)

    # the eager pass first: it checks the model's output and the classes, raises for strict
    # functional sites, and is the reference for the check after export
    with torch.inference_mode(False):
        with torch.enable_grad():
            logits = twin(image.detach().requires_grad_(True))
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"fastsal.export needs a model that returns logits of shape (N, C); it returned {shape}")
        if classes is not None and bool(((classes < 0) | (classes >= logits.shape[1])).any()):
            n = logits.shape[1]
            raise ValueError(f"example target {classes.tolist()} out of range for {n} classes (0..{n - 1})")
        eager = graph(*args)

    program, traced_args = _trace(graph, args, dynamic_batch)
    result = ExportCheck(ran=False, reason="no path given: no ONNX file was written")
    if path is not None:
        path = os.fspath(path)
        _write_onnx(program, traced_args, path, len(args), opset)
        if check == "skip":
            result = ExportCheck(ran=False, reason="check='skip'")
        else:
            result = check_onnx(path, args, eager, rule)
            if result.ran and not result.passed:
                message = f"{result}. The file {path} is kept for inspection"
                if check == "error":
                    raise ExportCheckError(message)
                warnings.warn(message, RuntimeWarning, stacklevel=2)
    program.fastsal_check = result
    program.fastsal_report = twin.fastsal_report
    program.fastsal_path = path
    return program


def _write_onnx(program, args: tuple, path: str, n_inputs: int, opset: Optional[int]) -> None:
    from fastsal.exporter.translations import translation_table

    kwargs = {} if opset is None else {"opset_version": opset}
    try:
        onnx_program = torch.onnx.export(
            program, args, dynamo=True, input_names=list(INPUT_NAMES[:n_inputs]), output_names=list(OUTPUT_NAMES),
            verbose=False, custom_translation_table=translation_table(), **kwargs,
        )
    except Exception as err:
        missing = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)'", str(err))
        if missing is None:
            raise
        raise ValueError(
            f"the saliency graph holds {missing.group(1)}, which torch's ONNX exporter cannot translate; "
            "call fastsal.export without path= for the torch.export program, or replace that layer"
        ) from err
    # the flipped weights of the backward's convolutions are constants: fold them into weights
    # (up to the largest convolution weight's size), so runtimes see Conv with constant weights,
    # which they prepack (ONNX Runtime's fast NCHWc kernels need that)
    from onnxscript.optimizer import fold_constants

    largest = max((int(t.numel()) for t in program.state_dict.values() if t.dim() == 4), default=0)
    if largest:
        fold_constants(onnx_program.model, input_size_limit=largest, output_size_limit=largest)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # one self-contained file below protobuf's 2 GB limit (what Triton and most tools expect)
    onnx_program.save(path, external_data=None)


__all__ = ["export", "ExportCheckError", "TARGETS"]
