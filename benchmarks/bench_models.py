"""Model-level benchmark, the same code as ``fastsal bench`` (see ``fastsal bench --help``).

    python benchmarks/bench_models.py --quick --out benchmarks/results/cpu-quick.csv
    python benchmarks/bench_models.py --model resnet50 vgg16 --batch-size 64 256 --dtype bf16 fp32
    python benchmarks/bench_models.py --case resnet50:bf16:256 resnet50:fp32:64:inference+captum+fastsal

Rows reach the CSV (and its ``_ratios.csv``) as each case ends, so a run cut short keeps them.
"""

import sys

from fastsal.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
