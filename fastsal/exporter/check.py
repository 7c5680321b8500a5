"""The check after export: run the ONNX file in ONNX Runtime and compare with fastsal eager.

Tolerances, on ``max|onnx - eager| / max|eager|`` of each output:

* logits: 1e-4 (the graph's forward is the model's, summed in another order);
* DeconvNet maps: 1e-4. Its backward reads nothing of the forward but the max-pool
  switches, so ONNX Runtime and fastsal agree to rounding;
* gradient and Guided maps: 1e-2. Their ReLU masks read the sign of each ReLU input, and
  where an input is within rounding of zero ONNX Runtime's convolutions can flip it; the
  few pixels downstream then differ. The relative L2 error is reported beside it.

A check that was not run says why (no file written, onnxruntime not installed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from fastsal.rules import Rule

LOGITS_TOLERANCE = 1e-4
MAP_TOLERANCE = {Rule.DECONVNET: 1e-4, Rule.GRADIENT: 1e-2, Rule.GUIDED: 1e-2}

INPUT_NAMES = ("image", "target")
OUTPUT_NAMES = ("logits", "saliency")


@dataclass
class ExportCheck:
    """What the check after export found (``ExportedProgram.fastsal_check``)."""

    ran: bool
    passed: Optional[bool] = None  # None when it did not run
    reason: str = ""  # why it did not run, or what failed
    errors: Dict[str, float] = field(default_factory=dict)  # output -> max|Δ| / max|eager|
    rel_l2: Dict[str, float] = field(default_factory=dict)  # output -> ‖Δ‖ / ‖eager‖
    tolerances: Dict[str, float] = field(default_factory=dict)
    batch_size: int = 0

    def __str__(self) -> str:
        if not self.ran:
            return f"ONNX check not run: {self.reason}"
        figures = ", ".join(
            f"{k} {self.errors[k]:.2e} (tolerance {self.tolerances[k]:.0e}, rel. L2 {self.rel_l2[k]:.2e})" for k in self.errors
        )
        verdict = "passed" if self.passed else "FAILED"
        return f"ONNX Runtime vs fastsal eager on the example (batch {self.batch_size}): {verdict}: {figures}"


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def run_onnx(path: str, inputs: Sequence[torch.Tensor], threads: int = 0) -> List[np.ndarray]:
    """The ONNX file's outputs on ``inputs`` (in the graph's input order), on ONNX Runtime's CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = {name: t.detach().cpu().numpy() for name, t in zip(names, inputs)}
    return session.run(None, feed)


def _compare(got: np.ndarray, want: torch.Tensor):
    want = want.detach().cpu().double().numpy()
    got = np.asarray(got, dtype=np.float64)
    if got.shape != want.shape:
        raise ValueError(f"shape {got.shape} from ONNX Runtime, {want.shape} from fastsal")
    diff = np.abs(got - want)
    scale = float(np.abs(want).max()) if want.size else 0.0
    norm = float(np.linalg.norm(want))
    err = float(diff.max() / scale) if scale > 0 else float(diff.max() if diff.size else 0.0)
    rel = float(np.linalg.norm(got - want) / norm) if norm > 0 else float(np.linalg.norm(got - want))
    return err, rel


def check_onnx(path: str, inputs: Sequence[torch.Tensor], eager: Sequence[torch.Tensor], rule: Rule) -> ExportCheck:
    """Run ``path`` on ``inputs`` and compare its (logits, saliency) with fastsal's ``eager`` ones."""
    if not onnxruntime_available():
        return ExportCheck(ran=False, reason="onnxruntime is not installed (pip install 'fastsal[export]')")
    tolerances = {OUTPUT_NAMES[0]: LOGITS_TOLERANCE, OUTPUT_NAMES[1]: MAP_TOLERANCE[rule]}
    check = ExportCheck(ran=True, tolerances=tolerances, batch_size=int(inputs[0].shape[0]))
    outputs = run_onnx(path, inputs)
    failed = []
    for name, got, want in zip(OUTPUT_NAMES, outputs, eager):
        err, rel = _compare(got, want)
        check.errors[name], check.rel_l2[name] = err, rel
        if not err <= tolerances[name]:  # NaN fails too
            failed.append(f"{name}: {err:.2e} > {tolerances[name]:.0e}")
    check.passed = not failed
    check.reason = "; ".join(failed)
    return check


__all__ = ["ExportCheck", "check_onnx", "run_onnx", "onnxruntime_available", "LOGITS_TOLERANCE", "MAP_TOLERANCE",
           "INPUT_NAMES", "OUTPUT_NAMES"]
