"""Find the module pairs the rewrite merges: conv → BatchNorm (to fold) and ReLU → max-pool (to fuse).

A pair qualifies only when the first module's output feeds the second module alone, and
each module is called once. ``torch.fx`` shows that data flow for traceable code (e.g. the
``conv1``/``bn1`` of torchvision's ResNet blocks); where a module cannot be traced, the pairs
inside a plain ``nn.Sequential`` are still certain (each output feeds only the next module),
and tracing is tried again on each child.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import List, Tuple

import torch.fx as fx
import torch.nn as nn

from fastsal._trace_gate import GATE


@dataclass
class Pairs:
    conv_bn: List[Tuple[str, str]] = field(default_factory=list)  # (conv name, bn name)
    relu_pool: List[Tuple[str, str]] = field(default_factory=list)  # (relu name, pool name)
    untraceable: List[str] = field(default_factory=list)  # modules fx could not trace (searched child by child)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_conv_bn(first: nn.Module, second: nn.Module) -> bool:
    return type(first) is nn.Conv2d and type(second) is nn.BatchNorm2d and first.out_channels == second.num_features


def _is_relu_pool(first: nn.Module, second: nn.Module) -> bool:
    return type(first) is nn.ReLU and type(second) is nn.MaxPool2d


def _pairs_in_graph(graph: fx.Graph, module: nn.Module, prefix: str, out: Pairs) -> None:
    submodules = dict(module.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op != "call_module" or calls[user.target] != 1 or user.args != (node,) or user.kwargs:
            continue
        first, second = submodules[node.target], submodules[user.target]
        if _is_conv_bn(first, second):
            out.conv_bn.append((_join(prefix, node.target), _join(prefix, user.target)))
        elif _is_relu_pool(first, second):
            # an in-place ReLU also changes its input: fusing it away is safe only if nothing else reads that input
            source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            if first.inplace and (not isinstance(source, fx.Node) or len(source.users) != 1):
                continue
            out.relu_pool.append((_join(prefix, node.target), _join(prefix, user.target)))


def _pairs_in_sequential(seq: nn.Sequential, prefix: str, out: Pairs) -> None:
    children = list(seq.named_children())
    for i, ((name_a, a), (name_b, b)) in enumerate(zip(children, children[1:])):
        if _is_conv_bn(a, b):
            out.conv_bn.append((_join(prefix, name_a), _join(prefix, name_b)))
        elif _is_relu_pool(a, b) and (i > 0 or not a.inplace):  # the Sequential's own input may be read elsewhere
            out.relu_pool.append((_join(prefix, name_a), _join(prefix, name_b)))


def _is_torch_leaf(module: nn.Module) -> bool:
    return fx.Tracer().is_leaf_module(module, "")


def _search(module: nn.Module, prefix: str, out: Pairs) -> None:
    if not list(module.children()) or _is_torch_leaf(module):
        return
    try:
        with GATE.tracing():
            graph = fx.Tracer().trace(module)
    except Exception:  # any failure to trace just means: look inside
        graph = None
    if graph is not None:
        _pairs_in_graph(graph, module, prefix, out)
        return
    if type(module).forward is nn.Sequential.forward:
        _pairs_in_sequential(module, prefix, out)
    else:
        out.untraceable.append(prefix or "<root>")
    for name, child in module.named_children():
        _search(child, _join(prefix, name), out)


def find_pairs(model: nn.Module) -> Pairs:
    """Conv → BatchNorm2d and ReLU → MaxPool2d pairs in ``model``, by qualified name."""
    out = Pairs()
    _search(model, "", out)
    return out
