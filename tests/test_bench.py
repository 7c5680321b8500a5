"""``fastsal bench`` and ``benchmarks/gpu_check.sh`` on a CPU: a failed memory pass leaves a
row that says so (and the CSV is still written), the CUDA-graph engine's memory is read over
its capture (fake CUDA memory counters), and the GPU script's stages leave their files."""

import csv
import math
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

from fastsal.bench import cli, engines, measure, runner
from fastsal.bench.runner import Case, parse_case, ratios

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 5)).eval()


# -- cases and ratios -------------------------------------------------------------------------

def test_parse_case():
    assert parse_case("resnet50:bf16:256") == Case("resnet50", "bf16", 256, None)
    assert parse_case("vgg16:fp32:64:inference+captum") == Case("vgg16", "fp32", 64, ("inference", "captum"))
    for bad in ("resnet50:bf16", "resnet50:int8:4", "resnet50:fp32:0", "resnet50:fp32:x", "vgg16:fp32:8:fastsal-grph"):
        with pytest.raises(ValueError):
            parse_case(bad)


def _row(engine, method, ips, mem=None, largest=None, error=""):
    return {"model": "m", "batch_size": 256, "dtype": "bf16", "engine": engine, "method": method,
            "images_per_s": ips, "peak_mem_mib": mem, "largest_batch_in_budget": largest, "error": error}


def test_ratios_skip_missing_values():
    rows = [
        _row("inference", "-", 1000.0, 100.0, 9000),
        _row("autograd", "gradient", None, error="OutOfMemoryError: at b256"),  # failed engine
        _row("captum", "guided", 200.0, None, None, error="peak memory: OutOfMemoryError"),  # failed memory
        _row("fastsal", "guided", 400.0, 50.0, 4000),
        _row("fastsal-graph", "guided", 450.0, float("nan"), ""),  # NaN and empty cells (a CSV read back)
        dict(_row("fastsal-compile", "guided", "420.0"), peak_mem_mib="", largest_batch_in_budget=""),
    ]
    table = {r["engine"]: r for r in ratios(rows)}
    assert set(table) == {"fastsal", "fastsal-graph", "fastsal-compile"}
    f = table["fastsal"]
    assert f["vs_inference_throughput"] == 0.4 and f["vs_captum_throughput"] == 2.0
    assert f["vs_autograd_throughput"] is None
    assert f["vs_captum_peak_mem"] is None and f["vs_captum_largest_batch"] is None
    assert table["fastsal-graph"]["vs_captum_peak_mem"] is None
    assert table["fastsal-compile"]["vs_captum_throughput"] == 2.1

    rows[2].update(peak_mem_mib=500.0, largest_batch_in_budget=800, error="")
    f = {r["engine"]: r for r in ratios(rows)}["fastsal"]
    assert f["vs_captum_peak_mem"] == 0.1 and f["vs_captum_largest_batch"] == 5.0


# -- a failed memory pass on the CPU path -----------------------------------------------------

def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


BENCH_ARGS = ["--case", "tiny:fp32:2", "--device", "cpu", "--size", "16", "--repeats", "1", "--warmup", "0",
              "--engine", "inference", "autograd", "fastsal", "--method", "guided", "--no-plot"]


def test_cli_writes_the_csv_when_the_memory_process_fails(monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "build_model", lambda name: tiny_model())

    def fail(*args, **kwargs):
        raise RuntimeError("the memory measurement failed: killed")
    monkeypatch.setattr(runner, "_memory_in_child", fail)
    out = tmp_path / "models.csv"
    assert cli.main([*BENCH_ARGS, "--out", str(out)]) == 0
    rows = _read_csv(out)
    assert [r["engine"] for r in rows] == ["inference", "autograd", "fastsal"]
    for r in rows:
        assert float(r["images_per_s"]) > 0
        assert r["peak_mem_mib"] == "" and r["error"].startswith("peak memory: RuntimeError")
    table = _read_csv(tmp_path / "models_ratios.csv")
    assert table[0]["vs_captum_peak_mem"] == "" and float(table[0]["vs_inference_throughput"]) > 0
    assert not (tmp_path / "models.png").exists()


def test_an_out_of_memory_case_gives_a_row_with_its_error(monkeypatch, tmp_path):
    """One engine's memory pass fails (an OOM at a large batch): its row keeps its
    throughput and says why it has no peak; the others keep theirs."""
    monkeypatch.setattr(runner, "build_model", lambda name: tiny_model())
    real_peak = runner.peak_memory
    calls = []

    def peak(step, device):
        calls.append(step)
        if len(calls) == 2:  # the second engine, autograd
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_peak(step, device)
    monkeypatch.setattr(runner, "peak_memory", peak)
    monkeypatch.setattr(runner, "_memory_in_child", lambda cases, engines, methods, size: runner.memory_pass(
        cases, torch.device("cpu"), engines, methods, size))
    out = tmp_path / "models.csv"
    assert cli.main([*BENCH_ARGS, "--out", str(out)]) == 0
    rows = {r["engine"]: r for r in _read_csv(out)}
    assert rows["autograd"]["peak_mem_mib"] == "" and "OutOfMemoryError" in rows["autograd"]["error"]
    assert float(rows["autograd"]["images_per_s"]) > 0
    for name in ("inference", "fastsal"):
        assert rows[name]["error"] == "" and float(rows[name]["peak_mem_mib"]) >= 0
        assert rows[name]["largest_batch_in_budget"] != "" or float(rows[name]["peak_mem_mib"]) == 0
    assert len(_read_csv(tmp_path / "models_ratios.csv")) == 1


def test_memory_pass_reports_a_failed_step(monkeypatch):
    def boom(step, device):
        raise torch.OutOfMemoryError("out of memory")
    monkeypatch.setattr(runner, "peak_memory", boom)
    monkeypatch.setattr(runner, "build_model", lambda name: tiny_model())
    peaks = runner.memory_pass([Case("tiny", "fp32", 2)], torch.device("cpu"), ["inference"], ["guided"], 16)
    assert peaks == {("tiny", "fp32", 2, "inference", "-"): "OutOfMemoryError: out of memory"}


def test_a_missing_captum_is_a_row_not_a_silent_gap(monkeypatch):
    monkeypatch.setitem(sys.modules, "captum.attr", None)  # import captum.attr raises ImportError
    es = engines.build_engines(tiny_model(), torch.device("cpu"), None, ["captum"], ["guided"])
    assert [(e.engine, e.method) for e in es] == [("captum", "guided")]
    with pytest.raises(ImportError):
        es[0].make_step(torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.long))


# -- the CUDA-graph engine's memory, with fake CUDA memory counters ---------------------------

class FakeCudaMemory:
    """The caching allocator's counters, moved by hand: a graph capture makes a private
    pool that stays reserved, and a replay allocates nothing."""

    def __init__(self, monkeypatch, allocated=1 * GiB, reserved=2 * GiB):
        self.allocated, self.reserved, self.cached_free = allocated, reserved, 0
        self.peak = allocated
        for name in ("synchronize", "empty_cache", "memory_allocated", "memory_reserved",
                     "reset_peak_memory_stats", "max_memory_allocated"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def synchronize(self, device=None):
        pass

    def empty_cache(self):
        self.reserved -= self.cached_free
        self.cached_free = 0

    def memory_allocated(self, device=None):
        return self.allocated

    def memory_reserved(self, device=None):
        return self.reserved

    def reset_peak_memory_stats(self, device=None):
        self.peak = self.allocated

    def max_memory_allocated(self, device=None):
        return self.peak

    def alloc(self, n, new_segment=True):
        self.allocated += n
        if new_segment:
            self.reserved += n
        self.peak = max(self.peak, self.allocated)

    def free(self, n, cached=True):
        self.allocated -= n
        self.cached_free += n if cached else 0


def fake_graph_step(mem: FakeCudaMemory, warmup_peak: int, pool: int, outputs: int):
    """First call: eager warm-up (its blocks go back to the general cache), then a capture
    whose blocks stay in the graph's private pool (``outputs`` of it still live). Later
    calls: replays, which allocate nothing."""
    state = {"captured": False}

    def step():
        if not state["captured"]:
            mem.alloc(warmup_peak)
            mem.free(warmup_peak, cached=True)
            mem.alloc(pool)
            mem.free(pool - outputs, cached=False)  # freed into the private pool: still reserved
            state["captured"] = True
    return step


def test_a_replay_hides_the_graph_memory_and_the_capture_shows_it(monkeypatch):
    mem = FakeCudaMemory(monkeypatch)
    step = fake_graph_step(mem, warmup_peak=3 * GiB, pool=3 * GiB + GiB // 2, outputs=GiB // 8)
    assert measure.capture_memory(step) == 3 * GiB + GiB // 2  # the pool it keeps
    # what the old measurement read: a replay after the capture allocates nothing
    assert measure.peak_memory(step, torch.device("cuda")) == 0


def test_capture_memory_takes_the_peak_when_it_exceeds_the_pool(monkeypatch):
    mem = FakeCudaMemory(monkeypatch)
    step = fake_graph_step(mem, warmup_peak=5 * GiB, pool=2 * GiB, outputs=GiB // 8)
    assert measure.capture_memory(step) == 5 * GiB


def test_engines_read_graph_memory_over_the_capture():
    es = engines.build_engines(tiny_model(), torch.device("cuda"), None,
                               ["fastsal", "fastsal-compile", "fastsal-graph"], ["guided"])
    assert {e.engine: e.memory for e in es} == {"fastsal": "step", "fastsal-compile": "step",
                                                "fastsal-graph": "capture"}


def test_cuda_bench_reads_memory_in_the_timing_pass(monkeypatch):
    """The CUDA branch of ``bench``, with the device faked: the graph engine's peak comes
    from its first call (the capture), the others' from one warm step; an OOM in one memory
    reading leaves an error in that row alone; each row reaches ``on_row`` as its case ends."""
    calls = []

    def engine(name, memory="step"):
        def make(x, target):
            def step():
                calls.append(("step", name))
            return step
        return engines.Engine(name, "guided", make, memory=memory)

    fake_engines = [engine("fastsal"), engine("captum"), engine("fastsal-graph", "capture")]
    cases = [Case("tiny", "bf16", 8), Case("tiny", "bf16", 32)]
    monkeypatch.setattr(runner, "_cases", lambda cases_, device, size: (
        (c, tiny_model(), torch.zeros(c.batch_size, 3, 16, 16), torch.zeros(c.batch_size, dtype=torch.long))
        for c in cases_))
    monkeypatch.setattr(runner, "build_engines", lambda model, device, amp, names, methods: list(fake_engines))
    monkeypatch.setattr(runner, "run_once", lambda step, device: (step(), 0.01)[1])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def capture(step):
        calls.append(("capture",))
        step()
        return GiB if calls.count(("capture",)) == 1 else 4 * GiB  # batch 8, then 32

    def peak(step, device):
        step()
        if calls.count(("peak",)) == 2:  # the fastsal step of the second case
            calls.append(("peak",))
            raise torch.OutOfMemoryError("CUDA out of memory")
        calls.append(("peak",))
        return GiB

    monkeypatch.setattr(runner, "capture_memory", capture)
    monkeypatch.setattr(runner, "peak_memory", peak)
    seen = []
    rows = runner.bench(cases, torch.device("cuda"), ["fastsal", "captum", "fastsal-graph"], ["guided"], 16,
                        repeats=2, warmup=2, memory_budget_gib=64.0, log=lambda s: None, on_row=seen.append)
    assert len(seen) == len(rows) == 6
    by = {(r["batch_size"], r["engine"]): r for r in rows}
    graph = by[(8, "fastsal-graph")]
    assert graph["peak_mem_mib"] == 1024 and graph["peak_mem_kind"] == "capture"
    assert by[(32, "fastsal-graph")]["peak_mem_mib"] == 4 * 1024
    assert by[(8, "fastsal")]["peak_mem_mib"] == 1024 and by[(8, "fastsal")]["peak_mem_kind"] == "step"
    assert by[(32, "fastsal")]["peak_mem_mib"] is None and "OutOfMemoryError" in by[(32, "fastsal")]["error"]
    assert by[(32, "fastsal")]["images_per_s"] == 3200.0
    # the capture is the graph engine's first call, and counts as one of its warm-up calls;
    # then one untimed round of every engine (the capture emptied the allocator's cache)
    first = calls.index(("capture",))
    assert calls[first + 1] == ("step", "fastsal-graph")
    assert sum(1 for c in calls if c == ("step", "fastsal-graph")) == 2 * (2 + 1 + 2)
    assert sum(1 for c in calls if c == ("step", "captum")) == 2 * (2 + 1 + 2 + 1)  # + its memory step
    # the largest batch: on the line through both batches (graph: 3 GiB per 24 images, no
    # fixed part), or proportional to the one batch with a figure (fastsal: 1 GiB at 8)
    assert graph["largest_batch_in_budget"] == 512
    assert by[(8, "fastsal")]["largest_batch_in_budget"] == 512
    assert by[(32, "fastsal")]["largest_batch_in_budget"] == 512  # the failed case's row gets it too
    assert not any(math.isnan(float(r["images_per_s"])) for r in rows)
    assert ratios(rows)


# -- benchmarks/gpu_check.sh ------------------------------------------------------------------

EXPECTED = {"machine.txt", "gpu_tests.log", "kernels.csv", "kernels.log", "models.csv", "models_ratios.csv",
            "models.log", "summary.txt"}

STUB = r"""#!/usr/bin/env bash
# a stand-in for python: records its arguments, writes what the real scripts would write
echo "$*" >> "$STUB_LOG"
out=""; prev=""
for a in "$@"; do [ "$prev" = "--out" ] && out=$a; prev=$a; done
case "$*" in
  *"-m pytest"*) echo "1 failed, 45 passed"; exit 1 ;;
  *bench_models.py*) echo "engine" > "$out"; echo "engine" > "${out%.csv}_ratios.csv" ;;
  *bench_kernels.py*) echo "op" > "$out" ;;
esac
exit 0
"""


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_runs_every_stage_and_keeps_going_after_a_failure(tmp_path):
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(stub), STUB_LOG=str(tmp_path / "calls.log"))
    env.pop("OUT", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the failed test stage is reported
    assert set(os.listdir(out)) == EXPECTED  # 8 files: all a device call returns
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["install", "gpu_tests", "kernels", "models"]
    assert "exit 1" in summary[1] and all("exit 0" in summary[i] for i in (0, 2, 3))
    calls = (tmp_path / "calls.log").read_text().splitlines()
    order = [next(i for i, c in enumerate(calls) if key in c) for key in ("pytest", "bench_kernels", "bench_models")]
    assert order == sorted(order)
    assert "--no-index --no-deps" in "\n".join(calls)
    models = next(c for c in calls if "bench_models" in c)
    assert "resnet50:bf16:256 vgg16:bf16:256" in models and "--no-plot" in models
    assert "fastsal-compile" not in models.split("resnet50:fp32:64")[1].split()[0]


def test_the_shipped_captum_wheel_is_pure_python_and_small():
    wheels = [f for f in os.listdir(os.path.join(ROOT, "benchmarks", "wheels")) if f.endswith(".whl")]
    assert len(wheels) == 1 and wheels[0].endswith("-py3-none-any.whl") and wheels[0].startswith("captum-")
    path = os.path.join(ROOT, "benchmarks", "wheels", wheels[0])
    assert os.path.getsize(path) < 1 << 20
    with zipfile.ZipFile(path) as z:
        assert not [n for n in z.namelist() if n.endswith((".so", ".pyd"))]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run_installs_the_captum_wheel_apart(tmp_path):
    """The real install stage of a dry run: Captum from the shipped wheel, imported from its
    own folder (the full dry run takes 1-2.5 minutes on 2 cores: run it by hand)."""
    env = dict(os.environ, GPU_CHECK_STAGES="install", PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    machine = (tmp_path / "machine.txt").read_text()
    assert "DRY RUN" in machine and "captum 0.9.0 from" in machine and "gpu_check_site" in machine
    summary = (tmp_path / "summary.txt").read_text()
    assert "install: exit 0" in summary and "models: skipped" in summary
