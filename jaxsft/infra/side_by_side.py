"""Several new programs compiled side by side: each lowered here, in turn, and compiled in a thread as soon as it is.

Why: XLA compiles outside the GIL, so a call that meets several new programs (a training call's packed layouts, a
first ``generate`` call's prefill and decode) waits about as long as its lowerings plus its slowest compile, not
the sum of its compiles. Lowering stays on the calling thread (it is Python), with the cyclic collector held off
(:mod:`jaxsft.infra.gc_pause`). Used by the trainer's programs and the generation engine's, so both follow one rule.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Callable, Hashable, Mapping, Optional, TypeVar

import jax

from jaxsft.infra.gc_pause import paused_gc

Key = TypeVar("Key", bound=Hashable)


def lowered_here(lower: Callable[[], jax.stages.Lowered]) -> jax.stages.Lowered:
    """``lower()`` with the collector held off: the one way a program of the trainer or the engine is lowered
    (the trainer's lowerings pause it themselves too, for programs built one at a time; a nested pause only counts)."""
    with paused_gc():
        return lower()


def compile_side_by_side(
    lowerings: Mapping[Key, Callable[[], jax.stages.Lowered]],
    compile_one: Callable[[jax.stages.Lowered], Any],
    meanwhile: Optional[Callable[[], None]] = None,
) -> dict[Key, Any]:
    """``{key: compile_one(lowering())}`` for every entry, in order, compiled side by side (at most one compile per
    host core at a time). ``meanwhile`` is host work run here once every program is lowered, while they compile."""
    if not lowerings:
        if meanwhile is not None:
            meanwhile()
        return {}
    workers = min(len(lowerings), os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {key: pool.submit(compile_one, lowered_here(lower)) for key, lower in lowerings.items()}
        if meanwhile is not None:
            meanwhile()
        return {key: future.result() for key, future in futures.items()}
