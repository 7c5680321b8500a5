"""Triton kernels of fastsal, each beside a plain-torch reference with the same signature.

Installed as ``fastsal._kernels`` (PyPI already has an unrelated ``kernels`` package).

* :mod:`.reference` -- the plain-torch versions; also the CPU path.
* :mod:`.relu`      -- the ReLU family (ReLU, clipped ReLU, LeakyReLU): forward with a packed
                       mask, backward for the three rules.
* :mod:`.maxpool`   -- max-pool forward with int8 switches (optionally fused with a ReLU),
                       and the unpool backward as a deterministic gather.

Importing this package does not import Triton; :func:`triton_available` tells whether the
Triton modules can be loaded.
"""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (set before the kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
