"""Compile fastsal's Triton kernels for real GPUs on a machine without one, and read the result.

Used by ``tests/test_compile_targets.py``; also a script that prints the audit as markdown
(the table in ``kernels/README.md``)::

    python tests/compile_targets.py --table                   # the default plan (as the tests)
    python tests/compile_targets.py --table --targets sm_90   # one target
    python tests/compile_targets.py --table --full            # the whole product, every target (slow)

How a specialization is obtained, without a hand-written signature that could drift:

1. **Capture.** A *scenario* calls the real launchers of ``fastsal._kernels`` (``relu_forward``,
   ``max_pool2d_forward``, ...) on small CPU tensors. While it runs, ``run`` of Triton's
   ``JITFunction`` and ``InterpretedFunction`` classes records ``(kernel, grid, args, kwargs)``
   instead of launching, and ``launchable`` (wherever a kernel module bound it) returns the
   raw kernel so no ``wrap_triton`` is in the way. Forward launchers still allocate and return
   their outputs, so a backward scenario feeds them to the backward launcher as ``ops`` does.
2. **Bind.** The captured call goes through Triton's own binder
   (``create_function_from_signature`` + ``JITFunction._pack_args``, what ``JITFunction.run``
   does): argument types, constexprs, ints equal to 1 folded to constants, and the
   divisibility-by-16 hints from the data pointers and int values.
3. **Compile** with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, then
   ``ptxas -v`` (Triton's bundled one) on the PTX for registers and spills, and a small PTX
   reader for global load/store widths, attributed to kernel parameters (see :func:`read_ptx`).

Under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` on a CPU-only machine) the kernels
are ``InterpretedFunction`` objects; :func:`jit_of` rebuilds a ``JITFunction`` from the Python
function, with the ``@triton.jit`` helpers it calls rebuilt the same way.

That rebuild alone is not enough: Triton's own ``@jit`` helpers (``tl.zeros``, ``tl.sum``'s
combine function, ...) are interpreted too, and the code generator calling one of them
patches ``triton.language`` for the interpreter for good. :func:`compile_mode` swaps them for
the time of the audit and restores everything after.

Cost: about 0.5-1 s of CPU per specialization and target on a free core (several times that
on a loaded one); threads do not help (the front end holds the GIL), forked worker processes
do. The launchers' whole product is about 710 specializations per target, too many for a CI
test, so scenarios come in tiers (:func:`_tier`): sm_90 compiles the "core" and "default"
ones (every value of every flag, each kernel's heaviest configurations, every dtype where
vector widths are asserted: about 90), the other targets the "core" ones (3 per kernel, one more
per relu kernel for each other row of the ReLU family), and
``full=True`` / ``--full`` / ``FASTSAL_COMPILE_FULL=1`` everything for every target.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

# ----------------------------------------------------------------------------------------
# What is compiled
# ----------------------------------------------------------------------------------------

# name -> compute capability. sm_120 is kept only if the installed Triton can target it.
TARGETS: Dict[str, int] = {"sm_80": 80, "sm_90": 90, "sm_100": 100, "sm_120": 120}
# the target that gets the "default" tier as well as the "core" one (see _tier)
FULL_TARGET = "sm_90"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Pool configurations of torchvision / timm CNNs: name -> (kernel, stride, padding, ceil_mode, H=W)
# of the input. The input size is picked so ceil_mode really adds a row (14 -> 7 with 3x3/2).
POOLS = {
    "2x2/2": (2, 2, 0, False, 16),  # VGG, timm's VGG-like nets
    "3x3/2p1": (3, 2, 1, False, 16),  # ResNet / ResNeXt / RegNet stems, DenseNet
    "3x3/2ceil": (3, 2, 0, True, 14),  # GoogLeNet, Inception (ceil_mode), AlexNet/SqueezeNet (3x3/2)
    "3x3/1p1": (3, 1, 1, False, 16),  # GoogLeNet / Inception branch pools
    "1x1/2": (1, 2, 0, False, 16),  # torchvision FPN's LastLevelMaxPool (F.max_pool2d(x, 1, 2, 0))
}

# Shape variants that decide Triton's divisibility-by-16 hints for the relu kernels.
#  aligned: numel a multiple of 16 (and of 2048, one program), 64-byte aligned pointers
#  odd:     numel = 1031 (numel % 16 != 0): no hint on n_elements
#  offset:  the same 2048 elements one element into a larger buffer: pointers lose the hint
RELU_VARIANTS = ("aligned", "odd", "offset")
RELU_RULES = (0, 1, 2)  # gradient, deconvnet, guided
# Rows of the ReLU family (kernels/reference.py): name -> (activation code, its scalar)
RELU_ACTS = {"relu": (0, 0.0), "relu6": (1, 6.0), "leaky": (2, 0.01)}
UNPOOL_RULES = (-1, 0, 1, 2)  # plain unpool, then fused relu with each rule


# Tiers: "core" scenarios are compiled for every target, "default" ones for FULL_TARGET only,
# "full" ones only on request (full=True, --full, or FASTSAL_COMPILE_FULL=1 for the tests).
TIERS = ("core", "default", "full")


@dataclasses.dataclass(frozen=True, eq=False)
class Scenario:
    """One call of a launcher (after any forward calls its inputs need)."""

    family: str  # relu_forward | relu_backward | pool_forward | unpool_backward
    label: Dict[str, Any]  # what the table shows: dtype, hints or pool and layout
    params: Dict[str, Any]  # every launcher argument the scenario varies (tier selection)
    run: Callable[[], None]
    int64: bool  # force the int64 decision of the launchers (see force_int64)
    tier: str


def _tier(family: str, p: Dict[str, Any]) -> str:
    """Which scenarios are compiled by default: a covering subset of the full product.

    Compiling costs about 0.5-1 s per specialization on one free core (several seconds on a
    loaded one), so the default run cannot afford the whole product (about 710 specializations
    per target). It keeps, for sm_90, every value of every flag at least once, each kernel's
    heaviest configuration (3x3 windows, fused ReLU with mask, channels_last, int64) and every
    dtype on the configurations whose vector widths are asserted; other targets get the
    "core" few per kernel. ``full=True`` compiles everything.
    """
    fp32 = p["dtype"] == "fp32"
    if family in ("relu_forward", "relu_backward") and p["act"] != "relu":
        return _family_tier(family, p)
    if family == "relu_forward":
        if p["inplace"]:
            return "full"  # the same specialization as out of place (it only aliases y to x)
        if p["variant"] == "aligned" and p["store_mask"] and not p["int64"] and p["dtype"] in ("fp32", "bf16"):
            return "core"
        if p["variant"] == "aligned" and p["store_mask"] and p["int64"] and fp32:
            return "core"
        if p["variant"] == "aligned":
            return "default"  # every dtype x store_mask x int64
        if p["store_mask"] and not p["int64"] and p["dtype"] in ("fp32", "bf16"):
            return "default"  # no divisibility hints: numel % 16 != 0, or a shifted pointer
        return "full"
    if family == "relu_backward":
        if p["variant"] == "aligned" and p["rule"] == 2 and (p["dtype"] in ("fp32", "bf16") and not p["int64"] or fp32):
            return "core"
        if p["variant"] == "aligned" and (not p["int64"] or fp32):
            return "default"  # every rule x dtype; int64 for every rule in fp32
        if p["rule"] == 2 and not p["int64"] and p["dtype"] in ("fp32", "bf16"):
            return "default"
        return "full"
    if family == "pool_forward":
        fused = p["apply_relu"] and p["store_mask"]
        if fp32 and p["pool"] == "3x3/2p1" and fused and p["int64"] == p["channels_last"]:
            return "core"  # NCHW int32, and NHWC int64
        if p["dtype"] == "bf16" and p["pool"] == "2x2/2" and fused and not p["channels_last"] and not p["int64"]:
            return "core"
        if fp32 and fused and not p["int64"] and (not p["channels_last"] or p["pool"] in ("2x2/2", "3x3/2p1")):
            return "default"  # every pool size in NCHW; NHWC for the two common ones
        if fp32 and p["pool"] == "2x2/2" and not p["channels_last"] and not p["int64"]:
            return "default"  # the other apply_relu / store_mask combinations
        if fp32 and fused and p["int64"] and p["pool"] in ("2x2/2", "3x3/2p1"):
            return "default"
        if p["dtype"] == "bf16" and fused and not p["int64"] and p["pool"] in ("2x2/2", "3x3/2p1"):
            return "default"  # both layouts
        if p["dtype"] == "fp16" and fused and not p["int64"] and p["pool"] == "3x3/2p1" and not p["channels_last"]:
            return "default"
        return "full"
    if family == "unpool_backward":
        if fp32 and p["pool"] == "3x3/2p1" and p["rule"] == 2 and p["int64"] == p["channels_last"]:
            return "core"  # the heaviest gather, NCHW int32 and NHWC int64
        if (p["dtype"] == "bf16" and p["pool"] == "2x2/2" and p["rule"] == -1 and not p["channels_last"]
                and not p["int64"]):
            return "core"
        if fp32 and p["rule"] == 2 and not p["int64"] and (not p["channels_last"] or p["pool"] in ("2x2/2", "3x3/2p1")):
            return "default"  # every pool size in NCHW; NHWC for the two common ones
        if fp32 and p["pool"] == "3x3/2p1" and not p["channels_last"] and not p["int64"]:
            return "default"  # every rule
        if fp32 and p["int64"] and p["pool"] in ("2x2/2", "3x3/2p1") and (p["rule"] == 2 or (
                p["rule"] == -1 and not p["channels_last"])):
            return "default"
        if not fp32 and not p["int64"] and p["rule"] == 2 and p["pool"] == "3x3/2p1" and not p["channels_last"]:
            return "default"
        if p["dtype"] == "bf16" and not p["int64"] and p["rule"] == 2 and p["pool"] == "2x2/2" and p["channels_last"]:
            return "default"
        return "full"
    raise ValueError(family)


def _family_tier(family: str, p: Dict[str, Any]) -> str:
    """The clipped ReLU and LeakyReLU rows of the relu kernels: a few more specializations.

    Their code differs from the ReLU row only in the elementwise arithmetic, so the default
    plan compiles each row on its heaviest path (mask stored; int64; no hints) in fp32, the
    half dtypes once where the vector widths are asserted, and every target once ("core").
    A clipped ReLU's backward, and a LeakyReLU's DeconvNet, are the ReLU row's backward
    (ACT=0): binding finds them duplicates, so they are left to the full product.
    """
    fp32 = p["dtype"] == "fp32"
    if family == "relu_forward":
        if p["inplace"] or not p["store_mask"]:
            return "full"  # in place aliases y to x; STORE_MASK=0 is the ReLU row's case
        if p["variant"] == "aligned" and not p["int64"] and p["dtype"] in ("fp32", "bf16"):
            return "core" if fp32 else "default"
        if fp32 and (p["variant"] == "aligned" or not p["int64"]):
            return "default"  # int64, and both hint-less variants
        if p["variant"] == "aligned" and not p["int64"] and p["dtype"] == "fp16":
            return "default"
        return "full"
    if p["act"] != "leaky" or p["rule"] == 1:
        return "full"  # the ReLU row's specialization again
    if p["variant"] == "aligned" and not p["int64"] and fp32 and p["rule"] == 2:
        return "core"
    if p["variant"] == "aligned" and not p["int64"] and (p["rule"] == 2 or fp32):
        return "default"  # guided in every dtype, gradient in fp32
    if fp32 and p["rule"] == 2 and (p["variant"] == "aligned" or not p["int64"]):
        return "default"  # int64, and the hint-less variants
    return "full"


def _relu_input(dtype, variant):
    if variant == "aligned":
        return torch.zeros(2 * 2048, dtype=dtype)
    if variant == "odd":
        return torch.zeros(1031, dtype=dtype)
    return torch.zeros(2 * 2048 + 1, dtype=dtype)[1:]  # dense, but one element off the allocation


def _pool_input(pool, dtype, channels_last):
    k, s, p, ceil, hw = POOLS[pool]
    x = torch.zeros(2, 16, hw, hw, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, dict(kernel_size=(k, k), stride=(s, s), padding=(p, p), dilation=(1, 1), ceil_mode=ceil)


def scenarios(tiers: Sequence[str] = TIERS) -> List[Scenario]:
    """Launcher calls fastsal can make, one representative shape each, in the given tiers.

    The flags a launcher turns into constexprs (store_mask, rule, apply_relu, channels_last)
    are enumerated over the launcher's own arguments; the int64 decision is forced both ways.
    Duplicated specializations (in place vs. not, for instance) are removed after binding.
    """
    from fastsal._kernels import maxpool, relu

    out: List[Scenario] = []

    def add(family, label, params, run):
        tier = _tier(family, params)
        if tier in tiers:
            out.append(Scenario(family, label, params, run, params["int64"], tier))

    for dtype_name, dtype in DTYPES.items():
        for (act_name, (act, param)), variant, int64 in itertools.product(
                RELU_ACTS.items(), RELU_VARIANTS, (False, True)):
            # the ReLU row keeps its labels of before the family: its table rows stay comparable
            relu_label = dict(dtype=dtype_name, hints=variant) if act_name == "relu" else dict(
                dtype=dtype_name, act=act_name, hints=variant)
            for store_mask, inplace in itertools.product((True, False), (False, True)):

                def fwd(dtype=dtype, variant=variant, store_mask=store_mask, inplace=inplace, act=act, param=param):
                    x = _relu_input(dtype, variant)
                    if inplace:
                        relu.relu_family_forward_(x, act, param, store_mask)
                    else:
                        relu.relu_family_forward(x, act, param, store_mask)

                add("relu_forward", relu_label,
                    dict(dtype=dtype_name, variant=variant, int64=int64, store_mask=store_mask, inplace=inplace,
                         act=act_name), fwd)
            for rule in RELU_RULES:

                def bwd(dtype=dtype, variant=variant, rule=rule, act=act, param=param):
                    x = _relu_input(dtype, variant)
                    with _no_capture():  # the forward only makes the mask tensor
                        _, bits = relu.relu_family_forward(x, act, param, rule != 1)
                    relu.relu_family_backward(_relu_input(dtype, variant), bits, rule, act, param)

                add("relu_backward", relu_label,
                    dict(dtype=dtype_name, variant=variant, int64=int64, rule=rule, act=act_name), bwd)

        for pool, channels_last, int64 in itertools.product(POOLS, (False, True), (False, True)):
            label = dict(dtype=dtype_name, pool=pool, layout="NHWC" if channels_last else "NCHW")
            # (False, True) is a launcher-only combination: ops stores a mask only for a fused ReLU
            for apply_relu, store_mask in ((False, False), (True, False), (True, True), (False, True)):

                def pool_fwd(pool=pool, dtype=dtype, channels_last=channels_last, apply_relu=apply_relu,
                             store_mask=store_mask):
                    x, a = _pool_input(pool, dtype, channels_last)
                    maxpool.max_pool2d_forward(x, a["kernel_size"], a["stride"], a["padding"], a["dilation"],
                                               a["ceil_mode"], apply_relu, store_mask)

                add("pool_forward", label, dict(dtype=dtype_name, pool=pool, channels_last=channels_last, int64=int64,
                                                apply_relu=apply_relu, store_mask=store_mask), pool_fwd)
            for rule in UNPOOL_RULES:

                def unpool(pool=pool, dtype=dtype, channels_last=channels_last, rule=rule):
                    x, a = _pool_input(pool, dtype, channels_last)
                    with _no_capture():  # the forward only makes the switches and mask
                        pooled, switches, bits = maxpool.max_pool2d_forward(
                            x, a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"],
                            rule != -1, rule in (0, 2))
                    grad = torch.zeros_like(pooled)  # autograd's gradient has the output's layout
                    maxpool.max_pool2d_backward(grad, switches, bits, rule, list(x.shape), a["kernel_size"],
                                                a["stride"], a["padding"], a["dilation"], channels_last)

                add("unpool_backward", label, dict(dtype=dtype_name, pool=pool, channels_last=channels_last,
                                                   int64=int64, rule=rule), unpool)
    return out


# ----------------------------------------------------------------------------------------
# Capture: run a launcher, record its kernel launch instead of running it
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    kernel: Any  # JITFunction or InterpretedFunction, as the launcher holds it
    grid: Any
    args: tuple
    kwargs: dict


_CAPTURING: List[Optional[List[Launch]]] = [None]


@contextlib.contextmanager
def _no_capture():
    """Inside a capture: let nested launcher calls (a forward that only makes inputs) record nothing."""
    saved, _CAPTURING[0] = _CAPTURING[0], []
    try:
        yield
    finally:
        _CAPTURING[0] = saved


def _kernel_modules() -> List[types.ModuleType]:
    import fastsal._kernels as pkg
    from fastsal._kernels import _launch, maxpool, relu  # noqa: F401 (loads them)

    return [m for name, m in sorted(sys.modules.items()) if m is not None and name.startswith(pkg.__name__ + ".")]


def _patch_bound(obj_in_launch: Any, replacement: Any, stack: contextlib.ExitStack):
    """Replace ``obj_in_launch`` in ``_launch`` and in every kernel module that imported it."""
    for module in _kernel_modules():
        for name, value in list(vars(module).items()):
            if value is obj_in_launch:
                stack.callback(setattr, module, name, value)
                setattr(module, name, replacement)


@contextlib.contextmanager
def capture() -> Iterator[List[Launch]]:
    """Record every Triton launch made inside the block, run nothing."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from fastsal._kernels import _launch

    launches: List[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        if _CAPTURING[0] is not None:
            _CAPTURING[0].append(Launch(self, grid, args, dict(kwargs)))
        return None

    with contextlib.ExitStack() as stack:
        for cls in (JITFunction, InterpretedFunction):
            stack.callback(setattr, cls, "run", cls.__dict__["run"])
            cls.run = record
        # no wrap_triton between the launcher and the kernel (it only matters off the interpreter)
        _patch_bound(_launch.launchable, lambda kernel: kernel, stack)
        saved, _CAPTURING[0] = _CAPTURING[0], launches
        stack.callback(_CAPTURING.__setitem__, 0, saved)
        yield launches


@contextlib.contextmanager
def force_int64(value: bool):
    """Make the launchers' int64 decision come out as ``value``, whatever the tensor sizes.

    Read from ``fastsal._kernels._launch`` rather than assumed: every function there whose
    name mentions int64 is replaced (in ``_launch`` and wherever a kernel module imported
    it), and every int constant whose name mentions int64 or a threshold is set to 1 or to
    2**62. :func:`capture_scenario` then checks the ``INT64`` constexpr really followed.
    """
    from fastsal._kernels import _launch

    with contextlib.ExitStack() as stack:
        for name, value_ in list(vars(_launch).items()):
            if name.startswith("__"):
                continue
            lname = name.lower()
            if callable(value_) and not isinstance(value_, type) and "int64" in lname:
                _patch_bound(value_, (lambda *a, **k: value), stack)
            elif isinstance(value_, int) and not isinstance(value_, bool) and (
                    "int64" in lname or "threshold" in lname):
                stack.callback(setattr, _launch, name, value_)
                setattr(_launch, name, 1 if value else 2**62)
        yield


# the constexpr that names the int64 decision in every kernel (checked on each capture)
INT64_CONSTEXPR = "INT64"


def capture_scenario(scenario: Scenario) -> List[Launch]:
    with force_int64(scenario.int64), capture() as launches:
        scenario.run()
    if not launches:
        raise AssertionError(f"{scenario.family} {scenario.label}: the launcher made no Triton launch")
    for launch in launches:
        names = _arg_names(launch.kernel)
        if INT64_CONSTEXPR in names:
            got = _bound_value(launch, names, INT64_CONSTEXPR)
            if bool(got) != scenario.int64:
                raise AssertionError(
                    f"{scenario.family} {scenario.label}: INT64={got} although force_int64({scenario.int64}); "
                    "the int64 decision in fastsal._kernels._launch changed: update force_int64")
    return launches


def launch_constexprs(launch: Launch) -> Tuple[str, Dict[str, Any]]:
    """(kernel name, its declared constexpr arguments) of a captured launch, without binding."""
    jf = jit_of(launch.kernel)
    names = [p.name for p in jf.params]
    flags = {}
    for p in jf.params:
        if p.is_constexpr:
            value = _bound_value(launch, names, p.name)
            flags[p.name] = p.default if value is None and p.has_default else value
    return jf.fn.__name__, flags


def _arg_names(kernel) -> List[str]:
    import inspect

    fn = kernel.fn if hasattr(kernel, "fn") else kernel
    return list(inspect.signature(fn).parameters)


def _bound_value(launch: Launch, names: Sequence[str], name: str):
    if name in launch.kwargs:
        return launch.kwargs[name]
    i = names.index(name)
    return launch.args[i] if i < len(launch.args) else None


# ----------------------------------------------------------------------------------------
# Bind: Triton's own specialization of a captured call
# ----------------------------------------------------------------------------------------

_JIT_OF: Dict[Any, Any] = {}


def jit_of(kernel):
    """A compilable ``JITFunction`` for ``kernel`` (itself, or rebuilt from an interpreted one).

    An ``InterpretedFunction`` keeps the Python function as ``.fn``. The rebuilt function gets
    a copy of its module's globals in which every interpreted ``@triton.jit`` helper (such as
    ``_decompose``) is itself rebuilt, so the code generator sees only ``JITFunction`` objects.
    Cached per Python function; the copy of the globals is taken when first asked for, which
    is at every new capture session (see :func:`reset`).
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    if not isinstance(kernel, InterpretedFunction):
        raise TypeError(f"not a Triton kernel: {kernel!r}")
    fn = kernel.fn
    if fn in _JIT_OF:
        return _JIT_OF[fn]
    scope = dict(fn.__globals__)
    clone = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__qualname__, clone.__module__, clone.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    clone.__kwdefaults__, clone.__annotations__ = fn.__kwdefaults__, dict(fn.__annotations__)  # tl.constexpr marks
    jf = JITFunction(clone, **getattr(kernel, "kwargs", {}))
    _JIT_OF[fn] = jf
    for name, value in list(scope.items()):
        if isinstance(value, InterpretedFunction):
            scope[name] = jit_of(value)
    return jf


def reset():
    """Forget rebuilt kernels (call after the kernel modules were edited and reloaded)."""
    _JIT_OF.clear()


@contextlib.contextmanager
def compile_mode():
    """Let ``triton.compile`` work in a process where ``TRITON_INTERPRET=1`` was set at import.

    Under the interpreter, Triton's own ``@jit`` helpers in ``triton.language`` (``tl.zeros``,
    ``tl.sum``'s combine function, ``tl.cdiv``, ...) are ``InterpretedFunction`` objects too,
    and the code generator calling one patches ``triton.language`` for the interpreter for
    good. For the block: Triton's interpret knob is off, those helpers are swapped for
    rebuilt ``JITFunction`` objects in their modules, and calling an ``InterpretedFunction``
    raises instead of patching. Everything is restored on exit, so interpreted tests that
    run later in the same process are unaffected. A no-op when nothing is interpreted.
    """
    from triton import knobs
    from triton.runtime.interpreter import InterpretedFunction

    if not (knobs.runtime.interpret or _interpreted_anywhere()):
        yield
        return

    def refuse(self, *args, **kwargs):
        raise RuntimeError(f"{self.fn.__name__} is still an InterpretedFunction inside triton.compile")

    env_before = os.environ.get("TRITON_INTERPRET")
    with contextlib.ExitStack() as stack:
        stack.callback(setattr, InterpretedFunction, "__call__", InterpretedFunction.__dict__["__call__"])
        InterpretedFunction.__call__ = refuse
        for name, module in list(sys.modules.items()):
            if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
                continue
            for attr, value in list(vars(module).items()):
                if isinstance(value, InterpretedFunction):
                    stack.callback(setattr, module, attr, value)
                    setattr(module, attr, jit_of(value))

        def restore_env():
            knobs.runtime.interpret = knobs.env
            if env_before is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = env_before

        stack.callback(restore_env)
        knobs.runtime.interpret = False
        yield


def _interpreted_anywhere() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    lang = sys.modules.get("triton.language.standard")
    return lang is not None and any(isinstance(v, InterpretedFunction) for v in vars(lang).values())


@dataclasses.dataclass
class Spec:
    jit: Any
    name: str  # kernel function name
    signature: Dict[str, str]
    constexprs: Dict[tuple, Any]
    attrs: Dict[tuple, Any]
    options: Dict[str, Any]
    param_names: List[str]
    tensors: Dict[str, Tuple[int, int]]  # tensor arguments of the captured call: (numel, element size)
    programs: int  # programs in the captured call's grid

    def flags(self) -> Dict[str, Any]:
        """Constexpr parameters by name (block sizes and folded ints equal to 1 included)."""
        return {self.param_names[path[0]]: v for path, v in self.constexprs.items() if len(path) == 1}

    def key(self) -> str:
        def norm(d):
            return sorted((repr(k), repr(v)) for k, v in d.items())

        opts = {k: v for k, v in self.options.items() if k not in ("extern_libs",)}
        return repr((self.name, sorted(self.signature.items()), norm(self.constexprs), norm(self.attrs), norm(opts)))

    def hinted(self) -> List[str]:
        """Parameters Triton was told are divisible by 16."""
        return sorted(self.param_names[p[0]] for p, a in self.attrs.items() if "tt.divisibility" in repr(a))


def bind(launch: Launch, cc: int) -> Spec:
    """What ``JITFunction.run`` would compile for this call on a GPU of capability ``cc``."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jf = jit_of(launch.kernel)
    backend = make_backend(GPUTarget("cuda", cc, 32))
    binder = create_function_from_signature(jf.signature, jf.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", jf.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = jf._pack_args(backend, kwargs, bound_args, specialization, options)
    grid = launch.grid(bound_args) if callable(launch.grid) else launch.grid
    programs = 1
    for g in grid:
        programs *= int(g)
    tensors = {k: (v.numel(), v.element_size()) for k, v in bound_args.items() if isinstance(v, torch.Tensor)}
    return Spec(jf, jf.fn.__name__, dict(signature), dict(constexprs), dict(attrs), dict(options.__dict__),
                [p.name for p in jf.params], tensors, programs)


# ----------------------------------------------------------------------------------------
# Compile and read
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class GlobalOp:
    op: str  # "ld" or "st" (or "atom"/"red")
    bits: int  # bits moved by one instruction per thread (vector count x element width)
    params: Tuple[str, ...]  # kernel parameters the address derives from
    vector: bool = False  # more than one element per instruction


@dataclasses.dataclass
class Result:
    scenario: Scenario
    target: str
    spec: Spec
    seconds: float = 0.0
    error: Optional[str] = None
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None  # spill stores + spill loads, bytes per thread
    stack_bytes: Optional[int] = None
    shared: Optional[int] = None  # ck.metadata.shared
    bar_syncs: Optional[int] = None  # bar.sync / barrier.sync in the PTX
    global_ops: List[GlobalOp] = dataclasses.field(default_factory=list)
    num_warps: Optional[int] = None

    @property
    def kernel(self) -> str:
        return self.spec.name

    def widths(self, param: str, op: Optional[str] = None) -> List[int]:
        return [g.bits for g in self.global_ops if param in g.params and (op is None or g.op == op)]

    def access_counts(self, params: Sequence[str]) -> Tuple[int, int]:
        """(scalar, vector) global accesses of ``params``; vector = more than one element."""
        scalar = vector = 0
        for g in self.global_ops:
            if any(p in g.params for p in params):
                if g.vector:
                    vector += 1
                else:
                    scalar += 1
        return scalar, vector


_STATEMENT = re.compile(r"^(?:@!?%\w+\s+)?([a-z][\w.:]*)\s*(.*)$", re.S)
_REG = re.compile(r"%[A-Za-z_]\w*")
_PARAM = re.compile(r"\[\s*(\w+?)_param_(\d+)\s*\]")


def read_ptx(ptx: str, param_names: Sequence[str]) -> Tuple[List[GlobalOp], int]:
    """Global loads/stores of a PTX kernel, each with its width and the parameters it addresses.

    Attribution is a forward taint analysis on the PTX registers: ``ld.param [k_param_N]``
    marks its destination with parameter N, and every instruction marks its destination
    registers with the union of its source registers' marks (iterated to a fixed point, so
    branches and loops are covered). The address of a ``ld.global``/``st.global`` then
    carries exactly the pointer parameters it was computed from: offsets are built from
    program ids, thread ids and int parameters, never from another pointer, so integer marks
    are dropped and only pointer parameters (``*`` in the signature) are reported. This is
    sound for what the tests ask (which tensor a vector access touches) without modelling
    address arithmetic. ``param_names`` are the non-constexpr parameters in order, which is
    how Triton numbers the PTX parameters.

    Returns the global ops and the number of barrier instructions (``bar.sync``/``barrier``).
    """
    text = re.sub(r"//[^\n]*", "", ptx)
    text = re.sub(r"(?m)^\s*\.(?:loc|file|pragma)\b[^\n;]*$", "", text)  # directives without a ';'
    entry = text.find(".entry")
    body = text[text.find("{", entry) + 1:]  # the kernel body, after the parameter list
    statements = []
    for raw in body.split(";"):
        s = raw.strip()
        # drop labels, and the braces that open/close a scope (inline asm blocks, the body)
        s = re.sub(r"^(?:[$\w]+:\s*)+", "", s)
        while s.startswith("{") and not s.startswith("{ %") and not s.startswith("{%"):
            s = s[1:].strip()
        s = s.lstrip("}").strip()
        s = re.sub(r"^(?:[$\w]+:\s*)+", "", s)
        if s:
            statements.append(s)

    parsed = []
    for s in statements:
        m = _STATEMENT.match(s)
        if not m:
            continue
        opcode, operands = m.group(1), m.group(2)
        parsed.append((opcode, operands))

    taint: Dict[str, frozenset] = {}
    changed = True
    while changed:
        changed = False
        for opcode, operands in parsed:
            if opcode.startswith(("st.", "bar", "barrier", "ret", "bra", "red.", "atom.", "fence", "membar")):
                continue
            pm = _PARAM.search(operands)
            dst_text, _, src_text = operands.partition(",")
            if dst_text.strip().startswith("{"):  # vector destination: up to the closing brace
                close = operands.find("}")
                dst_text, src_text = operands[: close + 1], operands[close + 1:]
            dsts = _REG.findall(dst_text)
            if opcode.startswith("ld.param") and pm:
                marks = frozenset([int(pm.group(2))])
            else:
                marks = frozenset().union(*(taint.get(r, frozenset()) for r in _REG.findall(src_text)))
            for d in dsts:
                old = taint.get(d, frozenset())
                if not marks <= old:
                    taint[d] = old | marks
                    changed = True

    ops: List[GlobalOp] = []
    barriers = 0
    for opcode, operands in parsed:
        if re.match(r"^(bar|barrier)\.(cta\.)?(sync|red|arrive)", opcode) or opcode == "barrier.sync":
            barriers += 1
        kind = None
        if opcode.startswith("ld.global"):
            kind = "ld"
        elif opcode.startswith("st.global"):
            kind = "st"
        elif opcode.startswith(("atom.global", "red.global")):
            kind = opcode.split(".")[0]
        if kind is None:
            continue
        vec = re.search(r"\.v(\d+)", opcode)
        elem = re.search(r"\.[bsuf](\d+)$", opcode)
        count = int(vec.group(1)) if vec else 1
        bits = count * (int(elem.group(1)) if elem else 0)
        addr = re.search(r"\[([^\]]*)\]", operands)
        regs = _REG.findall(addr.group(1)) if addr else []
        marks = frozenset().union(*(taint.get(r, frozenset()) for r in regs))
        names = tuple(sorted(param_names[i] if i < len(param_names) else f"<param {i}>" for i in marks))
        ops.append(GlobalOp(kind, bits, names, count > 1))
    return ops, barriers


def _ptxas_path(cc: int) -> str:
    """Triton's bundled ptxas for ``cc`` (``ptxas-blackwell`` from sm_100 on, where Triton has one)."""
    from triton.backends.nvidia import compiler as nvidia

    if hasattr(nvidia, "get_ptxas"):
        return nvidia.get_ptxas(cc).path
    return nvidia._path_to_binary("ptxas")[0]  # older Triton


def ptxas_usage(ptx: str, cc: int, fmad: bool = True) -> Dict[str, int]:
    """Registers, spill bytes and stack of the PTX as Triton's bundled ``ptxas -v`` reports them."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [_ptxas_path(cc), "-v", "--regAllocOptLevel=2", *([] if fmad else ["--fmad=false"]),
               f"--gpu-name={sm_arch_from_capability(cc)}", src, "-o", os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    usage = _parse_ptxas_log(log)
    if usage is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return usage


def _parse_ptxas_log(log: str) -> Optional[Dict[str, int]]:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if not (regs and spills and stack):
        return None
    return {"registers": int(regs.group(1)), "spill_bytes": int(spills.group(1)) + int(spills.group(2)),
            "stack_bytes": int(stack.group(1))}


def compile_one(scenario: Scenario, target: str, spec: Spec) -> Result:
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cc = TARGETS[target]
    res = Result(scenario, target, spec)
    t0 = time.perf_counter()
    try:
        # Triton runs ptxas -v itself; its log is printed only on request, so ask and keep it
        log = io.StringIO()
        has_knob = hasattr(getattr(knobs, "nvidia", None), "dump_ptxas_log")
        saved = knobs.nvidia.dump_ptxas_log if has_knob else None
        if has_knob:
            knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                ck = triton.compile(
                    ASTSource(fn=spec.jit, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs),
                    target=GPUTarget("cuda", cc, 32), options=spec.options)
        finally:
            if has_knob:
                knobs.nvidia.dump_ptxas_log = saved
        ptx = ck.asm["ptx"]
        assert ck.asm["cubin"], "no cubin"
        # a cache hit runs no ptxas: then run it here
        usage = _parse_ptxas_log(log.getvalue())
        if usage is None:
            usage = ptxas_usage(ptx, cc, fmad=spec.options.get("enable_fp_fusion", True))
        res.registers, res.spill_bytes, res.stack_bytes = usage["registers"], usage["spill_bytes"], usage["stack_bytes"]
        res.shared = ck.metadata.shared
        res.num_warps = ck.metadata.num_warps
        runtime_params = [n for n in spec.param_names if spec.signature.get(n) != "constexpr"]
        ops, res.bar_syncs = read_ptx(ptx, runtime_params)
        pointers = {n for n in runtime_params if str(spec.signature[n]).startswith("*")}
        for op in ops:
            op.params = tuple(p for p in op.params if p in pointers)
        res.global_ops = ops
    except Exception as e:  # reported by the tests, with the specialization
        res.error = f"{type(e).__name__}: {e}"[:2000]
    res.seconds = time.perf_counter() - t0
    return res


def target_supported(target: str) -> Tuple[bool, str]:
    """Whether the installed Triton (and its ptxas) can compile for ``target``."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def _probe(x_ptr):
        tl.store(x_ptr, 1.0)

    try:
        jf = jit_of(_probe)
        triton.compile(ASTSource(fn=jf, signature={"x_ptr": "*fp32"}, constexprs={}, attrs={}),
                       target=GPUTarget("cuda", TARGETS[target], 32))
    except Exception as e:
        return False, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return True, ""


@contextlib.contextmanager
def triton_cache(path: Optional[str] = None):
    """Triton's on-disk cache in ``path`` (a fresh temporary folder by default) for the block."""
    from triton import knobs

    with contextlib.ExitStack() as stack:
        if path is None:
            path = stack.enter_context(tempfile.TemporaryDirectory(prefix="fastsal-triton-cache-"))
        old = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = path  # knobs.cache.dir reads the variable on each access
        knobs.cache.dir = path
        try:
            yield path
        finally:
            knobs.cache.dir = knobs.env  # back to reading the environment variable
            if old is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = old


@dataclasses.dataclass
class Audit:
    results: List[Result]
    skipped_targets: Dict[str, str]
    n_scenarios: int
    seconds: float


def plan(targets: Sequence[str], full: bool = False) -> List[Tuple[Scenario, str, Spec]]:
    """Capture the scenarios, bind each for its targets, drop duplicate specializations."""
    seen = set()
    jobs = []
    for scenario in scenarios(TIERS if full else ("core", "default")):
        launches = capture_scenario(scenario)
        for target in targets:
            if not (full or target == FULL_TARGET or scenario.tier == "core"):
                continue
            for launch in launches:
                spec = bind(launch, TARGETS[target])
                key = (target, spec.key())
                if key in seen:
                    continue
                seen.add(key)
                jobs.append((scenario, target, spec))
    return jobs


def run_audit(targets: Optional[Sequence[str]] = None, full: bool = False, workers: Optional[int] = None,
              cache_dir: Optional[str] = None, progress: bool = False) -> Audit:
    """Compile every planned specialization; nothing raises, errors are in the results."""
    t0 = time.perf_counter()
    reset()
    targets = list(TARGETS) if targets is None else list(targets)
    skipped = {}
    with triton_cache(cache_dir), compile_mode():
        kept = []
        for t in targets:
            ok, why = target_supported(t)
            if ok:
                kept.append(t)
            else:
                skipped[t] = why
        jobs = plan(kept, full)
        results = compile_all(jobs, workers, progress, t0)
    return Audit(results, skipped, len(jobs), time.perf_counter() - t0)


_JOBS: List[Tuple[Scenario, str, Spec]] = []


def _compile_job(i: int) -> Tuple[int, Result]:
    res = compile_one(*_JOBS[i])
    return i, dataclasses.replace(res, scenario=None, spec=None)  # the rest is plain data


def compile_all(jobs, workers: Optional[int] = None, progress: bool = False, t0: float = 0.0) -> List[Result]:
    """Compile the jobs, in ``workers`` forked processes when there is more than one.

    Threads do not help: Triton's front end and passes hold the GIL. Forked workers inherit
    the captured specializations (nothing is pickled but the plain results) and the state
    of :func:`compile_mode`. ``workers`` defaults to ``FASTSAL_COMPILE_WORKERS`` or
    ``min(2, cpu count)``; 1 compiles in this process.
    """
    import multiprocessing

    workers = workers or int(os.environ.get("FASTSAL_COMPILE_WORKERS", "0")) or min(2, os.cpu_count() or 1)
    results: List[Optional[Result]] = [None] * len(jobs)

    def done(n):
        if progress and n % 25 == 0:
            print(f"  {n}/{len(jobs)} compiled, {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    if workers <= 1 or len(jobs) < 4 or "fork" not in multiprocessing.get_all_start_methods():
        for i, job in enumerate(jobs):
            results[i] = compile_one(*job)
            done(i + 1)
        return results  # type: ignore[return-value]
    _JOBS[:] = jobs
    # the pool kernels cost the most: hand them out first so the workers finish together
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][2].name.startswith("_relu"))
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for n, (i, res) in enumerate(pool.imap_unordered(_compile_job, order), 1):
                results[i] = dataclasses.replace(res, scenario=jobs[i][0], spec=jobs[i][2])
                done(n)
    finally:
        _JOBS[:] = []
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------

_SKIP_FLAGS = re.compile(r"^BLOCK")

# Threads an SM can hold: 2,048 on sm_80/sm_90/sm_100, 1,536 on sm_120 (consumer Blackwell).
MAX_THREADS_PER_SM = {80: 2048, 90: 2048, 100: 2048, 120: 1536}


def occupancy(registers: int, num_warps: int, cc: int) -> float:
    """Fraction of the SM's threads resident when registers are the only limit.

    65,536 registers per SM on every target here, allocated per warp in units of 256
    (8 per thread); a block is resident whole or not at all.
    """
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    blocks = 65536 // (per_warp * num_warps)
    max_threads = MAX_THREADS_PER_SM.get(cc, 2048)
    threads = min(blocks * num_warps * 32, max_threads - max_threads % (num_warps * 32))
    return threads / max_threads


def flag_text(res: Result) -> str:
    """The kernel's constexpr flags (block sizes and ints folded to 1 by Triton left out)."""
    flags = res.spec.flags()
    names = [n for n in res.spec.param_names if n in flags and n.isupper() and not _SKIP_FLAGS.match(n)]
    return " ".join(f"{n}={int(flags[n]) if isinstance(flags[n], bool) else flags[n]}" for n in names)


def data_params(res: Result) -> List[str]:
    """Pointer parameters other than the packed sign mask (``bits*``)."""
    sig = res.spec.signature
    return [n for n in res.spec.param_names if str(sig.get(n, "")).startswith("*") and not n.startswith("bits")]


def markdown(audit: Audit) -> str:
    lines = []
    by_kernel: Dict[str, List[Result]] = {}
    for r in audit.results:
        by_kernel.setdefault(r.kernel, []).append(r)
    lines.append(f"{len(audit.results)} specializations compiled in {audit.seconds:.0f} s "
                 f"({sum(r.error is not None for r in audit.results)} failed).")
    cost: Dict[str, List[float]] = {}
    for r in audit.results:
        cost.setdefault(r.kernel, []).append(r.seconds)
    lines.append("Compile time per specialization (mean, this machine): " + ", ".join(
        f"`{k}` {sum(v) / len(v):.1f} s" for k, v in cost.items()) + ".")
    for t, why in audit.skipped_targets.items():
        lines.append(f"\n{t} skipped: this Triton cannot target it ({why}).")
    for kernel, rows in by_kernel.items():
        lines.append(f"\n### `{kernel}`\n")
        lines.append("| target | dtype | case | flags | regs | occupancy | spill B | shared B | bar.sync | widest ld | "
                     "widest st | data accesses scalar/vector |")
        lines.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        rows = sorted(rows, key=lambda r: (r.target != FULL_TARGET, r.target,
                                           list(DTYPES).index(r.scenario.label["dtype"]), repr(r.scenario.label),
                                           flag_text(r)))
        for r in rows:
            lab = r.scenario.label
            case = ", ".join(str(v) for k, v in lab.items() if k not in ("dtype", "inplace"))
            if r.error:
                lines.append(f"| {r.target} | {lab['dtype']} | {case} | {flag_text(r)} | **compile error** "
                             "| | | | | | | |")
                continue
            lds = [g.bits for g in r.global_ops if g.op == "ld"]
            sts = [g.bits for g in r.global_ops if g.op == "st"]
            sc, vec = r.access_counts(data_params(r))
            occ = occupancy(r.registers, r.num_warps, TARGETS[r.target])
            lines.append(f"| {r.target} | {lab['dtype']} | {case} | {flag_text(r)} | {r.registers} | {occ:.0%} | "
                         f"{r.spill_bytes} | {r.shared} | {r.bar_syncs} | {max(lds, default=0)} | "
                         f"{max(sts, default=0)} | {sc}/{vec} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", "--markdown", action="store_true", help="print the markdown table (default)")
    parser.add_argument("--full", action="store_true", help="every scenario on every target")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, from " + ",".join(TARGETS))
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "0")
    audit = run_audit([t.strip() for t in args.targets.split(",") if t.strip()], full=args.full, workers=args.workers,
                      progress=True)
    print(markdown(audit))
    for r in audit.results:
        if r.error:
            print(f"\n{r.target} {r.kernel} {r.scenario.label} {flag_text(r)}: {r.error}", file=sys.stderr)
    return 1 if any(r.error for r in audit.results) else 0


if __name__ == "__main__":
    sys.exit(main())
