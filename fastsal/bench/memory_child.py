"""Run by ``fastsal bench`` on a CPU: the peak memory pass, in a process whose allocator
returns freed memory at once from the start (see :func:`release_freed_memory_eagerly`)."""

import json
import sys

from fastsal.bench.measure import release_freed_memory_eagerly


def main() -> None:
    release_freed_memory_eagerly()
    import torch

    from fastsal.bench.runner import Case, memory_pass

    spec = json.loads(sys.argv[1])
    cases = [Case(m, d, b, tuple(e) if e else None) for m, d, b, e in spec["cases"]]
    peaks = memory_pass(cases, torch.device("cpu"), spec["engines"], spec["methods"], spec["size"])
    print(json.dumps([[list(k), v] for k, v in peaks.items()]))


if __name__ == "__main__":
    main()
