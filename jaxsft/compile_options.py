"""XLA options the trainer compiles its programs with (``TrainConfig.xla_options``).

Why: on GPUs, whether gradient all-reduces overlap the backward pass is decided by XLA passes
(the latency-hiding scheduler, loop double-buffering, collective pipelining). Options given here
are passed per program, not through the process-wide ``XLA_FLAGS``, so the user's other jitted
code is left alone, and a bad name fails when the trainer is built.

``TrainConfig.xla_options=None`` (the default) means :data:`BACKEND_DEFAULTS` for the backend in use,
and ``{}`` means XLA's own settings. On GPU the default turns off XLA's Triton GEMM fusions, so every
matmul goes to cuBLAS: on one H200 (Qwen2.5-0.5B shape) this trained as fast (117.4k against 116.3k
tokens/s, within run-to-run noise) and compiled much faster (first step 11.7 s against 16.1 s; a packed ragged call
meeting 7 new layouts 25.2 s against 35.5 s), most likely because XLA autotunes every Triton GEMM
fusion while compiling (not profiled; see benchmarks/RESULTS.md). CPU and TPU keep XLA's settings. ``GPU_OVERLAP_OPTIONS`` is an opt-in preset:
on 2 x H200 (jax 0.11.2) it changed data-parallel scaling by less than run-to-run noise, and an
FSDP run compiled with it did not finish within 4 minutes, so it is not switched on for users
(see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax

BACKEND_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpu": {"xla_gpu_enable_triton_gemm": False},
}


def resolve(options: Optional[dict[str, Any]], backend: Optional[str] = None) -> dict[str, Any]:
    """The options programs compile with: ``options`` as given, or for None the backend's measured defaults
    (those this XLA release accepts; a retired name is dropped, not an error, since the user did not ask for it)."""
    if options is not None:
        return dict(options)
    defaults = BACKEND_DEFAULTS.get(backend or jax.default_backend(), {})
    return {name: value for name, value in defaults.items() if accepted(name, value)}


GPU_OVERLAP_OPTIONS: dict[str, Any] = {
    "xla_gpu_enable_latency_hiding_scheduler": True,
    "xla_gpu_enable_pipelined_all_reduce": True,
    "xla_gpu_enable_pipelined_all_gather": True,
    "xla_gpu_enable_pipelined_reduce_scatter": True,
    "xla_gpu_enable_while_loop_double_buffering": True,
}


def gpu_overlap_options() -> dict[str, Any]:
    """``GPU_OVERLAP_OPTIONS`` minus those this XLA release does not know (they are renamed and retired)."""
    return {name: value for name, value in GPU_OVERLAP_OPTIONS.items() if accepted(name, value)}


@functools.lru_cache(maxsize=None)
def accepted(name: str, value: Any) -> bool:
    """Whether this process's XLA accepts ``name=value`` as a compile option (probed once, cached)."""
    try:
        _compile_scalar({name: value})
    except Exception:  # JaxRuntimeError INVALID_ARGUMENT: No such compile option
        return False
    return True


def _compile_scalar(options: dict[str, Any]) -> None:
    jax.jit(lambda x: x + 1).lower(jax.numpy.zeros((), jax.numpy.float32)).compile(compiler_options=options)


def check(options: dict[str, Any]) -> None:
    """Compile a scalar program with ``options`` so a bad name or value fails at construction, not mid-step."""
    if not options:
        return
    try:
        _compile_scalar(options)
    except Exception as err:  # XLA raises JaxRuntimeError (INVALID_ARGUMENT) for unknown names and bad values
        raise ValueError(
            f"TrainConfig.xla_options={options!r} was refused by XLA ({err}); pass valid XLA option names and values "
            "(see xla/debug_options_flags.cc), or {} for XLA's defaults."
        ) from None
