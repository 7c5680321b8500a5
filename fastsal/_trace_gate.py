"""Keeps ``torch.fx`` tracing and rewritten models' forwards from overlapping across threads.

``torch.fx`` patches ``nn.Module.__call__`` process-wide while it traces, so a module called
from another thread during a trace would be routed into the tracer. The rewriting pass
traces under :meth:`TraceGate.tracing`; rewritten models run their eager forward under
:meth:`TraceGate.running`: any number of forwards at once, or one trace, never both.
(Other code running plain modules during a rewrite is not covered: rewrite before serving.)
"""

from __future__ import annotations

import threading
from contextlib import contextmanager


class TraceGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tracing = False
        self._running = 0
        self._tracer_thread: int | None = None

    @contextmanager
    def tracing(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._tracing and self._running == 0)
            self._tracing = True
            self._tracer_thread = threading.get_ident()
        try:
            yield
        finally:
            with self._cond:
                self._tracing = False
                self._tracer_thread = None
                self._cond.notify_all()

    @contextmanager
    def running(self):
        with self._cond:
            # a forward inside this thread's own trace (fx calling a module) must not wait for itself
            if self._tracer_thread != threading.get_ident():
                self._cond.wait_for(lambda: not self._tracing)
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()


GATE = TraceGate()
