"""The card's roof, measured: its bf16 matmul peak and its memory bandwidth, one probe each for every benchmark.

Why one module: the benchmarks had five probes (jax and torch, random data and ones, a wall clock around
single calls after one warm-up call). On one H200 (benchmarks/RESULTS.md, fifteenth session) the generation
benchmark's jax probe read 568 TFLOP/s where the training benchmark's torch probe read 762.7 on the same
machine, and earlier H100 runs of the jax probe ranged from 573 to 742. A roof or an MFU is only as good
as the figure it divides by, so every benchmark now takes it from here:

* **warmed up:** each probe first runs its kernel for ``WARMUP_S`` seconds, so the clocks have ramped;
* **bursts, not single calls:** a timed sample is ``BURST`` back-to-back kernels, so launch and host
  round trips are a small share of it; the figure is the median of ``SAMPLES`` bursts;
* **random data** (zeros or ones would flatter the matmul);
* **the matmul peak:** torch's cuBLAS GEMM, timed with CUDA events, where torch sees a CUDA device (the
  probe every MFU figure in RESULTS.md has used); jax's elsewhere (a TPU, or a CPU for smoke tests);
* **the bandwidth:** jax, a bf16 array read and written once per pass (``y * -1``), passes chained in one
  ``fori_loop`` so that each is a full read and write.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional

WARMUP_S = 0.5
BURST = 10
SAMPLES = 5
MATMUL_N = 8192
BANDWIDTH_ELEMENTS = 1 << 30  # 2 GiB of bf16


def _cuda_torch() -> Optional[Any]:
    """torch, where it is installed and sees a CUDA device; else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _warm_then_median(run_burst: Callable[[], float]) -> float:
    """Run bursts for ``WARMUP_S`` seconds untimed, then return the median of ``SAMPLES`` timed ones (seconds)."""
    start = time.perf_counter()
    while time.perf_counter() - start < WARMUP_S:
        run_burst()
    return statistics.median(run_burst() for _ in range(SAMPLES))


def _torch_matmul_peak(torch: Any, n: int) -> float:
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)

    def burst() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(BURST):
            a @ b
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    return 2 * n**3 * BURST / _warm_then_median(burst)


def _jax_matmul_peak(n: int) -> float:
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = (jax.random.normal(kb, (n, n), jnp.float32) * n**-0.5).astype(jnp.bfloat16)  # keeps x @ b at unit scale

    @jax.jit
    def chain(x, w):  # each product feeds the next, so XLA can neither hoist nor drop one
        return jax.lax.fori_loop(0, BURST, lambda _, y: y @ w, x)

    def burst() -> float:
        t = time.perf_counter()
        chain(a, b).block_until_ready()
        return time.perf_counter() - t

    return 2 * n**3 * BURST / _warm_then_median(burst)


def matmul_peak(n: int = MATMUL_N, *, probe: str = "auto") -> float:
    """bf16 matmul FLOP/s on random ``n`` x ``n`` operands. ``probe``: "auto" (torch's where it sees a CUDA device,
    else jax's on its default device) or "jax"."""
    if probe not in ("auto", "jax"):
        raise ValueError(f"probe={probe!r}: pick 'auto' or 'jax'")
    torch = _cuda_torch() if probe == "auto" else None
    return _torch_matmul_peak(torch, n) if torch is not None else _jax_matmul_peak(n)


def bandwidth(elements: int = BANDWIDTH_ELEMENTS) -> float:
    """Device memory bytes/s: a bf16 array of ``elements`` read and written once per pass, jax, on the default device."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (elements,), jnp.bfloat16)

    @jax.jit
    def passes(y):
        return jax.lax.fori_loop(0, BURST, lambda _, z: z * -1, y)

    def burst() -> float:
        t = time.perf_counter()
        passes(x).block_until_ready()
        return time.perf_counter() - t

    return 2 * x.nbytes * BURST / _warm_then_median(burst)


def device_name() -> str:
    """The card the probes ran on, as its driver names it (torch's where it sees CUDA, else jax's)."""
    torch = _cuda_torch()
    if torch is not None:
        return torch.cuda.get_device_name(0)
    import jax

    return str(jax.devices()[0].device_kind)


if __name__ == "__main__":  # python benchmarks/roof.py [--small]: the probes alone
    import argparse

    parser = argparse.ArgumentParser(description="The card's bf16 matmul peak and memory bandwidth, as the benchmarks "
                                                 "measure them.")
    parser.add_argument("--small", action="store_true", help="tiny sizes: a smoke test on a CPU")
    small = parser.parse_args().small
    peak = matmul_peak(512 if small else MATMUL_N)
    bw = bandwidth(1 << 20 if small else BANDWIDTH_ELEMENTS)
    print(f"{device_name()}: bf16 matmul peak {peak / 1e12:.1f} TFLOP/s, bandwidth {bw / 1e12:.3f} TB/s")
