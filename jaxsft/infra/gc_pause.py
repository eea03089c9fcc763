"""Python's cyclic garbage collector held off while a program is traced and lowered.

Why: tracing allocates in bursts (tracers, equations, MLIR objects), and each burst sets off the collector,
whose full passes walk every object the process holds: the model, the trainer, and the hundreds of thousands of
objects that torch and transformers bring. On this repository's CPU, holding it off took the lowering of a first
ragged 0.5B training call's three GPU programs from 2.26-2.40 s to 1.60-1.66 s (benchmarks/RESULTS.md, nineteenth
session). Lowering runs on the caller's thread, one program after another, before the last compile can start, so
the time is on a first step's critical path.

Only lowering is covered, never a compile or a run: the collector is off for well under a second per program, and
the cycles tracing leaves behind are collected at the collector's next pass after it is back on. A caller that
had turned the collector off keeps it off; nested and concurrent uses turn it back on only when the last one ends.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

_lock = threading.Lock()
_depth = 0  # uses in progress (any thread)
_was_enabled = False  # the collector's state when the first of them began


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Hold the cyclic collector off for the block (see the module's docstring)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
