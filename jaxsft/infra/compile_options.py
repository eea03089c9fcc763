"""XLA options the trainer compiles its programs with (``TrainConfig.xla_options``).

Why: on GPUs, whether gradient all-reduces overlap the backward pass is decided by XLA passes
(the latency-hiding scheduler, loop double-buffering, collective pipelining). Options given here
are passed per program, not through the process-wide ``XLA_FLAGS``, so the user's other jitted
code is left alone, and a bad name fails when the trainer is built.

``TrainConfig.xla_options=None`` (the default) means :data:`BACKEND_DEFAULTS` for the backend in use
and the model's width, and ``{}`` means XLA's own settings. On GPU, models at least
``CUBLAS_FROM_HIDDEN_SIZE`` wide turn off XLA's Triton GEMM fusions, so every matmul goes to cuBLAS;
narrower ones keep XLA's settings. Measured on one H200 each time with both settings in one call
(benchmarks/RESULTS.md): at the Qwen2.5-0.5B shape (hidden 896) cuBLAS trained as fast (115.7k against
113.7k tokens/s) and compiled much faster (first step 11.2 s against 16.7 s; a packed ragged call meeting
7 new layouts 25.2 s against 35.5 s), most likely because XLA autotunes every Triton GEMM fusion while
compiling; at the SmolLM2-135M shape (hidden 576) Triton's fused GEMMs trained 12 % faster (250-251k
against 222-226k tokens/s), at equal compile time. CPU and TPU keep XLA's settings. ``GPU_OVERLAP_OPTIONS`` is an opt-in preset:
on 2 x H200 (jax 0.11.2) it changed data-parallel scaling by less than run-to-run noise, and an
FSDP run compiled with it did not finish within 4 minutes, so it is not switched on for users
(see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax

# Models at least this wide (hidden size) get the GPU default below; between the two measured widths, 576
# (Triton faster) and 896 (cuBLAS as fast, compiles faster).
CUBLAS_FROM_HIDDEN_SIZE = 768

# backend -> (options, the narrowest hidden size they apply to)
BACKEND_DEFAULTS: dict[str, tuple[dict[str, Any], int]] = {
    "gpu": ({"xla_gpu_enable_triton_gemm": False}, CUBLAS_FROM_HIDDEN_SIZE),
}


def resolve(options: Optional[dict[str, Any]], backend: Optional[str] = None, hidden_size: Optional[int] = None) -> dict[str, Any]:
    """The options programs compile with: ``options`` as given, or for None the backend's measured defaults
    for a model ``hidden_size`` wide (unknown width: the defaults apply), keeping those this XLA release
    accepts (a retired name is dropped, not an error, since the user did not ask for it)."""
    if options is not None:
        return dict(options)
    defaults, narrowest = BACKEND_DEFAULTS.get(backend or jax.default_backend(), ({}, 0))
    if hidden_size is not None and hidden_size < narrowest:
        return {}
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


@functools.lru_cache(maxsize=None)
def _accepted_together(items: tuple) -> None:
    """One scalar compile per set of options (a trainer and its sampler check the same set; a refusal is not cached)."""
    _compile_scalar(dict(items))


def check(options: dict[str, Any], where: str = "TrainConfig.xla_options") -> None:
    """Compile a scalar program with ``options`` so a bad name or value fails at construction, not mid-step."""
    if not options:
        return
    try:
        key = tuple(sorted(options.items()))
        hash(key)
    except TypeError:  # a value that cannot be a cache key: checked uncached
        key = None
    try:
        _accepted_together(key) if key is not None else _compile_scalar(options)
    except Exception as err:  # XLA raises JaxRuntimeError (INVALID_ARGUMENT) for unknown names and bad values
        raise ValueError(
            f"{where}={options!r} was refused by XLA ({err}); pass valid XLA option names and values "
            "(see xla/debug_options_flags.cc), or {} for XLA's defaults."
        ) from None
