"""What a rewrite changed, what it left alone and why.

Module sites are known when the model is rewritten. Functional call sites (``F.relu`` inside
a ``forward``) only show up when the model runs, so the rewritten model adds them here on
each eager forward; ``str(report)`` says how many forwards it has seen.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from fastsal.rules import Rule

# what a site is, for the summary lines
RELU_LIKE = "relu-like"  # zeroes negatives like ReLU but has no saliency rule here: strict mode refuses it
NO_RULE = "no rule"  # an activation that gets no rule (SiLU, GELU, ... unless activations="all"; gates)
KEPT = "kept"  # not an activation: kept as it is (training BatchNorm, unsupported pool, ...)
EXCLUDED = "excluded"  # filter_fn said no


@dataclass
class Site:
    where: str  # a module's qualified name, or "file.py:123 (in <module name>)" for a call
    kind: str  # what it is: "nn.ReLU", "F.relu", "nn.BatchNorm2d", ...
    action: str  # what the rewrite did, or why it left the site alone (the same words for sites alike)
    detail: str = ""  # what is particular to this site ("into conv1", "called from 3 places")
    rule_site: bool = False  # an activation that now applies the rule (ReLU family, or smooth with activations="all")


@dataclass
class RewriteReport:
    """The outcome of :func:`fastsal.rewrite`; print it for a summary."""

    rule: Rule
    model_name: str
    activations: str = "relu"  # which activations get the rule: "relu" (the ReLU family) or "all"
    replaced: List[Site] = field(default_factory=list)
    left_alone: List[Tuple[str, Site]] = field(default_factory=list)  # (category, site)
    notes: List[str] = field(default_factory=list)
    forwards_seen: int = 0
    _seen_calls: Dict[Tuple[str, str], None] = field(default_factory=dict, repr=False)
    _call_counts: Dict[Tuple[str, str], int] = field(default_factory=dict, repr=False)  # (where, kind) -> calls
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    # a lock cannot be copied or pickled: copies (copy.deepcopy of a rewritten model) get their own
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # --- filled in by the rewriting pass and the function mode ------------------------------------
    def add_replaced(self, where: str, kind: str, action: str, detail: str = "", rule_site: bool = False) -> None:
        self.replaced.append(Site(where, kind, action, detail, rule_site))

    def add_left_alone(self, category: str, where: str, kind: str, why: str) -> None:
        self.left_alone.append((category, Site(where, kind, why)))

    def add_call(self, where: str, kind: str, action: str, category: str | None = None, rule_site: bool = False) -> None:
        """Record a functional call site once, however often it runs (safe from several threads)."""
        key = (where, kind)
        self._call_counts[key] = self._call_counts.get(key, 0) + 1  # a statistic: a lost update is harmless
        if key in self._seen_calls:
            return
        with self._lock:
            if key in self._seen_calls:
                return
            self._seen_calls[key] = None
            if category is None:
                self.add_replaced(where, kind, action, rule_site=rule_site)
            else:
                self.add_left_alone(category, where, kind, action)

    # --- reading it -------------------------------------------------------------------------------
    @property
    def replaced_counts(self) -> Dict[str, int]:
        """``{"nn.ReLU -> fastsal relu (guided)": 13, ...}``."""
        return dict(Counter(f"{s.kind} -> {s.action}" for s in self.replaced))

    def relu_sites(self) -> int:
        """How many ReLU call sites (module or functional) got the rule."""
        return sum(1 for s in self.replaced if "relu" in s.action and not s.action.startswith("fused into"))

    def rule_sites(self) -> int:
        """How many activation call sites (module or functional) apply the rule, ReLU family or smooth."""
        return sum(1 for s in self.replaced if s.rule_site)

    def activations_left(self) -> Dict[str, int]:
        """``{"nn.SiLU": 49, "F.hardtanh": 1, ...}``: activation sites that keep their ordinary gradient."""
        return dict(Counter(s.kind for cat, s in self.left_alone if cat in (RELU_LIKE, NO_RULE)))

    def relu_like_left(self) -> List[Site]:
        """ReLU-like sites that keep their ordinary gradient (what ``strict=True`` refuses)."""
        return [s for cat, s in self.left_alone if cat == RELU_LIKE]

    def __str__(self) -> str:
        lines = [f"fastsal rewrite of {self.model_name} (rule: {self.rule}"
                 + (f", activations: {self.activations})" if self.activations != "relu" else ")")]
        counts = self.replaced_counts
        if counts:
            lines.append("  replaced:")
            for what, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                calls = sum(self._call_counts.get((s.where, s.kind), 0) for s in self.replaced
                            if f"{s.kind} -> {s.action}" == what)
                per_forward = f" ({calls / self.forwards_seen:.0f} calls per forward)" \
                    if calls and self.forwards_seen else ""
                lines.append(f"    {n:4d} x {what}{per_forward}")
        if not self.rule_sites():
            lines.append("  no ReLU found" + (" nor another activation given the rule" if self.activations == "all" else "")
                         + ("" if self.forwards_seen else " in modules (functional calls show up after a forward)")
                         + ": the rule changes nothing; the gradient is the plain one")
        if self.left_alone:
            lines.append("  left alone:")
            grouped = Counter((cat, s.kind, s.action) for cat, s in self.left_alone)
            for (cat, kind, why), n in sorted(grouped.items()):
                examples = [s.where for c, s in self.left_alone if (c, s.kind, s.action) == (cat, kind, why)][:3]
                more = ", ..." if n > 3 else ""
                lines.append(f"    {n:4d} x {kind} [{cat}]: {why} (e.g. {', '.join(examples)}{more})")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(
            f"  functional call sites: from {self.forwards_seen} eager forward(s) so far"
            if self.forwards_seen
            else "  functional call sites (F.relu in forward, ...): not seen yet; they are rewritten when the model runs "
            "and listed here after the first forward"
        )
        return "\n".join(lines)
