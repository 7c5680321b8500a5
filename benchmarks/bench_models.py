"""Model-level benchmark, the same code as ``fastsal bench`` (see ``fastsal bench --help``).

    python benchmarks/bench_models.py --quick --out benchmarks/results/cpu-quick.csv
    python benchmarks/bench_models.py --model resnet50 vgg16 --batch-size 64 256 --dtype bf16 fp32
"""

import sys

from fastsal.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
