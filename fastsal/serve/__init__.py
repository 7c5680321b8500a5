"""``fastsal serve``: predictions and their saliency maps from a model server.

The serving logic is framework-free (:mod:`.decoding` with its limits, :mod:`.batcher`,
:mod:`.engine`, :mod:`.encoding`, :mod:`.errors`, tied together by :mod:`.service`);
:mod:`.kserve_adapter` puts it behind KServe's Python model server (the ``serve`` extra), and
is the only module here that imports KServe. A second adapter (LitServe, Triton's Python
backend) would call :meth:`Service.v1` / :meth:`Service.v2` the same way.
"""

from fastsal.serve.decoding import Limits
from fastsal.serve.encoding import decode_map, encode_map
from fastsal.serve.errors import BadRequest, ServeError, TooLarge, Unavailable
from fastsal.serve.service import ServeConfig, Service

__all__ = ["BadRequest", "Limits", "ServeConfig", "ServeError", "Service", "TooLarge", "Unavailable",
           "decode_map", "encode_map"]
