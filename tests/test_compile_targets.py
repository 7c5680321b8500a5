"""Every Triton kernel compiled for real GPUs on the CPU, and checks on what the compiler made.

The interpreter the other kernel tests run in is not the compiler: these tests compile each
specialization the launchers produce for sm_80, sm_90, sm_100 (and sm_120 where the installed
Triton can target it) down to a cubin, and assert on registers, spills, shared memory and the
width of the global loads and stores in the PTX. Each specialization is captured from a real
launcher call and bound by Triton's own specialization code (see ``compile_targets.py``).

Budget: compiling costs ~0.5-1 s per specialization on a free core, so by default sm_90 gets a
covering subset of the launchers' product (every value of every flag, the heaviest
configurations, every dtype where vector widths are asserted, the clipped ReLU and LeakyReLU
rows of the relu kernels; ~90 specializations) and the other targets a few per kernel.
``FASTSAL_COMPILE_FULL=1`` compiles the whole product (~710 specializations per target; minutes).
``FASTSAL_COMPILE_WORKERS`` sets the worker processes. ``python tests/compile_targets.py --table``
prints the same audit as markdown.
"""

from __future__ import annotations

import os

import pytest

from fastsal._kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")

# ======================================================================================
# THRESHOLDS -- the one place to change what the compiler output must satisfy.
# Names are the kernels' and their parameters' names in kernels/*.py;
# test_thresholds_name_compiled_kernels fails when one no longer exists.
# ======================================================================================

# Registers per thread on every target: (budget when INT64=False, budget when INT64=True).
# Resident threads per SM at 4 warps (65,536 registers; 2,048 threads on sm_80/90/100):
# <=32 regs 100 %, 40 75 %, 48 62.5 %, 64 50 %, 80 37.5 %, 128 25 %, 160 18.75 %, 200 12.5 %.
REGISTER_BUDGET = {
    "_relu_forward_kernel": (32, 32),
    "_relu_backward_kernel": (32, 32),
    "_max_pool2d_forward_kernel": (128, 128),
    "_unpool_backward_kernel": (160, 200),
}

# Spill bytes per thread (stores + loads) allowed when INT64=True. INT64=False: always 0.
INT64_SPILL_BUDGET = {
    "_relu_forward_kernel": 0,
    "_relu_backward_kernel": 0,
    "_max_pool2d_forward_kernel": 0,
    "_unpool_backward_kernel": 0,
}

# Tensors that must move in wide vectors when Triton's divisibility-by-16 hint holds on their
# pointers: kernel -> {pointer parameter: "ld" or "st"}. The accesses of at least VECTOR_BITS
# (or a whole thread's share when that is smaller, e.g. 8 int8 switches = 64 bits) must move
# at least one full program's per-thread share of the tensor.
VECTOR_BITS = 128
VECTOR_ACCESSES = {
    "_relu_forward_kernel": {"x_ptr": "ld", "y_ptr": "st"},
    "_relu_backward_kernel": {"grad_ptr": "ld", "out_ptr": "st"},
    "_max_pool2d_forward_kernel": {"out_ptr": "st", "switch_ptr": "st"},
}

# Kernels that must not round-trip through shared memory (a layout conversion): no shared
# bytes (ck.metadata.shared) and no bar.sync in the PTX.
NO_SHARED_MEMORY = ("_relu_forward_kernel", "_relu_backward_kernel", "_max_pool2d_forward_kernel")

# ======================================================================================

import compile_targets as ct  # noqa: E402  (tests/ is on sys.path, see conftest.py)

FULL = os.environ.get("FASTSAL_COMPILE_FULL", "") not in ("", "0")


@pytest.fixture(scope="module")
def audit():
    """Capture, bind and compile once for the module (Triton's cache in a temporary folder)."""
    return ct.run_audit(full=FULL)


def _ok(audit):
    return [r for r in audit.results if r.error is None]


def _describe(r) -> str:
    return f"{r.target} {r.kernel} {r.scenario.label} [{ct.flag_text(r)}]"


def _int64(r) -> bool:
    return bool(r.spec.flags().get(ct.INT64_CONSTEXPR, False))


@pytest.mark.parametrize("target", list(ct.TARGETS))
def test_every_kernel_compiles_for(audit, target):
    if target in audit.skipped_targets:
        pytest.skip(f"this Triton cannot target {target}: {audit.skipped_targets[target]}")
    mine = [r for r in audit.results if r.target == target]
    assert mine, f"nothing was compiled for {target}"
    failed = [f"{_describe(r)}: {r.error.splitlines()[0] if r.error else ''}" for r in mine if r.error]
    assert not failed, f"{len(failed)} of {len(mine)} specializations failed to compile:\n" + "\n".join(failed[:20])


def test_every_kernel_is_compiled_for_every_target(audit):
    kernels = {r.kernel for r in audit.results}
    for target in ct.TARGETS:
        if target not in audit.skipped_targets:
            assert {r.kernel for r in audit.results if r.target == target} == kernels, target


def test_no_spills_without_int64(audit):
    bad = [f"{_describe(r)}: {r.spill_bytes} B spilled, {r.registers} regs" for r in _ok(audit)
           if not _int64(r) and r.spill_bytes]
    assert not bad, "\n".join(bad)


def test_int64_spills_within_budget(audit):
    bad = [f"{_describe(r)}: {r.spill_bytes} B spilled > {INT64_SPILL_BUDGET.get(r.kernel, 0)}" for r in _ok(audit)
           if _int64(r) and r.spill_bytes > INT64_SPILL_BUDGET.get(r.kernel, 0)]
    assert not bad, "\n".join(bad)


def test_registers_within_budget(audit):
    bad = []
    for r in _ok(audit):
        budget = REGISTER_BUDGET[r.kernel][1 if _int64(r) else 0]
        if r.registers > budget:
            bad.append(f"{_describe(r)}: {r.registers} registers > {budget}")
    assert not bad, "\n".join(bad)


def test_vector_accesses_when_hints_hold(audit):
    """The data tensors move in 128-bit vectors in the full programs.

    Expected share: a full program moves ``numel // programs`` elements of the tensor over
    ``32 * num_warps`` threads (numbers from the captured launch). Masked tail paths may stay
    scalar, so only the vector accesses are counted, and they must cover that share; a
    kernel whose full path went scalar, or narrower, fails.
    """
    bad, checked = [], 0
    for r in _ok(audit):
        wanted = VECTOR_ACCESSES.get(r.kernel)
        if not wanted or not set(wanted) <= set(r.spec.hinted()):
            continue  # no divisibility hint on a pointer: Triton cannot vectorize, nothing to ask
        threads = 32 * r.num_warps
        for param, op in wanted.items():
            numel, size = r.spec.tensors[param]
            share = numel // r.spec.programs // threads * size
            width = min(VECTOR_BITS, share * 8)
            moved = sum(g.bits for g in r.global_ops if g.op == op and param in g.params and g.bits >= width) // 8
            widths = sorted({g.bits for g in r.global_ops if g.op == op and param in g.params})
            checked += 1
            if share and moved < share:
                bad.append(f"{_describe(r)}: {param} {op} moves {moved} of {share} B per thread in >= {width}-bit "
                           f"accesses (widths seen: {widths})")
    assert checked, "no hinted specialization of a kernel in VECTOR_ACCESSES was compiled"
    assert not bad, "\n".join(bad)


def test_relu_has_no_shared_memory_round_trip(audit):
    bad = [f"{_describe(r)}: {r.shared} B shared, {r.bar_syncs} bar.sync" for r in _ok(audit)
           if r.kernel in NO_SHARED_MEMORY and (r.shared or r.bar_syncs)]
    assert not bad, "\n".join(bad)


def test_thresholds_name_compiled_kernels(audit):
    compiled = {r.kernel for r in audit.results}
    for table in (REGISTER_BUDGET, INT64_SPILL_BUDGET, VECTOR_ACCESSES):
        assert set(table) <= compiled, f"thresholds name kernels that were not compiled: {set(table) - compiled}"
        assert compiled <= set(table) or table is VECTOR_ACCESSES, f"no threshold for {compiled - set(table)}"
    assert set(NO_SHARED_MEMORY) <= compiled
    params = {r.kernel: set(r.spec.param_names) for r in audit.results}
    for kernel, wanted in VECTOR_ACCESSES.items():
        assert set(wanted) <= params[kernel], f"{kernel} has no parameter {set(wanted) - params[kernel]}"


def test_default_plan_covers_every_flag_value(audit):
    """Every value a launcher gives each constexpr (over the full product) is compiled for sm_90.

    Guards the covering subset: a new flag or rule in a kernel fails here until a scenario
    compiles it. Captures every scenario of the product (no compiling: a few seconds).
    """
    produced = {}
    for scenario in ct.scenarios():
        for launch in ct.capture_scenario(scenario):
            kernel, flags = ct.launch_constexprs(launch)
            for name, value in flags.items():
                produced.setdefault((kernel, name), set()).add(value)
    compiled = {}
    for r in audit.results:
        if r.target == ct.FULL_TARGET:
            for name, value in r.spec.flags().items():
                compiled.setdefault((r.kernel, name), set()).add(value)
    missing = {k: sorted(map(repr, v - compiled.get(k, set()))) for k, v in produced.items()
               if v - compiled.get(k, set())}
    assert not missing, f"constexpr values the launchers produce but {ct.FULL_TARGET} never compiled: {missing}"


def test_read_ptx_attributes_accesses_to_parameters():
    ptx = """
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u64 .ptr .global .align 1 k_param_1,
	.param .u32 k_param_2
)
{
	.loc	1 2 0
	ld.param.b64 	%rd1, [k_param_0];
	ld.param.b64 	%rd2, [k_param_1];
	ld.param.b32 	%r1, [k_param_2];
$L__tmp0:
	mov.u32 	%r2, %tid.x;
	.loc	1 3 0
	mul.wide.s32 	%rd3, %r2, 16;
	add.s64 	%rd4, %rd1, %rd3;
	setp.lt.s32 	%p1, %r2, %r1;
	// begin inline asm
	mov.u32 %r3, 0x0;
	@%p1 ld.global.v4.b32 { %r3, %r4, %r5, %r6 }, [ %rd4 + 0 ];
	// end inline asm
	.loc	1 4 0
	mad.wide.s32 	%rd5, %r2, 4, %rd2;
	bar.sync 	0;
	@%p1 st.global.b32 	[ %rd5 + 0 ], %r3;
	ret;
}
"""
    ops, barriers = ct.read_ptx(ptx, ["x_ptr", "y_ptr", "n"])
    assert [(g.op, g.bits, g.params, g.vector) for g in ops] == [
        ("ld", 128, ("x_ptr",), True), ("st", 32, ("y_ptr",), False)]
    assert barriers == 1
