#!/usr/bin/env bash
# One script for a rare, short GPU run (one call of at most 10 minutes, no network): install
# fastsal and the Captum wheel shipped in benchmarks/wheels/, then three stages, each with its
# own timeout and its own files, so a failure or a timeout in one still returns the others':
#
#   1. the `gpu` tests (compiled Triton kernels against the reference, torch.compile, CUDA graphs)
#   2. the kernel benchmark (GB/s against the card's copy bandwidth)
#   3. the model benchmark, guided backprop, every engine, rows written as they are measured:
#      resnet50 and vgg16 in bf16, channels_last, batch 256 (the headline targets), then
#      resnet50 in fp32 at batch 64 without torch.compile (a second compile would not fit)
#
# It writes 8 files, the most a device call returns, into $OUT (or the folder given):
#   machine.txt  gpu_tests.log  kernels.csv  kernels.log  models.csv  models_ratios.csv
#   models.log  summary.txt (each stage's exit status and seconds; 124 = timed out)
# Worst case 45 + 160 + 75 + 270 s of stages (+ ~10 s): it ends inside a 600 s call (timeout_s=600).
#
#   bash benchmarks/gpu_check.sh                    # writes to $OUT, else benchmarks/results/gpu-<date>
#   bash benchmarks/gpu_check.sh /tmp/results
#   bash benchmarks/gpu_check.sh --dry-run /tmp/dry # on a CPU: the same stages at toy sizes (1-2.5
#                                                   # minutes on 2 cores); installs nothing for good
#   GPU_CHECK_STAGES="install models" bash benchmarks/gpu_check.sh ...   # only these stages
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
dest="${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PIP_ROOT_USER_ACTION=ignore
stages=" ${GPU_CHECK_STAGES:-install gpu_tests kernels models} "
summary="$dest/summary.txt"
: > "$summary"
status=0

# stage NAME SECONDS CMD...: run CMD under its own timeout, note its status and seconds
stage() {
  local name=$1 limit=$2 t0 rc
  shift 2
  case "$stages" in *" $name "*) ;; *) echo "$name: skipped" >> "$summary"; return 0 ;; esac
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@"
  rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - t0 )) s (limit $limit s)$([ $rc = 124 ] && echo ', timed out')" \
    >> "$summary"
  [ $rc = 0 ] || status=1
  return 0
}

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  [ $dry = 1 ] && echo "DRY RUN: toy sizes on $(uname -m), nothing installed for good"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  timeout 60 "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', \
    torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$dest/machine.txt" 2>&1

# Install, with no network. Captum is pure Python (py3-none-any); what it imports at
# `import captum.attr` (matplotlib, numpy, packaging, tqdm, torch) is on the GPU image, so it
# goes in with --no-deps. Into a folder of its own, put first on PYTHONPATH.
site="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")"
install() {
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    benchmarks/wheels/captum-*.whl || return 1
  if [ $dry = 0 ]; then  # a dry run uses the fastsal already installed here
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
  fi
  PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import captum, captum.attr, fastsal
print('captum', captum.__version__, 'from', captum.__file__)
print('fastsal', fastsal.__version__, 'from', fastsal.__file__)"
}
export -f install
export PY site dry
stage install 45 bash -c install >> "$dest/machine.txt" 2>&1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
cat "$dest/machine.txt"

if [ $dry = 1 ]; then
  tests=(--collect-only -q)
  kernels=(--quick --dtypes float32)
  models=(--case resnet18:fp32:2 --size 32 --repeats 2 --warmup 1 --device cpu
          --engine inference autograd captum fastsal)
else
  tests=(-q --durations=15)
  kernels=()
  models=(--case resnet50:bf16:256 vgg16:bf16:256
          resnet50:fp32:64:inference+autograd+captum+fastsal+fastsal-graph
          --repeats 5 --warmup 2)
fi

# 1. the compiled kernels, before anything else can use up the time
stage gpu_tests 160 "$PY" -m pytest -m gpu tests/ -p no:cacheprovider "${tests[@]}" > "$dest/gpu_tests.log" 2>&1
tail -5 "$dest/gpu_tests.log"
# 2. each kernel against torch, and the copy bandwidth
stage kernels 75 "$PY" benchmarks/bench_kernels.py --out "$dest/kernels.csv" "${kernels[@]}" > "$dest/kernels.log" 2>&1
tail -3 "$dest/kernels.log"
# 3. the models; models.csv and models_ratios.csv grow a row at a time (no PNG: 8 files at most)
stage models 270 "$PY" benchmarks/bench_models.py "${models[@]}" --method guided --no-plot \
  --out "$dest/models.csv" > "$dest/models.log" 2>&1
tail -12 "$dest/models.log"

rm -rf "$site"
cat "$summary"
echo "gpu_check finished with status $status; results in $dest"
exit $status
