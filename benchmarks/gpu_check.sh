#!/usr/bin/env bash
# One script for a GPU machine with no network, under 10 minutes: install fastsal, run the
# `gpu` tests (compiled Triton kernels against the reference, every dtype, torch.compile
# and a CUDA-graph capture), the kernel benchmark, then the model benchmark (resnet50 and
# vgg16, bf16 and fp32, batch 64 and 256, guided backprop, every engine). Logs and CSVs go to $OUT (or the
# folder given as $1).
#
#   bash benchmarks/gpu_check.sh                # writes to $OUT, else benchmarks/results/gpu-<date>
#   bash benchmarks/gpu_check.sh /tmp/results
set -uo pipefail
cd "$(dirname "$0")/.."
dest="${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}}"
mkdir -p "$dest"
export PYTHONUNBUFFERED=1

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$dest/machine.txt" 2>&1
cat "$dest/machine.txt"

python -m pip install -q --no-deps --no-build-isolation -e . >> "$dest/machine.txt" 2>&1 || {
  echo "install failed, see $dest/machine.txt"; tail -20 "$dest/machine.txt"; exit 1; }

status=0
timeout 240 python -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tee "$dest/gpu_tests.log" || status=1
timeout 120 python benchmarks/bench_kernels.py --out "$dest/kernels.csv" 2>&1 | tee "$dest/bench_kernels.log" || status=1
# models: guided backprop, every engine; the CSV, its ratios and the PNG land beside each other
timeout 240 python benchmarks/bench_models.py --model resnet50 vgg16 --batch-size 64 256 --dtype bf16 fp32 \
  --method guided --repeats 5 --warmup 2 --out "$dest/models.csv" > "$dest/bench_models.log" 2>&1 || status=1
tail -30 "$dest/bench_models.log"
echo "gpu_check finished with status $status; results in $dest"
exit $status
